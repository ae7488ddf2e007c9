// Loading and storing rows of the element types in fastft.h on the CPU, converting to / from the compute type.
//
// bfloat16: the upper half of a float32; float32 -> bfloat16 rounds to nearest even and maps NaN to the
// quiet NaN 0x7FC0, as torch does. float16: the compiler's _Float16 (IEEE, round to nearest even);
// without it the library is built without float16 support (fastft_cpu_supports_dtype says so).
#pragma once

#include <stdint.h>
#include <string.h>

#include "fastft.h"

#if defined(__FLT16_MANT_DIG__)
#define FASTFT_HAVE_FLOAT16 1
#else
#define FASTFT_HAVE_FLOAT16 0
#endif

namespace fastft {

inline float bf16_to_float(uint16_t h) {
  uint32_t bits = (uint32_t)h << 16;
  float f;
  memcpy(&f, &bits, sizeof f);
  return f;
}

inline uint16_t float_to_bf16(float f) {
  uint32_t bits;
  memcpy(&bits, &f, sizeof bits);
  if (f != f) return 0x7FC0;
  return (uint16_t)((bits + 0x7FFFu + ((bits >> 16) & 1u)) >> 16);
}

inline bool dtype_supported(int dtype) {
  switch (dtype) {
    case FASTFT_FLOAT32:
    case FASTFT_BFLOAT16:
    case FASTFT_FLOAT64:
      return true;
    case FASTFT_FLOAT16:
      return FASTFT_HAVE_FLOAT16 != 0;
    default:
      return false;
  }
}

inline int64_t dtype_size(int dtype) {
  return dtype == FASTFT_FLOAT32 ? 4 : dtype == FASTFT_FLOAT64 ? 8 : 2;
}

// dst[j] = row[j] for j < n, converted to T (float or double).
template <typename T>
void load_row(T* __restrict dst, const void* row, int dtype, int64_t n) {
  switch (dtype) {
    case FASTFT_FLOAT32: {
      const float* src = (const float*)row;
      for (int64_t j = 0; j < n; ++j) dst[j] = (T)src[j];
      break;
    }
    case FASTFT_FLOAT64: {
      const double* src = (const double*)row;
      for (int64_t j = 0; j < n; ++j) dst[j] = (T)src[j];
      break;
    }
    case FASTFT_BFLOAT16: {
      const uint16_t* src = (const uint16_t*)row;
      for (int64_t j = 0; j < n; ++j) dst[j] = (T)bf16_to_float(src[j]);
      break;
    }
#if FASTFT_HAVE_FLOAT16
    case FASTFT_FLOAT16: {
      const _Float16* src = (const _Float16*)row;
      for (int64_t j = 0; j < n; ++j) dst[j] = (T)(float)src[j];
      break;
    }
#endif
    default:
      break;
  }
}

// row[j] = src[j] for j < n, converted from T to dtype, rounding to nearest even.
template <typename T>
void store_row(void* row, const T* __restrict src, int dtype, int64_t n) {
  switch (dtype) {
    case FASTFT_FLOAT32: {
      float* dst = (float*)row;
      for (int64_t j = 0; j < n; ++j) dst[j] = (float)src[j];
      break;
    }
    case FASTFT_FLOAT64: {
      double* dst = (double*)row;
      for (int64_t j = 0; j < n; ++j) dst[j] = (double)src[j];
      break;
    }
    case FASTFT_BFLOAT16: {
      uint16_t* dst = (uint16_t*)row;
      for (int64_t j = 0; j < n; ++j) dst[j] = float_to_bf16((float)src[j]);
      break;
    }
#if FASTFT_HAVE_FLOAT16
    case FASTFT_FLOAT16: {
      _Float16* dst = (_Float16*)row;
      for (int64_t j = 0; j < n; ++j) dst[j] = (_Float16)(float)src[j];
      break;
    }
#endif
    default:
      break;
  }
}

}  // namespace fastft
