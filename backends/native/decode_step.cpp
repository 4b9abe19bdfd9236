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
#include "stored_gemm.cpp"

#include <cmath>

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

inline float reduce(const float* acc) {
  float s = 0.f;
  for (int j = 0; j < LANES; ++j) s += acc[j];
  return s;
}

// One x row through stored_gemm.cpp's job API (the best ISA this CPU runs): rows [n0, n1) of the stored
// weight `w` (its row 0; fp8 codes or fp4 packed pairs) into y[0 .. n1 - n0).
inline void stored_gemv(int kind, const float* x, int64_t K, const uint8_t* w, int64_t ldw, const uint8_t* s,
                        int64_t lds, float* y, int64_t n0, int64_t n1, int nthreads) {
  Dsv4Job j{};
  j.kind = kind; j.M = 1; j.K = K; j.N = n1 - n0; j.n0 = n0;
  j.x = x; j.ldx = K; j.w = w; j.ldw = ldw; j.s = s; j.lds = lds; j.rs = nullptr; j.y = y; j.ldy = n1 - n0;
  dsv4_gemv(&j, 1, nthreads, -1);
}

struct Lin {             // one linear's weight in its stored format
  int64_t kind;          // 0 float32, 1 bf16, 2 fp8 block, 3 fp4 experts
  const void* w;
  int64_t ldw;           // row stride of w (elements / bytes)
  const uint8_t* s;      // scales (fp8 / fp4)
  int64_t lds;
  int64_t N, K;
};

// Four rows at once: y[r] = sum_k x[k] * w_r[k], with independent accumulators sharing each x load (the
// indexer's heads against one key: measured faster than one head at a time). `Cv` widens a stored value.
template <class T, class Cv>
inline void dot4(const float* __restrict x, const T* __restrict w0, int64_t ldw, int64_t K, int rows,
                 float* __restrict y, Cv cv) {
  const T* __restrict a = w0;
  const T* __restrict b = w0 + (rows > 1 ? 1 : 0) * ldw;
  const T* __restrict c = w0 + (rows > 2 ? 2 : 0) * ldw;
  const T* __restrict d = w0 + (rows > 3 ? 3 : 0) * ldw;
  alignas(64) float p[LANES] = {}, q[LANES] = {}, r[LANES] = {}, s[LANES] = {};
  int64_t i = 0;
  for (; i + LANES <= K; i += LANES) {
    for (int j = 0; j < LANES; ++j) {
      const float xv = x[i + j];
      p[j] += xv * cv(a[i + j]);
      q[j] += xv * cv(b[i + j]);
      r[j] += xv * cv(c[i + j]);
      s[j] += xv * cv(d[i + j]);
    }
  }
  float t[4] = {reduce(p), reduce(q), reduce(r), reduce(s)};
  const T* rw[4] = {a, b, c, d};
  for (int k = 0; k < rows; ++k) {
    float tail = 0.f;
    for (int64_t m = i; m < K; ++m) tail += x[m] * cv(rw[k][m]);
    y[k] = t[k] + tail;
  }
}

inline float bf16_val(uint16_t h) { return bits_f(uint32_t(h) << 16); }
inline float f32_val(float v) { return v; }

template <class T, class Cv>
inline float dot1(const float* __restrict x, const T* __restrict w, int64_t K, Cv cv) {
  alignas(64) float acc[LANES] = {0};
  int64_t i = 0;
  for (; i + LANES <= K; i += LANES)
    for (int j = 0; j < LANES; ++j) acc[j] += x[i + j] * cv(w[i + j]);
  float t = 0.f;
  for (; i < K; ++i) t += x[i] * cv(w[i]);
  return reduce(acc) + t;
}
template <class T, class Cv>
inline void rows_dot(const float* x, const T* w, int64_t ldw, int64_t K, int64_t n0, int64_t n1, float* y, Cv cv) {
  // one row at a time measured faster than dot4 here (AVX-512, rows of 128-1024): the row's load stream
  // is what the loop waits on, not the FMA chain
  for (int64_t n = n0; n < n1; ++n) y[n - n0] = dot1(x, w + n * ldw, K, cv);
}

// y[n - n0] = sum_k x[k] W[n, k] for n in [n0, n1)
void lin_rows(const Lin& L, const float* x, float* y, int64_t n0, int64_t n1, int nt) {
  switch (L.kind) {
    case 2: stored_gemv(FP8, x, L.K, (const uint8_t*)L.w, L.ldw, L.s, L.lds, y, n0, n1, nt); return;
    case 3: stored_gemv(FP4, x, L.K, (const uint8_t*)L.w, L.ldw, L.s, L.lds, y, n0, n1, nt); return;
    case 1:               // bf16 (as stored, or FP8 / FP4 widened exactly at plan time): one fused pass
      rows_dot(x, (const uint16_t*)L.w, L.ldw, L.K, n0, n1, y, bf16_val);
      return;
    default:
      rows_dot(x, (const float*)L.w, L.ldw, L.K, n0, n1, y, f32_val);
  }
}
inline void lin(const Lin& L, const float* x, float* y, int nt) { lin_rows(L, x, y, 0, L.N, nt); }

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

// Add token `pos`'s row to a compressor's pending rows; pool the window it closes into out[row] (norm, RoPE
// at the window start). Returns 1 when an entry was written. The caller's counters follow the same rule
// (runtime/model/decode.py): keep = stop*m - (m if overlap), pending start = keep.
int comp_step(const Comp& C, const float* x, int64_t pos, float* pk, float* ps, int64_t pstart, float* out,
              const float* freqs, int64_t half, float eps, int nt) {
  const int64_t width = (C.overlap ? 2 : 1) * C.c, m = C.m;
  const int64_t row = pos - pstart;
  lin(C.wkv, x, pk + row * width, nt);
  lin(C.wgate, x, ps + row * width, nt);
  const float* a = C.ape + (pos % m) * width;
  for (int64_t j = 0; j < width; ++j) ps[row * width + j] += a[j];
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

void attn_one(const AttnP& P, const float* x, SeqP& S, float* out, int nt) {
  const int64_t H = P.H, D = P.D, pos = S.pos;
  std::vector<float> qr(P.q_lora), q(H * D), kvr(D), o(H * D), z(P.G * P.o_lora);
  lin(P.wq_a, x, qr.data(), nt);
  rms(qr.data(), P.q_lora, P.q_norm, P.eps);
  lin(P.wq_b, qr.data(), q.data(), nt);
  for (int64_t h = 0; h < H; ++h) {
    rms(q.data() + h * D, D, nullptr, P.eps);
    rope(q.data() + h * D, D, P.freqs, P.rope_half, pos, false);
  }
  lin(P.wkv, x, kvr.data(), nt);
  rms(kvr.data(), D, P.kv_norm, P.eps);
  rope(kvr.data(), D, P.freqs, P.rope_half, pos, false);
  std::memcpy(S.kv + (pos % P.W) * D, kvr.data(), sizeof(float) * D);
  int64_t n_ent = S.n_entries;
  if (P.ratio)
    n_ent += comp_step(P.comp, x, pos, S.pk, S.ps, S.pstart, S.kv + (P.W + n_ent) * D, P.freqs, P.rope_half,
                       P.eps, nt);
  std::vector<int64_t> rows;                 // pool rows this query reads: window slots, then entries
  rows.reserve(P.W + P.topk + n_ent);
  for (int64_t t = pos - P.W + 1; t <= pos; ++t) if (t >= 0) rows.push_back(t % P.W);
  if (P.ratio) {
    const int64_t n_vis = (pos + 1) / P.ratio;
    if (P.csa) {
      std::vector<float> iq(P.ih * P.idim), iw(P.ih);
      lin(P.iwq_b, qr.data(), iq.data(), nt);
      for (int64_t h = 0; h < P.ih; ++h) rope(iq.data() + h * P.idim, P.idim, P.freqs, P.rope_half, pos, false);
      lin(P.iw_proj, x, iw.data(), nt);
      for (auto& v : iw) v *= P.iscale;
      int64_t n_idx = S.n_index + comp_step(P.icomp, x, pos, S.ipk, S.ips, S.ipstart, S.ikeys + S.n_index * P.idim,
                                            P.freqs, P.rope_half, P.eps, nt);
      const int64_t n = std::min(n_vis, n_idx), k = std::min(P.topk, n_vis);
      std::vector<float> sc(n);
      std::vector<float> hs(P.ih);
      for (int64_t e = 0; e < n; ++e) {        // relu(q_h . key) for every head (4 at a time), weighted, summed
        const float* key = S.ikeys + e * P.idim;
        for (int64_t h = 0; h < P.ih; h += 4)
          dot4(key, iq.data() + h * P.idim, P.idim, P.idim, int(std::min<int64_t>(4, P.ih - h)), hs.data() + h,
               f32_val);
        float tot = 0.f;
        for (int64_t h = 0; h < P.ih; ++h) tot += std::max(hs[h], 0.f) * iw[h];
        sc[e] = tot;
      }
      std::vector<int64_t> ord(n);
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
  // attention with the sink: p_j = exp(s_j) / (sum exp(s_j) + exp(sink_h))
  const float scale = 1.0f / std::sqrt(float(D));
  const int64_t K = int64_t(rows.size());
  std::vector<float> s(K);
  for (int64_t h = 0; h < H; ++h) {
    const float* qh = q.data() + h * D;
    float mx = P.sink[h];
    for (int64_t j = 0; j < K; ++j) {
      alignas(64) float acc[LANES] = {0};
      float t = fma_lanes(acc, qh, S.kv + rows[j] * D, D);
      s[j] = (reduce(acc) + t) * scale;
      mx = std::max(mx, s[j]);
    }
    float den = std::exp(P.sink[h] - mx);
    for (int64_t j = 0; j < K; ++j) { s[j] = std::exp(s[j] - mx); den += s[j]; }
    float* oh = o.data() + h * D;
    std::memset(oh, 0, sizeof(float) * D);
    for (int64_t j = 0; j < K; ++j) {
      const float p = s[j] / den, *v = S.kv + rows[j] * D;
      for (int64_t i = 0; i < D; ++i) oh[i] += p * v[i];
    }
    rope(oh, D, P.freqs, P.rope_half, pos, true);
  }
  const int64_t per = H / P.G * D;            // wo_a: group g's rows [g*o_lora, (g+1)*o_lora) read o[g*per..]
  for (int64_t g = 0; g < P.G; ++g)
    lin_rows(P.wo_a, o.data() + g * per, z.data() + g * P.o_lora, g * P.o_lora, (g + 1) * P.o_lora, nt);
  lin(P.wo_b, z.data(), out, nt);
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

inline void swiglu_expert(const Lin* e, const float* x, float wgt, float limit, int64_t inter, float* y, int nt) {
  std::vector<float> g(inter), u(inter), t(e[1].N);
  lin(e[0], x, g.data(), nt);
  lin(e[2], x, u.data(), nt);
  for (int64_t i = 0; i < inter; ++i) {
    float a = std::min(g[i], limit), b = std::max(-limit, std::min(u[i], limit));
    g[i] = a / (1.0f + std::exp(-a)) * b * wgt;
  }
  lin(e[1], g.data(), t.data(), nt);
  for (int64_t i = 0; i < e[1].N; ++i) y[i] += t[i];
}

void moe_one(const MoeP& P, const float* x, int64_t id, float* y, int nt) {
  std::vector<float> s(P.E), routed(P.d, 0.f);
  for (int64_t e = 0; e < P.E; ++e) {
    alignas(64) float acc[LANES] = {0};
    float t = fma_lanes(acc, x, P.gate_w + e * P.d, P.d);
    float v = reduce(acc) + t;
    s[e] = std::sqrt(v > 20.f ? v : std::log1p(std::exp(v)));
  }
  std::vector<int64_t> idx(P.k);
  if (P.tid2eid) {
    for (int64_t j = 0; j < P.k; ++j) idx[j] = P.tid2eid[id * P.k + j];
  } else {
    std::vector<int64_t> ord(P.E);
    for (int64_t e = 0; e < P.E; ++e) ord[e] = e;
    std::partial_sort(ord.begin(), ord.begin() + P.k, ord.end(), [&](int64_t a, int64_t b) {
      float sa = s[a] + P.bias[a], sb = s[b] + P.bias[b];
      return sa > sb || (sa == sb && a < b);
    });
    for (int64_t j = 0; j < P.k; ++j) idx[j] = ord[j];
  }
  float tot = 0.f;
  for (int64_t j = 0; j < P.k; ++j) tot += s[idx[j]];
  std::vector<int64_t> order(P.k);           // experts in ascending id, as the reference's grouping
  for (int64_t j = 0; j < P.k; ++j) order[j] = j;
  std::sort(order.begin(), order.end(), [&](int64_t a, int64_t b) { return idx[a] < idx[b]; });
  for (int64_t j : order)
    swiglu_expert(P.experts + 3 * idx[j], x, s[idx[j]] / tot * P.route_scale, P.limit, P.inter, routed.data(), nt);
  std::memset(y, 0, sizeof(float) * P.d);
  if (P.shared) swiglu_expert(P.shared, x, 1.0f, P.limit, P.shared_inter, y, nt);
  for (int64_t i = 0; i < P.d; ++i) y[i] = routed[i] + y[i];
}

struct HcP { const float *fn, *base, *scale, *norm; int64_t hc, d, iters; float hc_eps, norm_eps; };

void hc_pre_one(const HcP& P, const float* X, float* x, float* post, float* comb) {
  const int64_t hc = P.hc, d = P.d, nd = hc * d, nm = (2 + hc) * hc;
  float r = 1.0f / std::sqrt(sumsq(X, nd) / float(nd) + P.norm_eps);
  std::vector<float> mix(nm);
  for (int64_t j = 0; j < nm; ++j) {
    alignas(64) float acc[LANES] = {0};
    float t = fma_lanes(acc, X, P.fn + j * nd, nd);
    mix[j] = (reduce(acc) + t) * r;
  }
  std::vector<float> pre(hc);
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
  auto cols = [&] {
    for (int64_t j = 0; j < hc; ++j) {
      float sum = P.hc_eps;
      for (int64_t i = 0; i < hc; ++i) sum += cm[i * hc + j];
      for (int64_t i = 0; i < hc; ++i) cm[i * hc + j] /= sum;
    }
  };
  cols();
  for (int64_t it = 1; it < P.iters; ++it) {
    for (int64_t i = 0; i < hc; ++i) {
      float sum = P.hc_eps;
      for (int64_t j = 0; j < hc; ++j) sum += cm[i * hc + j];
      for (int64_t j = 0; j < hc; ++j) cm[i * hc + j] /= sum;
    }
    cols();
  }
  for (int64_t k = 0; k < d; ++k) {
    float v = 0.f;
    for (int64_t i = 0; i < hc; ++i) v += pre[i] * X[i * d + k];
    x[k] = v;
  }
  if (P.norm) rms(x, d, P.norm, P.norm_eps);
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
  for (int64_t b = 0; b < B; ++b) attn_one(*P, x + b * P->d, seqs[b], out + b * P->d, nt);
}

// x [B, d] (after ffn_norm), ids [B] -> out [B, d]
void dsv4d_moe(const MoeP* P, int64_t B, const float* x, const int64_t* ids, float* out, int nt) {
  for (int64_t b = 0; b < B; ++b) moe_one(*P, x + b * P->d, ids[b], out + b * P->d, nt);
}

// One block's decode step: X [B, hc, d] -> Xo [B, hc, d]
void dsv4d_block(const HcP* ha, const AttnP* A, const HcP* hf, const MoeP* M, int64_t B, const float* X,
                 const int64_t* ids, SeqP* seqs, float* Xo, int nt) {
  const int64_t hc = ha->hc, d = ha->d;
  std::vector<float> x(d), y(d), post(hc), comb(hc * hc), mid(hc * d);
  for (int64_t b = 0; b < B; ++b) {
    const float* Xb = X + b * hc * d;
    hc_pre_one(*ha, Xb, x.data(), post.data(), comb.data());
    attn_one(*A, x.data(), seqs[b], y.data(), nt);
    hc_post_one(hc, d, y.data(), Xb, post.data(), comb.data(), mid.data());
    hc_pre_one(*hf, mid.data(), x.data(), post.data(), comb.data());
    moe_one(*M, x.data(), ids[b], y.data(), nt);
    hc_post_one(hc, d, y.data(), mid.data(), post.data(), comb.data(), Xo + b * hc * d);
  }
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

int dsv4d_abi() { return 1; }

}  // extern "C"
