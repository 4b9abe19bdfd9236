// The fused decode step's attention sub-block (included by decode_step.cpp after decode_linear.h): the small
// float32 helpers the kernels share (lane dot products, RMS norm, RoPE), the compressors' per-token update,
// the per-sequence attention core (q norms / RoPE, compressors, indexer top-k, attention with the sink) and
// `attn_batch`, which runs a batch's projections as stages of tiles around the cores. See decode_step.cpp.
#pragma once

#include <cmath>

#include "decode_exp.h"
#include "decode_linear.h"

namespace {

// Lane accumulation for the fused kernels' own dot products: plain loops over LANES accumulators that the
// compiler vectorises. acc[0..LANES) += a[0..n) * b[0..n) for the multiple-of-LANES head; returns the tail.
inline float fma_lanes(float* __restrict acc, const float* __restrict a, const float* __restrict b, int64_t n) {
  int64_t i = 0;
  for (; i + LANES <= n; i += LANES)
    for (int j = 0; j < LANES; ++j) acc[j] += a[i + j] * b[i + j];
  float t = 0.f;
  for (; i < n; ++i) t += a[i] * b[i];
  return t;
}

inline float sumsq(const float* x, int64_t n) {
  alignas(64) float acc[LANES] = {0};
  float t = fma_lanes(acc, x, x, n);
  return reduce(acc) + t;
}

// in place: x * rsqrt(mean(x^2) + eps) (* w)
inline void rms(float* x, int64_t n, const float* w, float eps) {
  float r = 1.0f / std::sqrt(sumsq(x, n) / float(n) + eps);
  if (w) for (int64_t i = 0; i < n; ++i) x[i] = x[i] * r * w[i];
  else for (int64_t i = 0; i < n; ++i) x[i] *= r;
}

// interleaved-pair RoPE of the trailing 2*half dims of x at position pos (inverse: conjugate)
inline void rope(float* x, int64_t dim, const float* freqs, int64_t half, int64_t pos, bool inverse) {
  float* r = x + dim - 2 * half;
  for (int64_t k = 0; k < half; ++k) {
    float ang = float(pos) * freqs[k];
    float c = std::cos(ang), s = inverse ? -std::sin(ang) : std::sin(ang);
    float a = r[2 * k], b = r[2 * k + 1];
    r[2 * k] = a * c - b * s;
    r[2 * k + 1] = a * s + b * c;
  }
}

// RoPE with the cos / sin of one position precomputed (cs[2k], cs[2k+1]: the same values `rope` computes),
// for the many heads rotated at the same position
inline void trig(const float* freqs, int64_t half, int64_t pos, float* cs) {
  for (int64_t k = 0; k < half; ++k) {
    float ang = float(pos) * freqs[k];
    cs[2 * k] = std::cos(ang);
    cs[2 * k + 1] = std::sin(ang);
  }
}
inline void rope_cs(float* x, int64_t dim, const float* cs, int64_t half, bool inverse) {
  float* r = x + dim - 2 * half;
  for (int64_t k = 0; k < half; ++k) {
    float c = cs[2 * k], s = inverse ? -cs[2 * k + 1] : cs[2 * k + 1];
    float a = r[2 * k], b = r[2 * k + 1];
    r[2 * k] = a * c - b * s;
    r[2 * k + 1] = a * s + b * c;
  }
}

inline float sigm(float v) { return 1.0f / (1.0f + std::exp(-v)); }

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

struct Comp {            // one compressor's weights
  Lin wkv, wgate;
  const float* ape;      // [m, coff*c]
  const float* norm;     // [c]
  int64_t m, overlap, c;
};

struct AttnP {           // one attention layer's weights and dims
  Lin wq_a, wq_b, wkv, wo_a, wo_b, iwq_b, iw_proj;
  const float *q_norm, *kv_norm, *sink, *freqs;
  Comp comp, icomp;
  int64_t d, H, D, rope_half, q_lora, G, o_lora, W, ratio, csa;
  int64_t ih, idim, topk;
  float eps, iscale;
};

struct SeqP {            // one sequence's state of this layer (pointers into its torch buffers)
  int64_t pos;
  float* kv;             // [W + entries (+1 room), D]: ring then compressed entries
  int64_t n_entries;
  float *pk, *ps;        // compressor pending values / scores [cap, coff*c]
  int64_t pstart;
  float* ikeys;          // [n_index (+1 room), idim]
  int64_t n_index;
  float *ipk, *ips;
  int64_t ipstart;
};

inline int64_t comp_width(const Comp& C) { return (C.overlap ? 2 : 1) * C.c; }

// Add token `pos`'s projected row (kv, gate: C.wkv / C.wgate of x, computed by the stage's linears) to a
// compressor's pending rows; pool the window it closes into out[row] (norm, RoPE at the window start).
// Returns 1 when an entry was written. The caller's counters follow the same rule (runtime/model/decode.py):
// keep = stop*m - (m if overlap), pending start = keep.
int comp_step(const Comp& C, const float* kv, const float* gate, int64_t pos, float* pk, float* ps,
              int64_t pstart, float* out, const float* freqs, int64_t half, float eps) {
  const int64_t width = comp_width(C), m = C.m;
  const int64_t row = pos - pstart;
  std::memcpy(pk + row * width, kv, sizeof(float) * width);
  const float* a = C.ape + (pos % m) * width;
  for (int64_t j = 0; j < width; ++j) ps[row * width + j] = gate[j] + a[j];
  if ((pos + 1) % m) return 0;
  const int64_t w = (pos + 1) / m - 1;       // the closing window
  const int64_t c = C.c;
  // slots: overlap -> window w-1's first half channels (rows [0, m) when w >= 1) then window w's second half
  const int64_t cur = C.overlap ? (w >= 1 ? m : 0) : 0;   // row of window w's first slot in pending
  for (int64_t ch = 0; ch < c; ++ch) {
    float mx = -INFINITY;
    auto each = [&](auto f) {
      if (C.overlap && w >= 1)
        for (int64_t i = 0; i < m; ++i) f(ps[i * width + ch], pk[i * width + ch]);
      const int64_t off = C.overlap ? c : 0;
      for (int64_t i = 0; i < m; ++i) f(ps[(cur + i) * width + off + ch], pk[(cur + i) * width + off + ch]);
    };
    each([&](float s, float) { mx = std::max(mx, s); });
    float den = 0.f, num = 0.f;
    each([&](float s, float v) { float e = std::exp(s - mx); den += e; num += e * v; });
    out[ch] = num / den;
  }
  rms(out, c, C.norm, eps);
  rope(out, c, freqs, half, w * m, false);
  // keep the last closed window for an overlapping compressor: rows [m, 2m) -> [0, m)
  if (C.overlap && cur == m) {
    std::memmove(pk, pk + m * width, sizeof(float) * m * width);
    std::memmove(ps, ps + m * width, sizeof(float) * m * width);
  }
  return 1;
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

// One attention layer's per-token rows of a batch, each [B, width] (the stage linears' outputs). One per
// calling thread, reused by every layer and step (every row is written before it is read: no clearing).
struct AttnRows {
  std::vector<float> qr, kvr, q, o, z, ckv, cg, iw, ikv, ig, iq;
  void size(const AttnP& P, int64_t B) {
    qr.resize(B * P.q_lora), kvr.resize(B * P.D), q.resize(B * P.H * P.D), o.resize(B * P.H * P.D);
    z.resize(B * P.G * P.o_lora);
    ckv.resize(P.ratio ? B * comp_width(P.comp) : 0), cg.resize(ckv.size());
    iw.resize(P.csa ? B * P.ih : 0), ikv.resize(P.csa ? B * comp_width(P.icomp) : 0), ig.resize(ikv.size());
    iq.resize(P.csa ? B * P.ih * P.idim : 0);
  }
};

// Sequence b's attention after the projections: q norms / RoPE, compressors, indexer top-k, attention over
// window + entries with the sink, inverse RoPE -> R.o row b. The ring row was written by the caller.
void attn_core(const AttnP& P, AttnRows& R, int64_t b, SeqP& S) {
  const int64_t H = P.H, D = P.D, pos = S.pos;
  thread_local std::vector<float> cs, s, den, sc;
  thread_local IndexQ iqt;
  thread_local std::vector<int64_t> rows, ord;
  cs.resize(2 * P.rope_half);
  trig(P.freqs, P.rope_half, pos, cs.data());
  float* q = R.q.data() + b * H * D;
  for (int64_t h = 0; h < H; ++h) {
    rms(q + h * D, D, nullptr, P.eps);
    rope_cs(q + h * D, D, cs.data(), P.rope_half, false);
  }
  int64_t n_ent = S.n_entries;
  if (P.ratio) {
    const int64_t cw = comp_width(P.comp);
    n_ent += comp_step(P.comp, R.ckv.data() + b * cw, R.cg.data() + b * cw, pos, S.pk, S.ps, S.pstart,
                       S.kv + (P.W + n_ent) * D, P.freqs, P.rope_half, P.eps);
  }
  rows.clear();                              // pool rows this query reads: window slots, then entries
  for (int64_t t = pos - P.W + 1; t <= pos; ++t) if (t >= 0) rows.push_back(t % P.W);
  if (P.ratio) {
    const int64_t n_vis = (pos + 1) / P.ratio;
    if (P.csa) {
      float* iq = R.iq.data() + b * P.ih * P.idim;
      float* iw = R.iw.data() + b * P.ih;
      for (int64_t h = 0; h < P.ih; ++h) rope_cs(iq + h * P.idim, P.idim, cs.data(), P.rope_half, false);
      for (int64_t h = 0; h < P.ih; ++h) iw[h] *= P.iscale;
      const int64_t icw = comp_width(P.icomp);
      int64_t n_idx = S.n_index + comp_step(P.icomp, R.ikv.data() + b * icw, R.ig.data() + b * icw, pos, S.ipk,
                                            S.ips, S.ipstart, S.ikeys + S.n_index * P.idim, P.freqs,
                                            P.rope_half, P.eps);
      const int64_t n = std::min(n_vis, n_idx), k = std::min(P.topk, n_vis);
      sc.resize(n);
      iqt.set(iq, iw, P.ih, P.idim);
      index_scores(iqt, S.ikeys, n, sc.data());
      const int64_t kk = std::min(k, n);
      ord.resize(kk);
      const int64_t got = top_k(sc.data(), n, kk, ord.data());
      for (int64_t j = 0; j < got; ++j) rows.push_back(P.W + ord[j]);
    } else {
      for (int64_t e = 0; e < n_vis; ++e) rows.push_back(P.W + e);
    }
  }
  // attention with the sink: p_j = exp(s_j) / (sum exp(s_j) + exp(sink_h)), scores s[h, j] = q_h . kv[rows[j]]
  const float scale = 1.0f / std::sqrt(float(D));
  const int64_t K = int64_t(rows.size());
  s.resize(H * K);
  den.resize(H);
  scores_heads(q, H, D, S.kv, rows.data(), K, s.data(), K);
  softmax_sink(s.data(), H, K, scale, P.sink, den.data());
  float* o = R.o.data() + b * H * D;
  weighted_rows_heads(s.data(), K, H, S.kv, rows.data(), K, D, o, D);
  for (int64_t h = 0; h < H; ++h) rope_cs(o + h * D, D, cs.data(), P.rope_half, true);
}

// x [B, d] (after attn_norm) -> out [B, d]; updates the sequences' states. S: rows per sequence (B / S
// sequences of S consecutive rows at consecutive positions, each row with its own record: a speculative verify
// chunk). A sequence's rows run in position order on one thread, its ring write right before its core, so
// each row sees exactly what a one-token step at its position sees (S = 1: one token per sequence).
void attn_batch(const AttnP& P, int64_t B, const float* x, SeqP* seqs, float* out, int nt, int64_t S = 1) {
  const int64_t d = P.d, D = P.D, HD = P.H * P.D, ql = P.q_lora, ol = P.o_lora, G = P.G;
  thread_local AttnRows mine;
  AttnRows& R = mine;        // a local name: the lambdas below run on pool threads, where `mine` is theirs
  R.size(P, B);
  std::vector<Job> jobs{job(P.wq_a, x, d, B, R.qr.data(), ql), job(P.wkv, x, d, B, R.kvr.data(), D)};
  if (P.ratio) {
    const int64_t cw = comp_width(P.comp);
    jobs.push_back(job(P.comp.wkv, x, d, B, R.ckv.data(), cw));
    jobs.push_back(job(P.comp.wgate, x, d, B, R.cg.data(), cw));
  }
  if (P.csa) {
    const int64_t icw = comp_width(P.icomp);
    jobs.push_back(job(P.iw_proj, x, d, B, R.iw.data(), P.ih));
    jobs.push_back(job(P.icomp.wkv, x, d, B, R.ikv.data(), icw));
    jobs.push_back(job(P.icomp.wgate, x, d, B, R.ig.data(), icw));
  }
  run_jobs(jobs.data(), int(jobs.size()), nt);
  for_seqs(B, nt, [&](int64_t b) {           // norms, the kv row's RoPE and its ring slot
    rms(R.qr.data() + b * ql, ql, P.q_norm, P.eps);
    float* kv = R.kvr.data() + b * D;
    rms(kv, D, P.kv_norm, P.eps);
    rope(kv, D, P.freqs, P.rope_half, seqs[b].pos, false);
    if (S == 1) std::memcpy(seqs[b].kv + (seqs[b].pos % P.W) * D, kv, sizeof(float) * D);
  });
  jobs = {job(P.wq_b, R.qr.data(), ql, B, R.q.data(), HD)};
  if (P.csa) jobs.push_back(job(P.iwq_b, R.qr.data(), ql, B, R.iq.data(), P.ih * P.idim));
  run_jobs(jobs.data(), int(jobs.size()), nt);
  if (S == 1) {
    // the cores, longest context first (a core's cost grows with its position: the threads claim them in this
    // order, so the last claims are the short ones and the threads finish together)
    thread_local std::vector<int64_t> order;
    std::vector<int64_t>& by_pos = order;      // a local name (as R above)
    by_pos.resize(B);
    for (int64_t b = 0; b < B; ++b) by_pos[b] = b;
    std::stable_sort(by_pos.begin(), by_pos.end(), [&](int64_t a, int64_t c) { return seqs[a].pos > seqs[c].pos; });
    for_seqs(B, nt, [&](int64_t i) { attn_core(P, R, by_pos[i], seqs[by_pos[i]]); });
  } else {                                   // a sequence's rows in position order, each ring write first
    for_seqs(B / S, nt, [&](int64_t g) {
      for (int64_t b = g * S; b < (g + 1) * S; ++b) {
        std::memcpy(seqs[b].kv + (seqs[b].pos % P.W) * D, R.kvr.data() + b * D, sizeof(float) * D);
        attn_core(P, R, b, seqs[b]);
      }
    });
  }
  const int64_t per = HD / G;                // wo_a: group g's rows [g*o_lora, (g+1)*o_lora) read o[g*per..]
  jobs.clear();
  for (int64_t g = 0; g < G; ++g)
    jobs.push_back(Job{&P.wo_a, R.o.data() + g * per, HD, B, R.z.data() + g * ol, G * ol, g * ol, (g + 1) * ol});
  run_jobs(jobs.data(), int(jobs.size()), nt);
  jobs = {job(P.wo_b, R.z.data(), G * ol, B, out, d)};
  run_jobs(jobs.data(), 1, nt);
}

}  // namespace
