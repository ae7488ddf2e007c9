// CUDA kernel of fastft.ops.hadamard_transform and the fused per-token fake quantization (fastft.h,
// fastft_rows_args with group_size 0 and no stats).
//
// One thread block per row (a grid-stride loop over rows). With rotation the row lives in shared memory
// in the compute type (float; double for float64), d·sizeof(T) <= 128 KiB:
//
//   A. m >= 8: each thread takes chunks of 8 contiguous elements straight from global memory (masked by
//      keep_in), runs the butterfly stages h = 1, 2, 4 in registers and h = 8 .. 128 (while h < m)
//      across the 32 lanes of its warp with __shfl_xor_sync — lane l exchanges with lane l ^ (h/8); the
//      lower lane keeps u + v, the upper u - v — then stores the chunk to shared memory. A warp holds 32
//      consecutive chunks (256 elements), so every pair of these stages is inside one warp.
//   B. the stages h = 256 .. m/2 (and every stage when m < 8) over shared memory, one barrier per stage.
//   C. each thread computes its outputs idx = tid + j·blockDim (j < PER_THREAD) into registers: for k > 1
//      the sum over c = 0 .. k-1 of ±buf[c·m + idx % m] with the signs of hk row idx / m, then the
//      multiplication by row_scale; the max and min of the row come from a block reduction; then the
//      quantization of csrc/quantize.h, and the stores.
//
// Every stage is the reference's operation on the same operands, so for k = 1 the transform equals the
// reference bit for bit; the k-sum is in the CPU kernel's order. The library is compiled with
// --fmad=false (products rounded before they are added, as in torch) and uses IEEE division and rint.
// Without rotation, step C reads the row from global memory and there is no shared buffer.
#include <math.h>
#include <stdint.h>

#include "cuda_common.cuh"
#include "quantize.h"

namespace fastft {
namespace {

constexpr int kMaxThreads = 1024;
constexpr int64_t kMaxRowBytes = 128 * 1024;
constexpr int kShuffleSpan = 256;  // elements a warp holds in phase A: 32 lanes x 8

struct RowsParams {
  const void* x;
  void* out;
  const int8_t* hk;
  const uint8_t* keep_in;
  uint8_t* keep_out;
  int64_t x_row_stride, out_row_stride, rows;
  int d, m, k;
  int x_dtype, out_dtype, rotate, quant, bits, symmetric;
  double row_scale, clip_ratio, scale_eps;
};

template <typename T>
__device__ __forceinline__ T shfl_xor(T v, int mask) {
  return __shfl_xor_sync(0xffffffffu, v, mask);
}

// The butterfly stages h = 1, 2, 4 on eight values in registers.
template <typename T>
__device__ __forceinline__ void butterflies8(T (&a)[8]) {
#pragma unroll
  for (int t = 0; t < 8; t += 2) {
    T u = a[t], w = a[t + 1];
    a[t] = u + w;
    a[t + 1] = u - w;
  }
#pragma unroll
  for (int t = 0; t < 8; t += 4) {
#pragma unroll
    for (int s = 0; s < 2; ++s) {
      T u = a[t + s], w = a[t + s + 2];
      a[t + s] = u + w;
      a[t + s + 2] = u - w;
    }
  }
#pragma unroll
  for (int s = 0; s < 4; ++s) {
    T u = a[s], w = a[s + 4];
    a[s] = u + w;
    a[s + 4] = u - w;
  }
}

// max, min and "any NaN" over the block; every thread gets the result.
template <typename T>
__device__ void block_max_min(T& hi, T& lo, int& nan) {
  __shared__ T s_hi[32], s_lo[32];
  __shared__ int s_nan[32];
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, warps = blockDim.x >> 5;
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) {
    T h = shfl_xor(hi, o), l = shfl_xor(lo, o);
    int n = __shfl_xor_sync(0xffffffffu, nan, o);
    hi = h > hi ? h : hi;
    lo = l < lo ? l : lo;
    nan |= n;
  }
  if (lane == 0) {
    s_hi[warp] = hi;
    s_lo[warp] = lo;
    s_nan[warp] = nan;
  }
  __syncthreads();
  hi = s_hi[0];
  lo = s_lo[0];
  nan = s_nan[0];
  for (int w = 1; w < warps; ++w) {
    hi = s_hi[w] > hi ? s_hi[w] : hi;
    lo = s_lo[w] < lo ? s_lo[w] : lo;
    nan |= s_nan[w];
  }
  __syncthreads();  // s_* may be rewritten by the next row
}

template <typename T, int PER_THREAD>
__global__ void __launch_bounds__(kMaxThreads) rows_kernel(RowsParams p) {
  extern __shared__ __align__(16) unsigned char smem_raw[];
  T* buf = reinterpret_cast<T*>(smem_raw);
  const int tid = threadIdx.x, nthreads = blockDim.x;
  const int lane = tid & 31, warp = tid >> 5, warps = nthreads >> 5;
  const int d = p.d, m = p.m, k = p.k;
  const T row_scale = (T)p.row_scale;
  const QuantSpec<T> qs = quant_spec<T>(p.bits, p.symmetric != 0, p.clip_ratio, p.scale_eps);

  for (int64_t row = blockIdx.x; row < p.rows; row += gridDim.x) {
    const int64_t x_base = row * p.x_row_stride;
    const uint8_t* keep_in = p.keep_in ? p.keep_in + row * d : nullptr;

    if (p.rotate) {
      int h0 = 1;
      if (m >= 8) {  // phase A
        int shuffle_stages = 0;
        for (int h = 8; h < m && h < kShuffleSpan; h *= 2) ++shuffle_stages;
        const int chunks = d / 8;
        for (int base = warp * 32; base < chunks; base += warps * 32) {  // uniform across the warp
          const int chunk = base + lane;
          const bool active = chunk < chunks;
          T v[8];
#pragma unroll
          for (int t = 0; t < 8; ++t) {
            const int idx = chunk * 8 + t;
            T x = active ? load_element<T>(p.x, p.x_dtype, x_base + idx) : (T)0;
            v[t] = (active && keep_in && !keep_in[idx]) ? (T)0 : x;
          }
          butterflies8(v);
          for (int s = 0; s < shuffle_stages; ++s) {
            const int mask = 1 << s;
            const bool upper = (lane & mask) != 0;
#pragma unroll
            for (int t = 0; t < 8; ++t) {
              const T other = shfl_xor(v[t], mask);
              v[t] = upper ? other - v[t] : v[t] + other;
            }
          }
          if (active) {
#pragma unroll
            for (int t = 0; t < 8; ++t) buf[chunk * 8 + t] = v[t];
          }
        }
        h0 = m < kShuffleSpan ? m : kShuffleSpan;
      } else {
        for (int idx = tid; idx < d; idx += nthreads) {
          T x = load_element<T>(p.x, p.x_dtype, x_base + idx);
          buf[idx] = (keep_in && !keep_in[idx]) ? (T)0 : x;
        }
      }
      __syncthreads();
      for (int h = h0; h < m; h *= 2) {  // phase B
        for (int q = tid; q < d / 2; q += nthreads) {
          const int i = (q / h) * 2 * h + (q % h);
          const T u = buf[i], w = buf[i + h];
          buf[i] = u + w;
          buf[i + h] = u - w;
        }
        __syncthreads();
      }
    }

    // phase C
    T vals[PER_THREAD];
    T hi = -(T)INFINITY, lo = (T)INFINITY;
    int nan = 0;
#pragma unroll
    for (int j = 0; j < PER_THREAD; ++j) {
      const int idx = tid + j * nthreads;
      T v = (T)0;
      if (idx < d) {
        if (p.rotate) {
          if (k > 1) {
            const int a = idx / m, col = idx - a * m;
            const int8_t* signs = p.hk + (int64_t)a * k;
            T acc = (T)0;
            for (int c = 0; c < k; ++c) {
              const T x = buf[c * m + col];
              acc = __ldg(signs + c) > 0 ? acc + x : acc - x;
            }
            v = acc;
          } else {
            v = buf[idx];
          }
          v = v * row_scale;
        } else {
          v = load_element<T>(p.x, p.x_dtype, x_base + idx);
          if (keep_in && !keep_in[idx]) v = (T)0;
        }
        hi = v > hi ? v : hi;
        lo = v < lo ? v : lo;
        nan |= v != v;
      }
      vals[j] = v;
    }
    T scale = (T)1, zero = (T)0;
    if (p.quant) {
      block_max_min(hi, lo, nan);
      if (nan) hi = lo = (T)NAN;
      group_scale_zero(hi, lo, qs, &scale, &zero);
    }
    const int64_t out_base = row * p.out_row_stride;
#pragma unroll
    for (int j = 0; j < PER_THREAD; ++j) {
      const int idx = tid + j * nthreads;
      if (idx < d) {
        T v = vals[j];
        if (p.quant) {
          unsigned char kept;
          v = quantize_value(v, scale, zero, qs, &kept);
          if (p.keep_out) p.keep_out[row * d + idx] = kept;
        }
        store_element<T>(p.out, p.out_dtype, out_base + idx, v);
      }
    }
    __syncthreads();  // buf is rewritten by the next row
  }
}

int ceil_div(int64_t a, int64_t b) { return (int)((a + b - 1) / b); }

template <typename T, int PER_THREAD>
int launch(const RowsParams& p, int threads, cudaStream_t stream) {
  const size_t smem = p.rotate ? (size_t)p.d * sizeof(T) : 0;
  auto kernel = rows_kernel<T, PER_THREAD>;
  if (smem > 48 * 1024) {
    cudaError_t err = cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, (int)smem);
    if (err != cudaSuccess)
      return set_error("fastft_cuda_rows: %zu bytes of shared memory per block: %s", smem, cudaGetErrorString(err));
  }
  const int64_t max_grid = 1 << 30;
  const unsigned grid = (unsigned)(p.rows < max_grid ? p.rows : max_grid);
  kernel<<<grid, threads, smem, stream>>>(p);
  return check_launch("fastft_cuda_rows");
}

template <typename T>
int launch_rows(const RowsParams& p, cudaStream_t stream) {
  int threads = ceil_div(p.d, 8);
  threads = ((threads + 31) / 32) * 32;
  threads = threads < 32 ? 32 : (threads > kMaxThreads ? kMaxThreads : threads);
  // d <= 8192 takes at most 8 values a thread; longer rows 16 (double, d <= 16384) or 32 (float). Few
  // instantiations keep the compile short.
  const int per = ceil_div(p.d, threads);
  if (per <= 8) return launch<T, 8>(p, threads, stream);
  if (per <= 16 && sizeof(T) == 8) return launch<double, 16>(p, threads, stream);
  if (per <= 32 && sizeof(T) == 4) return launch<float, 32>(p, threads, stream);
  return set_error("fastft_cuda_rows: d=%d is longer than this kernel's rows", p.d);
}

bool is_power_of_two(int64_t v) { return v > 0 && (v & (v - 1)) == 0; }

}  // namespace
}  // namespace fastft

extern "C" {

FASTFT_API int64_t fastft_cuda_max_row(int32_t compute_dtype) {
  const int64_t size = compute_dtype == FASTFT_FLOAT64 ? 8 : 4;
  return fastft::kMaxRowBytes / size;
}

FASTFT_API int fastft_cuda_rows(const fastft_rows_args* a, int device, void* stream) {
  using namespace fastft;
  try {
    if (!a) return set_error("fastft_cuda_rows: args is NULL");
    if (int err = require_device()) return err;
    const bool f64 = a->x_dtype == FASTFT_FLOAT64;
    if (a->d < 1 || a->rows < 0 || a->d > fastft_cuda_max_row(f64 ? FASTFT_FLOAT64 : FASTFT_FLOAT32))
      return set_error("fastft_cuda_rows: rows=%lld, d=%lld: the CUDA kernel takes 1 <= d <= %lld",
                       (long long)a->rows, (long long)a->d, (long long)fastft_cuda_max_row(a->x_dtype));
    if (a->x_dtype < 0 || a->x_dtype > 3 || a->out_dtype < 0 || a->out_dtype > 3)
      return set_error("fastft_cuda_rows: bad dtype codes %d, %d", a->x_dtype, a->out_dtype);
    if (a->quant && (a->group_size != 0 || a->stats))
      return set_error("fastft_cuda_rows: the CUDA kernel quantizes per token only (group_size 0, no stats)");
    if (a->quant && (a->bits < 2 || a->bits > 8)) return set_error("fastft_cuda_rows: bits=%d: 2..8", a->bits);
    if (a->x_row_stride < 0 || a->out_row_stride < a->d) return set_error("fastft_cuda_rows: bad row strides");
    int m = (int)a->d;
    if (a->rotate) {
      if (a->k < 1 || a->d % a->k || !is_power_of_two(a->d / a->k))
        return set_error("fastft_cuda_rows: d=%lld is not k=%d times a power of two", (long long)a->d, a->k);
      if (a->k > 1 && !a->hk) return set_error("fastft_cuda_rows: k=%d needs hk", a->k);
      m = (int)(a->d / a->k);
    }
    if (a->rows == 0) return 0;
    if (!a->x || !a->out) return set_error("fastft_cuda_rows: x or out is NULL");
    cudaError_t err = cudaSetDevice(device);
    if (err != cudaSuccess) return set_error("fastft_cuda_rows: cudaSetDevice(%d): %s", device, cudaGetErrorString(err));
    RowsParams p;
    p.x = a->x;
    p.out = a->out;
    p.hk = a->hk;
    p.keep_in = a->keep_in;
    p.keep_out = a->keep_out;
    p.x_row_stride = a->x_row_stride;
    p.out_row_stride = a->out_row_stride;
    p.rows = a->rows;
    p.d = (int)a->d;
    p.m = m;
    p.k = a->rotate ? a->k : 1;
    p.x_dtype = a->x_dtype;
    p.out_dtype = a->out_dtype;
    p.rotate = a->rotate;
    p.quant = a->quant;
    p.bits = a->quant ? a->bits : 8;
    p.symmetric = a->symmetric;
    p.row_scale = a->row_scale;
    p.clip_ratio = a->quant ? a->clip_ratio : 1.0;
    p.scale_eps = a->scale_eps;
    cudaStream_t s = (cudaStream_t)stream;
    return f64 ? launch_rows<double>(p, s) : launch_rows<float>(p, s);
  }
  FASTFT_CATCH_ALL
}

}  // extern "C"
