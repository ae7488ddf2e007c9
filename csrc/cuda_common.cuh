// Shared by the CUDA sources: element loads / stores, block reductions, the device check.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>
#include <stdint.h>

#include "errors.h"
#include "fastft.h"

namespace fastft {

// 0 if a CUDA device is usable, else the error code with the message "no CUDA device ...".
int require_device();

// The error of the last launch (cudaGetLastError), as an error code with a message naming `what`.
int check_launch(const char* what);

__host__ __device__ inline int64_t dtype_bytes(int dtype) { return dtype == FASTFT_FLOAT32 ? 4 : dtype == FASTFT_FLOAT64 ? 8 : 2; }

template <typename T>
__device__ __forceinline__ T load_element(const void* base, int dtype, int64_t i) {
  switch (dtype) {
    case FASTFT_FLOAT32:
      return (T)((const float*)base)[i];
    case FASTFT_FLOAT64:
      return (T)((const double*)base)[i];
    case FASTFT_BFLOAT16:
      return (T)__bfloat162float(((const __nv_bfloat16*)base)[i]);
    default:
      return (T)__half2float(((const __half*)base)[i]);
  }
}

// Round to nearest even into dtype (a double destined for float32 / 16-bit goes through float only when
// the input was float64, which the Python side never combines with a 16-bit output).
template <typename T>
__device__ __forceinline__ void store_element(void* base, int dtype, int64_t i, T v) {
  switch (dtype) {
    case FASTFT_FLOAT32:
      ((float*)base)[i] = (float)v;
      break;
    case FASTFT_FLOAT64:
      ((double*)base)[i] = (double)v;
      break;
    case FASTFT_BFLOAT16:
      ((__nv_bfloat16*)base)[i] = __float2bfloat16_rn((float)v);
      break;
    default:
      ((__half*)base)[i] = __float2half_rn((float)v);
      break;
  }
}

}  // namespace fastft
