// AVX-512 VBMI row kernels for stored_gemm.cpp (Ice Lake / Sapphire Rapids / Zen 4 and later): the FP8 and FP4
// weight decoders by byte table lookup, the contract of stored_simd.h's kernels (one output row, MR rows of x).
//
//   fp8  Every e4m3 value, and its float32 bits, fit in the top two bytes of a float (a bf16: 3 mantissa bits,
//        exponents 2^-9 .. 2^8, NaN 0x7FC0). Two vpermi2b lookups of the 128 magnitudes give those two bytes
//        for 64 codes at once (the sign bit ORed into the top one); one zero-masked vpermt2b per 16 codes
//        places them in bytes 2 and 3 of each float. 8 shuffle-class uops per 64 codes where the fp16 route of
//        stored_simd.h takes ~24 -- the decode, not memory, is what bounded the AVX-512 kernel at batch 1.
//        The values are exact, so a 128-block's partial sum needs only the block's ue8m0 scale (one exact
//        power-of-two product). The K tail is the same vector step on zero-masked loads (code 0 is +0.0).
//   fp4  One 64-byte load holds 128 codes = four 32-blocks, one per 128-bit lane. vpermps reads the low four
//        bits of each dword, so shifting the loaded dwords right by 4 * s (s = 0..7) exposes nibble s of every
//        dword: eight lookups give the 128 values without a widening step, in the order k = 8 * d + s (d the
//        dword). x is pre-permuted per 128-code group to that order (stored_gemm.cpp), which keeps every lane
//        inside its own 32-block: the eight products are summed per lane and scaled by a vector of the four
//        blocks' scales (vectorised ue8m0 decode, 16 blocks per load). Rows whose K is not a multiple of 128
//        finish their last 32-blocks with stored_simd.h's kernel on the [16 even | 16 odd] layout.
// Both prefetch the weight a page ahead (ahead(), stored_simd.h).
#pragma once

#if defined(DSV4_HAVE_X86)
#define DSV4_TVBMI __attribute__((target("avx512f,avx512bw,avx512vl,avx512dq,avx512vbmi,fma,f16c")))

namespace dsv4 {

struct Fp8Bytes {                           // byte 2 (lo) and byte 3 (hi) of the float32 of magnitude 0..127
  alignas(64) uint8_t lo[128];
  alignas(64) uint8_t hi[128];
};

inline const Fp8Bytes& fp8_bytes() {
  static const Fp8Bytes t = [] {
    Fp8Bytes b;
    for (uint32_t m = 0; m < 128; ++m) {
      const uint32_t bits = f_bits(dec_fp8(m));          // the scalar decoder: one definition of the values
      b.lo[m] = uint8_t(bits >> 16);
      b.hi[m] = uint8_t(bits >> 24);
    }
    return b;
  }();
  return t;
}

template <int MR>
DSV4_TVBMI void fp8_row_vbmi(const Gemv& g) {
  constexpr int NA = MR == 1 ? 4 : 2;                    // independent FMA chains per x row
  const Fp8Bytes& T = fp8_bytes();
  const __m512i lo0 = _mm512_load_si512(T.lo), lo1 = _mm512_load_si512(T.lo + 64);
  const __m512i hi0 = _mm512_load_si512(T.hi), hi1 = _mm512_load_si512(T.hi + 64);
  const __m512i sign = _mm512_set1_epi8(char(0x80));
  const __mmask64 top = 0xCCCCCCCCCCCCCCCCull;           // bytes 2, 3 of every dword
  __m512i place[4];                                      // dword d of output j <- lo[16j + d], hi[16j + d]
  for (int j = 0; j < 4; ++j) {
    alignas(64) uint8_t ix[64];
    for (int b = 0; b < 64; ++b) ix[b] = uint8_t((b & 3) == 3 ? 64 + 16 * j + (b >> 2) : 16 * j + (b >> 2));
    place[j] = _mm512_load_si512(ix);
  }
  __m512 tot[MR];
  for (int m = 0; m < MR; ++m) tot[m] = _mm512_setzero_ps();
  for (int64_t k0 = 0; k0 < g.K; k0 += 128) {
    const int64_t len = g.K - k0 < 128 ? g.K - k0 : 128;
    __m512 acc[MR][NA];
    for (int m = 0; m < MR; ++m)
      for (int a = 0; a < NA; ++a) acc[m][a] = _mm512_setzero_ps();
    int64_t k = k0;
    for (; k + 64 <= k0 + len; k += 64) {
      ahead(g.w + k);
      const __m512i c = _mm512_loadu_si512(g.w + k);
      const __m512i h = _mm512_ternarylogic_epi32(_mm512_permutex2var_epi8(hi0, c, hi1), c, sign, 0xF8);
      const __m512i l = _mm512_permutex2var_epi8(lo0, c, lo1);
      for (int j = 0; j < 4; ++j) {
        const __m512 f = _mm512_castsi512_ps(_mm512_maskz_permutex2var_epi8(top, l, place[j], h));
        for (int m = 0; m < MR; ++m)
          acc[m][j % NA] = _mm512_fmadd_ps(_mm512_loadu_ps(g.x + m * g.ldx + k + 16 * j), f, acc[m][j % NA]);
      }
    }
    if (k < k0 + len) {                                  // the row's K tail: zero-masked loads
      const int64_t rem = k0 + len - k;
      const __m512i c = _mm512_maskz_loadu_epi8((__mmask64(1) << rem) - 1, g.w + k);
      const __m512i h = _mm512_ternarylogic_epi32(_mm512_permutex2var_epi8(hi0, c, hi1), c, sign, 0xF8);
      const __m512i l = _mm512_permutex2var_epi8(lo0, c, lo1);
      for (int j = 0; 16 * j < rem; ++j) {
        const int64_t r = rem - 16 * j;
        const __mmask16 xm = r >= 16 ? __mmask16(0xFFFF) : __mmask16((1u << r) - 1);
        const __m512 f = _mm512_castsi512_ps(_mm512_maskz_permutex2var_epi8(top, l, place[j], h));
        for (int m = 0; m < MR; ++m)
          acc[m][j % NA] = _mm512_fmadd_ps(_mm512_maskz_loadu_ps(xm, g.x + m * g.ldx + k + 16 * j), f,
                                           acc[m][j % NA]);
      }
    }
    const __m512 vs = _mm512_set1_ps(e8m0(g.s[k0 >> 7]));
    for (int m = 0; m < MR; ++m) {
      __m512 s = acc[m][0];
      for (int a = 1; a < NA; ++a) s = _mm512_add_ps(s, acc[m][a]);
      tot[m] = _mm512_fmadd_ps(s, vs, tot[m]);
    }
  }
  for (int m = 0; m < MR; ++m) g.y[m * g.ldy] = _mm512_reduce_add_ps(tot[m]);
}

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
    __m512 p[MR][2];
    for (int s = 0; s < 8; ++s) {
      const __m512 f = _mm512_permutexvar_ps(s ? _mm512_srli_epi32(c, 4 * s) : c, tab);
      for (int m = 0; m < MR; ++m) {
        const __m512 xv = _mm512_loadu_ps(g.x + m * g.ldx + 128 * q + 16 * s);
        p[m][s & 1] = s < 2 ? _mm512_mul_ps(xv, f) : _mm512_fmadd_ps(xv, f, p[m][s & 1]);
      }
    }
    for (int m = 0; m < MR; ++m) tot[m] = _mm512_fmadd_ps(_mm512_add_ps(p[m][0], p[m][1]), vs, tot[m]);
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
