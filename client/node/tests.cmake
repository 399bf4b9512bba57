# The Node.js / TypeScript client package (client/node): its type check, its
# node:test suite against real engramd processes, and an install from a
# packed tarball (scripts/run_tests.sh). Included from
# tests/integration/CMakeLists.txt; needs node, npm and the npm registry or a
# warm npm cache.
find_program(ENGRAM_NODE node)
find_program(ENGRAM_NPM npm)
find_program(ENGRAM_BASH bash)
if(ENGRAM_NODE AND ENGRAM_NPM AND ENGRAM_BASH)
  add_test(NAME integration.node_client
    COMMAND ${ENGRAM_BASH} ${CMAKE_CURRENT_LIST_DIR}/scripts/run_tests.sh $<TARGET_FILE:engramd>)
  set_tests_properties(integration.node_client PROPERTIES LABELS "integration" TIMEOUT 600)
else()
  message(STATUS "node, npm or bash not found: integration.node_client is not registered")
endif()
