// SIMD row kernels for stored_gemm.cpp: AVX-512 (F/BW/VL), AVX2 (+FMA, F16C) and aarch64 NEON.
//
// Each kernel computes one output row n for MR (1..8; 1..4 below AVX-512) rows of x: y[m, n - n0] = sum_k x[m, k] * W[n, k].
// The weight row is decoded in registers, never stored:
//   fp8  e4m3 -> fp16 bits by integer arithmetic (sign to bit 15, exponent+mantissa << 7), then the F16C /
//        AVX-512 half->float conversion: that float is exactly value * 2^-8 for every normal and subnormal
//        code (the conversion is exact and ignores DAZ); 0x7F / 0xFF (NaN) are blended to a half NaN.
//        A 128-wide block's partial sums are scaled by 2^8 and by the block's ue8m0 scale -- two exact
//        power-of-two products -- so the result is x . (code * scale) up to summation order only.
//   fp4  e2m1 nibbles -> float by a 16-entry permute (vpermps uses an index's low 4 bits: the byte itself is
//        the index of its low nibble), x pre-permuted per 32-block as [16 even k | 16 odd k] to meet them;
//        per-32 scale applied to the block's partial sum (exact power of two).
//   bf16 -> float by a 16-bit shift; int8 -> float * the row's scale per element (the reference's values).
// Tails (K not a multiple of the vector width) go through the scalar decoders. Every kernel prefetches its
// weight stream PREFETCH_AHEAD bytes ahead (ahead()): the hardware prefetchers stop at each 4 KiB page and a
// decode step streams ~0.5 GB of rows (measured on the realistic-width model, one thread, FP8 / FP4 rows of
// 1-8 KiB: 86 -> 57 ms of CPU per decode step; 512 B ahead gained a third of that, 4-8 KiB all of it). The functions carry their own
// `target` attributes, so the library is built for the baseline ISA and picks a path at run time.
#pragma once

#include <cstdint>
#include <cstring>

namespace dsv4 {

struct Gemv {                 // one call's operands; x rows are MR consecutive rows from x (stride ldx)
  const float* x;
  int64_t ldx, K;
  const uint8_t* w;           // codes of the row (fp8 / int8 / fp4 packed) or bf16 as bytes
  const uint8_t* s;           // the row's scales: fp8 -> that row block's scale row, fp4 -> the row's scales
  const float* rs;            // int8: the row's float32 scale
  float* y;                   // &y[0, n - n0]
  int64_t ldy;
};

constexpr int64_t PREFETCH_AHEAD = 4096;

// a hint, never a fault: past the weight's end it reads nothing that matters
inline void ahead(const void* p) { __builtin_prefetch(static_cast<const char*>(p) + PREFETCH_AHEAD, 0, 3); }

inline float bits_f(uint32_t u) { float f; std::memcpy(&f, &u, 4); return f; }
inline uint32_t f_bits(float f) { uint32_t u; std::memcpy(&u, &f, 4); return u; }

inline float e8m0(uint8_t s) {
  if (s == 255) return bits_f(0x7FC00000u);            // NaN
  return s == 0 ? bits_f(0x00400000u) : bits_f(uint32_t(s) << 23);   // 2^(s-127); 2^-127 is subnormal
}

// e4m3 code -> value. Normal: exponent field + 120 rebias; subnormal (exp 0): mantissa * 2^-9 (a multiply of
// a small integer, so flush-to-zero modes cannot change it); 0x7F / 0xFF: NaN. Branch-free.
inline float dec_fp8(uint32_t b) {
  uint32_t mag = b & 0x7Fu;
  uint32_t nbits = (mag << 20) + (120u << 23);
  uint32_t sbits = f_bits(float(int32_t(mag & 7u)) * 0.001953125f);
  uint32_t normal = 0u - uint32_t(mag >= 8u);
  uint32_t bits = (nbits & normal) | (sbits & ~normal);
  bits |= 0x7FC00000u & (0u - uint32_t(mag == 0x7Fu));
  return bits_f(bits | ((b & 0x80u) << 24));
}

// one e2m1 nibble -> value. Normal (exp > 0): exponent field + 126 rebias; subnormal: 0 or 0.5. Branch-free.
inline float dec_e2m1(uint32_t nib) {
  uint32_t mag = nib & 7u;
  uint32_t nbits = (mag << 22) + (126u << 23);
  uint32_t sbits = (mag & 1u) * 0x3F000000u;                 // 0.5f or 0
  uint32_t normal = 0u - uint32_t(mag >= 2u);
  return bits_f(((nbits & normal) | (sbits & ~normal)) | ((nib & 8u) << 28));
}

inline float bf16_f(uint16_t h) { return bits_f(uint32_t(h) << 16); }

}  // namespace dsv4

#if defined(__x86_64__) && !defined(DSV4_NO_X86_SIMD)
#include <immintrin.h>
#define DSV4_T512 __attribute__((target("avx512f,avx512bw,avx512vl,avx512dq,fma,f16c")))
#define DSV4_T256 __attribute__((target("avx2,fma,f16c")))

namespace dsv4 {

// ---------------------------------------------------------------- AVX-512
DSV4_T512 inline __m512i fp8_half_512(__m256i bytes) {
  const __m512i m80 = _mm512_set1_epi16(0x80), m7f = _mm512_set1_epi16(0x7F);
  __m512i v = _mm512_cvtepu8_epi16(bytes);
  __m512i h = _mm512_slli_epi16(_mm512_add_epi16(v, _mm512_and_si512(v, m80)), 7);   // sign carries to 15
  __mmask32 nan = _mm512_cmpeq_epi16_mask(_mm512_and_si512(v, m7f), m7f);
  return _mm512_mask_mov_epi16(h, nan, _mm512_set1_epi16(0x7E00));
}

template <int MR>
DSV4_T512 void fp8_row_512(const Gemv& g) {
  __m512 tot[MR];
  float tail[MR];
  for (int m = 0; m < MR; ++m) { tot[m] = _mm512_setzero_ps(); tail[m] = 0.f; }
  const __m512 v256 = _mm512_set1_ps(256.f);
  for (int64_t k0 = 0; k0 < g.K; k0 += 128) {
    const int64_t len = g.K - k0 < 128 ? g.K - k0 : 128, full = len & ~int64_t(31);
    const float sc = e8m0(g.s[k0 >> 7]);
    __m512 a0[MR], a1[MR];
    for (int m = 0; m < MR; ++m) { a0[m] = _mm512_setzero_ps(); a1[m] = _mm512_setzero_ps(); }
    for (int64_t k = k0; k < k0 + full; k += 32) {
      ahead(g.w + k);
      __m512i h = fp8_half_512(_mm256_loadu_si256((const __m256i*)(g.w + k)));
      __m512 w0 = _mm512_cvtph_ps(_mm512_castsi512_si256(h));
      __m512 w1 = _mm512_cvtph_ps(_mm512_extracti64x4_epi64(h, 1));
      for (int m = 0; m < MR; ++m) {
        const float* xm = g.x + m * g.ldx + k;
        a0[m] = _mm512_fmadd_ps(_mm512_loadu_ps(xm), w0, a0[m]);
        a1[m] = _mm512_fmadd_ps(_mm512_loadu_ps(xm + 16), w1, a1[m]);
      }
    }
    const __m512 vs = _mm512_set1_ps(sc);
    for (int m = 0; m < MR; ++m)
      tot[m] = _mm512_fmadd_ps(_mm512_mul_ps(_mm512_add_ps(a0[m], a1[m]), v256), vs, tot[m]);
    for (int64_t k = k0 + full; k < k0 + len; ++k) {
      float v = dec_fp8(g.w[k]) * sc;
      for (int m = 0; m < MR; ++m) tail[m] += g.x[m * g.ldx + k] * v;
    }
  }
  for (int m = 0; m < MR; ++m) g.y[m * g.ldy] = _mm512_reduce_add_ps(tot[m]) + tail[m];
}

// x is pre-permuted: per 32-block [16 even k | 16 odd k]; K a multiple of 32
template <int MR>
DSV4_T512 void fp4_row_512(const Gemv& g) {
  const __m512 tab = _mm512_setr_ps(0.f, .5f, 1.f, 1.5f, 2.f, 3.f, 4.f, 6.f,
                                    -0.f, -.5f, -1.f, -1.5f, -2.f, -3.f, -4.f, -6.f);
  __m512 t0[MR], t1[MR];
  for (int m = 0; m < MR; ++m) { t0[m] = _mm512_setzero_ps(); t1[m] = _mm512_setzero_ps(); }
  const int64_t nb = g.K / 32;
  int64_t j = 0;
  for (; j + 2 <= nb; j += 2) {
    ahead(g.w + 16 * j);
    __m512i v0 = _mm512_cvtepu8_epi32(_mm_loadu_si128((const __m128i*)(g.w + 16 * j)));
    __m512i v1 = _mm512_cvtepu8_epi32(_mm_loadu_si128((const __m128i*)(g.w + 16 * j + 16)));
    __m512 lo0 = _mm512_permutexvar_ps(v0, tab), hi0 = _mm512_permutexvar_ps(_mm512_srli_epi32(v0, 4), tab);
    __m512 lo1 = _mm512_permutexvar_ps(v1, tab), hi1 = _mm512_permutexvar_ps(_mm512_srli_epi32(v1, 4), tab);
    __m512 s0 = _mm512_set1_ps(e8m0(g.s[j])), s1 = _mm512_set1_ps(e8m0(g.s[j + 1]));
    for (int m = 0; m < MR; ++m) {
      const float* xm = g.x + m * g.ldx + 32 * j;
      __m512 p0 = _mm512_fmadd_ps(_mm512_loadu_ps(xm + 16), hi0, _mm512_mul_ps(_mm512_loadu_ps(xm), lo0));
      __m512 p1 = _mm512_fmadd_ps(_mm512_loadu_ps(xm + 48), hi1, _mm512_mul_ps(_mm512_loadu_ps(xm + 32), lo1));
      t0[m] = _mm512_fmadd_ps(p0, s0, t0[m]);
      t1[m] = _mm512_fmadd_ps(p1, s1, t1[m]);
    }
  }
  for (; j < nb; ++j) {
    __m512i v0 = _mm512_cvtepu8_epi32(_mm_loadu_si128((const __m128i*)(g.w + 16 * j)));
    __m512 lo0 = _mm512_permutexvar_ps(v0, tab), hi0 = _mm512_permutexvar_ps(_mm512_srli_epi32(v0, 4), tab);
    __m512 s0 = _mm512_set1_ps(e8m0(g.s[j]));
    for (int m = 0; m < MR; ++m) {
      const float* xm = g.x + m * g.ldx + 32 * j;
      __m512 p0 = _mm512_fmadd_ps(_mm512_loadu_ps(xm + 16), hi0, _mm512_mul_ps(_mm512_loadu_ps(xm), lo0));
      t0[m] = _mm512_fmadd_ps(p0, s0, t0[m]);
    }
  }
  for (int m = 0; m < MR; ++m) g.y[m * g.ldy] = _mm512_reduce_add_ps(_mm512_add_ps(t0[m], t1[m]));
}

template <int MR>
DSV4_T512 void bf16_row_512(const Gemv& g) {
  const uint16_t* w = reinterpret_cast<const uint16_t*>(g.w);
  __m512 a0[MR], a1[MR];
  float tail[MR];
  for (int m = 0; m < MR; ++m) { a0[m] = _mm512_setzero_ps(); a1[m] = _mm512_setzero_ps(); tail[m] = 0.f; }
  const int64_t full = g.K & ~int64_t(31);
  for (int64_t k = 0; k < full; k += 32) {
    ahead(w + k);
    __m512 w0 = _mm512_castsi512_ps(_mm512_slli_epi32(
        _mm512_cvtepu16_epi32(_mm256_loadu_si256((const __m256i*)(w + k))), 16));
    __m512 w1 = _mm512_castsi512_ps(_mm512_slli_epi32(
        _mm512_cvtepu16_epi32(_mm256_loadu_si256((const __m256i*)(w + k + 16))), 16));
    for (int m = 0; m < MR; ++m) {
      const float* xm = g.x + m * g.ldx + k;
      a0[m] = _mm512_fmadd_ps(_mm512_loadu_ps(xm), w0, a0[m]);
      a1[m] = _mm512_fmadd_ps(_mm512_loadu_ps(xm + 16), w1, a1[m]);
    }
  }
  for (int64_t k = full; k < g.K; ++k)
    for (int m = 0; m < MR; ++m) tail[m] += g.x[m * g.ldx + k] * bf16_f(w[k]);
  for (int m = 0; m < MR; ++m) g.y[m * g.ldy] = _mm512_reduce_add_ps(_mm512_add_ps(a0[m], a1[m])) + tail[m];
}

template <int MR>
DSV4_T512 void int8_row_512(const Gemv& g) {
  const int8_t* w = reinterpret_cast<const int8_t*>(g.w);
  const float sc = g.rs[0];
  const __m512 vs = _mm512_set1_ps(sc);
  __m512 a0[MR];
  float tail[MR];
  for (int m = 0; m < MR; ++m) { a0[m] = _mm512_setzero_ps(); tail[m] = 0.f; }
  const int64_t full = g.K & ~int64_t(15);
  for (int64_t k = 0; k < full; k += 16) {
    ahead(w + k);
    __m512 w0 = _mm512_mul_ps(_mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128((const __m128i*)(w + k)))), vs);
    for (int m = 0; m < MR; ++m) a0[m] = _mm512_fmadd_ps(_mm512_loadu_ps(g.x + m * g.ldx + k), w0, a0[m]);
  }
  for (int64_t k = full; k < g.K; ++k)
    for (int m = 0; m < MR; ++m) tail[m] += g.x[m * g.ldx + k] * (float(w[k]) * sc);
  for (int m = 0; m < MR; ++m) g.y[m * g.ldy] = _mm512_reduce_add_ps(a0[m]) + tail[m];
}

// ---------------------------------------------------------------- AVX2
DSV4_T256 inline float hsum256(__m256 v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  s = _mm_add_ss(s, _mm_movehdup_ps(s));
  return _mm_cvtss_f32(s);
}

DSV4_T256 inline __m256i fp8_half_256(__m128i bytes) {
  const __m256i m80 = _mm256_set1_epi16(0x80), m7f = _mm256_set1_epi16(0x7F);
  __m256i v = _mm256_cvtepu8_epi16(bytes);
  __m256i h = _mm256_slli_epi16(_mm256_add_epi16(v, _mm256_and_si256(v, m80)), 7);
  __m256i nan = _mm256_cmpeq_epi16(_mm256_and_si256(v, m7f), m7f);
  return _mm256_blendv_epi8(h, _mm256_set1_epi16(0x7E00), nan);
}

template <int MR>
DSV4_T256 void fp8_row_256(const Gemv& g) {
  __m256 tot[MR];
  float tail[MR];
  for (int m = 0; m < MR; ++m) { tot[m] = _mm256_setzero_ps(); tail[m] = 0.f; }
  const __m256 v256 = _mm256_set1_ps(256.f);
  for (int64_t k0 = 0; k0 < g.K; k0 += 128) {
    const int64_t len = g.K - k0 < 128 ? g.K - k0 : 128, full = len & ~int64_t(15);
    const float sc = e8m0(g.s[k0 >> 7]);
    __m256 a0[MR], a1[MR];
    for (int m = 0; m < MR; ++m) { a0[m] = _mm256_setzero_ps(); a1[m] = _mm256_setzero_ps(); }
    for (int64_t k = k0; k < k0 + full; k += 16) {
      ahead(g.w + k);
      __m256i h = fp8_half_256(_mm_loadu_si128((const __m128i*)(g.w + k)));
      __m256 w0 = _mm256_cvtph_ps(_mm256_castsi256_si128(h));
      __m256 w1 = _mm256_cvtph_ps(_mm256_extracti128_si256(h, 1));
      for (int m = 0; m < MR; ++m) {
        const float* xm = g.x + m * g.ldx + k;
        a0[m] = _mm256_fmadd_ps(_mm256_loadu_ps(xm), w0, a0[m]);
        a1[m] = _mm256_fmadd_ps(_mm256_loadu_ps(xm + 8), w1, a1[m]);
      }
    }
    const __m256 vs = _mm256_set1_ps(sc);
    for (int m = 0; m < MR; ++m)
      tot[m] = _mm256_fmadd_ps(_mm256_mul_ps(_mm256_add_ps(a0[m], a1[m]), v256), vs, tot[m]);
    for (int64_t k = k0 + full; k < k0 + len; ++k) {
      float v = dec_fp8(g.w[k]) * sc;
      for (int m = 0; m < MR; ++m) tail[m] += g.x[m * g.ldx + k] * v;
    }
  }
  for (int m = 0; m < MR; ++m) g.y[m * g.ldy] = hsum256(tot[m]) + tail[m];
}

template <int MR>
DSV4_T256 void fp4_row_256(const Gemv& g) {
  const __m256 mag = _mm256_setr_ps(0.f, .5f, 1.f, 1.5f, 2.f, 3.f, 4.f, 6.f);   // vpermps: low 3 bits
  const __m256i m8 = _mm256_set1_epi32(8);
  __m256 t0[MR], t1[MR];
  for (int m = 0; m < MR; ++m) { t0[m] = _mm256_setzero_ps(); t1[m] = _mm256_setzero_ps(); }
  for (int64_t j = 0; j < g.K / 32; ++j) {
    ahead(g.w + 16 * j);
    __m256 vs = _mm256_set1_ps(e8m0(g.s[j]));
    for (int half = 0; half < 2; ++half) {           // bytes 8*half .. : even k 16j+8h.., odd k likewise
      __m256i v = _mm256_cvtepu8_epi32(_mm_loadl_epi64((const __m128i*)(g.w + 16 * j + 8 * half)));
      __m256i u = _mm256_srli_epi32(v, 4);
      __m256 lo = _mm256_xor_ps(_mm256_permutevar8x32_ps(mag, v),
                                _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_and_si256(v, m8), 28)));
      __m256 hi = _mm256_xor_ps(_mm256_permutevar8x32_ps(mag, u),
                                _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_and_si256(u, m8), 28)));
      for (int m = 0; m < MR; ++m) {
        const float* xm = g.x + m * g.ldx + 32 * j + 8 * half;
        __m256 p = _mm256_fmadd_ps(_mm256_loadu_ps(xm + 16), hi, _mm256_mul_ps(_mm256_loadu_ps(xm), lo));
        if (half == 0) t0[m] = _mm256_fmadd_ps(p, vs, t0[m]);
        else t1[m] = _mm256_fmadd_ps(p, vs, t1[m]);
      }
    }
  }
  for (int m = 0; m < MR; ++m) g.y[m * g.ldy] = hsum256(_mm256_add_ps(t0[m], t1[m]));
}

template <int MR>
DSV4_T256 void bf16_row_256(const Gemv& g) {
  const uint16_t* w = reinterpret_cast<const uint16_t*>(g.w);
  __m256 a0[MR], a1[MR];
  float tail[MR];
  for (int m = 0; m < MR; ++m) { a0[m] = _mm256_setzero_ps(); a1[m] = _mm256_setzero_ps(); tail[m] = 0.f; }
  const int64_t full = g.K & ~int64_t(15);
  for (int64_t k = 0; k < full; k += 16) {
    ahead(w + k);
    __m256 w0 = _mm256_castsi256_ps(_mm256_slli_epi32(
        _mm256_cvtepu16_epi32(_mm_loadu_si128((const __m128i*)(w + k))), 16));
    __m256 w1 = _mm256_castsi256_ps(_mm256_slli_epi32(
        _mm256_cvtepu16_epi32(_mm_loadu_si128((const __m128i*)(w + k + 8))), 16));
    for (int m = 0; m < MR; ++m) {
      const float* xm = g.x + m * g.ldx + k;
      a0[m] = _mm256_fmadd_ps(_mm256_loadu_ps(xm), w0, a0[m]);
      a1[m] = _mm256_fmadd_ps(_mm256_loadu_ps(xm + 8), w1, a1[m]);
    }
  }
  for (int64_t k = full; k < g.K; ++k)
    for (int m = 0; m < MR; ++m) tail[m] += g.x[m * g.ldx + k] * bf16_f(w[k]);
  for (int m = 0; m < MR; ++m) g.y[m * g.ldy] = hsum256(_mm256_add_ps(a0[m], a1[m])) + tail[m];
}

template <int MR>
DSV4_T256 void int8_row_256(const Gemv& g) {
  const int8_t* w = reinterpret_cast<const int8_t*>(g.w);
  const float sc = g.rs[0];
  const __m256 vs = _mm256_set1_ps(sc);
  __m256 a0[MR];
  float tail[MR];
  for (int m = 0; m < MR; ++m) { a0[m] = _mm256_setzero_ps(); tail[m] = 0.f; }
  const int64_t full = g.K & ~int64_t(7);
  for (int64_t k = 0; k < full; k += 8) {
    ahead(w + k);
    __m256 w0 = _mm256_mul_ps(_mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64((const __m128i*)(w + k)))), vs);
    for (int m = 0; m < MR; ++m) a0[m] = _mm256_fmadd_ps(_mm256_loadu_ps(g.x + m * g.ldx + k), w0, a0[m]);
  }
  for (int64_t k = full; k < g.K; ++k)
    for (int m = 0; m < MR; ++m) tail[m] += g.x[m * g.ldx + k] * (float(w[k]) * sc);
  for (int m = 0; m < MR; ++m) g.y[m * g.ldy] = hsum256(a0[m]) + tail[m];
}

}  // namespace dsv4
#define DSV4_HAVE_X86 1
#endif  // x86-64

#if defined(__aarch64__) && !defined(DSV4_NO_NEON)
// NEON (aarch64: Kunpeng / Graviton hosts). Compiled only by an aarch64 compiler: NOT run on this project's
// x86 test machine. A build failure here is retried without it (-DDSV4_NO_NEON) by the Python loader.
#include <arm_neon.h>

namespace dsv4 {

template <int MR>
void fp8_row_neon(const Gemv& g) {
  float32x4_t tot[MR];
  float tail[MR];
  for (int m = 0; m < MR; ++m) { tot[m] = vdupq_n_f32(0.f); tail[m] = 0.f; }
  const uint16x8_t m80 = vdupq_n_u16(0x80), m7f = vdupq_n_u16(0x7F), qnan = vdupq_n_u16(0x7E00);
  for (int64_t k0 = 0; k0 < g.K; k0 += 128) {
    const int64_t len = g.K - k0 < 128 ? g.K - k0 : 128, full = len & ~int64_t(7);
    const float sc = e8m0(g.s[k0 >> 7]);
    float32x4_t a0[MR], a1[MR];
    for (int m = 0; m < MR; ++m) { a0[m] = vdupq_n_f32(0.f); a1[m] = vdupq_n_f32(0.f); }
    for (int64_t k = k0; k < k0 + full; k += 8) {
      ahead(g.w + k);
      uint16x8_t v = vmovl_u8(vld1_u8(g.w + k));
      uint16x8_t h = vshlq_n_u16(vaddq_u16(v, vandq_u16(v, m80)), 7);
      h = vbslq_u16(vceqq_u16(vandq_u16(v, m7f), m7f), qnan, h);
      float16x8_t hf = vreinterpretq_f16_u16(h);
      float32x4_t w0 = vcvt_f32_f16(vget_low_f16(hf)), w1 = vcvt_high_f32_f16(hf);
      for (int m = 0; m < MR; ++m) {
        const float* xm = g.x + m * g.ldx + k;
        a0[m] = vfmaq_f32(a0[m], vld1q_f32(xm), w0);
        a1[m] = vfmaq_f32(a1[m], vld1q_f32(xm + 4), w1);
      }
    }
    for (int m = 0; m < MR; ++m)
      tot[m] = vfmaq_n_f32(tot[m], vmulq_n_f32(vaddq_f32(a0[m], a1[m]), 256.f), sc);
    for (int64_t k = k0 + full; k < k0 + len; ++k) {
      float v = dec_fp8(g.w[k]) * sc;
      for (int m = 0; m < MR; ++m) tail[m] += g.x[m * g.ldx + k] * v;
    }
  }
  for (int m = 0; m < MR; ++m) g.y[m * g.ldy] = vaddvq_f32(tot[m]) + tail[m];
}

template <int MR>
void bf16_row_neon(const Gemv& g) {
  const uint16_t* w = reinterpret_cast<const uint16_t*>(g.w);
  float32x4_t a0[MR];
  float tail[MR];
  for (int m = 0; m < MR; ++m) { a0[m] = vdupq_n_f32(0.f); tail[m] = 0.f; }
  const int64_t full = g.K & ~int64_t(3);
  for (int64_t k = 0; k < full; k += 4) {
    ahead(w + k);
    float32x4_t w0 = vreinterpretq_f32_u32(vshll_n_u16(vld1_u16(w + k), 16));
    for (int m = 0; m < MR; ++m) a0[m] = vfmaq_f32(a0[m], vld1q_f32(g.x + m * g.ldx + k), w0);
  }
  for (int64_t k = full; k < g.K; ++k)
    for (int m = 0; m < MR; ++m) tail[m] += g.x[m * g.ldx + k] * bf16_f(w[k]);
  for (int m = 0; m < MR; ++m) g.y[m * g.ldy] = vaddvq_f32(a0[m]) + tail[m];
}

}  // namespace dsv4
#define DSV4_HAVE_NEON 1
#endif  // aarch64
