// GEMV / small-GEMM and tile dequantisation on DeepSeek-V4 checkpoint storage (issue 15), for the CPU backend.
//
// y[m, n - n0] = sum_k x[m, k] * W[n, k] for the output rows n in [n0, n1), with W in its stored format:
//   fp8  : e4m3 codes [N, K] + ue8m0 scales per 128x128 block [ceil(N/128), ceil(K/128)]
//   fp4  : e2m1 codes two per byte (low nibble = even k) [N, K/2] + ue8m0 scales per 32 along K [N, K/32]
//   bf16 : [N, K] as stored
//   int8 : codes [N, K] + one float32 scale per row
// Each weight value is decoded in registers / a 128-float stack buffer as code * scale in float32 -- the very
// float32 value the reference's dequantisation gives -- and accumulated in float32 (16 lanes, then a sum):
// only the summation order differs from the reference matmul. No whole dequantised weight ever exists.
// The decoders are bit manipulation (no table lookups), written as plain loops the compiler vectorises
// (-O3 -march=native: AVX2 / AVX-512 on x86, NEON on aarch64); subnormal codes are built with a multiply of
// a small integer, so flush-to-zero modes cannot change them. Plain C ABI, no torch headers: the Python side
// (backends/cpu_native.py) compiles this file once and calls it through ctypes (which releases the GIL).
#include <algorithm>
#include <cstdint>
#include <cstring>
#include <thread>
#include <vector>

namespace {

constexpr int LANES = 16;
constexpr int MAX_M = 16;          // rows of x per call (the Python side tiles larger M through a GEMM)
constexpr int64_t MIN_PARALLEL = 1 << 17;   // weights below which one thread does it all

inline float bits_f(uint32_t u) { float f; std::memcpy(&f, &u, 4); return f; }
inline uint32_t f_bits(float f) { uint32_t u; std::memcpy(&u, &f, 4); return u; }

inline float e8m0(uint8_t s) {
  if (s == 255) return bits_f(0x7FC00000u);            // NaN
  return s == 0 ? bits_f(0x00400000u) : bits_f(uint32_t(s) << 23);   // 2^(s-127); 2^-127 is subnormal
}

// e4m3 codes -> value * scale. Normal: exponent field + 120 rebias; subnormal (exp 0): mantissa * 2^-9;
// 0x7F / 0xFF: NaN. Branch-free (integer masks) so that the loop vectorises.
inline void dec_fp8(const uint8_t* c, float scale, float* out, int n) {
  for (int i = 0; i < n; ++i) {
    uint32_t b = c[i], mag = b & 0x7Fu;
    uint32_t nbits = (mag << 20) + (120u << 23);
    uint32_t sbits = f_bits(float(int32_t(mag & 7u)) * 0.001953125f);
    uint32_t normal = 0u - uint32_t(mag >= 8u);
    uint32_t bits = (nbits & normal) | (sbits & ~normal);
    bits |= 0x7FC00000u & (0u - uint32_t(mag == 0x7Fu));
    out[i] = bits_f(bits | ((b & 0x80u) << 24)) * scale;
  }
}

// one e2m1 nibble -> value. Normal (exp > 0): exponent field + 126 rebias; subnormal: 0 or 0.5. Branch-free.
inline float dec_e2m1(uint32_t nib) {
  uint32_t mag = nib & 7u;
  uint32_t nbits = (mag << 22) + (126u << 23);
  uint32_t sbits = (mag & 1u) * 0x3F000000u;                 // 0.5f or 0
  uint32_t normal = 0u - uint32_t(mag >= 2u);
  return bits_f(((nbits & normal) | (sbits & ~normal)) | ((nib & 8u) << 28));
}

inline float bf16_f(uint16_t h) { return bits_f(uint32_t(h) << 16); }

// acc[0..LANES) += a[0..n) * b[0..n) for n a multiple of LANES; returns the scalar tail's sum.
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

template <class F>
void parallel_rows(int64_t n0, int64_t n1, int nthreads, int64_t work, F f) {
  int64_t n = n1 - n0;
  int T = int(std::max<int64_t>(1, std::min<int64_t>(nthreads, n)));
  if (work < MIN_PARALLEL) T = 1;
  if (T == 1) { f(n0, n1); return; }
  int64_t per = (n + T - 1) / T;
  std::vector<std::thread> th;
  for (int t = 1; t < T; ++t) {
    int64_t a = n0 + t * per, b = std::min(n1, a + per);
    if (a < b) th.emplace_back(f, a, b);
  }
  f(n0, std::min(n1, n0 + per));
  for (auto& t : th) t.join();
}

// Row-decoding GEMV: decode(n, k0, len, buf) writes W[n, k0:k0+len] as float32 into buf. A whole row is
// decoded (in `block`-wide pieces, one scale each) into a K-float buffer that stays in L1 / L2, then one long
// multiply-add per x row: long loops are what the vectoriser does best.
template <class Decode>
void gemv(const float* x, int64_t M, int64_t K, int64_t ldx, float* y, int64_t ldy, int64_t n0, int64_t n1,
          int nthreads, int block, Decode decode) {
  parallel_rows(n0, n1, nthreads, (n1 - n0) * K, [=](int64_t a, int64_t b) {
    std::vector<float> row(size_t(K) + LANES);
    float* buf = row.data();
    alignas(64) float acc[LANES];
    for (int64_t n = a; n < b; ++n) {
      for (int64_t k0 = 0; k0 < K; k0 += block) decode(n, k0, int(std::min<int64_t>(block, K - k0)), buf + k0);
      for (int64_t m = 0; m < M; ++m) {
        std::memset(acc, 0, sizeof(acc));
        float t = fma_lanes(acc, x + m * ldx, buf, int(K));
        y[m * ldy + (n - n0)] = reduce(acc) + t;
      }
    }
  });
}

}  // namespace

extern "C" {

int dsv4_max_m() { return MAX_M; }

// fp8: w [N, K] codes (row stride ldw), s [ceil(N/128), ceil(K/128)] (row stride lds).
void dsv4_fp8_gemv(const float* x, int64_t M, int64_t K, int64_t ldx, const uint8_t* w, int64_t ldw,
                   const uint8_t* s, int64_t lds, float* y, int64_t ldy, int64_t n0, int64_t n1, int nthreads) {
  gemv(x, M, K, ldx, y, ldy, n0, n1, nthreads, 128, [=](int64_t n, int64_t k0, int len, float* buf) {
    dec_fp8(w + n * ldw + k0, e8m0(s[(n >> 7) * lds + (k0 >> 7)]), buf, len);
  });
}

// fp4: w [N, K/2] packed (row stride ldw bytes), s [N, K/32] (row stride lds). K a multiple of 32. The x
// operand is read de-interleaved (even / odd k) so that a byte's two nibbles meet two contiguous x runs.
void dsv4_fp4_gemv(const float* x, int64_t M, int64_t K, int64_t ldx, const uint8_t* w, int64_t ldw,
                   const uint8_t* s, int64_t lds, float* y, int64_t ldy, int64_t n0, int64_t n1, int nthreads) {
  const int64_t H = K / 2;
  std::vector<float> xd(size_t(M) * K);                // per m: [even k (H) | odd k (H)]
  for (int64_t m = 0; m < M; ++m)
    for (int64_t i = 0; i < H; ++i) {
      xd[m * K + i] = x[m * ldx + 2 * i];
      xd[m * K + H + i] = x[m * ldx + 2 * i + 1];
    }
  const float* xp = xd.data();
  parallel_rows(n0, n1, nthreads, (n1 - n0) * K, [=](int64_t a, int64_t b) {
    // one row at a time: its scales expanded per byte, then its codes decoded into two long runs (even /
    // odd k), then one long multiply-add per x row: long loops are what the vectoriser does best.
    std::vector<float> buf(size_t(2) * K);     // [scale per byte (H) | even k (H) | odd k (H)]
    float* sc = buf.data();
    float* lo = sc + H;
    float* hi = lo + H;
    alignas(64) float acc[MAX_M][LANES];
    for (int64_t n = a; n < b; ++n) {
      const uint8_t* row = w + n * ldw;
      for (int64_t j = 0; j < K / 32; ++j) {
        float v = e8m0(s[n * lds + j]);
        for (int t = 0; t < 16; ++t) sc[j * 16 + t] = v;
      }
      for (int64_t i = 0; i < H; ++i) {
        uint32_t c = row[i];
        lo[i] = dec_e2m1(c & 15u) * sc[i];
        hi[i] = dec_e2m1(c >> 4) * sc[i];
      }
      std::memset(acc, 0, sizeof(acc));
      for (int64_t m = 0; m < M; ++m) {
        const float* xe = xp + m * K;
        float t = fma_lanes(acc[m], xe, lo, int(H)) + fma_lanes(acc[m], xe + H, hi, int(H));
        y[m * ldy + (n - n0)] = reduce(acc[m]) + t;
      }
    }
  });
}

void dsv4_bf16_gemv(const float* x, int64_t M, int64_t K, int64_t ldx, const uint16_t* w, int64_t ldw,
                    float* y, int64_t ldy, int64_t n0, int64_t n1, int nthreads) {
  gemv(x, M, K, ldx, y, ldy, n0, n1, nthreads, 128, [=](int64_t n, int64_t k0, int len, float* buf) {
    const uint16_t* c = w + n * ldw + k0;
    for (int i = 0; i < len; ++i) buf[i] = bf16_f(c[i]);
  });
}

void dsv4_int8_gemv(const float* x, int64_t M, int64_t K, int64_t ldx, const int8_t* w, int64_t ldw,
                    const float* scale, float* y, int64_t ldy, int64_t n0, int64_t n1, int nthreads) {
  gemv(x, M, K, ldx, y, ldy, n0, n1, nthreads, 128, [=](int64_t n, int64_t k0, int len, float* buf) {
    const int8_t* c = w + n * ldw + k0;
    float sc = scale[n];
    for (int i = 0; i < len; ++i) buf[i] = float(c[i]) * sc;
  });
}

// Tile dequantisation for the large-M path: out [(n1 - n0), K] float32 = the reference's dequantised rows.
void dsv4_fp8_dequant(const uint8_t* w, int64_t ldw, const uint8_t* s, int64_t lds, int64_t K, float* out,
                      int64_t n0, int64_t n1, int nthreads) {
  parallel_rows(n0, n1, nthreads, (n1 - n0) * K, [=](int64_t a, int64_t b) {
    for (int64_t n = a; n < b; ++n)
      for (int64_t k0 = 0; k0 < K; k0 += 128)
        dec_fp8(w + n * ldw + k0, e8m0(s[(n >> 7) * lds + (k0 >> 7)]), out + (n - n0) * K + k0,
                int(std::min<int64_t>(128, K - k0)));
  });
}

void dsv4_fp4_dequant(const uint8_t* w, int64_t ldw, const uint8_t* s, int64_t lds, int64_t K, float* out,
                      int64_t n0, int64_t n1, int nthreads) {
  parallel_rows(n0, n1, nthreads, (n1 - n0) * K, [=](int64_t a, int64_t b) {
    for (int64_t n = a; n < b; ++n) {
      float* o = out + (n - n0) * K;
      for (int64_t i = 0; i < K / 2; ++i) {
        float sc = e8m0(s[n * lds + (2 * i) / 32]);
        uint32_t c = w[n * ldw + i];
        o[2 * i] = dec_e2m1(c & 15u) * sc;
        o[2 * i + 1] = dec_e2m1(c >> 4) * sc;
      }
    }
  });
}

}  // extern "C"
