# Helpers of CMakeLists.txt: where libtorch is, and the CUDA toolkit that a CUDA
# build of libtorch needs before find_package(Torch) can succeed.

# Root of the libtorch install (the dir holding lib/ and share/cmake/Torch/).
function(instdisc_locate_torch out)
  set(cands "")
  if(Torch_DIR)
    list(APPEND cands "${Torch_DIR}")
  endif()
  foreach(p IN LISTS CMAKE_PREFIX_PATH)
    list(APPEND cands "${p}/Torch" "${p}/share/cmake/Torch")
  endforeach()
  if(DEFINED ENV{CMAKE_PREFIX_PATH})
    string(REPLACE ":" ";" _env "$ENV{CMAKE_PREFIX_PATH}")
    foreach(p IN LISTS _env)
      list(APPEND cands "${p}/Torch" "${p}/share/cmake/Torch")
    endforeach()
  endif()
  foreach(c IN LISTS cands)
    if(EXISTS "${c}/TorchConfig.cmake")
      get_filename_component(root "${c}/../../.." ABSOLUTE)
      set(${out} "${root}" PARENT_SCOPE)
      return()
    endif()
  endforeach()
  message(FATAL_ERROR "TorchConfig.cmake not found: configure with "
                      "-DCMAKE_PREFIX_PATH=$(python -c 'import torch.utils; print(torch.utils.cmake_prefix_path)')")
endfunction()

# Header and library dirs of the pip CUDA packages next to a pip-installed torch
# (site-packages/nvidia/*/{include,lib}); empty for other installs.
function(instdisc_pip_cuda_dirs torch_root inc_out lib_out)
  file(GLOB _inc LIST_DIRECTORIES true "${torch_root}/../nvidia/*/include")
  file(GLOB _lib LIST_DIRECTORIES true "${torch_root}/../nvidia/*/lib")
  set(${inc_out} "${_inc}" PARENT_SCOPE)
  set(${lib_out} "${_lib}" PARENT_SCOPE)
endfunction()

# Find the toolkit root from CMAKE_CUDA_COMPILER, CUDAToolkit_ROOT, $CUDA_HOME,
# $CUDA_PATH or nvcc on PATH. nvcc may be a symlink or a wrapper script outside
# the toolkit (e.g. /usr/local/bin/nvcc running <root>/bin/nvcc): symlinks are
# resolved, and nvcc itself reports its TOP dir otherwise. Sets the cache
# variables FindCUDA / FindCUDAToolkit / enable_language(CUDA) use, and locates
# nvrtc (in the pip package dir when the toolkit has none). out: root or "".
function(instdisc_find_cuda_toolkit out torch_root)
  set(${out} "" PARENT_SCOPE)
  set(nvcc "")
  if(CMAKE_CUDA_COMPILER)
    set(nvcc "${CMAKE_CUDA_COMPILER}")
  elseif(CUDAToolkit_ROOT AND EXISTS "${CUDAToolkit_ROOT}/bin/nvcc")
    set(nvcc "${CUDAToolkit_ROOT}/bin/nvcc")
  elseif(DEFINED ENV{CUDA_HOME} AND EXISTS "$ENV{CUDA_HOME}/bin/nvcc")
    set(nvcc "$ENV{CUDA_HOME}/bin/nvcc")
  elseif(DEFINED ENV{CUDA_PATH} AND EXISTS "$ENV{CUDA_PATH}/bin/nvcc")
    set(nvcc "$ENV{CUDA_PATH}/bin/nvcc")
  else()
    find_program(INSTDISC_NVCC nvcc PATHS /usr/local/cuda/bin)
    if(INSTDISC_NVCC)
      set(nvcc "${INSTDISC_NVCC}")
    endif()
  endif()
  if(NOT nvcc)
    return()
  endif()
  get_filename_component(_real "${nvcc}" REALPATH)
  get_filename_component(_bin "${_real}" DIRECTORY)
  get_filename_component(root "${_bin}" DIRECTORY)
  if(NOT EXISTS "${root}/include/cuda_runtime.h")
    execute_process(COMMAND "${nvcc}" -v --dryrun -x cu -c /dev/null -o /dev/null
                    OUTPUT_VARIABLE _o ERROR_VARIABLE _e RESULT_VARIABLE _rc)
    if("${_o}${_e}" MATCHES "#\\$ TOP=([^\n]+)")
      get_filename_component(root "${CMAKE_MATCH_1}" REALPATH)
    endif()
  endif()
  if(NOT EXISTS "${root}/include/cuda_runtime.h" OR NOT EXISTS "${root}/bin/nvcc")
    message(STATUS "instdisc: '${nvcc}' is not part of a usable CUDA toolkit")
    return()
  endif()
  set(CMAKE_CUDA_COMPILER "${root}/bin/nvcc" CACHE FILEPATH "CUDA compiler" FORCE)
  set(CUDA_TOOLKIT_ROOT_DIR "${root}" CACHE PATH "CUDA toolkit root" FORCE)
  set(CUDAToolkit_ROOT "${root}" CACHE PATH "CUDA toolkit root" FORCE)
  if(NOT CUDA_nvrtc_LIBRARY)
    instdisc_pip_cuda_dirs("${torch_root}" _inc _lib)
    find_library(CUDA_nvrtc_LIBRARY NAMES nvrtc libnvrtc.so.13 libnvrtc.so.12
                 PATHS "${root}/lib64" "${root}/lib" ${_lib} NO_DEFAULT_PATH)
  endif()
  set(${out} "${root}" PARENT_SCOPE)
endfunction()

# Older CMake (3.25 here) knows no C++20 flag for nvcc, and TorchConfig sets
# CMAKE_CUDA_STANDARD 20 (then try_run()s CUDA code when TORCH_CUDA_ARCH_LIST is
# unset). Newer CMake sets these itself when CUDA is enabled.
macro(instdisc_cuda_cxx20_flags)
  if(NOT CMAKE_CUDA20_STANDARD_COMPILE_OPTION)
    set(CMAKE_CUDA20_STANDARD_COMPILE_OPTION "-std=c++20")
    set(CMAKE_CUDA20_EXTENSION_COMPILE_OPTION "-std=c++20")
  endif()
endmacro()

# CPU-only fallback when libtorch was built with CUDA but no CUDA toolkit is
# installed (TorchConfig then refuses to load): an INTERFACE target over
# libtorch's CPU libraries (torch_cpu, c10), which do not depend on CUDA.
function(instdisc_torch_cpu_target torch_root)
  find_library(INSTDISC_TORCH_CPU_LIB torch_cpu PATHS "${torch_root}/lib" NO_DEFAULT_PATH REQUIRED)
  find_library(INSTDISC_C10_LIB c10 PATHS "${torch_root}/lib" NO_DEFAULT_PATH REQUIRED)
  add_library(instdisc_torch_cpu INTERFACE)
  target_include_directories(instdisc_torch_cpu SYSTEM INTERFACE
                             "${torch_root}/include" "${torch_root}/include/torch/csrc/api/include")
  target_link_libraries(instdisc_torch_cpu INTERFACE "${INSTDISC_TORCH_CPU_LIB}" "${INSTDISC_C10_LIB}")
  # Older TorchConfig files carry the libstdc++ ABI flag in TORCH_CXX_FLAGS.
  file(STRINGS "${torch_root}/share/cmake/Torch/TorchConfig.cmake" _flags REGEX "set\\(TORCH_CXX_FLAGS \"[^\"]+\"\\)")
  if(_flags MATCHES "set\\(TORCH_CXX_FLAGS \"([^\"]+)\"\\)")
    separate_arguments(_opts UNIX_COMMAND "${CMAKE_MATCH_1}")
    target_compile_options(instdisc_torch_cpu INTERFACE ${_opts})
  endif()
endfunction()
