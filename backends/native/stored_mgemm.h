// Small-M GEMM on stored weights (issue 19: prefill), included at the end of stored_gemm.cpp.
//
// y[m, n - n0] = sum_k x[m, k] * W[n, k] for any M (the GEMV kernels stop at MAX_M = 16): a prefill chunk's
// attention linears (M = the chunk) and each routed expert's tokens (M ~ 48 at 512 tokens with 64 experts).
// The former path dequantised 4 MB float32 tiles and handed them to torch's GEMM; at M ~ 48 the tile left L2,
// was written to and read back from memory, and the GEMM ran at a fraction of its speed. Here:
//   - x is packed once per job, transposed, in chunks of up to 64 rows: [K][16 * mv] floats (mv = the chunk's
//     16-row vectors, zero-padded), so lanes run over x rows;
//   - a unit is NB = 96 weight rows: per K block of 512, its rows are decoded once (the same decoders as the
//     tile dequantisation: exactly the reference's float32 values) into a 192 KB buffer that stays in L2;
//   - NR of those rows x mv vectors of x rows are accumulated in registers over the K block
//     (acc[r][j] += broadcast(W[r, k]) * xT[k][16j..]), 24 accumulators in every (mv, NR) shape, from zero,
//     and the block's sums added to a per-unit float32 buffer (each output a sum of <= 512-term partial sums,
//     not one K-long chain); the unit's outputs are written to y once at the end;
//   - units of all jobs are taken by the threads from one atomic counter (jobs of different M balance).
// Only the summation order differs from the reference matmul (float32 products and sums, FMA on AVX-512).
// Paths: the AVX-512 kernel on the AVX-512 levels (avx512, avx512vbmi); elsewhere (avx2, neon, scalar) the
// portable one, plain C++ loops the compiler vectorises for the baseline ISA. `dsv4_mgemm_path` says which.
#pragma once

#include <atomic>
#ifdef _OPENMP
#include <omp.h>
#endif

namespace {

// f(thread) on T threads: where the library is built with OpenMP, on an OpenMP team -- in a torch process
// that is torch's own libgomp (same soname, loaded first) and its threads, which spin for a few ms after
// each torch op: a thread of our pool started then shares a core with a spinning one (measured: 2048 x 4096
// FP4, M = 48, 2 threads, after a torch elementwise op 3.4 -> 5.8 ms per call on the pool). Else the pool.
// f must not depend on how many threads actually run it (work is taken from atomic counters).
template <class F>
void mg_parallel(int T, const F& f) {
#ifdef _OPENMP
  if (T > 1 && !omp_in_parallel()) {
#pragma omp parallel num_threads(T)
    f(omp_get_thread_num());
    return;
  }
#endif
  if (T <= 1) f(0); else parallel(T, f);
}

constexpr int MG_NB = 96;          // weight rows per unit (a multiple of every NR below)
constexpr int64_t MG_KB = 512;     // K block (a multiple of 128: whole FP8 scale blocks, whole FP4 groups)
constexpr int MG_MC = 64;          // x rows per packed chunk (4 vectors)

// rows per register tile for mv x-vectors: 24 accumulators each
constexpr int mg_nr(int mv) { return mv == 1 ? 24 : mv == 2 ? 12 : mv == 3 ? 8 : 6; }

// rows [n, n + rows) of job b's weight, columns [k0, k0 + len), as float32 into D (row stride MG_KB); rows
// rows..MG_NB - 1 are zeros (a job's last unit)
void mg_decode(const Dsv4Job& b, int64_t n, int rows, int64_t k0, int64_t len, float* D, bool v512) {
  for (int r = 0; r < rows; ++r) {
    const int64_t row = n + r;
    float* o = D + r * MG_KB;
    if (b.kind == FP8) {
      const uint8_t* w = b.w + row * b.ldw + k0;
      const uint8_t* s = b.s + (row >> 7) * b.lds + (k0 >> 7);
#ifdef DSV4_HAVE_X86
      if (v512) { fp8_dequant_row_512(w, s, len, o); continue; }
#endif
      for (int64_t i = 0; i < len; ++i) o[i] = dec_fp8(w[i]) * e8m0(s[i >> 7]);
    } else if (b.kind == FP4) {
      const uint8_t* w = b.w + row * b.ldw + k0 / 2;
      const uint8_t* s = b.s + row * b.lds + k0 / 32;
#ifdef DSV4_HAVE_X86
      if (v512) { fp4_dequant_row_512(w, s, len, o); continue; }
#endif
      for (int64_t i = 0; i < len / 2; ++i) {
        const float sc = e8m0(s[(2 * i) / 32]);
        o[2 * i] = dec_e2m1(w[i] & 15u) * sc;
        o[2 * i + 1] = dec_e2m1(uint32_t(w[i]) >> 4) * sc;
      }
    } else if (b.kind == BF16) {
      const uint16_t* w = reinterpret_cast<const uint16_t*>(b.w) + row * b.ldw + k0;
      for (int64_t i = 0; i < len; ++i) o[i] = bf16_f(w[i]);
    } else {
      const int8_t* w = reinterpret_cast<const int8_t*>(b.w) + row * b.ldw + k0;
      const float sc = b.rs[row];
      for (int64_t i = 0; i < len; ++i) o[i] = float(w[i]) * sc;
    }
  }
  for (int r = rows; r < MG_NB; ++r) std::memset(D + r * MG_KB, 0, sizeof(float) * size_t(len));
}

// C[r][16 * MV] (+)= sum_k D[r, k] * X[k][16 * MV] for r < NR, k < len
template <int MV, int NR>
void mg_tile_scalar(const float* D, const float* X, int64_t len, float* C, bool first) {
  constexpr int W = 16 * MV;
  float acc[NR][W];
  for (int r = 0; r < NR; ++r)
    for (int i = 0; i < W; ++i) acc[r][i] = 0.f;
  for (int64_t k = 0; k < len; ++k) {
    const float* xk = X + k * W;
    for (int r = 0; r < NR; ++r) {
      const float w = D[r * MG_KB + k];
      for (int i = 0; i < W; ++i) acc[r][i] += w * xk[i];
    }
  }
  for (int r = 0; r < NR; ++r)
    for (int i = 0; i < W; ++i) C[r * W + i] = first ? acc[r][i] : C[r * W + i] + acc[r][i];
}

#ifdef DSV4_HAVE_X86
template <int MV, int NR>
DSV4_T512 void mg_tile_512(const float* D, const float* X, int64_t len, float* C, bool first) {
  __m512 acc[NR][MV];
#pragma GCC unroll 24
  for (int r = 0; r < NR; ++r)
#pragma GCC unroll 4
    for (int j = 0; j < MV; ++j) acc[r][j] = _mm512_setzero_ps();
  for (int64_t k = 0; k < len; ++k) {
    __m512 xv[MV];
#pragma GCC unroll 4
    for (int j = 0; j < MV; ++j) xv[j] = _mm512_loadu_ps(X + (k * MV + j) * 16);
#pragma GCC unroll 24
    for (int r = 0; r < NR; ++r) {
      const __m512 w = _mm512_set1_ps(D[r * MG_KB + k]);
#pragma GCC unroll 4
      for (int j = 0; j < MV; ++j) acc[r][j] = _mm512_fmadd_ps(w, xv[j], acc[r][j]);
    }
  }
#pragma GCC unroll 24
  for (int r = 0; r < NR; ++r)
#pragma GCC unroll 4
    for (int j = 0; j < MV; ++j) {
      float* c = C + (r * MV + j) * 16;
      _mm512_storeu_ps(c, first ? acc[r][j] : _mm512_add_ps(_mm512_loadu_ps(c), acc[r][j]));
    }
}
#endif

using TileFn = void (*)(const float*, const float*, int64_t, float*, bool);

TileFn mg_tile(int mv, bool v512) {
#ifdef DSV4_HAVE_X86
  static const TileFn f512[4] = {mg_tile_512<1, mg_nr(1)>, mg_tile_512<2, mg_nr(2)>, mg_tile_512<3, mg_nr(3)>,
                                 mg_tile_512<4, mg_nr(4)>};
  if (v512) return f512[mv - 1];
#endif
  static const TileFn fs[4] = {mg_tile_scalar<1, mg_nr(1)>, mg_tile_scalar<2, mg_nr(2)>,
                               mg_tile_scalar<3, mg_nr(3)>, mg_tile_scalar<4, mg_nr(4)>};
  return fs[mv - 1];
}

bool mg_512(int isa) { return isa == AVX512 || isa == VBMI; }

struct MgPacked {                     // one job's x, transposed per chunk
  std::vector<float> xt;
  std::vector<int64_t> off;           // chunk c at xt + off[c]; its C block at c_off[c] (per NB rows)
  std::vector<int64_t> c_off;
  int64_t c_total = 0;
};

void mg_pack(const Dsv4Job& b, MgPacked& p) {
  const int chunks = (b.M + MG_MC - 1) / MG_MC;
  int64_t size = 0, csize = 0;
  for (int c = 0; c < chunks; ++c) {
    const int mv = (std::min(MG_MC, b.M - c * MG_MC) + 15) / 16;
    p.off.push_back(size);
    p.c_off.push_back(csize);
    size += b.K * 16 * mv;
    csize += int64_t(MG_NB) * 16 * mv;
  }
  p.c_total = csize;
  p.xt.assign(size_t(size), 0.f);
  for (int c = 0; c < chunks; ++c) {
    const int m0 = c * MG_MC, mc = std::min(MG_MC, b.M - m0), W = 16 * ((mc + 15) / 16);
    float* o = p.xt.data() + p.off[c];
    for (int i = 0; i < mc; ++i) {
      const float* xm = b.x + (m0 + i) * b.ldx;
      for (int64_t k = 0; k < b.K; ++k) o[k * W + i] = xm[k];
    }
  }
}

// rows [b.n0 + u0, b.n0 + u0 + rows) of job b: every K block decoded once, then every chunk x row group
void mg_unit(const Dsv4Job& b, const MgPacked& p, int64_t u0, int rows, float* D, float* C, bool v512) {
  const int chunks = int(p.off.size());
  for (int64_t k0 = 0; k0 < b.K; k0 += MG_KB) {
    const int64_t len = std::min<int64_t>(MG_KB, b.K - k0);
    mg_decode(b, b.n0 + u0, rows, k0, len, D, v512);
    for (int c = 0; c < chunks; ++c) {
      const int mv = (std::min(MG_MC, b.M - c * MG_MC) + 15) / 16, nr = mg_nr(mv);
      const TileFn f = mg_tile(mv, v512);
      const float* X = p.xt.data() + p.off[c] + k0 * 16 * mv;
      for (int r0 = 0; r0 < rows; r0 += nr) f(D + r0 * MG_KB, X, len, C + p.c_off[c] + r0 * 16 * mv, k0 == 0);
    }
  }
  for (int c = 0; c < chunks; ++c) {                // C[r][i] of chunk c -> y[m0 + i, u0 + r]
    const int m0 = c * MG_MC, mc = std::min(MG_MC, b.M - m0), W = 16 * ((mc + 15) / 16);
    const float* cc = C + p.c_off[c];
    for (int i = 0; i < mc; ++i) {
      float* yr = b.y + (m0 + i) * b.ldy + u0;
      for (int r = 0; r < rows; ++r) yr[r] = cc[r * W + i];
    }
  }
}

}  // namespace

extern "C" {

// 1 where `dsv4_mgemm` on instruction set `isa` (-1: process_isa()) runs the AVX-512 kernel, 0: the portable one
int dsv4_mgemm_path(int isa) {
  if (isa < 0) isa = process_isa();
  return supported(isa) && mg_512(isa) ? 1 : 0;
}

// Jobs as for dsv4_gemv but any M >= 1. Returns 0, or -1 for a job with M < 1 or an unknown kind.
int dsv4_mgemm(const Dsv4Job* jobs, int njobs, int nthreads, int isa) {
  if (isa < 0) isa = process_isa();
  if (!supported(isa)) isa = SCALAR;
  const bool v512 = mg_512(isa);
  std::vector<int64_t> first_unit(njobs + 1, 0);   // units of job j: [first_unit[j], first_unit[j + 1])
  int64_t work = 0, cmax = 0;
  for (int j = 0; j < njobs; ++j) {
    if (jobs[j].M < 1 || jobs[j].kind < 0 || jobs[j].kind > INT8) return -1;
    first_unit[j + 1] = first_unit[j] + (jobs[j].N + MG_NB - 1) / MG_NB;
    work += jobs[j].N * jobs[j].K * jobs[j].M;
  }
  const int64_t units = first_unit[njobs];
  std::vector<MgPacked> packed(njobs);
  int T = int(std::max<int64_t>(1, std::min<int64_t>(nthreads, std::max<int64_t>(units, njobs))));
  if (work < MIN_PARALLEL * 64) T = 1;   // 8M multiply-adds: below, a second thread costs more than it saves
  // x packed per job, the jobs taken by the threads
  std::atomic<int> next_job{0};
  auto pack = [&](int) { for (int j = next_job++; j < njobs; j = next_job++) mg_pack(jobs[j], packed[j]); };
  mg_parallel(njobs > 1 ? T : 1, pack);
  for (const MgPacked& p : packed) cmax = std::max(cmax, p.c_total);
  std::atomic<int64_t> next{0};
  auto run = [&](int) {
    std::vector<float> D(size_t(MG_NB) * MG_KB), C(static_cast<size_t>(cmax));
    int j = 0;
    for (int64_t u = next.fetch_add(1); u < units; u = next.fetch_add(1)) {
      while (first_unit[j + 1] <= u) ++j;             // units are taken in increasing order
      const Dsv4Job& b = jobs[j];
      const int64_t u0 = (u - first_unit[j]) * MG_NB;
      mg_unit(b, packed[j], u0, int(std::min<int64_t>(MG_NB, b.N - u0)), D.data(), C.data(), v512);
    }
  };
  mg_parallel(T, run);
  return 0;
}

}  // extern "C"
