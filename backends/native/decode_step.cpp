// The fused CPU decode step (issue 19): one call per block and decode step, made of five kernels that are also
// exported one by one (each tested against the float32 reference ops it replaces, tests/test_decode_fused.py):
//   dsv4d_hc_pre   mHC pre: RMS-scaled mixes, gates, row softmax + Sinkhorn, weighted stream sum, then the
//                  sub-block's RMS norm (attn_norm / ffn_norm)                     = hc_pre + rms_norm
//   dsv4d_hc_post  mHC post: post[j] * y + sum_i comb[i, j] * res[i]                = hc_post
//   dsv4d_attn     q / kv projections with their norms and RoPE, the ring write, the compressors' per-token
//                  update on their preallocated pending rows (pooling, norm, RoPE of a closing window), the
//                  indexer's queries, keys and top-k, attention over window + selected / HCA entries with the
//                  sink, inverse RoPE, wo_a per group, wo_b                          = Attention.__call__
//   dsv4d_moe      gate (sqrt-softplus, hash or biased top-k), routed + shared clamped-SwiGLU experts = MoE
//   dsv4d_block    the four above in order for one block                           = Block.__call__ (S = 1)
// Exact numerics only (float32 everywhere; the Python side refuses other numerics). Linears decode the
// checkpoint's storage with the GEMV kernels of stored_gemm.cpp (included, not copied: one source of truth).
// Ragged batches: every sequence has its own position and state pointers. Plain C ABI for ctypes.
// A batch runs stage by stage (issue 16): each stage's linears read every weight row once for all B rows and
// split their output rows over a persistent pool (decode_linear.h, decode_pool.h); the per-sequence parts
// (mHC, the attention core) split whole sequences. A row's arithmetic is the same at any B and thread count,
// so a sequence's bits do not depend on what it is batched with.
#include "stored_gemm.cpp"

#include <cmath>

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

// The indexer's heads against one key, four heads at a time sharing each key load (measured faster than one
// head at a time): y[r] = sum_k key[k] * q_r[k] for r < rows.
inline void dot4(const float* __restrict key, const float* __restrict q0, int64_t ldq, int64_t K, int rows,
                 float* __restrict y) {
  const float* qs[4];
  for (int r = 0; r < 4; ++r) qs[r] = q0 + (r < rows ? r : 0) * ldq;
  alignas(64) float p[4][LANES] = {};
  int64_t i = 0;
  for (; i + LANES <= K; i += LANES)
    for (int r = 0; r < 4; ++r)
      for (int j = 0; j < LANES; ++j) p[r][j] += key[i + j] * qs[r][i + j];
  for (int r = 0; r < rows; ++r) {
    float tail = 0.f;
    for (int64_t m = i; m < K; ++m) tail += key[m] * qs[r][m];
    y[r] = reduce(p[r]) + tail;
  }
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

// One attention layer's per-token rows of a batch, each [B, width] (the stage linears' outputs).
struct AttnRows {
  std::vector<float> qr, kvr, q, o, z, ckv, cg, iw, ikv, ig, iq;
  AttnRows(const AttnP& P, int64_t B)
      : qr(B * P.q_lora), kvr(B * P.D), q(B * P.H * P.D), o(B * P.H * P.D), z(B * P.G * P.o_lora),
        ckv(P.ratio ? B * comp_width(P.comp) : 0), cg(ckv.size()), iw(P.csa ? B * P.ih : 0),
        ikv(P.csa ? B * comp_width(P.icomp) : 0), ig(ikv.size()), iq(P.csa ? B * P.ih * P.idim : 0) {}
};

// Sequence b's attention after the projections: q norms / RoPE, compressors, indexer top-k, attention over
// window + entries with the sink, inverse RoPE -> R.o row b. The ring row was written by the caller.
void attn_core(const AttnP& P, AttnRows& R, int64_t b, SeqP& S) {
  const int64_t H = P.H, D = P.D, pos = S.pos;
  thread_local std::vector<float> cs, s, den, sc, hs;
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
      hs.resize(P.ih);
      for (int64_t e = 0; e < n; ++e) {        // relu(q_h . key) for every head (4 at a time), weighted, summed
        const float* key = S.ikeys + e * P.idim;
        for (int64_t h = 0; h < P.ih; h += 4)
          dot4(key, iq + h * P.idim, P.idim, P.idim, int(std::min<int64_t>(4, P.ih - h)), hs.data() + h);
        float tot = 0.f;
        for (int64_t h = 0; h < P.ih; ++h) tot += std::max(hs[h], 0.f) * iw[h];
        sc[e] = tot;
      }
      ord.resize(n);
      for (int64_t e = 0; e < n; ++e) ord[e] = e;
      const int64_t kk = std::min(k, n);
      std::partial_sort(ord.begin(), ord.begin() + kk, ord.end(), [&](int64_t a, int64_t b) {
        return sc[a] > sc[b] || (sc[a] == sc[b] && a < b);   // the reference's stable descending sort
      });
      for (int64_t j = 0; j < kk; ++j) rows.push_back(P.W + ord[j]);
    } else {
      for (int64_t e = 0; e < n_vis; ++e) rows.push_back(P.W + e);
    }
  }
  // attention with the sink: p_j = exp(s_j) / (sum exp(s_j) + exp(sink_h)). Scores s[h, j] = q_h . kv[rows[j]]
  // by the linear tiles over each run of consecutive pool rows (the ring's two halves, HCA's entries).
  const float scale = 1.0f / std::sqrt(float(D));
  const int64_t K = int64_t(rows.size());
  s.resize(H * K);
  den.resize(H);
  for (int64_t j0 = 0; j0 < K;) {
    int64_t j1 = j0 + 1;
    while (j1 < K && rows[j1] == rows[j1 - 1] + 1) ++j1;
    rows_batch(q, D, H, S.kv + rows[j0] * D, D, D, 0, j1 - j0, 0, s.data() + j0, K);
    j0 = j1;
  }
  for (int64_t h = 0; h < H; ++h) {
    float* sh = s.data() + h * K;
    float mx = P.sink[h];
    for (int64_t j = 0; j < K; ++j) { sh[j] *= scale; mx = std::max(mx, sh[j]); }
    float dn = std::exp(P.sink[h] - mx);
    for (int64_t j = 0; j < K; ++j) { sh[j] = std::exp(sh[j] - mx); dn += sh[j]; }
    den[h] = dn;
  }
  for (int64_t h = 0; h < H; ++h)
    for (int64_t j = 0; j < K; ++j) s[h * K + j] /= den[h];
  float* o = R.o.data() + b * H * D;
  for (int64_t h = 0; h < H; ++h) weighted_rows(s.data() + h * K, S.kv, rows.data(), K, D, o + h * D);
  for (int64_t h = 0; h < H; ++h) rope_cs(o + h * D, D, cs.data(), P.rope_half, true);
}

// x [B, d] (after attn_norm), one token per sequence -> out [B, d]; updates the sequences' states.
void attn_batch(const AttnP& P, int64_t B, const float* x, SeqP* seqs, float* out, int nt) {
  const int64_t d = P.d, D = P.D, HD = P.H * P.D, ql = P.q_lora, ol = P.o_lora, G = P.G;
  AttnRows R(P, B);
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
    std::memcpy(seqs[b].kv + (seqs[b].pos % P.W) * D, kv, sizeof(float) * D);
  });
  jobs = {job(P.wq_b, R.qr.data(), ql, B, R.q.data(), HD)};
  if (P.csa) jobs.push_back(job(P.iwq_b, R.qr.data(), ql, B, R.iq.data(), P.ih * P.idim));
  run_jobs(jobs.data(), int(jobs.size()), nt);
  for_seqs(B, nt, [&](int64_t b) { attn_core(P, R, b, seqs[b]); });
  const int64_t per = HD / G;                // wo_a: group g's rows [g*o_lora, (g+1)*o_lora) read o[g*per..]
  jobs.clear();
  for (int64_t g = 0; g < G; ++g)
    jobs.push_back(Job{&P.wo_a, R.o.data() + g * per, HD, B, R.z.data() + g * ol, G * ol, g * ol, (g + 1) * ol});
  run_jobs(jobs.data(), int(jobs.size()), nt);
  jobs = {job(P.wo_b, R.z.data(), G * ol, B, out, d)};
  run_jobs(jobs.data(), 1, nt);
}

struct MoeP {
  const float* gate_w;   // [E, d]
  const float* bias;     // [E] or null (hash layer)
  const int64_t* tid2eid;   // [vocab, k] or null
  const Lin* experts;    // [E][3]: w1, w2, w3
  const Lin* shared;     // [3] or null
  int64_t d, E, k, inter, shared_inter;
  float route_scale, limit;
};

// token b's experts (selection order) and their weights s / sum(s) * route_scale
void route(const MoeP& P, const float* x, int64_t id, int64_t* idx, float* wgt) {
  thread_local std::vector<float> s;
  thread_local std::vector<int64_t> ord;
  s.resize(P.E);
  for (int64_t e = 0; e < P.E; ++e) {
    alignas(64) float acc[LANES] = {0};
    float t = fma_lanes(acc, x, P.gate_w + e * P.d, P.d);
    float v = reduce(acc) + t;
    s[e] = std::sqrt(v > 20.f ? v : std::log1p(std::exp(v)));
  }
  if (P.tid2eid) {
    for (int64_t j = 0; j < P.k; ++j) idx[j] = P.tid2eid[id * P.k + j];
  } else {
    ord.resize(P.E);
    for (int64_t e = 0; e < P.E; ++e) ord[e] = e;
    std::partial_sort(ord.begin(), ord.begin() + P.k, ord.end(), [&](int64_t a, int64_t b) {
      float sa = s[a] + P.bias[a], sb = s[b] + P.bias[b];
      return sa > sb || (sa == sb && a < b);
    });
    for (int64_t j = 0; j < P.k; ++j) idx[j] = ord[j];
  }
  float tot = 0.f;
  for (int64_t j = 0; j < P.k; ++j) tot += s[idx[j]];
  for (int64_t j = 0; j < P.k; ++j) wgt[j] = s[idx[j]] / tot * P.route_scale;
}

// h[i] = silu(min(g, limit)) * clamp(u, +-limit) * wgt, in place in g
inline void swiglu(float* g, const float* u, int64_t n, float limit, float wgt) {
  for (int64_t i = 0; i < n; ++i) {
    float a = std::min(g[i], limit), b = std::max(-limit, std::min(u[i], limit));
    g[i] = a / (1.0f + std::exp(-a)) * b * wgt;
  }
}

// x [B, d] (after ffn_norm), ids [B] -> y [B, d]. Each expert's weights are read once for the tokens routed
// to it; a token's expert outputs are summed in ascending expert id (the reference's grouping), then the
// shared expert's output is added.
void moe_batch(const MoeP& P, int64_t B, const float* x, const int64_t* ids, float* y, int nt) {
  const int64_t d = P.d, k = P.k, I = P.inter, SI = P.shared_inter, E = P.E;
  std::vector<int64_t> idx(B * k);
  std::vector<float> wgt(B * k);
  for_seqs(B, nt, [&](int64_t b) { route(P, x + b * d, ids[b], idx.data() + b * k, wgt.data() + b * k); });
  // slot b*k + j -> its row among expert idx's tokens; experts' rows laid out one after another
  std::vector<int64_t> first(E + 1, 0), row(B * k);
  for (int64_t i = 0; i < B * k; ++i) ++first[idx[i] + 1];
  for (int64_t e = 0; e < E; ++e) first[e + 1] += first[e];
  std::vector<int64_t> fill(first.begin(), first.end() - 1);
  for (int64_t i = 0; i < B * k; ++i) row[i] = fill[idx[i]]++;
  const int64_t n = B * k;
  std::vector<float> xg(n * d), g(n * I), u(n * I), t(n * d), sg(B * SI), su(B * SI), st(P.shared ? B * d : 0);
  for (int64_t i = 0; i < n; ++i) std::memcpy(xg.data() + row[i] * d, x + (i / k) * d, sizeof(float) * d);
  std::vector<Job> jobs;
  for (int64_t e = 0; e < E; ++e) {
    const int64_t c = first[e + 1] - first[e];
    if (!c) continue;
    const float* xe = xg.data() + first[e] * d;
    jobs.push_back(job(P.experts[3 * e], xe, d, c, g.data() + first[e] * I, I));
    jobs.push_back(job(P.experts[3 * e + 2], xe, d, c, u.data() + first[e] * I, I));
  }
  if (P.shared) {
    jobs.push_back(job(P.shared[0], x, d, B, sg.data(), SI));
    jobs.push_back(job(P.shared[2], x, d, B, su.data(), SI));
  }
  run_jobs(jobs.data(), int(jobs.size()), nt);
  // the activations (an exp per element) of every routed row, then of the shared rows
  for_seqs(n + (P.shared ? B : 0), nt, [&](int64_t i) {
    if (i < n) swiglu(g.data() + row[i] * I, u.data() + row[i] * I, I, P.limit, wgt[i]);
    else swiglu(sg.data() + (i - n) * SI, su.data() + (i - n) * SI, SI, P.limit, 1.0f);
  });
  jobs.clear();
  for (int64_t e = 0; e < E; ++e) {
    const int64_t c = first[e + 1] - first[e];
    if (c) jobs.push_back(job(P.experts[3 * e + 1], g.data() + first[e] * I, I, c, t.data() + first[e] * d, d));
  }
  if (P.shared) jobs.push_back(job(P.shared[1], sg.data(), SI, B, st.data(), d));
  run_jobs(jobs.data(), int(jobs.size()), nt);
  for_seqs(B, nt, [&](int64_t b) {
    thread_local std::vector<int64_t> order;
    order.resize(k);
    const int64_t* ib = idx.data() + b * k;
    for (int64_t j = 0; j < k; ++j) order[j] = j;
    std::sort(order.begin(), order.end(), [&](int64_t a, int64_t c) { return ib[a] < ib[c]; });
    float* yb = y + b * d;
    for (int64_t i = 0; i < d; ++i) {
      float r = 0.f;                         // routed sum in ascending expert id, then + shared
      for (int64_t j : order) r += t[row[b * k + j] * d + i];
      yb[i] = r + (P.shared ? 0.f + st[b * d + i] : 0.f);
    }
  });
}

struct HcP { const float *fn, *base, *scale, *norm; int64_t hc, d, iters; float hc_eps, norm_eps; };

// mHC pre in three parts, so that a batch runs the Sinkhorn iterations of all its rows at once (lanes = rows):
// head: the mixes (`dots`: X . fn_j for the (2 + hc) * hc of them, from the caller's stage; null: computed
// here, the same values), the pre / post gates and comb's row softmax (+ eps); sinkhorn: the alternating
// normalisations; tail: the weighted stream sum and the sub-block's norm.
void hc_pre_head(const HcP& P, const float* X, const float* dots, float* pre, float* post, float* comb) {
  const int64_t hc = P.hc, d = P.d, nd = hc * d, nm = (2 + hc) * hc;
  float r = 1.0f / std::sqrt(sumsq(X, nd) / float(nd) + P.norm_eps);
  thread_local std::vector<float> mix;
  mix.resize(nm);
  for (int64_t j = 0; j < nm; ++j) {
    float v;
    if (dots) {
      v = dots[j];
    } else {
      alignas(64) float acc[LANES] = {0};
      float t = fma_lanes(acc, X, P.fn + j * nd, nd);
      v = reduce(acc) + t;
    }
    mix[j] = v * r;
  }
  for (int64_t i = 0; i < hc; ++i) {
    pre[i] = sigm(mix[i] * P.scale[0] + P.base[i]) + P.hc_eps;
    post[i] = 2.0f * sigm(mix[hc + i] * P.scale[1] + P.base[hc + i]);
  }
  float* cm = comb;
  for (int64_t i = 0; i < hc; ++i) {
    float mx = -INFINITY;
    for (int64_t j = 0; j < hc; ++j) {
      cm[i * hc + j] = mix[2 * hc + i * hc + j] * P.scale[2] + P.base[2 * hc + i * hc + j];
      mx = std::max(mx, cm[i * hc + j]);
    }
    float sum = 0.f;
    for (int64_t j = 0; j < hc; ++j) { cm[i * hc + j] = std::exp(cm[i * hc + j] - mx); sum += cm[i * hc + j]; }
    for (int64_t j = 0; j < hc; ++j) cm[i * hc + j] = cm[i * hc + j] / sum + P.hc_eps;
  }
}

// the Sinkhorn normalisations of B rows' comb [B, hc, hc] in place: column sums first, then rows and columns
// alternately. Each row is one lane of the innermost loops: additions and divisions in the same order as for
// a row alone (no exp or fma here, so vector lanes compute exactly what scalar code does).
void sinkhorn(const HcP& P, int64_t B, float* comb) {
  const int64_t hc = P.hc, e = hc * hc;
  thread_local std::vector<float> t, sum;
  t.resize(e * B);
  sum.resize(B);
  for (int64_t b = 0; b < B; ++b)
    for (int64_t k = 0; k < e; ++k) t[k * B + b] = comb[b * e + k];
  float* __restrict T = t.data();
  float* __restrict S = sum.data();
  const float eps = P.hc_eps;
  auto line = [&](int64_t first, int64_t step) {      // normalise elements first + m * step, m < hc
    for (int64_t b = 0; b < B; ++b) S[b] = eps;
    for (int64_t m = 0; m < hc; ++m)
      for (int64_t b = 0; b < B; ++b) S[b] += T[(first + m * step) * B + b];
    for (int64_t m = 0; m < hc; ++m)
      for (int64_t b = 0; b < B; ++b) T[(first + m * step) * B + b] /= S[b];
  };
  auto cols = [&] { for (int64_t j = 0; j < hc; ++j) line(j, hc); };
  cols();
  for (int64_t it = 1; it < P.iters; ++it) {
    for (int64_t i = 0; i < hc; ++i) line(i * hc, 1);
    cols();
  }
  for (int64_t b = 0; b < B; ++b)
    for (int64_t k = 0; k < e; ++k) comb[b * e + k] = t[k * B + b];
}

void hc_pre_tail(const HcP& P, const float* X, const float* pre, float* x) {
  const int64_t hc = P.hc, d = P.d;
  for (int64_t k = 0; k < d; ++k) {
    float v = 0.f;
    for (int64_t i = 0; i < hc; ++i) v += pre[i] * X[i * d + k];
    x[k] = v;
  }
  if (P.norm) rms(x, d, P.norm, P.norm_eps);
}

void hc_pre_one(const HcP& P, const float* X, float* x, float* post, float* comb) {
  thread_local std::vector<float> pre;
  pre.resize(P.hc);
  hc_pre_head(P, X, nullptr, pre.data(), post, comb);
  sinkhorn(P, 1, comb);
  hc_pre_tail(P, X, pre.data(), x);
}

void hc_post_one(int64_t hc, int64_t d, const float* y, const float* res, const float* post, const float* comb,
                 float* out) {
  for (int64_t j = 0; j < hc; ++j) {
    float* o = out + j * d;
    for (int64_t k = 0; k < d; ++k) o[k] = post[j] * y[k];
    for (int64_t i = 0; i < hc; ++i) {
      const float c = comb[i * hc + j], *r = res + i * d;
      for (int64_t k = 0; k < d; ++k) o[k] += c * r[k];
    }
  }
}

}  // namespace

extern "C" {

// X [T, hc, d] -> x [T, d] (after the norm when P.norm is set), post [T, hc], comb [T, hc, hc]
void dsv4d_hc_pre(const HcP* P, int64_t T, const float* X, float* x, float* post, float* comb) {
  for (int64_t t = 0; t < T; ++t)
    hc_pre_one(*P, X + t * P->hc * P->d, x + t * P->d, post + t * P->hc, comb + t * P->hc * P->hc);
}

void dsv4d_hc_post(int64_t T, int64_t hc, int64_t d, const float* y, const float* res, const float* post,
                   const float* comb, float* out) {
  for (int64_t t = 0; t < T; ++t)
    hc_post_one(hc, d, y + t * d, res + t * hc * d, post + t * hc, comb + t * hc * hc, out + t * hc * d);
}

// x [B, d] (after attn_norm), one token per sequence at seqs[b].pos -> out [B, d]; updates the states.
void dsv4d_attn(const AttnP* P, int64_t B, const float* x, SeqP* seqs, float* out, int nt) {
  attn_batch(*P, B, x, seqs, out, nt);
}

// x [B, d] (after ffn_norm), ids [B] -> out [B, d]
void dsv4d_moe(const MoeP* P, int64_t B, const float* x, const int64_t* ids, float* out, int nt) {
  moe_batch(*P, B, x, ids, out, nt);
}

// mHC pre of a batch: X [B, hc, d] -> x [B, d] (after the norm), post [B, hc], comb [B, hc, hc]; the mixes
// X . fn_j [B, (2 + hc) * hc] as one stage of tiles (fn is float32 [(2 + hc) * hc, hc * d])
void hc_pre_batch(const HcP& P, int64_t B, const float* X, float* x, float* post, float* comb, int nt) {
  const int64_t hc = P.hc, d = P.d, nd = hc * d, nm = (2 + hc) * hc;
  thread_local std::vector<float> dots, pre;
  dots.resize(B * nm);
  pre.resize(B * hc);
  const Lin fn{0, P.fn, nd, nullptr, 0, nm, nd};
  const Job j = job(fn, X, nd, B, dots.data(), nm);
  run_jobs(&j, 1, nt);
  float *D = dots.data(), *Pr = pre.data();
  for_seqs(B, nt, [&](int64_t b) {
    hc_pre_head(P, X + b * nd, D + b * nm, Pr + b * hc, post + b * hc, comb + b * hc * hc);
  });
  sinkhorn(P, B, comb);
  for_seqs(B, nt, [&](int64_t b) { hc_pre_tail(P, X + b * nd, Pr + b * hc, x + b * d); });
}

// One block's decode step: X [B, hc, d] -> Xo [B, hc, d]
void dsv4d_block(const HcP* ha, const AttnP* A, const HcP* hf, const MoeP* M, int64_t B, const float* X,
                 const int64_t* ids, SeqP* seqs, float* Xo, int nt) {
  const int64_t hc = ha->hc, d = ha->d, nd = hc * d;
  std::vector<float> x(B * d), y(B * d), post(B * hc), comb(B * hc * hc), mid(B * nd);
  hc_pre_batch(*ha, B, X, x.data(), post.data(), comb.data(), nt);
  attn_batch(*A, B, x.data(), seqs, y.data(), nt);
  for_seqs(B, nt, [&](int64_t b) {
    hc_post_one(hc, d, y.data() + b * d, X + b * nd, post.data() + b * hc, comb.data() + b * hc * hc,
                mid.data() + b * nd);
  });
  hc_pre_batch(*hf, B, mid.data(), x.data(), post.data(), comb.data(), nt);
  moe_batch(*M, B, x.data(), ids, y.data(), nt);
  for_seqs(B, nt, [&](int64_t b) {
    hc_post_one(hc, d, y.data() + b * d, mid.data() + b * nd, post.data() + b * hc, comb.data() + b * hc * hc,
                Xo + b * nd);
  });
}

// hc_head: X [T, hc, d] -> out [T, d] = sum_h (sigmoid(mix_h * scale[0] + base[h]) + eps) X_h
void dsv4d_hc_head(int64_t T, int64_t hc, int64_t d, const float* X, const float* fn, const float* base,
                   const float* scale, float hc_eps, float norm_eps, float* out) {
  const int64_t nd = hc * d;
  std::vector<float> w(hc);
  for (int64_t t = 0; t < T; ++t) {
    const float* Xt = X + t * nd;
    float r = 1.0f / std::sqrt(sumsq(Xt, nd) / float(nd) + norm_eps);
    for (int64_t h = 0; h < hc; ++h) {
      alignas(64) float acc[LANES] = {0};
      float tt = fma_lanes(acc, Xt, fn + h * nd, nd);
      w[h] = sigm((reduce(acc) + tt) * r * scale[0] + base[h]) + hc_eps;
    }
    for (int64_t k = 0; k < d; ++k) {
      float v = 0.f;
      for (int64_t h = 0; h < hc; ++h) v += w[h] * Xt[h * d + k];
      out[t * d + k] = v;
    }
  }
}

int dsv4d_abi() { return 2; }

}  // extern "C"
