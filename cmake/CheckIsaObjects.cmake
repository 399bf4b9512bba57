# Fails when a per-ISA kernel object (kernels_avx*.o) defines a weak or
# unique symbol, i.e. out-of-line code of an inline function or template
# (a std::vector member, an Eigen template). The linker keeps one copy of
# such a symbol for the whole program, and if it keeps the one built with
# -mavx2 / -mavx512* flags, code running on a CPU without them calls it
# and crashes (SIGILL). Run with -DNM=<nm> -DOBJECTS=<a|b|c>.
string(REPLACE "|" ";" objects "${OBJECTS}")
set(checked 0)
foreach(obj IN LISTS objects)
  get_filename_component(name "${obj}" NAME)
  if(NOT name MATCHES "^kernels_avx")
    continue()
  endif()
  math(EXPR checked "${checked} + 1")
  execute_process(COMMAND "${NM}" -C --defined-only "${obj}"
                  OUTPUT_VARIABLE symbols RESULT_VARIABLE rc)
  if(NOT rc EQUAL 0)
    message(FATAL_ERROR "nm failed on ${obj}")
  endif()
  string(REPLACE "\n" ";" lines "${symbols}")
  foreach(line IN LISTS lines)
    # DW.ref.__gxx_personality_v0 is the exception-handling personality
    # reference every C++ object carries: data, not code.
    if(line MATCHES " [WVu] " AND NOT line MATCHES "DW\\.ref\\.__gxx_personality_v0")
      message(FATAL_ERROR "${name} defines a shared inline symbol: ${line}")
    endif()
  endforeach()
endforeach()
if(checked LESS 3)
  message(FATAL_ERROR "expected the AVX2, AVX-512 and AVX-512 BF16 kernel objects, found ${checked}")
endif()
message(STATUS "${checked} per-ISA kernel objects define no shared inline code")
