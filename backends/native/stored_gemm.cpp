// GEMV / small-GEMM and tile dequantisation on DeepSeek-V4 checkpoint storage (issue 15), for the CPU backend.
//
// y[m, n - n0] = sum_k x[m, k] * W[n, k] for the output rows n in [n0, n0 + N), with W in its stored format:
//   fp8  : e4m3 codes [N, K] + ue8m0 scales per 128x128 block [ceil(N/128), ceil(K/128)]
//   fp4  : e2m1 codes two per byte (low nibble = even k) [N, K/2] + ue8m0 scales per 32 along K [N, K/32]
//   bf16 : [N, K] as stored
//   int8 : codes [N, K] + one float32 scale per row
// A call is a batch of such jobs (`dsv4_gemv`): one linear, or every routed expert's w1 and w3 of a decode
// step at once; the rows of all jobs are split over `nthreads` threads (the caller passes torch's thread
// count; a persistent pool, stored_pool.h). Each weight value is decoded in registers (stored_vbmi.h: AVX-512
// VBMI FP4 decoder; stored_simd.h: AVX-512 / AVX2 on x86-64, picked at run time; NEON on aarch64; a
// portable scalar path everywhere) to exactly the float32 value the reference's
// dequantisation gives, up to exact power-of-two factors applied per scale block, and accumulated in float32:
// only the summation order differs from the reference matmul. No whole dequantised weight ever exists.
// Plain C ABI, no torch headers: backends/cpu_native.py compiles this file once and calls it through ctypes
// (which releases the GIL).
#include <algorithm>
#include <cctype>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <string>
#include <thread>
#include <vector>

#include "stored_simd.h"
#include "stored_vbmi.h"
#include "stored_rows.h"
#include "stored_pool.h"

using namespace dsv4;

namespace {

enum Kind { FP8 = 0, FP4 = 1, BF16 = 2, INT8 = 3 };
enum Isa { SCALAR = 0, AVX2 = 1, AVX512 = 2, NEON = 3, VBMI = 4 };

constexpr int LANES = 16;
constexpr int MAX_M = 16;                   // rows of x per job (the Python side tiles larger M through a GEMM)
constexpr int64_t MIN_PARALLEL = 1 << 17;   // weight elements below which one thread does it all

// ---------------------------------------------------------------- portable scalar row kernels
// plain loops over LANES accumulators, which the compiler vectorises for the baseline ISA
template <int MR>
void fp8_row_scalar(const Gemv& g) {
  alignas(64) float buf[128], acc[MR][LANES];
  float tail[MR] = {};
  std::memset(acc, 0, sizeof(acc));
  for (int64_t k0 = 0; k0 < g.K; k0 += 128) {
    const int len = int(std::min<int64_t>(128, g.K - k0)), full = len & ~(LANES - 1);
    const float sc = e8m0(g.s[k0 >> 7]);
    ahead(g.w + k0);
    ahead(g.w + k0 + 64);
    for (int i = 0; i < len; ++i) buf[i] = dec_fp8(g.w[k0 + i]) * sc;
    for (int m = 0; m < MR; ++m) {
      const float* xm = g.x + m * g.ldx + k0;
      for (int i = 0; i < full; i += LANES)
        for (int j = 0; j < LANES; ++j) acc[m][j] += xm[i + j] * buf[i + j];
      for (int i = full; i < len; ++i) tail[m] += xm[i] * buf[i];
    }
  }
  for (int m = 0; m < MR; ++m) {
    float t = tail[m];
    for (int j = 0; j < LANES; ++j) t += acc[m][j];
    g.y[m * g.ldy] = t;
  }
}

template <int MR>   // x pre-permuted per 32-block: [16 even k | 16 odd k]
void fp4_row_scalar(const Gemv& g) {
  alignas(64) float acc[MR][LANES];
  std::memset(acc, 0, sizeof(acc));
  for (int64_t j = 0; j < g.K / 32; ++j) {
    alignas(64) float lo[16], hi[16];
    const float sc = e8m0(g.s[j]);
    if ((j & 3) == 0) ahead(g.w + 16 * j);
    for (int i = 0; i < 16; ++i) {
      uint32_t c = g.w[16 * j + i];
      lo[i] = dec_e2m1(c & 15u) * sc;
      hi[i] = dec_e2m1(c >> 4) * sc;
    }
    for (int m = 0; m < MR; ++m) {
      const float* xm = g.x + m * g.ldx + 32 * j;
      for (int i = 0; i < 16; ++i) acc[m][i] += xm[i] * lo[i] + xm[16 + i] * hi[i];
    }
  }
  for (int m = 0; m < MR; ++m) {
    float t = 0.f;
    for (int j = 0; j < LANES; ++j) t += acc[m][j];
    g.y[m * g.ldy] = t;
  }
}

template <int MR>
void plain_row_scalar(const Gemv& g, bool bf16) {
  alignas(64) float buf[128], acc[MR][LANES];
  float tail[MR] = {};
  std::memset(acc, 0, sizeof(acc));
  const uint16_t* wb = reinterpret_cast<const uint16_t*>(g.w);
  const int8_t* wi = reinterpret_cast<const int8_t*>(g.w);
  for (int64_t k0 = 0; k0 < g.K; k0 += 128) {
    const int len = int(std::min<int64_t>(128, g.K - k0)), full = len & ~(LANES - 1);
    for (int i = 0; i < (bf16 ? 256 : 128); i += 64) ahead(g.w + (bf16 ? 2 : 1) * k0 + i);
    if (bf16) for (int i = 0; i < len; ++i) buf[i] = bf16_f(wb[k0 + i]);
    else for (int i = 0; i < len; ++i) buf[i] = float(wi[k0 + i]) * g.rs[0];
    for (int m = 0; m < MR; ++m) {
      const float* xm = g.x + m * g.ldx + k0;
      for (int i = 0; i < full; i += LANES)
        for (int j = 0; j < LANES; ++j) acc[m][j] += xm[i + j] * buf[i + j];
      for (int i = full; i < len; ++i) tail[m] += xm[i] * buf[i];
    }
  }
  for (int m = 0; m < MR; ++m) {
    float t = tail[m];
    for (int j = 0; j < LANES; ++j) t += acc[m][j];
    g.y[m * g.ldy] = t;
  }
}
template <int MR> void bf16_row_scalar(const Gemv& g) { plain_row_scalar<MR>(g, true); }
template <int MR> void int8_row_scalar(const Gemv& g) { plain_row_scalar<MR>(g, false); }

using RowFn = void (*)(const Gemv&);
// MR up to 8 x rows share each weight row's decode (M > 1: a verify chunk, a batched step on stored weights);
// measured on this project's 2-core host, one thread, a 4096 x 4096 weight: M = 16 fp8 11.2 -> 9.9 ms, fp4
// 11.9 -> 11.6 ms against passes of 4 (each row's arithmetic is the same at any MR: batch invariance holds)
#define DSV4_ROWS(f) {nullptr, f<1>, f<2>, f<3>, f<4>}
#define DSV4_ROWS8(f) {nullptr, f<1>, f<2>, f<3>, f<4>, f<5>, f<6>, f<7>, f<8>}
// x rows per pass: 8 on the AVX-512 levels (32 vector registers), 4 elsewhere
inline int pass_rows(int isa) { return isa == AVX512 || isa == VBMI ? 8 : 4; }

// [isa][kind][MR], MR = 1 .. pass_rows(isa) (index 0 unused); an ISA without its own table runs the scalar one
const RowFn* table(int isa, int kind) {
  static const RowFn scalar[4][5] = {DSV4_ROWS(fp8_row_scalar), DSV4_ROWS(fp4_row_scalar),
                                     DSV4_ROWS(bf16_row_scalar), DSV4_ROWS(int8_row_scalar)};
#ifdef DSV4_HAVE_X86
  static const RowFn avx512[4][9] = {DSV4_ROWS8(fp8_row_512), DSV4_ROWS8(fp4_row_512), DSV4_ROWS8(bf16_row_512),
                                     DSV4_ROWS8(int8_row_512)};
  static const RowFn avx2[4][5] = {DSV4_ROWS(fp8_row_256), DSV4_ROWS(fp4_row_256), DSV4_ROWS(bf16_row_256),
                                   DSV4_ROWS(int8_row_256)};
#ifdef DSV4_HAVE_VBMI
  static const RowFn vbmi[4][9] = {DSV4_ROWS8(fp8_row_512), DSV4_ROWS8(fp4_row_vbmi), DSV4_ROWS8(bf16_row_512),
                                   DSV4_ROWS8(int8_row_512)};
  if (isa == VBMI) return vbmi[kind];
#endif
  if (isa == AVX512) return avx512[kind];
  if (isa == AVX2) return avx2[kind];
#endif
#ifdef DSV4_HAVE_NEON
  static const RowFn neon[4][5] = {DSV4_ROWS(fp8_row_neon), DSV4_ROWS(fp4_row_scalar), DSV4_ROWS(bf16_row_neon),
                                   DSV4_ROWS(int8_row_scalar)};
  if (isa == NEON) return neon[kind];
#endif
  return scalar[kind];
}

// M = 1 kernels that take RW = 1..4 weight rows per pass (stored_rows.h): [isa][kind][RW]; nullptr: none (the
// single-row table runs)
using RowsFn = void (*)(const Gemv*);
const RowsFn* rows_table(int isa, int kind) {
#ifdef DSV4_HAVE_X86
#define DSV4_RW(f) {nullptr, f<1>, f<2>, f<3>, f<4>}
  static const RowsFn avx512[4][5] = {DSV4_RW(fp8_rows_512), {}, DSV4_RW(bf16_rows_512), {}};
#ifdef DSV4_HAVE_VBMI
  static const RowsFn vbmi[4][5] = {DSV4_RW(fp8_rows_512), DSV4_RW(fp4_rows_vbmi), DSV4_RW(bf16_rows_512), {}};
  if (isa == VBMI) return vbmi[kind][1] ? vbmi[kind] : nullptr;
#endif
#undef DSV4_RW
  if (isa == AVX512) return avx512[kind][1] ? avx512[kind] : nullptr;
#endif
  (void)isa; (void)kind;
  return nullptr;
}

bool supported(int isa) {
  switch (isa) {
    case SCALAR: return true;
#ifdef DSV4_HAVE_X86
    case AVX2: return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") &&
                      __builtin_cpu_supports("f16c");
    case AVX512: return __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
                        __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512dq") &&
                        __builtin_cpu_supports("fma") && __builtin_cpu_supports("f16c");
#endif
#ifdef DSV4_HAVE_VBMI
    case VBMI: return supported(AVX512) && __builtin_cpu_supports("avx512vbmi");
#endif
#ifdef DSV4_HAVE_NEON
    case NEON: return true;
#endif
    default: return false;
  }
}

int best() {
  for (int isa : {VBMI, AVX512, NEON, AVX2})
    if (supported(isa)) return isa;
  return SCALAR;
}

// what a call with isa = -1 runs (the fused decode step's calls): DSV4_NATIVE_ISA where it names a path this
// CPU runs -- the same knob, read the same way, as backends/cpu_native.py's choice for the per-op calls --,
// else the best. Read once per process.
int process_isa() {
  static const int isa = [] {
    const char* e = std::getenv("DSV4_NATIVE_ISA");
    std::string want;
    for (const char* c = e ? e : ""; *c; ++c)               // stripped and lower-cased, as the Python side
      if (*c != ' ' && *c != '\t' && *c != '\n') want += char(std::tolower((unsigned char)*c));
    const char* names[] = {"scalar", "avx2", "avx512", "neon", "avx512vbmi"};
    for (int i = 0; i < 5; ++i)
      if (want == names[i] && supported(i)) return i;
    return best();
  }();
  return isa;
}

}  // namespace

extern "C" {

// One GEMV job: rows [n0, n0 + N) of the weight, M <= MAX_M rows of x. Layout shared with cpu_native.Job.
struct Dsv4Job {
  int32_t kind;
  int32_t M;
  int64_t K, N, n0;
  const float* x;
  int64_t ldx;
  const uint8_t* w;          // the weight's row 0 (bf16: as bytes)
  int64_t ldw;               // row stride in elements of the stored dtype (fp4: bytes of packed pairs)
  const uint8_t* s;          // fp8: [ceil(N/128), ceil(K/128)] block scales; fp4: [N, K/32]
  int64_t lds;
  const float* rs;           // int8: [N] row scales
  float* y;                  // y[m, n - n0] at y + m * ldy + (n - n0)
  int64_t ldy;
};

int dsv4_max_m() { return MAX_M; }
int dsv4_best_isa() { return best(); }
int dsv4_process_isa() { return process_isa(); }
int dsv4_isa_supported(int isa) { return supported(isa) ? 1 : 0; }

// Run `njobs` jobs with `nthreads` threads on instruction set `isa` (-1: process_isa(); an
// unsupported one runs the scalar path -- the Python side refuses to ask for one). Returns 0, or -1 for a
// job with M > MAX_M or an unknown kind (nothing is computed then).
int dsv4_gemv(const Dsv4Job* jobs, int njobs, int nthreads, int isa) {
  if (isa < 0) isa = process_isa();
  if (!supported(isa)) isa = SCALAR;
  int64_t total = 0, work = 0;
  for (int j = 0; j < njobs; ++j) {
    if (jobs[j].M < 1 || jobs[j].M > MAX_M || jobs[j].kind < 0 || jobs[j].kind > INT8) return -1;
    total += jobs[j].N;
    work += jobs[j].N * jobs[j].K;
  }
  // fp4: x permuted once per job (x is tiny next to the weight) to the order the row kernel decodes the
  // codes in: per 32-block [16 even k | 16 odd k]; on VBMI per 128-group k = 8d + s at 16s + d (d < 16,
  // s < 8), the last K % 128 as 32-blocks
  std::vector<std::vector<float>> xs(njobs);
  for (int j = 0; j < njobs; ++j) {
    const Dsv4Job& b = jobs[j];
    if (b.kind != FP4) continue;
    xs[j].resize(size_t(b.M) * b.K);
    const int64_t grouped = isa == VBMI ? b.K & ~int64_t(127) : 0;
    for (int64_t m = 0; m < b.M; ++m) {
      float* o = xs[j].data() + m * b.K;
      const float* xm = b.x + m * b.ldx;
      for (int64_t k = 0; k < grouped; ++k) o[(k & ~int64_t(127)) + 16 * (k & 7) + ((k & 127) >> 3)] = xm[k];
      for (int64_t k = grouped; k < b.K; ++k) o[(k & ~int64_t(31)) + (k & 1) * 16 + ((k & 31) >> 1)] = xm[k];
    }
  }
  // rows [r0, r1) of the jobs' concatenated rows
  auto run = [&](int64_t r0, int64_t r1) {
    int64_t base = 0;
    for (int j = 0; j < njobs && base < r1; base += jobs[j].N, ++j) {
      const Dsv4Job& b = jobs[j];
      int64_t a = std::max<int64_t>(r0 - base, 0), e = std::min<int64_t>(r1 - base, b.N);
      if (a >= e) continue;
      const RowFn* fns = table(isa, b.kind);
      const int mr = pass_rows(isa);
      const float* x = b.kind == FP4 ? xs[j].data() : b.x;
      const int64_t ldx = b.kind == FP4 ? b.K : b.ldx;
      const int64_t esz = b.kind == BF16 ? 2 : 1;
      const RowsFn* multi = b.M == 1 ? rows_table(isa, b.kind) : nullptr;
      if (multi) {               // M = 1: up to 4 weight rows per pass over x (each row's value as alone)
        for (int64_t i = a; i < e;) {
          const int rw = int(std::min<int64_t>(4, e - i));
          Gemv g[4];
          for (int r = 0; r < rw; ++r, ++i) {
            const int64_t n = b.n0 + i;
            g[r] = Gemv{x, ldx, b.K, b.w + n * b.ldw * esz, nullptr, nullptr, b.y + i, b.ldy};
            g[r].s = b.kind == FP8 ? b.s + (n >> 7) * b.lds : b.kind == FP4 ? b.s + n * b.lds : nullptr;
          }
          multi[rw](g);
        }
        continue;
      }
      for (int64_t i = a; i < e; ++i) {
        const int64_t n = b.n0 + i;
        Gemv g{x, ldx, b.K, b.w + n * b.ldw * esz, nullptr, b.rs ? b.rs + n : nullptr, b.y + i, b.ldy};
        if (b.kind == FP8) g.s = b.s + (n >> 7) * b.lds;
        if (b.kind == FP4) g.s = b.s + n * b.lds;
        for (int m0 = 0; m0 < b.M; m0 += mr) {
          Gemv gm = g;
          gm.x = x + m0 * ldx;
          gm.y = g.y + m0 * b.ldy;
          fns[std::min(mr, b.M - m0)](gm);
        }
      }
    }
  };
  int T = int(std::max<int64_t>(1, std::min<int64_t>(nthreads, total)));
  if (work < MIN_PARALLEL) T = 1;
  if (T == 1) { run(0, total); return 0; }
  const int64_t per = (total + T - 1) / T;
  parallel(T, [&](int t) { run(std::min(total, t * per), std::min(total, (t + 1) * per)); });
  return 0;
}

}  // extern "C"

namespace {
template <class F>
void split_rows(int64_t n0, int64_t n1, int nthreads, const F& f) {   // f(a, b) on row ranges, in parallel
  const int T = int(std::max<int64_t>(1, std::min<int64_t>(nthreads, n1 - n0)));
  const int64_t per = (n1 - n0 + T - 1) / T;
  parallel(T, [&](int t) { f(std::min(n1, n0 + t * per), std::min(n1, n0 + (t + 1) * per)); });
}
#ifdef DSV4_HAVE_X86
// The large-M path's tile dequantisation, 32 values per step: the same float32 values as the scalar loops below.
// FP8: each e4m3 code's fp16 form (fp8_half_512) is exact, times 256 restores its exponent, then times the
// power-of-two block scale, as the scalar loop multiplies. FP4: the 16 e2m1 values by a table permute, low and
// high nibbles interleaved back into k order, times the per-32 scale.
DSV4_T512 void fp8_dequant_row_512(const uint8_t* w, const uint8_t* s, int64_t K, float* o) {
  const __m512 v256 = _mm512_set1_ps(256.f);
  for (int64_t k0 = 0; k0 < K; k0 += 128) {
    const int64_t len = std::min<int64_t>(128, K - k0), full = len & ~int64_t(31);
    const float sc = e8m0(s[k0 >> 7]);
    const __m512 vs = _mm512_set1_ps(sc);
    for (int64_t k = k0; k < k0 + full; k += 32) {
      const __m512i h = fp8_half_512(_mm256_loadu_si256((const __m256i*)(w + k)));
      const __m512 a = _mm512_mul_ps(_mm512_mul_ps(_mm512_cvtph_ps(_mm512_castsi512_si256(h)), v256), vs);
      const __m512 b = _mm512_mul_ps(_mm512_mul_ps(_mm512_cvtph_ps(_mm512_extracti64x4_epi64(h, 1)), v256), vs);
      _mm512_storeu_ps(o + k, a);
      _mm512_storeu_ps(o + k + 16, b);
    }
    for (int64_t k = k0 + full; k < k0 + len; ++k) o[k] = dec_fp8(w[k]) * sc;
  }
}

DSV4_T512 void fp4_dequant_row_512(const uint8_t* w, const uint8_t* s, int64_t K, float* o) {
  const __m512 tab = _mm512_setr_ps(0.f, .5f, 1.f, 1.5f, 2.f, 3.f, 4.f, 6.f,
                                    -0.f, -.5f, -1.f, -1.5f, -2.f, -3.f, -4.f, -6.f);
  const __m512i i0 = _mm512_setr_epi32(0, 16, 1, 17, 2, 18, 3, 19, 4, 20, 5, 21, 6, 22, 7, 23);
  const __m512i i1 = _mm512_setr_epi32(8, 24, 9, 25, 10, 26, 11, 27, 12, 28, 13, 29, 14, 30, 15, 31);
  const int64_t nb = K / 32;
  for (int64_t j = 0; j < nb; ++j) {
    const __m512i v = _mm512_cvtepu8_epi32(_mm_loadu_si128((const __m128i*)(w + 16 * j)));
    const __m512 lo = _mm512_permutexvar_ps(v, tab), hi = _mm512_permutexvar_ps(_mm512_srli_epi32(v, 4), tab);
    const __m512 sc = _mm512_set1_ps(e8m0(s[j]));
    _mm512_storeu_ps(o + 32 * j, _mm512_mul_ps(_mm512_permutex2var_ps(lo, i0, hi), sc));
    _mm512_storeu_ps(o + 32 * j + 16, _mm512_mul_ps(_mm512_permutex2var_ps(lo, i1, hi), sc));
  }
  for (int64_t i = nb * 16; i < K / 2; ++i) {
    const float sc = e8m0(s[(2 * i) / 32]);
    o[2 * i] = dec_e2m1(w[i] & 15u) * sc;
    o[2 * i + 1] = dec_e2m1(uint32_t(w[i]) >> 4) * sc;
  }
}
#endif

// AVX-512 dequantisation where the process's ISA (process_isa: DSV4_NATIVE_ISA or the best) is an AVX-512 level
bool dequant_512() {
#ifdef DSV4_HAVE_X86
  const int isa = process_isa();
  return isa == AVX512 || isa == VBMI;
#else
  return false;
#endif
}

}  // namespace

extern "C" {

// Tile dequantisation for the large-M path: out [(n1 - n0), K] float32 = the reference's dequantised rows.
void dsv4_fp8_dequant(const uint8_t* w, int64_t ldw, const uint8_t* s, int64_t lds, int64_t K, float* out,
                      int64_t n0, int64_t n1, int nthreads) {
  const bool v512 = dequant_512();
  auto f = [=](int64_t a, int64_t b) {
#ifdef DSV4_HAVE_X86
    if (v512) {
      for (int64_t n = a; n < b; ++n) fp8_dequant_row_512(w + n * ldw, s + (n >> 7) * lds, K, out + (n - n0) * K);
      return;
    }
#endif
    for (int64_t n = a; n < b; ++n)
      for (int64_t k0 = 0; k0 < K; k0 += 128) {
        const float sc = e8m0(s[(n >> 7) * lds + (k0 >> 7)]);
        const int64_t len = std::min<int64_t>(128, K - k0);
        for (int64_t i = 0; i < len; ++i) out[(n - n0) * K + k0 + i] = dec_fp8(w[n * ldw + k0 + i]) * sc;
      }
  };
  split_rows(n0, n1, (n1 - n0) * K < MIN_PARALLEL ? 1 : nthreads, f);
}

void dsv4_fp4_dequant(const uint8_t* w, int64_t ldw, const uint8_t* s, int64_t lds, int64_t K, float* out,
                      int64_t n0, int64_t n1, int nthreads) {
  const bool v512 = dequant_512();
  auto f = [=](int64_t a, int64_t b) {
#ifdef DSV4_HAVE_X86
    if (v512) {
      for (int64_t n = a; n < b; ++n) fp4_dequant_row_512(w + n * ldw, s + n * lds, K, out + (n - n0) * K);
      return;
    }
#endif
    for (int64_t n = a; n < b; ++n) {
      float* o = out + (n - n0) * K;
      for (int64_t i = 0; i < K / 2; ++i) {
        const float sc = e8m0(s[n * lds + (2 * i) / 32]);
        const uint32_t c = w[n * ldw + i];
        o[2 * i] = dec_e2m1(c & 15u) * sc;
        o[2 * i + 1] = dec_e2m1(c >> 4) * sc;
      }
    }
  };
  split_rows(n0, n1, (n1 - n0) * K < MIN_PARALLEL ? 1 : nthreads, f);
}

}  // extern "C"

#include "stored_mgemm.h"   // the small-M GEMM (any M): after the job type, the ISA choice and the decoders
