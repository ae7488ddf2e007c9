// CUDA kernel of fastft.ops.dequantize_4bit: bitsandbytes NF4 / FP4 weights (fastft.h,
// fastft_dequantize_4bit_args), with plain or nested (double-quantized) absmax.
//
// One thread per packed byte (a grid-stride loop): the high nibble is element 2i, the low nibble element
// 2i + 1; the 16-entry code table sits in shared memory. With nested quantization each element decodes
// its block's absmax as code2[q] * absmax2[j / blocksize2] + offset, two float32 operations rounded
// separately (__fmul_rn, __fadd_rn), as the reference's unnest_absmax computes it.
#include <stdint.h>

#include "cuda_common.cuh"

namespace fastft {
namespace {

__device__ __forceinline__ float block_absmax(const fastft_dequantize_4bit_args& p, int64_t block) {
  if (p.absmax) return p.absmax[block];
  const float code2 = p.code2[p.absmax_codes[block]];
  return __fadd_rn(__fmul_rn(code2, p.absmax2[block / p.blocksize2]), p.offset);
}

template <typename OUT>
__device__ __forceinline__ void store(void* out, int64_t i, float v);
template <>
__device__ __forceinline__ void store<float>(void* out, int64_t i, float v) { ((float*)out)[i] = v; }
template <>
__device__ __forceinline__ void store<double>(void* out, int64_t i, float v) { ((double*)out)[i] = (double)v; }
template <>
__device__ __forceinline__ void store<__nv_bfloat16>(void* out, int64_t i, float v) {
  ((__nv_bfloat16*)out)[i] = __float2bfloat16_rn(v);
}
template <>
__device__ __forceinline__ void store<__half>(void* out, int64_t i, float v) { ((__half*)out)[i] = __float2half_rn(v); }

template <typename OUT>
__global__ void dequantize_4bit_kernel(fastft_dequantize_4bit_args p) {
  __shared__ float code[16];
  if (threadIdx.x < 16) code[threadIdx.x] = p.code[threadIdx.x];
  __syncthreads();
  const int64_t bytes = (p.n + 1) / 2;
  for (int64_t b = blockIdx.x * (int64_t)blockDim.x + threadIdx.x; b < bytes; b += (int64_t)gridDim.x * blockDim.x) {
    const unsigned byte = p.packed[b];
    const int64_t i = 2 * b;
    store<OUT>(p.out, i, __fmul_rn(code[byte >> 4], block_absmax(p, i / p.blocksize)));
    if (i + 1 < p.n) store<OUT>(p.out, i + 1, __fmul_rn(code[byte & 15u], block_absmax(p, (i + 1) / p.blocksize)));
  }
}

}  // namespace
}  // namespace fastft

extern "C" {

FASTFT_API int fastft_cuda_dequantize_4bit(const fastft_dequantize_4bit_args* a, int device, void* stream) {
  using namespace fastft;
  try {
    if (!a) return set_error("fastft_cuda_dequantize_4bit: args is NULL");
    if (int err = require_device()) return err;
    if (a->n < 0 || a->blocksize < 1) return set_error("fastft_cuda_dequantize_4bit: n=%lld, blocksize=%lld",
                                                       (long long)a->n, (long long)a->blocksize);
    if (a->n == 0) return 0;
    if (!a->packed || !a->code || !a->out) return set_error("fastft_cuda_dequantize_4bit: a pointer is NULL");
    if (!a->absmax && (!a->absmax_codes || !a->code2 || !a->absmax2 || a->blocksize2 < 1))
      return set_error("fastft_cuda_dequantize_4bit: give absmax, or absmax_codes, code2, absmax2 and blocksize2");
    cudaError_t err = cudaSetDevice(device);
    if (err != cudaSuccess)
      return set_error("fastft_cuda_dequantize_4bit: cudaSetDevice(%d): %s", device, cudaGetErrorString(err));
    const int threads = 256;
    const int64_t bytes = (a->n + 1) / 2;
    const int64_t blocks = (bytes + threads - 1) / threads;
    const unsigned grid = (unsigned)(blocks < (1 << 20) ? blocks : (1 << 20));
    cudaStream_t s = (cudaStream_t)stream;
    switch (a->out_dtype) {
      case FASTFT_FLOAT32: dequantize_4bit_kernel<float><<<grid, threads, 0, s>>>(*a); break;
      case FASTFT_FLOAT64: dequantize_4bit_kernel<double><<<grid, threads, 0, s>>>(*a); break;
      case FASTFT_BFLOAT16: dequantize_4bit_kernel<__nv_bfloat16><<<grid, threads, 0, s>>>(*a); break;
      case FASTFT_FLOAT16: dequantize_4bit_kernel<__half><<<grid, threads, 0, s>>>(*a); break;
      default: return set_error("fastft_cuda_dequantize_4bit: bad dtype code %d", a->out_dtype);
    }
    return check_launch("fastft_cuda_dequantize_4bit");
  }
  FASTFT_CATCH_ALL
}

}  // extern "C"
