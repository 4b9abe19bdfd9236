// Multi-row GEMV kernels for one row of x (a decode step's M = 1), AVX-512 levels: RW (1..4) weight rows per
// pass over x, included by stored_gemm.cpp after stored_simd.h / stored_vbmi.h.
//
// Why: at M = 1 the single-row kernels of stored_simd.h decode ~8-11 GB/s of stored bytes per core out of
// cache, while the core streams ~16 GB/s: the decode's instructions and one row's prefetch stream are what a
// step waits on. Four rows at a time keep four streams in flight and share every x load; the FP8 decode is
// also leaner (measured on this project's 2-core host, one thread, 1 GiB of rows: fp8 11.3 -> 12.5 GB/s).
//
// Each row's arithmetic is exactly what the kernel computes for that row alone (RW = 1): the same
// accumulators fed in the same k order, so a row's value never depends on which rows share its pass (the
// fused decode's batch invariance, decode_linear.h). Values are the checkpoint's values (decoded exactly as in
// stored_simd.h), accumulated in float32.
//   fp8  e4m3 -> fp16 bits by sign extension: (int16(code) << 7) & 0xBFFF puts the sign at bit 15 and
//        exponent + mantissa at bits 13..7 (3 instructions per 32 codes, where the zero-extended route takes 4);
//        the half -> float conversion is exact (value * 2^-8, subnormals included), the block sum is scaled by
//        2^8 and the ue8m0 scale as in fp8_row_512. NaN codes (0x7F / 0xFF) are not decoded per lane: a row
//        that holds one sums NaN whatever the other terms, so a per-row flag (one masked compare per 64
//        codes) sets the row's result to NaN -- the value the per-lane decode gives.
//   bf16 the shift decode of bf16_row_512, several rows per x load.
//   fp4  (VBMI) fp4_row_vbmi's nibble-shift lookups, several rows per x load (x pre-permuted per 128 as there).
#pragma once

#if defined(DSV4_HAVE_X86)

#ifndef DSV4_PASS_AHEAD_MIN
#define DSV4_PASS_AHEAD_MIN 8192
#endif
#ifndef DSV4_PASS_AHEAD_MAX
#define DSV4_PASS_AHEAD_MAX 65536
#endif
namespace dsv4 {

// Prefetch distance of a pass: the rows of a job are contiguous (stride = g[1].w - g[0].w), so row r's bytes
// whole passes ahead (RW rows further each) are what it reads next: at least 8 KiB ahead, passes of up to
// 64 KiB; stored_simd.h's within-row 4 KiB for longer passes and a single row. (Within-row 4 KiB ahead lands
// on a row of this same pass when rows are short.) Measured, 2 threads, 1 GiB of weights: one pass ahead
// instead of within-row took fp8 4096x8192 15 -> 24 GB/s and bf16 21 -> 28; 8 KiB minimum fp8 32768x1024
// 15.8 -> 16.4 and fp4 4096x2048 16.9 -> 18.1.
template <int RW>
inline int64_t pass_ahead(const Gemv* g) {
  if (RW == 1) return PREFETCH_AHEAD;
  const int64_t d = RW * (g[1].w - g[0].w);
  if (d <= 0 || d > DSV4_PASS_AHEAD_MAX) return PREFETCH_AHEAD;
  return d * ((DSV4_PASS_AHEAD_MIN + d - 1) / d);
}
inline void ahead_by(const void* p, int64_t d) { __builtin_prefetch(static_cast<const char*>(p) + d, 0, 3); }

DSV4_T512 inline __m512i fp8_half_sx(__m256i bytes) {       // 32 codes -> their fp16 forms (NaN codes: finite)
  return _mm512_and_si512(_mm512_slli_epi16(_mm512_cvtepi8_epi16(bytes), 7), _mm512_set1_epi16(short(0xBFFF)));
}

// g[r]: row r's operands (the same x for all); writes g[r].y[0]
template <int RW>
DSV4_T512 void fp8_rows_512(const Gemv* g) {
  const float* x = g[0].x;
  const int64_t K = g[0].K;
  __m512 tot[RW];
  float tail[RW];
  __mmask64 ok[RW];
  for (int r = 0; r < RW; ++r) { tot[r] = _mm512_setzero_ps(); tail[r] = 0.f; ok[r] = ~__mmask64(0); }
  const __m512 v256 = _mm512_set1_ps(256.f);
  const __m512i m80 = _mm512_set1_epi8(char(0x80)), mff = _mm512_set1_epi8(char(0xFF));
  const int64_t pf = pass_ahead<RW>(g);
  for (int64_t k0 = 0; k0 < K; k0 += 128) {
    const int64_t len = K - k0 < 128 ? K - k0 : 128, full = len & ~int64_t(63), half = len & ~int64_t(31);
    __m512 a0[RW], a1[RW];
    for (int r = 0; r < RW; ++r) { a0[r] = _mm512_setzero_ps(); a1[r] = _mm512_setzero_ps(); }
    int64_t k = k0;
    for (; k < k0 + full; k += 64) {
      const __m512 x0 = _mm512_loadu_ps(x + k), x1 = _mm512_loadu_ps(x + k + 16);
      const __m512 x2 = _mm512_loadu_ps(x + k + 32), x3 = _mm512_loadu_ps(x + k + 48);
      for (int r = 0; r < RW; ++r) {
        const uint8_t* wr = g[r].w + k;
        ahead_by(wr, pf);
        const __m512i c = _mm512_loadu_si512(wr);
        ok[r] = _mm512_mask_cmpneq_epi8_mask(ok[r], _mm512_or_si512(c, m80), mff);
        const __m512i h0 = fp8_half_sx(_mm512_castsi512_si256(c)), h1 = fp8_half_sx(_mm512_extracti64x4_epi64(c, 1));
        a0[r] = _mm512_fmadd_ps(x0, _mm512_cvtph_ps(_mm512_castsi512_si256(h0)), a0[r]);
        a1[r] = _mm512_fmadd_ps(x1, _mm512_cvtph_ps(_mm512_extracti64x4_epi64(h0, 1)), a1[r]);
        a0[r] = _mm512_fmadd_ps(x2, _mm512_cvtph_ps(_mm512_castsi512_si256(h1)), a0[r]);
        a1[r] = _mm512_fmadd_ps(x3, _mm512_cvtph_ps(_mm512_extracti64x4_epi64(h1, 1)), a1[r]);
      }
    }
    if (k < k0 + half) {                                  // a last 32 codes of a short block (K % 128)
      const __m512 x0 = _mm512_loadu_ps(x + k), x1 = _mm512_loadu_ps(x + k + 16);
      for (int r = 0; r < RW; ++r) {
        const __m256i c = _mm256_loadu_si256((const __m256i*)(g[r].w + k));
        ok[r] = _mm512_mask_cmpneq_epi8_mask(ok[r], _mm512_or_si512(_mm512_zextsi256_si512(c), m80), mff);
        const __m512i h = fp8_half_sx(c);
        a0[r] = _mm512_fmadd_ps(x0, _mm512_cvtph_ps(_mm512_castsi512_si256(h)), a0[r]);
        a1[r] = _mm512_fmadd_ps(x1, _mm512_cvtph_ps(_mm512_extracti64x4_epi64(h, 1)), a1[r]);
      }
      k += 32;
    }
    for (int r = 0; r < RW; ++r) {
      const float sc = e8m0(g[r].s[k0 >> 7]);
      tot[r] = _mm512_fmadd_ps(_mm512_mul_ps(_mm512_add_ps(a0[r], a1[r]), v256), _mm512_set1_ps(sc), tot[r]);
      for (int64_t j = k; j < k0 + len; ++j) tail[r] += x[j] * (dec_fp8(g[r].w[j]) * sc);
    }
  }
  for (int r = 0; r < RW; ++r) {
    const float v = _mm512_reduce_add_ps(tot[r]) + tail[r];
    g[r].y[0] = ok[r] == ~__mmask64(0) ? v : bits_f(0x7FC00000u);
  }
}

template <int RW>
DSV4_T512 void bf16_rows_512(const Gemv* g) {
  const float* x = g[0].x;
  const int64_t K = g[0].K, full = K & ~int64_t(31);
  __m512 a0[RW], a1[RW];
  for (int r = 0; r < RW; ++r) { a0[r] = _mm512_setzero_ps(); a1[r] = _mm512_setzero_ps(); }
  const int64_t pf = pass_ahead<RW>(g);
  for (int64_t k = 0; k < full; k += 32) {
    const __m512 x0 = _mm512_loadu_ps(x + k), x1 = _mm512_loadu_ps(x + k + 16);
    for (int r = 0; r < RW; ++r) {
      const uint16_t* w = reinterpret_cast<const uint16_t*>(g[r].w) + k;
      ahead_by(w, pf);
      const __m512i c = _mm512_loadu_si512(w);
      const __m512 w0 = _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm512_castsi512_si256(c)), 16));
      const __m512 w1 = _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm512_extracti64x4_epi64(c, 1)), 16));
      a0[r] = _mm512_fmadd_ps(x0, w0, a0[r]);
      a1[r] = _mm512_fmadd_ps(x1, w1, a1[r]);
    }
  }
  for (int r = 0; r < RW; ++r) {
    const uint16_t* w = reinterpret_cast<const uint16_t*>(g[r].w);
    float t = 0.f;
    for (int64_t k = full; k < K; ++k) t += x[k] * bf16_f(w[k]);
    g[r].y[0] = _mm512_reduce_add_ps(_mm512_add_ps(a0[r], a1[r])) + t;
  }
}

#if defined(DSV4_HAVE_VBMI)
// fp4_row_vbmi's arithmetic per row (x in its per-128 order), RW rows per x load
template <int RW>
DSV4_TVBMI void fp4_rows_vbmi(const Gemv* g) {
  const __m512 tab = _mm512_setr_ps(0.f, .5f, 1.f, 1.5f, 2.f, 3.f, 4.f, 6.f,
                                    -0.f, -.5f, -1.f, -1.5f, -2.f, -3.f, -4.f, -6.f);
  const float* x = g[0].x;
  const int64_t K = g[0].K, ng = K / 128, nb = K / 32;
  __m512 tot[RW], sv[RW];
  for (int r = 0; r < RW; ++r) { tot[r] = _mm512_setzero_ps(); sv[r] = _mm512_setzero_ps(); }
  const int64_t pf = pass_ahead<RW>(g);
  const __m512i lane4 = _mm512_setr_epi32(0, 0, 0, 0, 1, 1, 1, 1, 2, 2, 2, 2, 3, 3, 3, 3);
  for (int64_t q = 0; q < ng; ++q) {
    if ((q & 3) == 0) {
      for (int r = 0; r < RW; ++r) {
        if (4 * q + 16 <= nb) {
          sv[r] = e8m0_16(g[r].s + 4 * q);
        } else {
          alignas(16) uint8_t sb[16] = {};
          std::memcpy(sb, g[r].s + 4 * q, size_t(nb - 4 * q));
          sv[r] = e8m0_16(sb);
        }
      }
    }
    const __m512i si = _mm512_add_epi32(_mm512_set1_epi32(4 * int(q & 3)), lane4);
    __m512i c[RW];
    __m512 p0[RW], p1[RW];
    for (int r = 0; r < RW; ++r) {
      ahead_by(g[r].w + 64 * q, pf);
      c[r] = _mm512_loadu_si512(g[r].w + 64 * q);
      p0[r] = _mm512_setzero_ps();
      p1[r] = _mm512_setzero_ps();
    }
    const float* xq = x + 128 * q;
#define DSV4_FP4_ROWS_STEP(S, P)                                                              \
    {                                                                                         \
      const __m512 xs = _mm512_loadu_ps(xq + 16 * (S));                                       \
      for (int r = 0; r < RW; ++r)                                                            \
        P[r] = _mm512_fmadd_ps(xs, _mm512_permutexvar_ps(_mm512_srli_epi32(c[r], 4 * (S)), tab), P[r]); \
    }
    DSV4_FP4_ROWS_STEP(0, p0) DSV4_FP4_ROWS_STEP(1, p1) DSV4_FP4_ROWS_STEP(2, p0) DSV4_FP4_ROWS_STEP(3, p1)
    DSV4_FP4_ROWS_STEP(4, p0) DSV4_FP4_ROWS_STEP(5, p1) DSV4_FP4_ROWS_STEP(6, p0) DSV4_FP4_ROWS_STEP(7, p1)
#undef DSV4_FP4_ROWS_STEP
    for (int r = 0; r < RW; ++r)
      tot[r] = _mm512_fmadd_ps(_mm512_add_ps(p0[r], p1[r]), _mm512_permutexvar_ps(si, sv[r]), tot[r]);
  }
  for (int r = 0; r < RW; ++r) {
    float tail = 0.f;
    if (K % 128) {                                       // the last (K % 128) / 32 blocks, as fp4_row_vbmi
      Gemv t = g[r];
      const int64_t k0 = 128 * ng;
      t.K = K - k0;
      t.w = g[r].w + k0 / 2;
      t.s = g[r].s + k0 / 32;
      t.x = x + k0;
      t.y = &tail;
      t.ldy = 1;
      fp4_row_512<1>(t);
    }
    g[r].y[0] = _mm512_reduce_add_ps(tot[r]) + tail;
  }
}
#endif  // DSV4_HAVE_VBMI

}  // namespace dsv4

#endif  // DSV4_HAVE_X86
