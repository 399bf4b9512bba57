# engram-client (client/python): installs the package into a fresh virtual
# environment made from Debian's Python, offline, and runs its pytest suite
# against this build's engramd. Included from tests/integration/CMakeLists.txt.
add_test(NAME integration.python_client
  COMMAND ${ENGRAM_SYSTEM_PYTHON} ${CMAKE_CURRENT_LIST_DIR}/tests/run_in_venv.py
          --engramd $<TARGET_FILE:engramd>)
set_tests_properties(integration.python_client PROPERTIES LABELS "integration" TIMEOUT 600)
