// The fused decode step's view of the sequences (decode_step.cpp `dsv4d_run`, backends/cpu_decode_seqs.py).
// Every Rows / Pending of a sequence's layer keeps its counters, buffer addresses and capacity in one int64
// array (runtime/model/state.py `_c`); a sequence hands the step one SeqCtr per layer (the addresses of those
// arrays). The records (SeqP) are built here and the counters advanced here by the rule of
// Compressor.advance (runtime/model/v4.py), so a step costs the Python side no per-layer work.
#pragma once

#include <algorithm>
#include <cstdint>
#include <cstring>

#include "decode_attn.h"

namespace {

struct RowsC { int64_t n, ptr, cap; };                        // Rows: rows in use, buffer, capacity rows
struct PendC { int64_t n, start, retain, kv, score, cap; };   // Pending (retain -1: none)
struct SeqCtr { RowsC* kv; PendC* comp; RowsC* ik; PendC* ib; };

// 0: the step can run; 1: a buffer needs room first (the caller reserves, nothing changed); 2: the pending
// rows are retained (a speculative verify step: the per-op path runs)
inline int seq_status(const AttnP& P, const SeqCtr& c, int64_t p0) {
  if (!P.ratio) return 0;
  if (c.comp->retain >= 0) return 2;
  if (c.kv->n >= c.kv->cap || p0 + 1 - c.comp->start > c.comp->cap) return 1;
  if (P.csa && (c.ik->n >= c.ik->cap || p0 + 1 - c.ib->start > c.ib->cap)) return 1;
  return 0;
}

// the pending rows after token p0 (Compressor.advance's rule); true when it closed a window (one entry more)
inline bool advance(PendC& b, int64_t p0, int64_t m, bool overlap) {
  const int64_t end = p0 + 1;
  if (end % m) { b.n += 1; return false; }
  const int64_t stop = end / m, keep = stop * m - (overlap && stop > 0 ? m : 0);
  b.n = end - keep, b.start = keep;
  return true;
}

// One sequence's record of a layer for its token at p0, then its counters moved past that token (the
// kernels read only the record, so the counters may move first).
inline void seq_record(const AttnP& P, const SeqCtr& c, int64_t p0, SeqP& S) {
  S = SeqP{};
  S.pos = p0;
  S.kv = reinterpret_cast<float*>(c.kv->ptr);
  S.n_entries = c.kv->n - P.W;
  if (!P.ratio) return;
  S.pk = reinterpret_cast<float*>(c.comp->kv), S.ps = reinterpret_cast<float*>(c.comp->score);
  S.pstart = c.comp->start;
  if (P.csa) {
    S.ikeys = reinterpret_cast<float*>(c.ik->ptr), S.n_index = c.ik->n;
    S.ipk = reinterpret_cast<float*>(c.ib->kv), S.ips = reinterpret_cast<float*>(c.ib->score);
    S.ipstart = c.ib->start;
    if (advance(*c.ib, p0, P.icomp.m, P.icomp.overlap)) c.ik->n += 1;
  }
  if (advance(*c.comp, p0, P.ratio, P.comp.overlap)) c.kv->n += 1;
}

// layer l's records of the B sequences into out[B], their counters advanced
inline void layer_records(const AttnP& P, int64_t l, int64_t B, const int64_t* seqs, SeqP* out) {
  for (int64_t b = 0; b < B; ++b) seq_record(P, reinterpret_cast<const SeqCtr*>(seqs[B + b])[l], seqs[b], out[b]);
}

// the step's status over every layer and sequence (the largest: a verify step wins over a missing room)
inline int step_status(int64_t L, const AttnP* const* A, int64_t B, const int64_t* seqs) {
  int st = 0;
  for (int64_t l = 0; l < L; ++l)
    for (int64_t b = 0; b < B; ++b)
      st = std::max(st, seq_status(*A[l], reinterpret_cast<const SeqCtr*>(seqs[B + b])[l], seqs[b]));
  return st;
}

struct EmbedP { const void* w; int64_t kind, V, hc, d; };   // the token embedding [V, d] (kind 0 f32, 1 bf16)

// X [B, hc, d]: each token's embedding row (widened to float32: exact for bf16) in every stream; false when an
// id is outside the table (nothing written; the caller's lookup then reports it)
inline bool embed_rows(const EmbedP& E, int64_t B, const int64_t* ids, float* X) {
  for (int64_t b = 0; b < B; ++b) if (ids[b] < 0 || ids[b] >= E.V) return false;
  for (int64_t b = 0; b < B; ++b) {
    float* x = X + b * E.hc * E.d;
    if (E.kind == 0) {
      std::memcpy(x, static_cast<const float*>(E.w) + ids[b] * E.d, sizeof(float) * E.d);
    } else {
      const uint16_t* r = static_cast<const uint16_t*>(E.w) + ids[b] * E.d;
      for (int64_t k = 0; k < E.d; ++k) {
        const uint32_t u = uint32_t(r[k]) << 16;
        std::memcpy(x + k, &u, sizeof(float));
      }
    }
    for (int64_t h = 1; h < E.hc; ++h) std::memcpy(x + h * E.d, x, sizeof(float) * E.d);
  }
  return true;
}

}  // namespace
