// The fused decode step's linears (included by decode_step.cpp after stored_gemm.cpp): a stage's linears run
// as one list of jobs whose output rows are split over the pool's threads (decode_pool.h), and each weight
// row is read once for all B rows of the batch (a small model's decode reads its weights from the last-level
// cache, so re-reading them per sequence is what a step waits on).
// Batch invariance: row b's value is sum_k x[b, k] W[n, k] accumulated by the same code whatever B, the
// thread split or the neighbouring rows: LANES per-lane accumulators over k in order, the lanes reduced by one
// fixed tree, then the K % LANES tail (`tile`, whose shape only decides which loads are shared); weights packed in
// output panels (kind 4, a small model's widened FP8 / FP4) have their own fixed order (decode_panels.h).
#pragma once

#include <cmath>

#include "decode_pool.h"

namespace {

struct Lin {             // one linear's weight in its stored format
  int64_t kind;          // 0 float32, 1 bf16, 2 fp8 block, 3 fp4 experts, 4 bf16 in panels (decode_panels.h)
  const void* w;
  int64_t ldw;           // row stride of w (elements / bytes; kind 4: 32-bit words a panel)
  const uint8_t* s;      // scales (fp8 / fp4)
  int64_t lds;
  int64_t N, K;
};

inline float widen(uint16_t h) { return bits_f(uint32_t(h) << 16); }   // bf16
inline float widen(float v) { return v; }

// t + a * b with one rounding wherever the CPU has an FMA, two where it has none: spelled out because the
// compiler contracts `t += a * b` in some instantiations and not in others (measured: the K % LANES tail of one
// row differed between two tile shapes), which would make a row's bits depend on its tile
inline float madd(float a, float b, float t) {
#if defined(__FMA__) || defined(__ARM_FEATURE_FMA)
  return std::fma(a, b, t);
#else
  return a * b + t;
#endif
}

#include "decode_panels.h"

// x rows from which a stage's bf16 weight rows are widened once into float32 scratch (group_rows)
constexpr int64_t WIDEN_ROWS = 6;

// The lanes of an accumulator summed as a fixed tree (halves, quarters, pairs: what the AVX-512 path's
// shuffles compute), a few dependent adds instead of a LANES-long chain.
inline float reduce(const float* a) {
  static_assert(LANES == 16, "the tree below sums 16 lanes");
  float r8[8], r4[4];
  for (int i = 0; i < 8; ++i) r8[i] = a[i] + a[i + 8];
  for (int i = 0; i < 4; ++i) r4[i] = r8[i] + r8[i + 4];
  return (r4[0] + r4[2]) + (r4[1] + r4[3]);
}

#if defined(__AVX512F__)
inline float reduce(__m512 v) {          // the same tree as reduce(const float*)
  const __m256 a = _mm256_add_ps(_mm512_castps512_ps256(v),
                                 _mm256_castpd_ps(_mm512_extractf64x4_pd(_mm512_castps_pd(v), 1)));
  __m128 b = _mm_add_ps(_mm256_castps256_ps128(a), _mm256_extractf128_ps(a, 1));
  b = _mm_add_ps(b, _mm_movehl_ps(b, b));
  b = _mm_add_ss(b, _mm_movehdup_ps(b));
  return _mm_cvtss_f32(b);
}
#endif

// A tile of RW weight rows x RX rows of x: y[c * ldy + r] = sum_k x[c * ldx + k] * w[r * ldw + k]. Each
// (r, c) pair has its own LANES accumulators, fed in k order and reduced by one fixed tree, then the K % LANES
// tail: the same arithmetic for every tile shape (shapes only change how many loads are shared).
#if defined(__AVX512F__)
// reduce()'s tree for 16 accumulators at once (about 2 shuffles an accumulator instead of 8 shuffles and
// adds): v[4r + c] -> lane 4c + r of the result. Every lane is summed exactly as reduce(v[4r + c]) sums it:
// halves (lane i + lane i+8), quarters (i + i+4), then (0 + 2) + (1 + 3); only where the lanes sit differs.
inline __m512 reduce16(const __m512* v) {
  __m512 h[8], q[4];
  for (int i = 0; i < 8; ++i)     // h[i] quarters: v[2i]'s two halves summed (8 lanes), then v[2i+1]'s
    h[i] = _mm512_add_ps(_mm512_shuffle_f32x4(v[2 * i], v[2 * i + 1], 0x44),
                         _mm512_shuffle_f32x4(v[2 * i], v[2 * i + 1], 0xEE));
  for (int i = 0; i < 4; ++i)     // q[i] quarter j: v[4i + j]'s four quarter sums
    q[i] = _mm512_add_ps(_mm512_shuffle_f32x4(h[2 * i], h[2 * i + 1], 0x88),
                         _mm512_shuffle_f32x4(h[2 * i], h[2 * i + 1], 0xDD));
  // p[i] quarter j: (s0, s1) of v[8i + j], then of v[8i + 4 + j]; s0 = l0 + l2, s1 = l1 + l3
  const __m512 p0 = _mm512_add_ps(_mm512_castpd_ps(_mm512_unpacklo_pd(_mm512_castps_pd(q[0]), _mm512_castps_pd(q[1]))),
                                  _mm512_castpd_ps(_mm512_unpackhi_pd(_mm512_castps_pd(q[0]), _mm512_castps_pd(q[1]))));
  const __m512 p1 = _mm512_add_ps(_mm512_castpd_ps(_mm512_unpacklo_pd(_mm512_castps_pd(q[2]), _mm512_castps_pd(q[3]))),
                                  _mm512_castpd_ps(_mm512_unpackhi_pd(_mm512_castps_pd(q[2]), _mm512_castps_pd(q[3]))));
  // quarter j lane m: s0 + s1 of v[4m + j]
  return _mm512_add_ps(_mm512_shuffle_ps(p0, p1, 0x88), _mm512_shuffle_ps(p0, p1, 0xDD));
}

template <int RW, int RX, class T, bool KEEP = false>
inline void tile(const float* __restrict x, int64_t ldx, const T* __restrict w, int64_t ldw, int64_t K,
                 float* __restrict y, int64_t ldy, float* __restrict keep = nullptr) {
  static_assert(LANES == 16, "one zmm of accumulators per pair");
  static_assert(RW <= 4 && RX * RW + RW + 1 <= 32, "a tile's accumulators and loads fit the registers");
  __m512 acc[RW][RX];
  for (int r = 0; r < RW; ++r)
    for (int c = 0; c < RX; ++c) acc[r][c] = _mm512_setzero_ps();
  int64_t i = 0;
  for (; i + 16 <= K; i += 16) {
    __m512 wv[RW];
    for (int r = 0; r < RW; ++r) {
      if constexpr (sizeof(T) == 2) {  // bf16: the high half of a float32
        wv[r] = _mm512_castsi512_ps(_mm512_slli_epi32(
            _mm512_cvtepu16_epi32(_mm256_loadu_si256((const __m256i*)(w + r * ldw + i))), 16));
        if constexpr (KEEP) _mm512_storeu_ps(keep + r * K + i, wv[r]);
      } else
        wv[r] = _mm512_loadu_ps((const float*)(w + r * ldw + i));
    }
    for (int c = 0; c < RX; ++c) {
      const __m512 xv = _mm512_loadu_ps(x + c * ldx + i);
      for (int r = 0; r < RW; ++r) acc[r][c] = _mm512_fmadd_ps(xv, wv[r], acc[r][c]);
    }
  }
  for (int c0 = 0; c0 < RX; c0 += 4) {       // four x rows' sums per reduce16: lane 4c + r
    __m512 v[16];
    for (int r = 0; r < 4; ++r)
      for (int c = 0; c < 4; ++c) v[4 * r + c] = r < RW && c0 + c < RX ? acc[r][c0 + c] : _mm512_setzero_ps();
    const __m512 s = reduce16(v);
    for (int c = 0; c < 4 && c0 + c < RX; ++c) {
      const __m128 q = c == 0 ? _mm512_castps512_ps128(s) : c == 1 ? _mm512_extractf32x4_ps(s, 1)
                     : c == 2 ? _mm512_extractf32x4_ps(s, 2) : _mm512_extractf32x4_ps(s, 3);
      if (RW == 4) _mm_storeu_ps(y + (c0 + c) * ldy, q);
      else _mm_mask_storeu_ps(y + (c0 + c) * ldy, __mmask8((1 << RW) - 1), q);
    }
  }
  if constexpr (KEEP)
    for (int r = 0; r < RW; ++r)
      for (int64_t m = i; m < K; ++m) keep[r * K + m] = widen(w[r * ldw + m]);
  if (i < K)
    for (int r = 0; r < RW; ++r)
      for (int c = 0; c < RX; ++c) {
        float t = 0.f;
        for (int64_t m = i; m < K; ++m) t = madd(x[c * ldx + m], widen(w[r * ldw + m]), t);
        y[c * ldy + r] += t;                 // = reduce(acc) + t: one rounding either way
      }
}
#else
template <int RW, int RX, class T, bool KEEP = false>
inline void tile(const float* __restrict x, int64_t ldx, const T* __restrict w, int64_t ldw, int64_t K,
                 float* __restrict y, int64_t ldy, float* __restrict keep = nullptr) {
  alignas(64) float acc[RW][RX][LANES] = {};
  int64_t i = 0;
  for (; i + LANES <= K; i += LANES) {
    alignas(64) float wv[RW][LANES];
    for (int r = 0; r < RW; ++r)
      for (int j = 0; j < LANES; ++j) wv[r][j] = widen(w[r * ldw + i + j]);
    if constexpr (KEEP)
      for (int r = 0; r < RW; ++r)
        for (int j = 0; j < LANES; ++j) keep[r * K + i + j] = wv[r][j];
    for (int c = 0; c < RX; ++c)
      for (int r = 0; r < RW; ++r)
        for (int j = 0; j < LANES; ++j) acc[r][c][j] = madd(x[c * ldx + i + j], wv[r][j], acc[r][c][j]);
  }
  if constexpr (KEEP)
    for (int r = 0; r < RW; ++r)
      for (int64_t m = i; m < K; ++m) keep[r * K + m] = widen(w[r * ldw + m]);
  for (int r = 0; r < RW; ++r)
    for (int c = 0; c < RX; ++c) {
      float t = 0.f;
      for (int64_t m = i; m < K; ++m) t = madd(x[c * ldx + m], widen(w[r * ldw + m]), t);
      y[c * ldy + r] = reduce(acc[r][c]) + t;
    }
}
#endif

// RW weight rows x all B rows of x: up to 6 x rows in one tile (each weight load shared by all), else tiles
// of 4 x rows and the remainder
template <int RW, class T>
inline void tile_rows(const float* x, int64_t ldx, int64_t B, const T* w, int64_t ldw, int64_t K, float* y,
                      int64_t ldy) {
  switch (B) {
    case 6: tile<RW, 6>(x, ldx, w, ldw, K, y, ldy); return;
    case 5: tile<RW, 5>(x, ldx, w, ldw, K, y, ldy); return;
    default: break;
  }
  int64_t b = 0;
  for (; b + 4 <= B; b += 4) tile<RW, 4>(x + b * ldx, ldx, w, ldw, K, y + b * ldy, ldy);
  switch (B - b) {
    case 3: tile<RW, 3>(x + b * ldx, ldx, w, ldw, K, y + b * ldy, ldy); break;
    case 2: tile<RW, 2>(x + b * ldx, ldx, w, ldw, K, y + b * ldy, ldy); break;
    case 1: tile<RW, 1>(x + b * ldx, ldx, w, ldw, K, y + b * ldy, ldy); break;
    default: break;
  }
}

template <int RW, class T>
inline void group_rows(const float* x, int64_t ldx, int64_t B, const T* w, int64_t ldw, int64_t K, float* y,
                       int64_t ldy) {
  if constexpr (sizeof(T) == 2) {
    // bf16 and more x rows than one tile takes: the first tile keeps the RW weight rows it widens (exactly)
    // as float32, which stay in L1 for the other x rows' tiles instead of being widened again for each
    if (B > WIDEN_ROWS) {
      thread_local std::vector<float> buf;
      if (int64_t(buf.size()) < RW * K) buf.resize(RW * K);
      float* f = buf.data();
      tile<RW, 4, T, true>(x, ldx, w, ldw, K, y, ldy, f);
      tile_rows<RW>(x + 4 * ldx, ldx, B - 4, (const float*)f, K, K, y + 4 * ldy, ldy);
      return;
    }
  }
  tile_rows<RW>(x, ldx, B, w, ldw, K, y, ldy);
}

// weight rows [a, e), every one of the B rows of x: y[b * ldy + n - base]
template <class T>
void rows_batch(const float* x, int64_t ldx, int64_t B, const T* w, int64_t ldw, int64_t K, int64_t a, int64_t e,
                int64_t base, float* y, int64_t ldy) {
  int64_t n = a;
  for (; n + 4 <= e; n += 4) group_rows<4>(x, ldx, B, w + n * ldw, ldw, K, y + (n - base), ldy);
  switch (e - n) {
    case 3: group_rows<3>(x, ldx, B, w + n * ldw, ldw, K, y + (n - base), ldy); break;
    case 2: group_rows<2>(x, ldx, B, w + n * ldw, ldw, K, y + (n - base), ldy); break;
    case 1: group_rows<1>(x, ldx, B, w + n * ldw, ldw, K, y + (n - base), ldy); break;
    default: break;
  }
}

// M <= 16 x rows (ldx apart) through stored_gemm.cpp's job API (the best ISA this CPU runs, one thread: the pool
// splits): rows [n0, n1) of the stored weight `w` (its row 0; fp8 codes or fp4 packed pairs) into
// y[m * ldy + 0 .. n1 - n0). Each weight row is decoded once for all M x rows, each x row's value as alone
// (stored_gemm.cpp; tests/test_decode_linear.py checks B = 1..32): a verify chunk or a batch no longer reads a
// large model's weights once per row.
inline void stored_gemv(int kind, const float* x, int64_t ldx, int64_t M, int64_t K, const uint8_t* w, int64_t ldw,
                        const uint8_t* s, int64_t lds, float* y, int64_t ldy, int64_t n0, int64_t n1) {
  Dsv4Job j{};
  j.kind = kind; j.M = int32_t(M); j.K = K; j.N = n1 - n0; j.n0 = n0;
  j.x = x; j.ldx = ldx; j.w = w; j.ldw = ldw; j.s = s; j.lds = lds; j.rs = nullptr; j.y = y; j.ldy = ldy;
  dsv4_gemv(&j, 1, 1, -1);
}

// One linear of a stage: y[b * ldy + n - n0] = sum_k x[b * ldx + k] W[n, k] for rows n in [n0, n1), b < B.
struct Job {
  const Lin* L;
  const float* x;
  int64_t ldx, B;
  float* y;
  int64_t ldy, n0, n1;
};

inline Job job(const Lin& L, const float* x, int64_t ldx, int64_t B, float* y, int64_t ldy) {
  return Job{&L, x, ldx, B, y, ldy, 0, L.N};
}

// rows [a, e) of job j
inline void job_rows(const Job& j, int64_t a, int64_t e) {
  const Lin& L = *j.L;
  switch (L.kind) {
    case 4:              // bf16 in output panels (a small model's, packed at plan time)
      panels_batch(j.x, j.ldx, j.B, (const uint32_t*)L.w, L.ldw, L.K, a, e, j.n0, j.y, j.ldy);
      return;
    case 1:              // bf16 (as stored, or FP8 / FP4 widened exactly at plan time)
      rows_batch(j.x, j.ldx, j.B, (const uint16_t*)L.w, L.ldw, L.K, a, e, j.n0, j.y, j.ldy);
      return;
    case 0:
      rows_batch(j.x, j.ldx, j.B, (const float*)L.w, L.ldw, L.K, a, e, j.n0, j.y, j.ldy);
      return;
    default:             // stored FP8 / FP4 (past the widening budget): bandwidth-bound, 16 x rows a pass
      for (int64_t b = 0; b < j.B; b += 16)
        stored_gemv(L.kind == 2 ? FP8 : FP4, j.x + b * j.ldx, j.ldx, std::min<int64_t>(16, j.B - b), L.K,
                    (const uint8_t*)L.w, L.ldw, L.s, L.lds, j.y + b * j.ldy + (a - j.n0), j.ldy, a, e);
  }
}

// multiply-adds of a stage below which one thread runs it (~3 us of work: less does not pay for handing rows to
// another core). One-row stages split too: each core then reads the same half of every weight each step, so
// far more of a small model's widened weights stay in the two cores' L2s than in one core's (from L3 each step) --
// measured on the tiny default (2 threads), a one-sequence step 0.195 -> 0.134 ms against keeping one-row stages
// under 1 M multiply-adds on the calling thread (the rule when the Python side of a step ran torch ops the
// spinning worker slowed; it is one native call now); 1 << 17 here: 0.150 ms.
constexpr int64_t MIN_SPLIT = 1 << 16;
// a chunk's rows start at a multiple of group(L) within their job (the tiles' weight rows, a panel's outputs: a
// chunk boundary never leaves a narrower tile behind)
inline int64_t group(const Lin& L) { return L.kind == 4 ? PANEL : 4; }

// every job's rows, in chunks of about equal multiply-adds (contiguous row ranges) claimed by up to nt threads
inline void run_jobs(const Job* jobs, int n, int nt) {
  int64_t total = 0;
  for (int i = 0; i < n; ++i) total += (jobs[i].n1 - jobs[i].n0) * jobs[i].L->K * jobs[i].B;
  const int T = total < MIN_SPLIT ? 1 : nt;
  const int64_t C = T == 1 ? 1 : 4 * T;      // a few chunks per thread: a late thread leaves no idle tail
  dsv4pool::pool().run(T, C, [&](int64_t t) {
    int64_t lo, hi, base = 0;
    dsv4pool::split(total, t, C, lo, hi);
    for (int i = 0; i < n; ++i) {
      const Job& j = jobs[i];
      const int64_t G = group(*j.L), c = j.L->K * j.B, rows = j.n1 - j.n0, g = G * c;
      // groups of G rows (whole tiles) whose cost start base + r * c lies in [lo, hi): each row in
      // exactly one chunk
      const int64_t a = g ? std::min(rows, G * std::max<int64_t>(0, (lo - base + g - 1) / g)) : 0;
      const int64_t e = g ? std::min(rows, G * std::max<int64_t>(0, (hi - base + g - 1) / g)) : 0;
      if (a < e) job_rows(j, j.n0 + a, j.n0 + e);
      base += rows * c;
    }
  });
}

// f(b) for every sequence b < B, one chunk per sequence, on up to nt threads (from 4 sequences on: a
// sequence's mHC or attention core is a few microseconds at small widths)
template <class F>
inline void for_seqs(int64_t B, int nt, F f) {
  dsv4pool::pool().run(B < 4 ? 1 : nt, B, [&](int64_t b) { f(b); });
}

// f(b0, b1) for contiguous groups of sequences covering [0, B), one group per thread (from 4 sequences on) up to
// 16 rows a group: for per-sequence work that also shares loads between the group's rows (mHC's mixes) or runs
// its rows as vector lanes (Sinkhorn: measured, a group of 4 rows cost about as much as one of 16)
template <class F>
inline void for_groups(int64_t B, int nt, F f) {
  const int T = B < 4 ? 1 : nt;
  const int64_t C = std::min<int64_t>(B, T * ((B + 16 * T - 1) / (16 * T)));
  dsv4pool::pool().run(T, C, [&](int64_t c) {
    int64_t lo, hi;
    dsv4pool::split(B, c, C, lo, hi);
    if (lo < hi) f(lo, hi);
  });
}

}  // namespace
