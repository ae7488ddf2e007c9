/* The C interface of fastft's two shared libraries (libfastft_cpu, libfastft_cuda).
 *
 * Plain C: pointers, shapes, strides, a CUDA stream as void*. No torch headers, so a library built once
 * works with every torch version. fastft/_ext.py mirrors these declarations with ctypes (and checks
 * FASTFT_C_ABI_VERSION and sizeof(fastft_rows_args) when it loads a library).
 *
 * Every entry point returns 0 on success and a non-zero code on failure; the library's
 * *_last_error() then returns a message for the calling thread.
 */
#ifndef FASTFT_H
#define FASTFT_H

#include <stdint.h>

#define FASTFT_C_ABI_VERSION 1

#if defined(__GNUC__)
#define FASTFT_API __attribute__((visibility("default")))
#else
#define FASTFT_API
#endif

/* Element types (codes shared with fastft/_ext.py). */
enum fastft_dtype { FASTFT_FLOAT32 = 0, FASTFT_BFLOAT16 = 1, FASTFT_FLOAT16 = 2, FASTFT_FLOAT64 = 3 };

/* One pass over the rows of a (rows x d) matrix: the pipeline of fastft.ops.hadamard and
 * fastft.ops.fake_quantize, each step optional, for each row independently:
 *
 *   v   = x[r, :]                    converted to the compute type (float64 for float64 x, else float32)
 *   v   = keep_in[r, :] ? v : 0      if keep_in (the clipped straight-through mask, backward)
 *   v   = v H_d^T / sqrt(d)          if rotate: butterflies of Sylvester's S_m on each of the k
 *                                    length-m segments, then the k x k product with hk, then one
 *                                    multiplication by (compute type) row_scale
 *   v   = fake_quantize(v)           if quant: per group of group_size elements (0: the whole row), or
 *                                    with the tensor-wide (max, min) in stats; keep_out = not clamped
 *   out[r, :] = v                    converted to out_dtype (round to nearest even)
 *
 * The quantization formulas are those of fastft/ops/fake_quantize.py, in the same order of operations
 * (csrc/quantize.h); the libraries are compiled without floating-point contraction.
 */
typedef struct fastft_rows_args {
  const void* x;            /* rows x d, element (r, j) at x[r * x_row_stride + j] */
  void* out;                /* rows x d, element (r, j) at out[r * out_row_stride + j] */
  int64_t x_row_stride;     /* in elements; >= 0 (0 repeats one row) */
  int64_t out_row_stride;   /* in elements; >= d */
  int64_t rows;
  int64_t d;
  int32_t x_dtype;          /* enum fastft_dtype */
  int32_t out_dtype;        /* enum fastft_dtype; float64 only with float64 x */
  /* rotation: d = k * m, m a power of two */
  int32_t rotate;
  int32_t k;                /* 1 (Sylvester only) or the order of the K-factor */
  const int8_t* hk;         /* k x k, +1/-1, row-major: the matrix applied on the left of each column
                               of the k x m view (H_K for the transform, H_K^T for its inverse); NULL if k == 1.
                               For the CUDA library a device pointer. */
  double row_scale;         /* 1 / sqrt(d), rounded once to the compute type */
  const uint8_t* keep_in;   /* NULL, or rows x d contiguous, 0 / 1 */
  /* fake quantization */
  int32_t quant;
  int32_t bits;             /* 2..8 */
  int32_t symmetric;
  int32_t pad0;
  double clip_ratio;        /* in (0, 1], rounded once to the compute type */
  double scale_eps;         /* SCALE_EPS, rounded once to the compute type */
  int64_t group_size;       /* 0: one group per row; else divides d */
  const double* stats;      /* NULL, or {max, min} of the whole tensor (granularity "tensor"); host memory */
  uint8_t* keep_out;        /* NULL, or rows x d contiguous: 1 where the code was not clamped */
} fastft_rows_args;

/* Dequantize a bitsandbytes 4-bit weight (fastft/ops/dequantize_4bit.py): element i of the flat weight
 * is code[c_i] * absmax[i / blocksize], c_i the high nibble of packed[i / 2] for even i, the low nibble
 * for odd i. Nested absmax (absmax_codes != NULL): absmax[j] = code2[absmax_codes[j]] *
 * absmax2[j / blocksize2] + offset, computed on the fly in float32. All pointers are device pointers. */
typedef struct fastft_dequantize_4bit_args {
  const uint8_t* packed;
  const float* absmax;         /* float32 per block, or NULL when nested */
  const uint8_t* absmax_codes; /* nested: uint8 per block */
  const float* code2;          /* nested: 256-entry table */
  const float* absmax2;        /* nested: float32 per blocksize2 blocks of absmax */
  const float* code;           /* 16-entry table (NF4 / FP4) */
  void* out;                   /* n elements of out_dtype */
  int64_t n;
  int64_t blocksize;
  int64_t blocksize2;
  float offset;
  int32_t out_dtype;
} fastft_dequantize_4bit_args;

#ifdef __cplusplus
extern "C" {
#endif

/* libfastft_cpu */
FASTFT_API int fastft_cpu_abi_version(void);
FASTFT_API const char* fastft_cpu_build_id(void);
FASTFT_API const char* fastft_cpu_last_error(void);
FASTFT_API int fastft_cpu_args_size(void);
FASTFT_API int fastft_cpu_max_threads(void);          /* OpenMP threads available; 0 if built without OpenMP */
FASTFT_API int fastft_cpu_supports_dtype(int dtype);
FASTFT_API int fastft_cpu_rows(const fastft_rows_args* args, int num_threads);
/* {max, min} over a (rows x d) matrix (NaN if any element is NaN) into result[0], result[1]. */
FASTFT_API int fastft_cpu_minmax(const void* x, int32_t dtype, int64_t x_row_stride, int64_t rows, int64_t d,
                      double* result, int num_threads);

/* libfastft_cuda */
FASTFT_API int fastft_cuda_abi_version(void);
FASTFT_API const char* fastft_cuda_build_id(void);
FASTFT_API const char* fastft_cuda_last_error(void);
FASTFT_API int fastft_cuda_args_size(void);
FASTFT_API int fastft_cuda_device_count(void);        /* >= 1, or -1 with last_error "no CUDA device ..." */
FASTFT_API int64_t fastft_cuda_max_row(int32_t compute_dtype);  /* the longest row fastft_cuda_rows takes */
/* device: the CUDA device index of the tensors; stream: a cudaStream_t of that device (NULL: its default stream).
 * fastft_cuda_rows supports granularity "token" only: group_size 0 and stats NULL. */
FASTFT_API int fastft_cuda_rows(const fastft_rows_args* args, int device, void* stream);
FASTFT_API int fastft_cuda_dequantize_4bit(const fastft_dequantize_4bit_args* args, int device, void* stream);

#ifdef __cplusplus
}
#endif

#endif /* FASTFT_H */
