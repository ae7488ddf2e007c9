// libfastft_cpu: identity (ABI version, build id), capabilities and the per-thread error message.
#include <stdarg.h>
#include <stdio.h>

#ifdef _OPENMP
#include <omp.h>
#endif

#include "dtypes_cpu.h"
#include "errors.h"
#include "fastft.h"

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

extern "C" {

FASTFT_API int fastft_cpu_abi_version(void) { return FASTFT_C_ABI_VERSION; }

// "fastft-build-id:" + the key fastft/build.py computed from the sources, compiler and flags.
FASTFT_API const char* fastft_cpu_build_id(void) { return "fastft-build-id:" FASTFT_BUILD_ID; }

FASTFT_API const char* fastft_cpu_last_error(void) { return last_error; }

FASTFT_API int fastft_cpu_args_size(void) { return (int)sizeof(fastft_rows_args); }

FASTFT_API int fastft_cpu_max_threads(void) {
#ifdef _OPENMP
  return omp_get_max_threads();
#else
  return 0;
#endif
}

FASTFT_API int fastft_cpu_supports_dtype(int dtype) { return fastft::dtype_supported(dtype) ? 1 : 0; }

}  // extern "C"
