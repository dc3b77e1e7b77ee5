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

# Architectures for the CUDA module: real code for Ampere to Hopper, PTX for the newest
# (sm_90 as both SASS and PTX). FASTREC_CUDA_ARCHS (CMake or environment variable, CMake's
# CUDA_ARCHITECTURES syntax, e.g. "90") narrows it for a quicker development build.
if(NOT DEFINED FASTREC_CUDA_ARCHS)
  if(DEFINED ENV{FASTREC_CUDA_ARCHS} AND NOT "$ENV{FASTREC_CUDA_ARCHS}" STREQUAL "")
    set(FASTREC_CUDA_ARCHS "$ENV{FASTREC_CUDA_ARCHS}")
  else()
    set(FASTREC_CUDA_ARCHS "80-real;86-real;89-real;90")
  endif()
endif()

# The CUDA runtime is linked statically: importing the module needs no libcudart and no driver;
# the driver is loaded at the first CUDA call.
if(FASTREC_BUILD_CUDA)
  enable_language(CUDA)  # at directory scope: CMake does not support it inside a function
  find_package(CUDAToolkit REQUIRED)
endif()

function(fastrec_add_cuda_module name)
  pybind11_add_module(${name} MODULE ${ARGN})
  set_target_properties(${name} PROPERTIES
    CUDA_ARCHITECTURES "${FASTREC_CUDA_ARCHS}"
    CUDA_RUNTIME_LIBRARY Static
    CUDA_STANDARD 17)
  target_include_directories(${name} PRIVATE ${CMAKE_CURRENT_SOURCE_DIR}/csrc/include)
  target_link_libraries(${name} PRIVATE CUDA::cudart_static)
  string(REPLACE ";" "," _archs "${FASTREC_CUDA_ARCHS}")
  target_compile_definitions(${name} PRIVATE FASTREC_CUDA_ARCH_LIST="${_archs}")
  target_compile_options(${name} PRIVATE $<$<COMPILE_LANGUAGE:CUDA>:--expt-relaxed-constexpr -lineinfo>)
endfunction()
