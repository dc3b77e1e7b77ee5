# FASTREC_CUDA=AUTO|ON|OFF (CMake variable or environment variable).
#   AUTO: build the CUDA module when a CUDA compiler is found; a machine without nvcc still
#         gets a working CPU build.
#   ON:   a missing CUDA compiler is an error.
#   OFF:  never build it.
if(NOT DEFINED FASTREC_CUDA)
  if(DEFINED ENV{FASTREC_CUDA})
    set(FASTREC_CUDA "$ENV{FASTREC_CUDA}")
  else()
    set(FASTREC_CUDA AUTO)
  endif()
endif()
string(TOUPPER "${FASTREC_CUDA}" FASTREC_CUDA)
if(NOT FASTREC_CUDA MATCHES "^(AUTO|ON|OFF)$")
  message(FATAL_ERROR "FASTREC_CUDA must be AUTO, ON or OFF (got '${FASTREC_CUDA}')")
endif()

set(FASTREC_BUILD_CUDA OFF)
if(NOT FASTREC_CUDA STREQUAL "OFF")
  include(CheckLanguage)
  check_language(CUDA)
  if(CMAKE_CUDA_COMPILER)
    set(FASTREC_BUILD_CUDA ON)
    message(STATUS "fastrec: CUDA compiler found: ${CMAKE_CUDA_COMPILER}")
  elseif(FASTREC_CUDA STREQUAL "ON")
    message(FATAL_ERROR "FASTREC_CUDA=ON but no CUDA compiler was found (set CUDACXX or put nvcc on PATH)")
  else()
    message(STATUS "fastrec: no CUDA compiler found; building the CPU module only")
  endif()
endif()

# Architectures for the CUDA module: real code for Ampere to Hopper, PTX for the newest.
set(FASTREC_CUDA_ARCHS "80-real;86-real;89-real;90")

function(fastrec_add_cuda_module name)
  enable_language(CUDA)
  pybind11_add_module(${name} MODULE ${ARGN})
  set_target_properties(${name} PROPERTIES CUDA_ARCHITECTURES "${FASTREC_CUDA_ARCHS}")
  target_include_directories(${name} PRIVATE ${CMAKE_CURRENT_SOURCE_DIR}/csrc/include)
endfunction()
