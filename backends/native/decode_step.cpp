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
//   dsv4d_step     every block of the step, then the head (hc_head, final norm, head linear): one call a step
//   dsv4d_step_rows  the same over chunks of S tokens per sequence (speculative verify), dsv4d_mtp_step the
//                  MTP block's input projections, its block and its head (the speculative draft),
//                  dsv4d_spec_step a greedy speculative iteration (draft, then verify) in one call
// Exact numerics only (float32 everywhere; the Python side refuses other numerics). Linears decode the
// checkpoint's storage with the GEMV kernels of stored_gemm.cpp (included, not copied: one source of truth).
// Ragged batches: every sequence has its own position and state pointers. Plain C ABI for ctypes.
// A batch runs stage by stage (issue 16): each stage's linears read every weight row once for all B rows and
// split their output rows over a persistent pool (decode_linear.h, decode_pool.h); the per-sequence parts
// (mHC, the attention core of decode_attn.h) split whole sequences. A row's arithmetic is the same at any B and thread count,
// so a sequence's bits do not depend on what it is batched with.
#include "stored_gemm.cpp"

#include <cmath>

#include "decode_attn.h"
#include "decode_linear.h"
#include "decode_moe.h"
#include "decode_seqs.h"

namespace {

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
// alternately. The rows are the lanes of the innermost loops, NL = 8 at a time (a fixed count, so the loops
// compile to whole vectors; unused lanes hold zeros and are not written back): additions and divisions in the
// same order as for a row alone (no exp or fma here, so vector lanes compute exactly what scalar code does).
template <int NL>
void sinkhorn_lanes(const HcP& P, int64_t nb, float* comb) {
  const int64_t hc = P.hc, e = hc * hc;
  thread_local std::vector<float> t;
  t.assign(e * NL, 0.f);
  for (int64_t b = 0; b < nb; ++b)
    for (int64_t k = 0; k < e; ++k) t[k * NL + b] = comb[b * e + k];
  float* __restrict T = t.data();
  const float eps = P.hc_eps;
  auto line = [&](int64_t first, int64_t step) {      // normalise elements first + m * step, m < hc
    alignas(64) float S[NL];
    for (int b = 0; b < NL; ++b) S[b] = eps;
    for (int64_t m = 0; m < hc; ++m)
      for (int b = 0; b < NL; ++b) S[b] += T[(first + m * step) * NL + b];
    for (int64_t m = 0; m < hc; ++m)
      for (int b = 0; b < NL; ++b) T[(first + m * step) * NL + b] /= S[b];
  };
  auto cols = [&] { for (int64_t j = 0; j < hc; ++j) line(j, hc); };
  cols();
  for (int64_t it = 1; it < P.iters; ++it) {
    for (int64_t i = 0; i < hc; ++i) line(i * hc, 1);
    cols();
  }
  for (int64_t b = 0; b < nb; ++b)
    for (int64_t k = 0; k < e; ++k) comb[b * e + k] = t[k * NL + b];
}

void sinkhorn(const HcP& P, int64_t B, float* comb) {
  for (int64_t b = 0; b < B; b += 8) sinkhorn_lanes<8>(P, std::min<int64_t>(8, B - b), comb + b * P.hc * P.hc);
}

// out = sum_i w[i] X_i over hc streams of d (a multiply-add chain over the streams, from zero). The AVX-512
// path keeps 16 columns in a register across the streams: the same chain per element.
inline void stream_sum(int64_t hc, int64_t d, const float* w, const float* X, float* out) {
  int64_t k = 0;
#if defined(__AVX512F__)
  for (; k + 16 <= d; k += 16) {
    __m512 v = _mm512_setzero_ps();
    for (int64_t i = 0; i < hc; ++i) v = _mm512_fmadd_ps(_mm512_set1_ps(w[i]), _mm512_loadu_ps(X + i * d + k), v);
    _mm512_storeu_ps(out + k, v);
  }
#endif
  for (; k < d; ++k) {
    float v = 0.f;
    for (int64_t i = 0; i < hc; ++i) v = std::fma(w[i], X[i * d + k], v);
    out[k] = v;
  }
}

// x = sum_i pre[i] X_i, then the norm
void hc_pre_tail(const HcP& P, const float* X, const float* pre, float* x) {
  stream_sum(P.hc, P.d, pre, X, x);
  if (P.norm) rms(x, P.d, P.norm, P.norm_eps);
}

void hc_pre_one(const HcP& P, const float* X, float* x, float* post, float* comb) {
  thread_local std::vector<float> pre;
  pre.resize(P.hc);
  hc_pre_head(P, X, nullptr, pre.data(), post, comb);
  sinkhorn(P, 1, comb);
  hc_pre_tail(P, X, pre.data(), x);
}

// out_j = post[j] y + sum_i comb[i, j] res_i: per element the product, then a multiply-add per stream in order.
// The AVX-512 path holds 16 columns of y and of the streams in registers for every output stream j.
void hc_post_one(int64_t hc, int64_t d, const float* y, const float* res, const float* post, const float* comb,
                 float* out) {
  int64_t k0 = 0;
#if defined(__AVX512F__)
  for (; k0 + 16 <= d; k0 += 16) {
    const __m512 yv = _mm512_loadu_ps(y + k0);
    for (int64_t j = 0; j < hc; ++j) {
      __m512 o = _mm512_mul_ps(_mm512_set1_ps(post[j]), yv);
      for (int64_t i = 0; i < hc; ++i)
        o = _mm512_fmadd_ps(_mm512_set1_ps(comb[i * hc + j]), _mm512_loadu_ps(res + i * d + k0), o);
      _mm512_storeu_ps(out + j * d + k0, o);
    }
  }
#endif
  for (int64_t j = 0; j < hc; ++j)
    for (int64_t k = k0; k < d; ++k) {
      float o = post[j] * y[k];
      for (int64_t i = 0; i < hc; ++i) o = std::fma(comb[i * hc + j], res[i * d + k], o);
      out[j * d + k] = o;
    }
}

// mHC pre of rows [b0, b1) of a batch, start to end: the mixes X . fn_j [(2 + hc) * hc] as tiles of these rows
// (fn is float32 [(2 + hc) * hc, hc * d]; read once for the group), the head, the Sinkhorn iterations of the
// group (lanes = rows), the tail. dots [B, (2 + hc) * hc] and pre [B, hc] are the caller's scratch.
void hc_pre_rows(const HcP& P, int64_t b0, int64_t b1, const float* X, float* x, float* post, float* comb,
                 float* dots, float* pre) {
  const int64_t hc = P.hc, d = P.d, nd = hc * d, nm = (2 + hc) * hc;
  rows_batch(X + b0 * nd, nd, b1 - b0, P.fn, nd, nd, 0, nm, 0, dots + b0 * nm, nm);
  for (int64_t b = b0; b < b1; ++b)
    hc_pre_head(P, X + b * nd, dots + b * nm, pre + b * hc, post + b * hc, comb + b * hc * hc);
  sinkhorn(P, b1 - b0, comb + b0 * hc * hc);
  for (int64_t b = b0; b < b1; ++b) hc_pre_tail(P, X + b * nd, pre + b * hc, x + b * d);
}

// mHC pre of a batch: X [B, hc, d] -> x [B, d] (after the norm), post [B, hc], comb [B, hc, hc], as one stage
// of sequence groups (hc_pre_rows). In each group's chunk, before(b0, b1) runs first (the caller's step that
// writes those rows of X) and after(b0, b1) last (its step that reads those rows of x).
template <class Before, class After>
void hc_pre_batch(const HcP& P, int64_t B, const float* X, float* x, float* post, float* comb, int nt,
                  Before before, After after) {
  const int64_t hc = P.hc, nm = (2 + hc) * hc;
  thread_local std::vector<float> dots, pre;
  dots.resize(B * nm);
  pre.resize(B * hc);
  float *D = dots.data(), *Pr = pre.data();
  for_groups(B, nt, [&](int64_t b0, int64_t b1) {
    before(b0, b1);
    hc_pre_rows(P, b0, b1, X, x, post, comb, D, Pr);
    after(b0, b1);
  });
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

// One block's decode step: X [B, hc, d] -> Xo [B, hc, d]. Six stages besides the attention's: mHC pre; then
// per sequence group the attention's mHC post, the FFN's mHC pre and the routing; the experts' two linear
// stages and their activations between; the combine with the FFN's mHC post. S rows per sequence (attn_batch).
static void block_rows(const HcP* ha, const AttnP* A, const HcP* hf, const MoeP* M, int64_t B, int64_t S,
                       const float* X, const int64_t* ids, SeqP* seqs, float* Xo, int nt) {
  const int64_t hc = ha->hc, d = ha->d, nd = hc * d, k = M->k;
  thread_local std::vector<float> tls[6];                      // reused per calling thread, by local names
  std::vector<float> &x = tls[0], &y = tls[1], &post = tls[2], &comb = tls[3], &mid = tls[4], &wgt = tls[5];
  thread_local std::vector<int64_t> idx_;                       // (as moe_experts)
  std::vector<int64_t>& idx = idx_;
  x.resize(B * d), y.resize(B * d), post.resize(B * hc), comb.resize(B * hc * hc), mid.resize(B * nd);
  idx.resize(B * k), wgt.resize(B * k);
  float *xp = x.data(), *yp = y.data(), *pp = post.data(), *cp = comb.data(), *mp = mid.data();
  auto none = [](int64_t, int64_t) {};
  hc_pre_batch(*ha, B, X, xp, pp, cp, nt, none, none);
  attn_batch(*A, B, xp, seqs, yp, nt, S);
  int64_t* ip = idx.data();
  float* wp = wgt.data();
  hc_pre_batch(*hf, B, mp, xp, pp, cp, nt, [&](int64_t b0, int64_t b1) {
    for (int64_t b = b0; b < b1; ++b)
      hc_post_one(hc, d, yp + b * d, X + b * nd, pp + b * hc, cp + b * hc * hc, mp + b * nd);
  }, [&](int64_t b0, int64_t b1) {
    for (int64_t b = b0; b < b1; ++b) route(*M, xp + b * d, ids[b], ip + b * k, wp + b * k);
  });
  moe_experts(*M, B, xp, ip, wp, yp, nt, [&](int64_t b) {
    hc_post_one(hc, d, yp + b * d, mp + b * nd, pp + b * hc, cp + b * hc * hc, Xo + b * nd);
  });
}

void dsv4d_block(const HcP* ha, const AttnP* A, const HcP* hf, const MoeP* M, int64_t B, const float* X,
                 const int64_t* ids, SeqP* seqs, float* Xo, int nt) {
  block_rows(ha, A, hf, M, B, 1, X, ids, seqs, Xo, nt);
}

// hc_head: X [T, hc, d] -> out [T, d] = sum_h (sigmoid(mix_h * scale[0] + base[h]) + eps) X_h. On AVX-512 the
// sum of squares and the hc mixes share one pass over X (each the same lanes and tree as sumsq / fma_lanes),
// and the weighted stream sum keeps 16 columns in a register (a multiply-add chain over the streams).
void dsv4d_hc_head(int64_t T, int64_t hc, int64_t d, const float* X, const float* fn, const float* base,
                   const float* scale, float hc_eps, float norm_eps, float* out) {
  const int64_t nd = hc * d;
  std::vector<float> w(hc);
  for (int64_t t = 0; t < T; ++t) {
    const float* Xt = X + t * nd;
    float* ot = out + t * d;
#if defined(__AVX512F__)
    if (nd % 16 == 0 && hc <= 7) {
      __m512 acc[8];
      for (int h = 0; h < 8; ++h) acc[h] = _mm512_setzero_ps();
      for (int64_t i = 0; i < nd; i += 16) {
        const __m512 x = _mm512_loadu_ps(Xt + i);
        acc[0] = _mm512_fmadd_ps(x, x, acc[0]);
        for (int64_t h = 0; h < hc; ++h) acc[1 + h] = _mm512_fmadd_ps(x, _mm512_loadu_ps(fn + h * nd + i), acc[1 + h]);
      }
      const float r = 1.0f / std::sqrt((reduce(acc[0]) + 0.f) / float(nd) + norm_eps);
      for (int64_t h = 0; h < hc; ++h) w[h] = sigm((reduce(acc[1 + h]) + 0.f) * r * scale[0] + base[h]) + hc_eps;
    } else
#endif
    {
      float r = 1.0f / std::sqrt(sumsq(Xt, nd) / float(nd) + norm_eps);
      for (int64_t h = 0; h < hc; ++h) {
        alignas(64) float acc[LANES] = {0};
        float tt = fma_lanes(acc, Xt, fn + h * nd, nd);
        w[h] = sigm((reduce(acc) + tt) * r * scale[0] + base[h]) + hc_eps;
      }
    }
    stream_sum(hc, d, w.data(), Xt, ot);
  }
}

struct LayerP { const HcP* ha; const AttnP* A; const HcP* hf; const MoeP* M; };

struct HeadP {           // hc_head collapse -> final RMS norm -> vocabulary projection
  const float *fn, *base, *scale, *norm;
  int64_t hc, d;
  float hc_eps, norm_eps;
  Lin w;                 // [V, d]
};

// A whole decode step's blocks in one call (no Python between blocks, the pool's workers stay warm):
// X [B, hc, d] through layers[0 .. L) -> Xo [B, hc, d]; seqs [L][B] (layer l's records at seqs + l * B). Each
// block is exactly dsv4d_block. With `head`: logits [B, V] of Xo (hc_head per row, the norm, the head linear
// as one stage: a row's values do not depend on B either).
static void step_rows(int64_t L, const LayerP* layers, int64_t B, int64_t S, const float* X, const int64_t* ids,
                      SeqP* seqs, float* Xo, const HeadP* head, float* logits, int nt) {
  const int64_t nd = layers[0].ha->hc * layers[0].ha->d;
  thread_local std::vector<float> tmp;
  tmp.resize(B * nd);
  const float* in = X;
  for (int64_t l = 0; l < L; ++l) {
    float* out = (L - 1 - l) % 2 == 0 ? Xo : tmp.data();
    const LayerP& P = layers[l];
    block_rows(P.ha, P.A, P.hf, P.M, B, S, in, ids, seqs + l * B, out, nt);
    in = out;
  }
  if (!head) return;
  const HeadP& H = *head;
  thread_local std::vector<float> y;
  y.resize(B * H.d);
  float* Y = y.data();
  for_seqs(B, nt, [&](int64_t b) {
    dsv4d_hc_head(1, H.hc, H.d, Xo + b * nd, H.fn, H.base, H.scale, H.hc_eps, H.norm_eps, Y + b * H.d);
    rms(Y + b * H.d, H.d, H.norm, H.norm_eps);
  });
  const Job j = job(H.w, Y, H.d, B, logits, H.w.N);
  run_jobs(&j, 1, nt);
}

void dsv4d_step(int64_t L, const LayerP* layers, int64_t B, const float* X, const int64_t* ids, SeqP* seqs,
                float* Xo, const HeadP* head, float* logits, int nt) {
  step_rows(L, layers, B, 1, X, ids, seqs, Xo, head, logits, nt);
}

// One layer's records (the attention kernel alone: tests, profiling) -> status (0: out[B] built, counters moved)
int dsv4d_records(const AttnP* A, int64_t B, const int64_t* seqs, SeqP* out) {
  const int st = step_status(1, &A, B, seqs);
  if (st) return st;
  layer_records(*A, 0, B, seqs, out);
  return 0;
}

// dsv4d_step from the sequences' state arrays -> status (0: ran; 1, 2: seq_status; 3: a token id outside the
// embedding; nothing changed unless 0). X null: the step embeds `ids` itself (`embed`); Xo null (with a head):
// the final streams are not kept; `top` (with a head): each row's greedy token (argmax_row) while its logits
// are in cache.
int dsv4d_run(int64_t L, const LayerP* layers, int64_t B, const float* X, const int64_t* ids, const int64_t* seqs,
              float* Xo, const HeadP* head, float* logits, int nt, const EmbedP* embed, int64_t* top) {
  thread_local std::vector<const AttnP*> A;
  thread_local std::vector<SeqP> recs;
  thread_local std::vector<float> X0;
  A.resize(L);
  for (int64_t l = 0; l < L; ++l) A[l] = layers[l].A;
  const int st = step_status(L, A.data(), B, seqs);
  if (st) return st;
  if (!X) {
    X0.resize(B * embed->hc * embed->d);
    if (!embed_rows(*embed, B, ids, X0.data())) return 3;
    X = X0.data();
  }
  thread_local std::vector<float> Xs;
  if (!Xo) {                                  // final streams not wanted (a step with the head): scratch
    Xs.resize(B * layers[0].ha->hc * layers[0].ha->d);
    Xo = Xs.data();
  }
  recs.resize(L * B);
  for (int64_t l = 0; l < L; ++l) layer_records(*A[l], l, B, seqs, recs.data() + l * B);
  dsv4d_step(L, layers, B, X, ids, recs.data(), Xo, head, logits, nt);
  if (top && head)
    for (int64_t b = 0; b < B; ++b) top[b] = argmax_row(logits + b * head->w.N, head->w.N);
  return 0;
}

// One linear as the step runs it (a stage of one job): y [B, N] = x [B, K] W^T on up to nt threads. For the
// tests of batch invariance (a row's bits alone = among B rows, whatever the tile shapes and the split).
void dsv4d_linear(const Lin* L, int64_t B, const float* x, float* y, int nt) {
  const Job j = job(*L, x, L->K, B, y, L->N);
  run_jobs(&j, 1, nt);
}

// out[b] = argmax_row of rows [B, V] (the rule alone: tests)
void dsv4d_argmax(int64_t B, int64_t V, const float* rows, int64_t* out) {
  for (int64_t b = 0; b < B; ++b) out[b] = argmax_row(rows + b * V, V);
}

int dsv4d_abi() { return 6; }

}  // extern "C"

#include "decode_spec.h"      // the speculative entry points: chunks, the MTP draft, a greedy iteration
