// The fused decode step's MoE (included by decode_step.cpp after decode_attn.h): each token's routing (gate
// scores, hash or biased top-k), then the experts as stages of tiles (decode_linear.h): the routed experts'
// and the shared expert's gate / up linears in one stage, their clamped SwiGLU, the down linears in one stage,
// and the combine per token. A token's arithmetic is the same at any batch size.
#pragma once

#include <algorithm>
#include <cmath>
#include <cstring>
#include <vector>

#include "decode_attn.h"
#include "decode_exp.h"
#include "decode_linear.h"

namespace {

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
  thread_local std::vector<float> e;
  e.resize(n);
  for (int64_t i = 0; i < n; ++i) e[i] = -std::min(g[i], limit);
  dexp::inplace(e.data(), n);              // see decode_exp.h
  for (int64_t i = 0; i < n; ++i) {
    float a = std::min(g[i], limit), b = std::max(-limit, std::min(u[i], limit));
    g[i] = a / (1.0f + e[i]) * b * wgt;
  }
}

// x [B, d] (after ffn_norm) and each token's experts idx [B, k] and weights wgt [B, k] (`route`) -> y [B, d].
// Each expert's weights are read once for the tokens routed to it; a token's expert outputs are summed in
// ascending expert id (the reference's grouping), then the shared expert's output is added. then(b) runs right
// after token b's y is written, in the same chunk (the caller's next per-sequence step, without a stage of its
// own).
template <class Then>
void moe_experts(const MoeP& P, int64_t B, const float* x, const int64_t* idx, const float* wgt, float* y, int nt,
                 Then then) {
  const int64_t d = P.d, k = P.k, I = P.inter, SI = P.shared_inter, E = P.E;
  // slot b*k + j -> its row among expert idx's tokens; experts' rows laid out one after another
  std::vector<int64_t> first(E + 1, 0), row(B * k);
  for (int64_t i = 0; i < B * k; ++i) ++first[idx[i] + 1];
  for (int64_t e = 0; e < E; ++e) first[e + 1] += first[e];
  std::vector<int64_t> fill(first.begin(), first.end() - 1);
  for (int64_t i = 0; i < B * k; ++i) row[i] = fill[idx[i]]++;
  const int64_t n = B * k;
  // reused per calling thread (every row is written before it is read)
  thread_local std::vector<float> tls[7];
  // local names (the lambdas below run on pool threads: a thread_local named there would be that thread's)
  std::vector<float> &xg = tls[0], &g = tls[1], &u = tls[2], &t = tls[3], &sg = tls[4], &su = tls[5], &st = tls[6];
  xg.resize(n * d), g.resize(n * I), u.resize(n * I), t.resize(n * d), sg.resize(B * SI), su.resize(B * SI);
  st.resize(P.shared ? B * d : 0);
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
    const int64_t* ib = idx + b * k;
    for (int64_t j = 0; j < k; ++j) order[j] = j;
    std::sort(order.begin(), order.end(), [&](int64_t a, int64_t c) { return ib[a] < ib[c]; });
    // routed sum in ascending expert id, then + shared: each element's additions in that order, a whole row
    // of d elements per addition (vector loops)
    float* __restrict yb = y + b * d;
    for (int64_t i = 0; i < d; ++i) yb[i] = 0.f;
    for (int64_t j : order) {
      const float* __restrict tj = t.data() + row[b * k + j] * d;
      for (int64_t i = 0; i < d; ++i) yb[i] += tj[i];
    }
    if (P.shared) {
      const float* __restrict sb = st.data() + b * d;
      for (int64_t i = 0; i < d; ++i) yb[i] = yb[i] + (0.f + sb[i]);
    } else {
      for (int64_t i = 0; i < d; ++i) yb[i] = yb[i] + 0.f;
    }
    then(b);
  });
}

void moe_batch(const MoeP& P, int64_t B, const float* x, const int64_t* ids, float* y, int nt) {
  const int64_t k = P.k;
  std::vector<int64_t> idx(B * k);
  std::vector<float> wgt(B * k);
  for_seqs(B, nt, [&](int64_t b) { route(P, x + b * P.d, ids[b], idx.data() + b * k, wgt.data() + b * k); });
  moe_experts(P, B, x, idx.data(), wgt.data(), y, nt, [](int64_t) {});
}

}  // namespace
