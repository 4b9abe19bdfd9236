// The fused decode step's attention sub-block (included by decode_step.cpp after decode_linear.h): the small
// float32 helpers the kernels share (lane dot products, RMS norm, RoPE), the compressors' per-token update,
// the per-sequence attention core (q norms / RoPE, compressors, indexer top-k, attention with the sink) and
// `attn_batch`, which runs a batch's projections as stages of tiles around the cores. The core's row kernels
// (indexer scores, top-k, attention scores, softmax, weighted rows) are in decode_attn_rows.h. See decode_step.cpp.
#pragma once

#include <cmath>

#include "decode_attn_rows.h"
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
  // pool rows this query reads: window slots, then entries (written in place: sized for the most it can be)
  const int64_t n_vis = P.ratio ? (pos + 1) / P.ratio : 0;
  rows.resize(std::min(pos + 1, P.W) + (P.csa ? std::min(P.topk, n_vis) : n_vis));
  int64_t* rw = rows.data();
  int64_t K = 0;
  const int64_t t0 = std::max<int64_t>(0, pos - P.W + 1);   // window slots t % W, the modulo once (an idiv a
  for (int64_t t = t0, slot = t0 % P.W; t <= pos; ++t) {       // slot was a tenth of the core's time)
    rw[K++] = slot;
    slot = slot + 1 == P.W ? 0 : slot + 1;
  }
  if (P.ratio) {
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
      for (int64_t j = 0; j < got; ++j) rw[K++] = P.W + ord[j];
    } else {
      for (int64_t e = 0; e < n_vis; ++e) rw[K++] = P.W + e;
    }
  }
  // attention with the sink: p_j = exp(s_j) / (sum exp(s_j) + exp(sink_h)), scores s[h, j] = q_h . kv[rows[j]]
  const float scale = 1.0f / std::sqrt(float(D));
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
