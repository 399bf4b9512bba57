# The web page in ui/ driven in headless Chromium (playwright-core from npm,
# Debian's chromium) against a real engramd serving it with --http_ui_dir.
# Screenshots land in ui-screenshots/ of this build directory.
add_test(NAME integration.ui
  COMMAND sh ${PROJECT_SOURCE_DIR}/tests/ui/run_ui_test.sh $<TARGET_FILE:engramd>
          ${CMAKE_CURRENT_BINARY_DIR}/ui-screenshots)
set_tests_properties(integration.ui PROPERTIES LABELS "integration" TIMEOUT 600)
