// exp over float32 arrays for the fused decode step's softmaxes and SwiGLU (included by decode_attn.h).
// Scalar std::exp was most of a decode step's attention core (8 heads x ~140 scores per row and layer). Here
// each value is computed in double precision -- x = k ln2 + r, |r| <= ln2 / 2, exp(r) by its Taylor series to
// r^11 (truncation < 7e-15 relative), times 2^k -- and rounded once to float32: the float32 result is the
// correctly rounded exp(x) except when exp(x) lies within ~1e-6 ulp of a rounding boundary (the libm's expf
// is not correctly rounded either). Vector lanes and the scalar tail run the same operations (fused
// multiply-adds, round-to-nearest), so an element's bits do not depend on where it sits in the array, on the
// ISA or on the batch.
#pragma once

#include <cmath>
#include <cstdint>
#include <cstring>
#if defined(__AVX512F__)
#include <immintrin.h>
#endif

namespace {
namespace dexp {

constexpr double LOG2E = 1.4426950408889634, LN2_HI = 0.6931471805599453, LN2_LO = 2.3190468138462996e-17;
constexpr double LO = -150.0, HI = 100.0;   // exp(-150) rounds to 0 and exp(100) to inf in float32
// 1/i! for i = 11 .. 0 (Horner order)
constexpr double C[12] = {1.0 / 39916800, 1.0 / 3628800, 1.0 / 362880, 1.0 / 40320, 1.0 / 5040, 1.0 / 720,
                          1.0 / 120, 1.0 / 24, 1.0 / 6, 0.5, 1.0, 1.0};

inline float one(float xf) {
  if (xf != xf) return xf;
  const double x = std::min(HI, std::max(LO, double(xf)));
  const double k = std::nearbyint(x * LOG2E);
  double r = std::fma(-k, LN2_HI, x);
  r = std::fma(-k, LN2_LO, r);
  double p = C[0];
  for (int i = 1; i < 12; ++i) p = std::fma(p, r, C[i]);
  const uint64_t bits = uint64_t(int64_t(k) + 1023) << 52;
  double s;
  std::memcpy(&s, &bits, sizeof s);
  return float(p * s);
}

#if defined(__AVX512F__) && defined(__AVX512DQ__)
inline __m512d lanes(__m512d x) {             // the same steps as one() on 8 doubles (x already clamped)
  const __m512d k = _mm512_roundscale_pd(_mm512_mul_pd(x, _mm512_set1_pd(LOG2E)),
                                         _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m512d r = _mm512_fnmadd_pd(k, _mm512_set1_pd(LN2_HI), x);
  r = _mm512_fnmadd_pd(k, _mm512_set1_pd(LN2_LO), r);
  __m512d p = _mm512_set1_pd(C[0]);
  for (int i = 1; i < 12; ++i) p = _mm512_fmadd_pd(p, r, _mm512_set1_pd(C[i]));
  const __m512i e = _mm512_slli_epi64(_mm512_add_epi64(_mm512_cvtpd_epi64(k), _mm512_set1_epi64(1023)), 52);
  return _mm512_mul_pd(p, _mm512_castsi512_pd(e));
}
#endif

// x[i] = exp(x[i]) for i < n
inline void inplace(float* x, int64_t n) {
  int64_t i = 0;
#if defined(__AVX512F__) && defined(__AVX512DQ__)
  const __m512d lo = _mm512_set1_pd(LO), hi = _mm512_set1_pd(HI);
  for (; i + 8 <= n; i += 8) {
    const __m256 xf = _mm256_loadu_ps(x + i);
    const __m512d xd = _mm512_min_pd(hi, _mm512_max_pd(lo, _mm512_cvtps_pd(xf)));
    const __m256 y = _mm512_cvtpd_ps(lanes(xd));
    const __m256 nan = _mm256_cmp_ps(xf, xf, _CMP_UNORD_Q);
    _mm256_storeu_ps(x + i, _mm256_blendv_ps(y, xf, nan));
  }
#endif
  for (; i < n; ++i) x[i] = one(x[i]);
}

}  // namespace dexp
}  // namespace
