// CPU kernels of fastft.ops.hadamard_transform and fastft.ops.fake_quantize (see fastft.h, fastft_rows_args).
//
// Rows are independent: OpenMP splits them over threads; each thread converts its row into a private
// buffer of the compute type (float, or double for float64 input) that stays in L1/L2, runs every step
// there, and converts it out once. Loops are plain and contiguous so the compiler vectorizes them
// (-O3, -march=native where the compiler takes it); there is no floating-point contraction
// (-ffp-contract=off), so products are rounded before they are added, as in torch.
//
// Numerics, step by step the reference's (fastft/ops/hadamard.py, fastft/ops/fake_quantize.py):
// * butterflies: stage h = 1, 2, ..., m/2 maps (v[j], v[j+h]) to (v[j] + v[j+h], v[j] - v[j+h]); the
//   kernel runs the stages below the vector width inside vector registers (shuffles) and the others
//   two per pass over the row, with the same operations in the same order, so for k = 1 the transform
//   is the reference's bit for bit;
// * the k x k product sums +-v over c = 0 .. k-1 in order (the reference's matmul sums in another
//   order: results agree to rounding, exactly on integer-valued inputs);
// * one multiplication by row_scale rounded to the compute type; then csrc/quantize.h.
#include <math.h>
#include <stdint.h>
#include <string.h>

#include <algorithm>
#include <exception>
#include <type_traits>
#include <vector>

#ifdef _OPENMP
#include <omp.h>
#endif

#include "dtypes_cpu.h"
#include "errors.h"
#include "fastft.h"
#include "quantize.h"

namespace fastft {
namespace {

// Vectors of 64 bytes (GCC / clang vector extensions; the compiler maps them onto the machine's registers).
template <typename T>
struct Vec;
template <>
struct Vec<float> {
  typedef float type __attribute__((vector_size(64)));
  typedef int32_t mask __attribute__((vector_size(64)));
  static constexpr int lanes = 16;
};
template <>
struct Vec<double> {
  typedef double type __attribute__((vector_size(64)));
  typedef int64_t mask __attribute__((vector_size(64)));
  static constexpr int lanes = 8;
};

#if defined(__clang__) || (defined(__GNUC__) && __GNUC__ >= 12)
#define FASTFT_SHUFFLE(x, ...) __builtin_shufflevector(x, x, __VA_ARGS__)
#else
#define FASTFT_SHUFFLE(x, ...) __builtin_shuffle(x, (decltype(upper_mask(x))){__VA_ARGS__})
#endif

template <typename V>
inline V vload(const void* p) {
  V v;
  memcpy(&v, p, sizeof v);
  return v;
}
template <typename V>
inline void vstore(void* p, V v) {
  memcpy(p, &v, sizeof v);
}

inline Vec<float>::mask upper_mask(Vec<float>::type);
inline Vec<double>::mask upper_mask(Vec<double>::type);

// One butterfly stage inside a vector: partner = x with lanes t and t ^ h swapped; the lower lane of each
// pair keeps u + v (x + partner), the upper u - v (partner - x).
template <typename V, typename M>
inline V in_vector_stage(V x, V partner, M upper) {
  V sum = x + partner, difference = partner - x;
  return upper ? difference : sum;
}

// Stages h = 1 .. lanes/2 on every vector of v[0 .. m).
inline void in_vector_stages(float* __restrict v, int64_t m) {
  typedef Vec<float>::type V;
  typedef Vec<float>::mask M;
  const M u1 = {0, -1, 0, -1, 0, -1, 0, -1, 0, -1, 0, -1, 0, -1, 0, -1};
  const M u2 = {0, 0, -1, -1, 0, 0, -1, -1, 0, 0, -1, -1, 0, 0, -1, -1};
  const M u4 = {0, 0, 0, 0, -1, -1, -1, -1, 0, 0, 0, 0, -1, -1, -1, -1};
  const M u8 = {0, 0, 0, 0, 0, 0, 0, 0, -1, -1, -1, -1, -1, -1, -1, -1};
  for (int64_t i = 0; i < m; i += 16) {
    V x = vload<V>(v + i);
    x = in_vector_stage(x, FASTFT_SHUFFLE(x, 1, 0, 3, 2, 5, 4, 7, 6, 9, 8, 11, 10, 13, 12, 15, 14), u1);
    x = in_vector_stage(x, FASTFT_SHUFFLE(x, 2, 3, 0, 1, 6, 7, 4, 5, 10, 11, 8, 9, 14, 15, 12, 13), u2);
    x = in_vector_stage(x, FASTFT_SHUFFLE(x, 4, 5, 6, 7, 0, 1, 2, 3, 12, 13, 14, 15, 8, 9, 10, 11), u4);
    x = in_vector_stage(x, FASTFT_SHUFFLE(x, 8, 9, 10, 11, 12, 13, 14, 15, 0, 1, 2, 3, 4, 5, 6, 7), u8);
    vstore(v + i, x);
  }
}

inline void in_vector_stages(double* __restrict v, int64_t m) {
  typedef Vec<double>::type V;
  typedef Vec<double>::mask M;
  const M u1 = {0, -1, 0, -1, 0, -1, 0, -1};
  const M u2 = {0, 0, -1, -1, 0, 0, -1, -1};
  const M u4 = {0, 0, 0, 0, -1, -1, -1, -1};
  for (int64_t i = 0; i < m; i += 8) {
    V x = vload<V>(v + i);
    x = in_vector_stage(x, FASTFT_SHUFFLE(x, 1, 0, 3, 2, 5, 4, 7, 6), u1);
    x = in_vector_stage(x, FASTFT_SHUFFLE(x, 2, 3, 0, 1, 6, 7, 4, 5), u2);
    x = in_vector_stage(x, FASTFT_SHUFFLE(x, 4, 5, 6, 7, 0, 1, 2, 3), u4);
    vstore(v + i, x);
  }
}

// Sylvester's S_m (unnormalized) applied in place to v[0 .. m), m a power of two: stage h = 1, 2, ...,
// m/2 maps (v[j], v[j+h]) to (v[j] + v[j+h], v[j] - v[j+h]) in blocks of 2h, in this order. For
// m >= lanes the stages below lanes run inside vectors, the others two at a time over whole vectors.
template <typename T>
void butterflies(T* __restrict v, int64_t m) {
  typedef typename Vec<T>::type V;
  constexpr int L = Vec<T>::lanes;
  if (m < L) {
    for (int64_t h = 1; h < m; h *= 2) {
      for (int64_t i = 0; i < m; i += 2 * h) {
        for (int64_t j = i; j < i + h; ++j) {
          T u = v[j], w = v[j + h];
          v[j] = u + w;
          v[j + h] = u - w;
        }
      }
    }
    return;
  }
  in_vector_stages(v, m);
  int64_t h = L;
  for (; 4 * h <= m; h *= 4) {  // stages h and 2h in one pass
    for (int64_t i = 0; i < m; i += 4 * h) {
      for (int64_t j = i; j < i + h; j += L) {
        V a = vload<V>(v + j), b = vload<V>(v + j + h), c = vload<V>(v + j + 2 * h), e = vload<V>(v + j + 3 * h);
        V ab = a + b, a_b = a - b, ce = c + e, c_e = c - e;
        vstore(v + j, ab + ce);
        vstore(v + j + h, a_b + c_e);
        vstore(v + j + 2 * h, ab - ce);
        vstore(v + j + 3 * h, a_b - c_e);
      }
    }
  }
  if (h < m) {  // one stage left
    for (int64_t j = 0; j < h; j += L) {
      V a = vload<V>(v + j), b = vload<V>(v + j + h);
      vstore(v + j, a + b);
      vstore(v + j + h, a - b);
    }
  }
}

// dst (k x m) = hk (k x k, +-1, row-major) times src (k x m): dst[a][j] = sum over c = 0 .. k-1, in
// order, of hk[a][c] * src[c][j]. A -1 flips the sign bit of src (exact, and a + (-b) is a - b in IEEE
// arithmetic), so there is no branch on the signs; four rows a share each load of src.
template <typename T>
void k_factor_product(T* __restrict dst, const T* __restrict src, const int8_t* __restrict hk, int64_t k, int64_t m) {
  typedef typename Vec<T>::type V;
  typedef typename Vec<T>::mask M;
  typedef typename std::remove_reference<decltype(M{}[0])>::type Bits;
  constexpr int L = Vec<T>::lanes;
  constexpr int A = 4;
  const Bits sign_bit = (Bits)((typename std::make_unsigned<Bits>::type)1 << (8 * sizeof(Bits) - 1));
  if (m % L == 0) {
    std::vector<Bits> flips(A * k);
    for (int64_t a0 = 0; a0 < k; a0 += A) {
      const int rows = (int)std::min<int64_t>(A, k - a0);
      for (int64_t c = 0; c < k; ++c)
        for (int r = 0; r < A; ++r) flips[c * A + r] = (r < rows && hk[(a0 + r) * k + c] < 0) ? sign_bit : 0;
      for (int64_t j = 0; j < m; j += L) {
        V acc[A] = {};
        for (int64_t c = 0; c < k; ++c) {
          const M s = (M)vload<V>(src + c * m + j);
          for (int r = 0; r < A; ++r) acc[r] += (V)(s ^ flips[c * A + r]);
        }
        for (int r = 0; r < rows; ++r) vstore(dst + (a0 + r) * m + j, acc[r]);
      }
    }
    return;
  }
  for (int64_t a = 0; a < k; ++a) {  // short rows (m < lanes): scalar, the same operations
    for (int64_t j = 0; j < m; ++j) {
      T acc = (T)0;
      for (int64_t c = 0; c < k; ++c) acc += (hk[a * k + c] < 0 ? (T)-1 : (T)1) * src[c * m + j];
      dst[a * m + j] = acc;
    }
  }
}

// max and min of v[0 .. n) (both NaN if any element is NaN), over 16 interleaved lanes so that it vectorizes.
template <typename T>
void group_max_min(const T* __restrict v, int64_t n, T* vmax, T* vmin) {
  constexpr int L = 16;
  T hi[L], lo[L];
  int nan[L];
  for (int t = 0; t < L; ++t) {
    hi[t] = v[0];
    lo[t] = v[0];
    nan[t] = 0;
  }
  int64_t j = 0;
  for (; j + L <= n; j += L) {
    for (int t = 0; t < L; ++t) {
      T x = v[j + t];
      hi[t] = x > hi[t] ? x : hi[t];
      lo[t] = x < lo[t] ? x : lo[t];
      nan[t] |= x != x;
    }
  }
  for (; j < n; ++j) {
    T x = v[j];
    hi[0] = x > hi[0] ? x : hi[0];
    lo[0] = x < lo[0] ? x : lo[0];
    nan[0] |= x != x;
  }
  T h = hi[0], l = lo[0];
  int any_nan = nan[0];
  for (int t = 1; t < L; ++t) {
    h = hi[t] > h ? hi[t] : h;
    l = lo[t] < l ? lo[t] : l;
    any_nan |= nan[t];
  }
  *vmax = any_nan ? (T)NAN : h;
  *vmin = any_nan ? (T)NAN : l;
}

template <typename T>
void quantize_group(T* __restrict v, uint8_t* __restrict keep, int64_t n, T scale, T zero, const QuantSpec<T>& s) {
  if (keep) {
    for (int64_t j = 0; j < n; ++j) {
      unsigned char kept;
      v[j] = quantize_value(v[j], scale, zero, s, &kept);
      keep[j] = kept;
    }
  } else {
    for (int64_t j = 0; j < n; ++j) {
      unsigned char kept;
      v[j] = quantize_value(v[j], scale, zero, s, &kept);
    }
  }
}

struct Job {
  const fastft_rows_args* p;
  int64_t m;
  int64_t x_row_bytes;
  int64_t out_row_bytes;
};

template <typename T>
void process_row(const Job& job, int64_t r, T* buf, T* tmp, const QuantSpec<T>& qs, T tensor_scale, T tensor_zero) {
  const fastft_rows_args& p = *job.p;
  const int64_t d = p.d;
  load_row(buf, (const char*)p.x + r * job.x_row_bytes, p.x_dtype, d);
  if (p.keep_in) {
    const uint8_t* keep = p.keep_in + r * d;
    for (int64_t j = 0; j < d; ++j) buf[j] = keep[j] ? buf[j] : (T)0;
  }
  if (p.rotate) {
    for (int64_t a = 0; a < p.k; ++a) butterflies(buf + a * job.m, job.m);
    if (p.k > 1) {
      k_factor_product(tmp, buf, p.hk, p.k, job.m);
      std::swap(buf, tmp);
    }
    const T s = (T)p.row_scale;
    for (int64_t j = 0; j < d; ++j) buf[j] *= s;
  }
  if (p.quant) {
    uint8_t* keep = p.keep_out ? p.keep_out + r * d : nullptr;
    const int64_t g = p.group_size > 0 ? p.group_size : d;
    for (int64_t g0 = 0; g0 < d; g0 += g) {
      T scale = tensor_scale, zero = tensor_zero;
      if (!p.stats) {
        T vmax, vmin;
        group_max_min(buf + g0, g, &vmax, &vmin);
        group_scale_zero(vmax, vmin, qs, &scale, &zero);
      }
      quantize_group(buf + g0, keep ? keep + g0 : nullptr, g, scale, zero, qs);
    }
  }
  store_row((char*)p.out + r * job.out_row_bytes, buf, p.out_dtype, d);
}

int threads_for(int requested, int64_t work) {
  if (requested < 1 || work < (1 << 15)) return 1;
  return requested;
}

template <typename T>
int run_rows(const fastft_rows_args& p, int num_threads) {
  Job job{&p, p.rotate ? p.d / p.k : p.d, p.x_row_stride * dtype_size(p.x_dtype),
          p.out_row_stride * dtype_size(p.out_dtype)};
  const QuantSpec<T> qs = quant_spec<T>(p.bits, p.symmetric != 0, p.clip_ratio, p.scale_eps);
  T tensor_scale = 0, tensor_zero = 0;
  if (p.quant && p.stats) group_scale_zero((T)p.stats[0], (T)p.stats[1], qs, &tensor_scale, &tensor_zero);
  const int nt = threads_for(num_threads, p.rows * p.d);
  int out_of_memory = 0;
#ifdef _OPENMP
#pragma omp parallel num_threads(nt) reduction(| : out_of_memory)
#endif
  {
    std::vector<T> buf, tmp;
    try {
      buf.resize(p.d);
      if (p.rotate && p.k > 1) tmp.resize(p.d);
    } catch (...) {
      out_of_memory = 1;
    }
#ifdef _OPENMP
#pragma omp for schedule(static)
#endif
    for (int64_t r = 0; r < p.rows; ++r) {
      if (!buf.empty()) process_row<T>(job, r, buf.data(), tmp.data(), qs, tensor_scale, tensor_zero);
    }
  }
  (void)nt;
  if (out_of_memory) return set_error("out of memory for a row buffer of %lld elements", (long long)p.d);
  return 0;
}

bool is_power_of_two(int64_t v) { return v > 0 && (v & (v - 1)) == 0; }

int check_args(const fastft_rows_args* p) {
  if (!p) return set_error("fastft_cpu_rows: args is NULL");
  if (p->d < 1 || p->rows < 0) return set_error("bad shape: rows=%lld, d=%lld", (long long)p->rows, (long long)p->d);
  if (!dtype_supported(p->x_dtype) || !dtype_supported(p->out_dtype))
    return set_error("unsupported dtype codes x=%d out=%d (this build supports float32, bfloat16, float64%s)",
                     p->x_dtype, p->out_dtype, FASTFT_HAVE_FLOAT16 ? ", float16" : "");
  if (p->out_dtype == FASTFT_FLOAT64 && p->x_dtype != FASTFT_FLOAT64)
    return set_error("a float64 output needs float64 input");
  if (p->rows > 0 && (!p->x || !p->out)) return set_error("x or out is NULL");
  if (p->x_row_stride < 0 || p->out_row_stride < p->d)
    return set_error("bad row strides: x %lld, out %lld (d=%lld); the last dimension must be contiguous",
                     (long long)p->x_row_stride, (long long)p->out_row_stride, (long long)p->d);
  if (p->rotate) {
    if (p->k < 1 || p->d % p->k || !is_power_of_two(p->d / p->k))
      return set_error("rotation: d=%lld is not k=%d times a power of two", (long long)p->d, p->k);
    if (p->k > 1 && !p->hk) return set_error("rotation: k=%d needs the k x k factor hk", p->k);
  }
  if (p->quant) {
    if (p->bits < 2 || p->bits > 8) return set_error("bits=%d: 2..8", p->bits);
    if (p->group_size < 0 || (p->group_size > 0 && p->d % p->group_size))
      return set_error("group_size=%lld does not divide d=%lld", (long long)p->group_size, (long long)p->d);
    if (!(p->clip_ratio > 0.0 && p->clip_ratio <= 1.0)) return set_error("clip_ratio=%g: (0, 1]", p->clip_ratio);
  }
  return 0;
}

template <typename T>
int run_minmax(const void* x, int dtype, int64_t row_bytes, int64_t rows, int64_t d, double* result, int num_threads) {
  const int nt = threads_for(num_threads, rows * d);
  T hi = -(T)INFINITY, lo = (T)INFINITY;
  bool nan = false;
  int out_of_memory = 0;
#ifdef _OPENMP
#pragma omp parallel num_threads(nt) reduction(| : out_of_memory)
#endif
  {
    std::vector<T> buf;
    try {
      buf.resize(d);
    } catch (...) {
      out_of_memory = 1;
    }
    T my_hi = -(T)INFINITY, my_lo = (T)INFINITY;
#ifdef _OPENMP
#pragma omp for schedule(static)
#endif
    for (int64_t r = 0; r < rows; ++r) {
      if (buf.empty()) continue;
      load_row(buf.data(), (const char*)x + r * row_bytes, dtype, d);
      T rhi, rlo;
      group_max_min(buf.data(), d, &rhi, &rlo);
      my_hi = nan_max(rhi, my_hi);
      my_lo = nan_min(rlo, my_lo);
    }
#ifdef _OPENMP
#pragma omp critical
#endif
    {
      if (my_hi != my_hi || my_lo != my_lo) nan = true;
      hi = std::max(hi, my_hi);
      lo = std::min(lo, my_lo);
    }
  }
  (void)nt;
  if (out_of_memory) return set_error("out of memory for a row buffer of %lld elements", (long long)d);
  result[0] = nan ? NAN : (double)hi;
  result[1] = nan ? NAN : (double)lo;
  return 0;
}

}  // namespace
}  // namespace fastft

extern "C" {

FASTFT_API int fastft_cpu_rows(const fastft_rows_args* args, int num_threads) {
  try {
    if (int err = fastft::check_args(args)) return err;
    if (args->rows == 0) return 0;
    if (args->x_dtype == FASTFT_FLOAT64) return fastft::run_rows<double>(*args, num_threads);
    return fastft::run_rows<float>(*args, num_threads);
  }
  FASTFT_CATCH_ALL
}

FASTFT_API int fastft_cpu_minmax(const void* x, int32_t dtype, int64_t x_row_stride, int64_t rows, int64_t d,
                                 double* result, int num_threads) {
  try {
    if (!result || d < 1 || rows < 1 || !x || x_row_stride < 0)
      return fastft::set_error("fastft_cpu_minmax: bad arguments (rows=%lld, d=%lld)", (long long)rows, (long long)d);
    if (!fastft::dtype_supported(dtype)) return fastft::set_error("fastft_cpu_minmax: unsupported dtype code %d", dtype);
    const int64_t row_bytes = x_row_stride * fastft::dtype_size(dtype);
    if (dtype == FASTFT_FLOAT64) return fastft::run_minmax<double>(x, dtype, row_bytes, rows, d, result, num_threads);
    return fastft::run_minmax<float>(x, dtype, row_bytes, rows, d, result, num_threads);
  }
  FASTFT_CATCH_ALL
}

}  // extern "C"
