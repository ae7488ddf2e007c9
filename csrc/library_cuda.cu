// libfastft_cuda: identity (ABI version, build id), the device check and the per-thread error message.
#include <stdarg.h>
#include <stdio.h>

#include "cuda_common.cuh"

#ifndef FASTFT_BUILD_ID
#define FASTFT_BUILD_ID "unset"
#endif

namespace {
thread_local char last_error[2048];
}

int fastft::set_error(const char* format, ...) {
  va_list args;
  va_start(args, format);
  vsnprintf(last_error, sizeof last_error, format, args);
  va_end(args);
  return 1;
}

int fastft::require_device() {
  int count = 0;
  cudaError_t err = cudaGetDeviceCount(&count);
  if (err != cudaSuccess) {
    cudaGetLastError();  // clear it: the library stays usable if a device appears (it will not, but be tidy)
    return set_error("no CUDA device: cudaGetDeviceCount failed with %s (%s)", cudaGetErrorName(err),
                     cudaGetErrorString(err));
  }
  if (count < 1) return set_error("no CUDA device: cudaGetDeviceCount found none");
  return 0;
}

int fastft::check_launch(const char* what) {
  cudaError_t err = cudaGetLastError();
  if (err != cudaSuccess) return set_error("%s: kernel launch failed: %s (%s)", what, cudaGetErrorName(err),
                                           cudaGetErrorString(err));
  return 0;
}

extern "C" {

FASTFT_API int fastft_cuda_abi_version(void) { return FASTFT_C_ABI_VERSION; }

FASTFT_API const char* fastft_cuda_build_id(void) { return "fastft-build-id:" FASTFT_BUILD_ID; }

FASTFT_API const char* fastft_cuda_last_error(void) { return last_error; }

FASTFT_API int fastft_cuda_args_size(void) { return (int)sizeof(fastft_rows_args); }

FASTFT_API int fastft_cuda_device_count(void) {
  if (fastft::require_device()) return -1;
  int count = 0;
  cudaGetDeviceCount(&count);
  return count;
}

}  // extern "C"
