// The fake-quantization formulas of fastft/ops/fake_quantize.py, shared by the CPU and CUDA libraries.
//
// T is the compute type (float, or double for float64 input). The operations are the reference's, in its
// order, each rounded to T (both libraries are compiled without floating-point contraction):
//
//   asymmetric:  hi = max(vmax, 0)·c,  lo = min(vmin, 0)·c,  scale = max((hi - lo) / qmax, eps),
//                zero = rne(-lo / scale)
//   symmetric:   scale = max(max(vmax, -vmin)·c / qmax, eps),  zero = 0
//   raw = rne(v / scale) + zero,  kept = qmin <= raw <= qmax,  q = clamp(raw, qmin, qmax),
//   out = (q - zero)·scale
//
// rne is round-half-to-even (rint in the default rounding mode), "/" a correctly rounded division.
// Maxima, minima and clamps propagate NaN as torch's amax / amin / clamp do.
#pragma once

#include <math.h>

#ifdef __CUDACC__
#define FASTFT_HD __host__ __device__ __forceinline__
#else
#define FASTFT_HD inline
#endif

namespace fastft {

FASTFT_HD float round_half_even(float v) { return rintf(v); }
FASTFT_HD double round_half_even(double v) { return rint(v); }

// max / min that return NaN when either argument is NaN (torch.amax, torch.clamp_min ...).
template <typename T>
FASTFT_HD T nan_max(T a, T b) { return (a != a || a > b) ? a : b; }
template <typename T>
FASTFT_HD T nan_min(T a, T b) { return (a != a || a < b) ? a : b; }

template <typename T>
struct QuantSpec {
  T clip, eps, qmin, qmax;
  bool symmetric;
};

template <typename T>
FASTFT_HD QuantSpec<T> quant_spec(int bits, bool symmetric, double clip_ratio, double scale_eps) {
  QuantSpec<T> s;
  s.clip = (T)clip_ratio;
  s.eps = (T)scale_eps;
  s.symmetric = symmetric;
  if (symmetric) {
    s.qmin = (T)(-(1 << (bits - 1)));
    s.qmax = (T)((1 << (bits - 1)) - 1);
  } else {
    s.qmin = (T)0;
    s.qmax = (T)((1 << bits) - 1);
  }
  return s;
}

// scale and zero point of a group from its max and min.
template <typename T>
FASTFT_HD void group_scale_zero(T vmax, T vmin, const QuantSpec<T>& s, T* scale, T* zero) {
  if (s.symmetric) {
    T amax = nan_max(vmax, -vmin);
    T sc = amax * s.clip / s.qmax;
    *scale = nan_max(sc, s.eps);
    *zero = (T)0;
  } else {
    T hi = nan_max(vmax, (T)0) * s.clip;
    T lo = nan_min(vmin, (T)0) * s.clip;
    T sc = nan_max((hi - lo) / s.qmax, s.eps);
    *scale = sc;
    *zero = round_half_even(-lo / sc);
  }
}

// The fake-quantized value of v; *kept = 1 when its code was not clamped.
template <typename T>
FASTFT_HD T quantize_value(T v, T scale, T zero, const QuantSpec<T>& s, unsigned char* kept) {
  T raw = round_half_even(v / scale) + zero;
  *kept = (unsigned char)((raw >= s.qmin) & (raw <= s.qmax));
  T q = raw < s.qmin ? s.qmin : (raw > s.qmax ? s.qmax : raw);  // NaN passes through, as in torch.clamp
  return (q - zero) * scale;
}

}  // namespace fastft
