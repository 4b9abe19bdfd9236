// The attention core's row kernels (included by decode_attn.h): the indexer's scores of every compressed key
// and its top-k, the attention scores over a query's pool rows, the softmax with the sink, and the weighted sum
// of the pool rows. Each has an AVX-512 path and a portable one; every value is a fixed chain of operations
// per (head, row) whatever the batch or a row's place in a block of rows (the batch invariance the server needs).
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <vector>

#include "decode_exp.h"
#include "decode_linear.h"

namespace {

// The indexer's scores of n keys: sc[e] = sum_h relu(q_h . key_e) * w_h (w already scaled). The heads are the
// lanes: q is transposed once per query into qt [G][idim][16] (G groups of 16 heads, zero-padded, as w into
// wp [G][16]), so a key costs idim broadcast multiply-adds per group and one lane tree (`reduce`) instead of a
// tree per head (the indexer scan over every compressed key is the step's longest loop at long contexts).
// A key's value: per head a multiply-add chain over k from zero, relu times w, the group's 16 lanes by the
// fixed tree, groups summed in order -- the same for every key whatever n or its place in a block of keys.
struct IndexQ {
  std::vector<float> qt, wp;
  int64_t G = 0, idim = 0;
  void set(const float* q, const float* w, int64_t ih, int64_t dim) {
    G = (ih + 15) / 16, idim = dim;
    qt.assign(G * dim * 16, 0.f);
    wp.assign(G * 16, 0.f);
    for (int64_t h = 0; h < ih; ++h) {
      for (int64_t k = 0; k < dim; ++k) qt[((h / 16) * dim + k) * 16 + h % 16] = q[h * dim + k];
      wp[h] = w[h];
    }
  }
};

#if defined(__AVX512F__)
template <int NE>        // NE keys at a time: independent chains that share each qt load
inline void index_block(const IndexQ& Q, const float* __restrict keys, float* __restrict sc) {
  const int64_t dim = Q.idim;
  float r[NE];
  for (int i = 0; i < NE; ++i) r[i] = 0.f;
  for (int64_t g = 0; g < Q.G; ++g) {
    const float* qt = Q.qt.data() + g * dim * 16;
    __m512 acc[NE];
    for (int i = 0; i < NE; ++i) acc[i] = _mm512_setzero_ps();
    for (int64_t k = 0; k < dim; ++k) {
      const __m512 qv = _mm512_loadu_ps(qt + k * 16);
      for (int i = 0; i < NE; ++i) acc[i] = _mm512_fmadd_ps(_mm512_set1_ps(keys[i * dim + k]), qv, acc[i]);
    }
    const __m512 wv = _mm512_loadu_ps(Q.wp.data() + g * 16), z = _mm512_setzero_ps();
    for (int i = 0; i < NE; ++i) r[i] += reduce(_mm512_mul_ps(_mm512_max_ps(z, acc[i]), wv));
  }
  for (int i = 0; i < NE; ++i) sc[i] = r[i];
}
#endif

inline void index_scores(const IndexQ& Q, const float* keys, int64_t n, float* sc) {
  const int64_t dim = Q.idim;
  int64_t e = 0;
#if defined(__AVX512F__)
  for (; e + 8 <= n; e += 8) index_block<8>(Q, keys + e * dim, sc + e);
  for (; e < n; ++e) index_block<1>(Q, keys + e * dim, sc + e);
#else
  for (; e < n; ++e) {
    const float* key = keys + e * dim;
    float tot = 0.f;
    for (int64_t g = 0; g < Q.G; ++g) {
      const float* qt = Q.qt.data() + g * dim * 16;
      alignas(64) float acc[16] = {0};
      for (int64_t k = 0; k < dim; ++k)
        for (int l = 0; l < 16; ++l) acc[l] = std::fma(key[k], qt[k * 16 + l], acc[l]);
      for (int l = 0; l < 16; ++l) acc[l] = std::max(acc[l], 0.f) * Q.wp[g * 16 + l];
      tot += reduce(acc);
    }
    sc[e] = tot;
  }
#endif
}

// The k best of sc[0..n) in the reference's order (stable descending sort: a higher score first, equal scores
// by index) -> idx[0..k), returns k. One pass keeping the best so far sorted: a key enters only when it beats
// the k-th (a later key never wins a tie), so most keys cost one comparison.
inline int64_t top_k(const float* sc, int64_t n, int64_t k, int64_t* idx) {
  if (k <= 0) return 0;
  int64_t cnt = 0;
  for (int64_t e = 0; e < n; ++e) {
    const float v = sc[e];
    if (cnt == k && !(v > sc[idx[k - 1]])) continue;
    int64_t p = cnt < k ? cnt++ : k - 1;     // drop the k-th when full
    for (; p > 0 && v > sc[idx[p - 1]]; --p) idx[p] = idx[p - 1];
    idx[p] = e;
  }
  return cnt;
}

// out[i] = sum_j p[j] * kv[rows[j]][i], j in order for every element (from zero, one multiply-add per term);
// 64 elements at a time held in registers across all j on AVX-512
inline void weighted_rows(const float* p, const float* kv, const int64_t* rows, int64_t K, int64_t D, float* out) {
  int64_t i0 = 0;
#if defined(__AVX512F__)
  for (; i0 + 64 <= D; i0 += 64) {
    __m512 a0 = _mm512_setzero_ps(), a1 = a0, a2 = a0, a3 = a0;
    for (int64_t j = 0; j < K; ++j) {
      const float* v = kv + rows[j] * D + i0;
      const __m512 pj = _mm512_set1_ps(p[j]);
      a0 = _mm512_fmadd_ps(pj, _mm512_loadu_ps(v), a0);
      a1 = _mm512_fmadd_ps(pj, _mm512_loadu_ps(v + 16), a1);
      a2 = _mm512_fmadd_ps(pj, _mm512_loadu_ps(v + 32), a2);
      a3 = _mm512_fmadd_ps(pj, _mm512_loadu_ps(v + 48), a3);
    }
    _mm512_storeu_ps(out + i0, a0);
    _mm512_storeu_ps(out + i0 + 16, a1);
    _mm512_storeu_ps(out + i0 + 32, a2);
    _mm512_storeu_ps(out + i0 + 48, a3);
  }
  for (int64_t i = i0; i < D; ++i) {
    float a = 0.f;
    for (int64_t j = 0; j < K; ++j) a = std::fma(p[j], kv[rows[j] * D + i], a);
    out[i] = a;
  }
#else
  std::memset(out, 0, sizeof(float) * D);
  for (int64_t j = 0; j < K; ++j) {
    const float* __restrict v = kv + rows[j] * D;
    for (int64_t i = 0; i < D; ++i) out[i] += p[j] * v[i];
  }
#endif
}

#if defined(__AVX512F__)
// r[i] = row i of a 16 x 16 block -> r[k] = its column k
inline void transpose16(__m512* r) {
  __m512 t[16];
  for (int i = 0; i < 8; ++i) {
    t[2 * i] = _mm512_unpacklo_ps(r[2 * i], r[2 * i + 1]);
    t[2 * i + 1] = _mm512_unpackhi_ps(r[2 * i], r[2 * i + 1]);
  }
  for (int i = 0; i < 4; ++i) {
    r[4 * i] = _mm512_shuffle_ps(t[4 * i], t[4 * i + 2], 0x44);
    r[4 * i + 1] = _mm512_shuffle_ps(t[4 * i], t[4 * i + 2], 0xEE);
    r[4 * i + 2] = _mm512_shuffle_ps(t[4 * i + 1], t[4 * i + 3], 0x44);
    r[4 * i + 3] = _mm512_shuffle_ps(t[4 * i + 1], t[4 * i + 3], 0xEE);
  }
  for (int i = 0; i < 4; ++i) {
    t[i] = _mm512_shuffle_f32x4(r[i], r[i + 4], 0x88);
    t[i + 4] = _mm512_shuffle_f32x4(r[i], r[i + 4], 0xDD);
    t[i + 8] = _mm512_shuffle_f32x4(r[i + 8], r[i + 12], 0x88);
    t[i + 12] = _mm512_shuffle_f32x4(r[i + 8], r[i + 12], 0xDD);
  }
  for (int i = 0; i < 4; ++i) {
    r[i] = _mm512_shuffle_f32x4(t[i], t[i + 8], 0x88);
    r[i + 8] = _mm512_shuffle_f32x4(t[i], t[i + 8], 0xDD);
    r[i + 4] = _mm512_shuffle_f32x4(t[i + 4], t[i + 12], 0x88);
    r[i + 12] = _mm512_shuffle_f32x4(t[i + 4], t[i + 12], 0xDD);
  }
}

template <int NH>        // NH heads against the transposed block kt [D][16]: NH chains over k, lanes = pool rows
inline void scores_block(const float* __restrict q, int64_t D, const float* __restrict kt, float* s, int64_t lds,
                         __mmask16 keep) {
  __m512 acc[NH];
  for (int i = 0; i < NH; ++i) acc[i] = _mm512_setzero_ps();
  for (int64_t k = 0; k < D; ++k) {
    const __m512 v = _mm512_loadu_ps(kt + k * 16);
    for (int i = 0; i < NH; ++i) acc[i] = _mm512_fmadd_ps(_mm512_set1_ps(q[i * D + k]), v, acc[i]);
  }
  for (int i = 0; i < NH; ++i) _mm512_mask_storeu_ps(s + i * lds, keep, acc[i]);
}
#endif

// The attention scores s[h * lds + j] = q_h . kv[rows[j]] (h < H, j < K): one multiply-add chain over k from
// zero per score. On AVX-512 the pool rows are the lanes: each block of 16 rows is transposed once (16 x 16
// in registers) and shared by every head, instead of a lane tree per (head, row) pair; a short block repeats
// its last row in the unused lanes and stores only the used ones. The portable path runs the same chains.
inline void scores_heads(const float* q, int64_t H, int64_t D, const float* kv, const int64_t* rows, int64_t K,
                         float* s, int64_t lds) {
#if defined(__AVX512F__)
  if (D % 16 == 0) {
    thread_local std::vector<float> buf;
    buf.resize(D * 16);
    float* kt = buf.data();
    for (int64_t j0 = 0; j0 < K; j0 += 16) {
      const int64_t nj = std::min<int64_t>(16, K - j0);
      for (int64_t d0 = 0; d0 < D; d0 += 16) {
        __m512 r[16];
        for (int i = 0; i < 16; ++i) r[i] = _mm512_loadu_ps(kv + rows[j0 + std::min<int64_t>(i, nj - 1)] * D + d0);
        transpose16(r);
        for (int k = 0; k < 16; ++k) _mm512_storeu_ps(kt + (d0 + k) * 16, r[k]);
      }
      const __mmask16 keep = __mmask16((1u << nj) - 1);
      int64_t h = 0;
      for (; h + 8 <= H; h += 8) scores_block<8>(q + h * D, D, kt, s + h * lds + j0, lds, keep);
      for (; h < H; ++h) scores_block<1>(q + h * D, D, kt, s + h * lds + j0, lds, keep);
    }
    return;
  }
#endif
  for (int64_t h = 0; h < H; ++h)
    for (int64_t j = 0; j < K; ++j) {
      const float* v = kv + rows[j] * D;
      float a = 0.f;
      for (int64_t k = 0; k < D; ++k) a = std::fma(q[h * D + k], v[k], a);
      s[h * lds + j] = a;
    }
}

// weighted_rows for nh heads at once (p [nh, ldp], out [nh, ldo]): on AVX-512 four heads share each 64-element
// block's kv loads and keep 16 independent chains in flight (one head's four chains waited on the multiply-add
// latency); every element is the same chain over j as weighted_rows computes, so the bits are the same.
inline void weighted_rows_heads(const float* p, int64_t ldp, int64_t nh, const float* kv, const int64_t* rows,
                                int64_t K, int64_t D, float* out, int64_t ldo) {
  int64_t h = 0;
#if defined(__AVX512F__)
  if (D % 64 == 0)
    for (; h + 4 <= nh; h += 4)
      for (int64_t i0 = 0; i0 < D; i0 += 64) {
        __m512 a[4][4];
        for (int r = 0; r < 4; ++r)
          for (int c = 0; c < 4; ++c) a[r][c] = _mm512_setzero_ps();
        for (int64_t j = 0; j < K; ++j) {
          const float* v = kv + rows[j] * D + i0;
          const __m512 v0 = _mm512_loadu_ps(v), v1 = _mm512_loadu_ps(v + 16), v2 = _mm512_loadu_ps(v + 32),
                       v3 = _mm512_loadu_ps(v + 48);
          for (int r = 0; r < 4; ++r) {
            const __m512 pj = _mm512_set1_ps(p[(h + r) * ldp + j]);
            a[r][0] = _mm512_fmadd_ps(pj, v0, a[r][0]);
            a[r][1] = _mm512_fmadd_ps(pj, v1, a[r][1]);
            a[r][2] = _mm512_fmadd_ps(pj, v2, a[r][2]);
            a[r][3] = _mm512_fmadd_ps(pj, v3, a[r][3]);
          }
        }
        for (int r = 0; r < 4; ++r)
          for (int c = 0; c < 4; ++c) _mm512_storeu_ps(out + (h + r) * ldo + i0 + 16 * c, a[r][c]);
      }
#endif
  for (; h < nh; ++h) weighted_rows(p + h * ldp, kv, rows, K, D, out + h * ldo);
}

// Row h of s [H, K]: s = exp(s * scale - mx) / den with mx = max(sink_h, s * scale), den = exp(sink_h - mx) +
// sum exp(.) in j order. The scale / max / subtract loops are vectorised (elementwise, and a max is the same
// in any order); the sums of all heads run interleaved (H independent chains, each in j order).
inline void softmax_sink(float* s, int64_t H, int64_t K, float scale, const float* sink, float* den) {
  for (int64_t h = 0; h < H; ++h) {
    float* sh = s + h * K;
    float mx = sink[h];
    int64_t j = 0;
#if defined(__AVX512F__)
    const __m512 sv = _mm512_set1_ps(scale);
    __m512 m = _mm512_set1_ps(mx);
    for (; j + 16 <= K; j += 16) {
      const __m512 v = _mm512_mul_ps(_mm512_loadu_ps(sh + j), sv);
      _mm512_storeu_ps(sh + j, v);
      m = _mm512_max_ps(v, m);             // (a NaN score is skipped, as std::max(mx, v) does)
    }
    mx = _mm512_reduce_max_ps(m);
#endif
    for (; j < K; ++j) { sh[j] *= scale; mx = std::max(mx, sh[j]); }
    den[h] = dexp::one(sink[h] - mx);
    for (j = 0; j < K; ++j) sh[j] -= mx;
    dexp::inplace(sh, K);
  }
  for (int64_t j = 0; j < K; ++j)
    for (int64_t h = 0; h < H; ++h) den[h] += s[h * K + j];
  for (int64_t h = 0; h < H; ++h)
    for (int64_t j = 0; j < K; ++j) s[h * K + j] /= den[h];
}

}  // namespace
