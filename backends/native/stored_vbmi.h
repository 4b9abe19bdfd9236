// AVX-512 VBMI level for stored_gemm.cpp (Ice Lake / Sapphire Rapids / Zen 4 and later): the FP4 row kernel
// with a decode that needs no widening step, the contract of stored_simd.h's kernels (one output row, MR rows
// of x). The other formats run stored_simd.h's AVX-512 kernels at this level.
//
//   fp4  One 64-byte load holds 128 codes = four 32-blocks, one per 128-bit lane. vpermps reads the low four
//        bits of each dword, so shifting the loaded dwords right by 4 * s (s = 0..7) exposes nibble s of every
//        dword: eight lookups give the 128 values without a widening step, in the order k = 8 * d + s (d the
//        dword). x is pre-permuted per 128-code group to that order (stored_gemm.cpp), which keeps every lane
//        inside its own 32-block: the eight products are summed per lane and scaled by a vector of the four
//        blocks' scales (vectorised ue8m0 decode, 16 blocks per load). Rows whose K is not a multiple of 128
//        finish their last 32-blocks with stored_simd.h's kernel on the [16 even | 16 odd] layout. Measured
//        against fp4_row_512 (one row in L1, best of 300): 1.29x at MR = 1, 1.12x at MR = 4.
//   fp8  A table decoder was measured and not kept: e4m3 -> the top two bytes of the float by two vpermi2b
//        lookups of the 128 magnitudes and one zero-masked vpermt2b per 16 codes ran at 0.97x of the fp16
//        route of fp8_row_512 in L1 and at 1.00x in a decode step (the byte shuffles share the port the
//        conversions use).
// The weight stream is prefetched a page ahead (ahead(), stored_simd.h).
#pragma once

#if defined(DSV4_HAVE_X86)
#define DSV4_TVBMI __attribute__((target("avx512f,avx512bw,avx512vl,avx512dq,avx512vbmi,fma,f16c")))

namespace dsv4 {

// 16 ue8m0 scale bytes -> their float32 values (2^(s-127); s = 0 -> 2^-127 subnormal, 255 -> NaN), as e8m0()
DSV4_TVBMI inline __m512 e8m0_16(const uint8_t* s) {
  const __m512i v = _mm512_cvtepu8_epi32(_mm_loadu_si128((const __m128i*)s));
  __m512i bits = _mm512_slli_epi32(v, 23);
  bits = _mm512_mask_mov_epi32(bits, _mm512_cmpeq_epi32_mask(v, _mm512_setzero_si512()),
                               _mm512_set1_epi32(0x00400000));
  bits = _mm512_mask_mov_epi32(bits, _mm512_cmpeq_epi32_mask(v, _mm512_set1_epi32(255)),
                               _mm512_set1_epi32(0x7FC00000));
  return _mm512_castsi512_ps(bits);
}

// x per 128-code group in the order k = 8 * d + s at position 16 * s + d (d = 0..15, s = 0..7); a K tail
// (K % 128, a multiple of 32) keeps stored_simd.h's per-32 [16 even | 16 odd] layout. Row length K / 2 bytes.
template <int MR>
DSV4_TVBMI void fp4_row_vbmi(const Gemv& g) {
  const __m512 tab = _mm512_setr_ps(0.f, .5f, 1.f, 1.5f, 2.f, 3.f, 4.f, 6.f,
                                    -0.f, -.5f, -1.f, -1.5f, -2.f, -3.f, -4.f, -6.f);
  __m512 tot[MR];
  for (int m = 0; m < MR; ++m) tot[m] = _mm512_setzero_ps();
  const int64_t ng = g.K / 128;                          // 128-code groups
  __m512 sv = _mm512_setzero_ps();
  for (int64_t q = 0; q < ng; ++q) {
    if ((q & 3) == 0) {                                  // 16 scales cover four groups
      if (4 * q + 16 <= g.K / 32) {
        sv = e8m0_16(g.s + 4 * q);
      } else {
        alignas(16) uint8_t sb[16] = {};
        std::memcpy(sb, g.s + 4 * q, size_t(g.K / 32 - 4 * q));
        sv = e8m0_16(sb);
      }
    }
    // lane L of every product belongs to block 4q + L: its scale is sv[4 * (q & 3) + L] in all four dwords
    const __m512 vs = _mm512_permutexvar_ps(
        _mm512_add_epi32(_mm512_set1_epi32(4 * int(q & 3)),
                         _mm512_setr_epi32(0, 0, 0, 0, 1, 1, 1, 1, 2, 2, 2, 2, 3, 3, 3, 3)), sv);
    ahead(g.w + 64 * q);
    const __m512i c = _mm512_loadu_si512(g.w + 64 * q);
    __m512 p0[MR], p1[MR];                               // even / odd s: two FMA chains per x row
    for (int m = 0; m < MR; ++m) { p0[m] = _mm512_setzero_ps(); p1[m] = _mm512_setzero_ps(); }
    const float* xq = g.x + 128 * q;
    // written out: the shift counts are immediates and the chains stay in registers (a loop over s was
    // compiled with the partial sums on the stack: 2x slower at MR = 4)
#define DSV4_FP4_STEP(S, P)                                                              \
    {                                                                                    \
      const __m512 f = _mm512_permutexvar_ps(_mm512_srli_epi32(c, 4 * (S)), tab);        \
      for (int m = 0; m < MR; ++m)                                                       \
        P[m] = _mm512_fmadd_ps(_mm512_loadu_ps(xq + m * g.ldx + 16 * (S)), f, P[m]);     \
    }
    DSV4_FP4_STEP(0, p0) DSV4_FP4_STEP(1, p1) DSV4_FP4_STEP(2, p0) DSV4_FP4_STEP(3, p1)
    DSV4_FP4_STEP(4, p0) DSV4_FP4_STEP(5, p1) DSV4_FP4_STEP(6, p0) DSV4_FP4_STEP(7, p1)
#undef DSV4_FP4_STEP
    for (int m = 0; m < MR; ++m) tot[m] = _mm512_fmadd_ps(_mm512_add_ps(p0[m], p1[m]), vs, tot[m]);
  }
  float tail[MR] = {};
  if (g.K % 128) {                                       // the last (K % 128) / 32 blocks
    Gemv t = g;
    const int64_t k0 = 128 * ng;
    t.K = g.K - k0;
    t.w = g.w + k0 / 2;
    t.s = g.s + k0 / 32;
    t.x = g.x + k0;
    t.y = tail;
    t.ldy = 1;
    fp4_row_512<MR>(t);
  }
  for (int m = 0; m < MR; ++m) g.y[m * g.ldy] = _mm512_reduce_add_ps(tot[m]) + tail[m];
}

}  // namespace dsv4
#define DSV4_HAVE_VBMI 1
#endif  // DSV4_HAVE_X86
