# Fails when any of FILES includes a gRPC, protobuf or prometheus header.
separate_arguments(file_list UNIX_COMMAND "${FILES}")
foreach(f IN LISTS file_list)
  file(STRINGS "${f}" bad REGEX "^[ \t]*#[ \t]*include[ \t]*[<\"](grpc|grpcpp|google/protobuf|prometheus)/")
  if(bad)
    message(FATAL_ERROR "core must not depend on gRPC/protobuf/prometheus: ${f}: ${bad}")
  endif()
endforeach()
file(TOUCH "${STAMP}")
