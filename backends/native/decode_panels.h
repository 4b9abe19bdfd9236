// bf16 weights packed in output panels (Lin kind 4, decode_linear.h): the fused step's small-model linears.
// Layout (backends/cpu_decode.py `_panels`): panel p holds outputs [16p, 16p + 16); for each pair of inputs
// (2i, 2i + 1) it stores 16 32-bit words, word j = W[16p + j][2i] in its low half and W[16p + j][2i + 1] in its
// high half (zero past N or K). One 64-byte load thus gives two input steps for 16 outputs, widened to float32
// exactly by one shift (low halves) and one mask (high halves), and the outputs sit in the vector lanes: every
// x element is broadcast, no lane sums are reduced at the end (the row-major tiles end every output with a
// 16-lane reduction, a large share at K = 128-256), and each weight load serves every x row of the tile.
// Arithmetic: y[b, n] = the sum over blocks of KB inputs, in order, of each block's fma chain from 0 over its
// inputs in order -- the same for every tile shape (PP panels x R rows only decide which loads are shared), thread
// split and batch size.
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>

namespace {

constexpr int64_t PANEL = 16;

// lanes [lo, hi) of a panel (clamped to 0..16) as a store mask
inline uint32_t panel_mask(int64_t lo, int64_t hi) {
  lo = std::clamp<int64_t>(lo, 0, PANEL), hi = std::clamp<int64_t>(hi, 0, PANEL);
  if (hi <= lo) return 0;
  return ((hi == PANEL ? 0xFFFFu : (1u << hi) - 1)) & ~((1u << lo) - 1);
}

// Inputs per partial sum: each block of KB inputs is summed from zero by its own chain, then added to the
// output's total. A single K-long chain lost ~3x accuracy against the float64 product (measured on the tiny
// default's logits: 1.0e-5 vs 3.6e-6 for the lane-split tiles); blocks of 16: 4.3e-6 (tests/test_decode_fused.py).
constexpr int64_t KB = 16;

// PP consecutive panels (P: the first, panel stride ps words) x R rows of x (row r at x + r * ldx):
// y[r * ldy + pp * 16 + j] for the lanes pp * 16 + j in [lo, hi)
template <int PP, int R>
inline void panel_tile(const float* __restrict x, int64_t ldx, const uint32_t* __restrict P, int64_t ps, int64_t K,
                       float* __restrict y, int64_t ldy, int64_t lo, int64_t hi) {
#if defined(__AVX512F__)
  static_assert(2 * PP * R + 2 <= 30, "totals, block sums and weights fit the registers");
  const __m512i HI = _mm512_set1_epi32(int(0xFFFF0000u));
  __m512 acc[PP][R], t[PP][R];
  for (int p = 0; p < PP; ++p)
    for (int r = 0; r < R; ++r) acc[p][r] = _mm512_setzero_ps();
  for (int64_t k0 = 0; k0 < K; k0 += KB) {
    const int64_t k1 = std::min(K, k0 + KB);
    for (int p = 0; p < PP; ++p)
      for (int r = 0; r < R; ++r) t[p][r] = _mm512_setzero_ps();
    int64_t k = k0;
    for (; k + 2 <= k1; k += 2) {
      const float* xk = x + k;
      for (int p = 0; p < PP; ++p) {
        const __m512i v = _mm512_loadu_si512((const void*)(P + p * ps + k / 2 * PANEL));
        const __m512 wl = _mm512_castsi512_ps(_mm512_slli_epi32(v, 16));
        const __m512 wh = _mm512_castsi512_ps(_mm512_and_si512(v, HI));
        for (int r = 0; r < R; ++r) t[p][r] = _mm512_fmadd_ps(_mm512_set1_ps(xk[r * ldx]), wl, t[p][r]);
        for (int r = 0; r < R; ++r) t[p][r] = _mm512_fmadd_ps(_mm512_set1_ps(xk[r * ldx + 1]), wh, t[p][r]);
      }
    }
    if (k < k1)                            // K odd: the last input alone (its pair's high half is padding)
      for (int p = 0; p < PP; ++p) {
        const __m512i v = _mm512_loadu_si512((const void*)(P + p * ps + k / 2 * PANEL));
        const __m512 wl = _mm512_castsi512_ps(_mm512_slli_epi32(v, 16));
        for (int r = 0; r < R; ++r) t[p][r] = _mm512_fmadd_ps(_mm512_set1_ps(x[r * ldx + k]), wl, t[p][r]);
      }
    for (int p = 0; p < PP; ++p)
      for (int r = 0; r < R; ++r) acc[p][r] = _mm512_add_ps(acc[p][r], t[p][r]);
  }
  for (int p = 0; p < PP; ++p) {
    const __mmask16 m = __mmask16(panel_mask(lo - p * PANEL, hi - p * PANEL));
    for (int r = 0; r < R; ++r) _mm512_mask_storeu_ps(y + r * ldy + p * PANEL, m, acc[p][r]);
  }
#else
  float acc[PP][R][PANEL] = {}, t[PP][R][PANEL];
  for (int64_t k0 = 0; k0 < K; k0 += KB) {
    const int64_t k1 = std::min(K, k0 + KB);
    for (int p = 0; p < PP; ++p)
      for (int r = 0; r < R; ++r)
        for (int j = 0; j < PANEL; ++j) t[p][r][j] = 0.f;
    for (int64_t k = k0; k < k1; ++k)
      for (int p = 0; p < PP; ++p)
        for (int r = 0; r < R; ++r)
          for (int j = 0; j < PANEL; ++j) {
            const uint32_t wd = P[p * ps + k / 2 * PANEL + j];
            t[p][r][j] = madd(x[r * ldx + k], bits_f(k & 1 ? wd & 0xFFFF0000u : wd << 16), t[p][r][j]);
          }
    for (int p = 0; p < PP; ++p)
      for (int r = 0; r < R; ++r)
        for (int j = 0; j < PANEL; ++j) acc[p][r][j] += t[p][r][j];
  }
  for (int p = 0; p < PP; ++p) {
    const uint32_t m = panel_mask(lo - p * PANEL, hi - p * PANEL);
    for (int r = 0; r < R; ++r)
      for (int j = 0; j < PANEL; ++j)
        if (m >> j & 1) y[r * ldy + p * PANEL + j] = acc[p][r][j];
  }
#endif
}

// panels [p, p + np) (np <= PP) for R rows
template <int PP, int R>
inline void panel_run(int64_t np, const float* x, int64_t ldx, const uint32_t* P, int64_t ps, int64_t K, float* y,
                      int64_t ldy, int64_t lo, int64_t hi) {
  if constexpr (PP > 1)
    if (np < PP) return panel_run<PP - 1, R>(np, x, ldx, P, ps, K, y, ldy, lo, hi);
  panel_tile<PP, R>(x, ldx, P, ps, K, y, ldy, lo, hi);
}

// Panels in flight per row count: enough independent chains (PP * R >= 7) to cover the multiply-add latency,
// few enough that the sums, weights and broadcasts stay in registers (a first version spilled at 16 chains)
template <int R>
inline void panel_rows(const float* x, int64_t ldx, const uint32_t* P, int64_t ps, int64_t K, int64_t a, int64_t e,
                       float* y, int64_t ldy) {
  constexpr int PP = R == 1 ? 8 : R == 2 ? 4 : R == 3 ? 3 : R <= 6 ? 2 : 1;
  for (int64_t p = a / PANEL; p * PANEL < e; p += PP) {
    const int64_t np = std::min<int64_t>(PP, (e - p * PANEL + PANEL - 1) / PANEL);
    // y points at output p * 16 (lanes outside [a, e) are not stored)
    panel_run<PP, R>(np, x, ldx, P + p * ps, ps, K, y + p * PANEL, ldy, a - p * PANEL, e - p * PANEL);
  }
}

inline void panel_group(int64_t R, const float* x, int64_t ldx, const uint32_t* P, int64_t ps, int64_t K, int64_t a,
                        int64_t e, float* y, int64_t ldy) {
  switch (R) {
    case 1: panel_rows<1>(x, ldx, P, ps, K, a, e, y, ldy); break;
    case 2: panel_rows<2>(x, ldx, P, ps, K, a, e, y, ldy); break;
    case 3: panel_rows<3>(x, ldx, P, ps, K, a, e, y, ldy); break;
    case 4: panel_rows<4>(x, ldx, P, ps, K, a, e, y, ldy); break;
    case 5: panel_rows<5>(x, ldx, P, ps, K, a, e, y, ldy); break;
    case 6: panel_rows<6>(x, ldx, P, ps, K, a, e, y, ldy); break;
    case 7: panel_rows<7>(x, ldx, P, ps, K, a, e, y, ldy); break;
    default: panel_rows<8>(x, ldx, P, ps, K, a, e, y, ldy); break;
  }
}

// Outputs of a weight block every group of up to 8 x rows reads while it is in L1 (at B > 8: each group
// re-reading the whole chunk's weights from L2 made B = 32 1.6x slower than the row tiles)
constexpr int64_t BLOCK_OUT = 2 * PANEL;

// outputs [a, e) of a packed weight (N x K, ps words a panel) for all B rows of x: y[b * ldy + n - base]
inline void panels_batch(const float* x, int64_t ldx, int64_t B, const uint32_t* P, int64_t ps, int64_t K, int64_t a,
                         int64_t e, int64_t base, float* y, int64_t ldy) {
  y -= base;                               // indexed by the output's own number from here
  for (int64_t o = a, o1; o < e; o = o1) {
    o1 = B <= 8 ? e : std::min(e, (o / BLOCK_OUT + 1) * BLOCK_OUT);
    for (int64_t b0 = 0; b0 < B; b0 += 8)
      panel_group(std::min<int64_t>(8, B - b0), x + b0 * ldx, ldx, P, ps, K, o, o1, y + b0 * ldy, ldy);
  }
}

}  // namespace
