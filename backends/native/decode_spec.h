// The fused decode step's speculative-decoding entry points (included at the end of decode_step.cpp; issue 18):
//   dsv4d_step_rows  dsv4d_step over chunks of S tokens per sequence (a verify step [decided, draft, ...])
//   dsv4d_mtp_step   the MTP block's input projections, its block and its head (the draft)
//   dsv4d_spec_step  one greedy iteration: the draft (MTP argmax), then the verify of [decided, draft]
//   dsv4d_run_greedy plain greedy decoding's one-token step: dsv4d_run's argmaxes and a non-finite check
// They reuse decode_step.cpp's stages unchanged; a chunk's rows of one sequence run in position order
// (attn_batch's S), so every row is exactly the one-token step at its position. See backends/cpu_decode_rows.py.
#pragma once

extern "C" {

// A chunk's status from the sequences' state arrays (`seqs` as dsv4d_run's: n positions, then n SeqCtr
// addresses, layer l's at + l): step_status's for S rows each (1: room for S more rows first, by the bounds
// backends/cpu_decode_rows.py `_room` reserves; 2: pending rows held for the per-op path's rollback).
static int chunk_status(int64_t L, const LayerP* layers, int64_t n, int64_t S, const int64_t* seqs) {
  int st = 0;
  for (int64_t l = 0; l < L; ++l) {
    const AttnP& P = *layers[l].A;
    if (!P.ratio) continue;
    for (int64_t b = 0; b < n; ++b) {
      const SeqCtr& c = reinterpret_cast<const SeqCtr*>(seqs[n + b])[l];
      const int64_t p0 = seqs[b];
      if (c.comp->retain >= 0) return 2;
      if (c.kv->n + S > c.kv->cap || p0 + S - c.comp->start > c.comp->cap) st = 1;
      if (P.csa && (c.ik->n + S > c.ik->cap || p0 + S - c.ib->start > c.ib->cap)) st = 1;
    }
  }
  return st;
}

// the chunk's records into out [L][n * S] (row b * S + i at sequence b's position + i: its counters after the
// rows before it), the counters advanced past every row (seq_record, row after row)
static void chunk_records(int64_t L, const LayerP* layers, int64_t n, int64_t S, const int64_t* seqs, SeqP* out) {
  for (int64_t l = 0; l < L; ++l)
    for (int64_t b = 0; b < n; ++b) {
      const SeqCtr& c = reinterpret_cast<const SeqCtr*>(seqs[n + b])[l];
      for (int64_t i = 0; i < S; ++i) seq_record(*layers[l].A, c, seqs[b] + i, out[l * n * S + b * S + i]);
    }
}

// dsv4d_step over chunks of S tokens per sequence (a speculative verify step) -> status (chunk_status; 0: ran):
// n sequences, X [n * S, hc, d], row b * S + i at sequence b's position + i. A sequence's rows run in position
// order (attn_batch), every row exactly as a one-token step at its position: a chunk's row i has the bits of
// that step, the kernels being batch-invariant.
int dsv4d_step_rows(int64_t L, const LayerP* layers, int64_t n, int64_t S, const float* X, const int64_t* ids,
                    const int64_t* seqs, float* Xo, const HeadP* head, float* logits, int nt) {
  const int st = chunk_status(L, layers, n, S, seqs);
  if (st) return st;
  thread_local std::vector<SeqP> recs;
  recs.resize(L * n * S);
  chunk_records(L, layers, n, S, seqs, recs.data());
  step_rows(L, layers, n * S, S, X, ids, recs.data(), Xo, head, logits, nt);
  return 0;
}

struct MtpP {            // an MTP block's input: the shared embedding table, enorm / hnorm, e_proj / h_proj [d, d]
  const void* embed;     // [vocab, d]: float32 (embed_kind 0) or bf16 (1)
  int64_t embed_kind;
  const float *enorm, *hnorm;
  Lin e_proj, h_proj;
  int64_t hc, d;
  float eps;
};

// embedding row `id` as float32 (bf16 widened exactly: its bits are a float32's upper half)
static void embed_row(const MtpP& M, int64_t id, float* out) {
  if (M.embed_kind == 1) {
    const uint16_t* r = (const uint16_t*)M.embed + id * M.d;
    for (int64_t k = 0; k < M.d; ++k) {
      const uint32_t u = uint32_t(r[k]) << 16;
      std::memcpy(out + k, &u, sizeof(float));
    }
  } else {
    std::memcpy(out, (const float*)M.embed + id * M.d, sizeof(float) * M.d);
  }
}

// torch.argmax's choice: the first maximum (the first NaN, if any)
static int64_t argmax(const float* v, int64_t n) {
  int64_t best = 0;
  for (int64_t i = 0; i < n; ++i) {
    if (std::isnan(v[i])) return i;
    if (v[i] > v[best]) best = i;
  }
  return best;
}

// A window-only block's rows that only feed the state: hc_pre + attn_norm, the kv projection, its norm and
// RoPE, the ring write -- the same kernels as attn_batch's, so the same bits as the full rows' ring rows.
static void ring_rows(const LayerP& P, int64_t n, const float* X, const SeqP* seqs, int nt) {
  const AttnP& A = *P.A;
  const int64_t hc = P.ha->hc, d = P.ha->d, D = A.D;
  thread_local std::vector<float> tls[4];
  std::vector<float> &x = tls[0], &post = tls[1], &comb = tls[2], &kv = tls[3];
  x.resize(n * d), post.resize(n * hc), comb.resize(n * hc * hc), kv.resize(n * D);
  auto none = [](int64_t, int64_t) {};
  hc_pre_batch(*P.ha, n, X, x.data(), post.data(), comb.data(), nt, none, none);
  const Job j = job(A.wkv, x.data(), d, n, kv.data(), D);
  run_jobs(&j, 1, nt);
  float* K = kv.data();
  for_seqs(n, nt, [&](int64_t r) {
    float* row = K + r * D;
    rms(row, D, A.kv_norm, A.eps);
    rope(row, D, A.freqs, A.rope_half, seqs[r].pos, false);
    std::memcpy(seqs[r].kv + (seqs[r].pos % A.W) * D, row, sizeof(float) * D);
  });
}

// An MTP block's step over S rows per sequence (as dsv4d_step_rows): its input streams x[b, j] =
// e_proj(enorm(embed[ids[b]])) + h_proj(hnorm(X[b, j])) from the main model's final streams X [B, hc, d], then
// its block (`layer`, one) and its head. `last`: only each sequence's last row's outputs (Xo [B / S, hc, d],
// logits [B / S, V]); a window-only block's earlier rows then only write their ring rows (ring_rows).
static void mtp_rows(const MtpP& M, const LayerP& layer, const HeadP& head, int64_t B, int64_t S, const float* X,
                     const int64_t* ids, SeqP* seqs, float* Xo, float* logits, int nt, bool last) {
  const int64_t hc = M.hc, d = M.d, nd = hc * d, n = B / S;
  thread_local std::vector<float> tls[7];
  std::vector<float> &e = tls[0], &h = tls[1], &pe = tls[2], &ph = tls[3], &x = tls[4], &xs = tls[5], &xl = tls[6];
  e.resize(B * d), h.assign(X, X + B * nd), pe.resize(B * d), ph.resize(B * nd), x.resize(B * nd);
  float *Ep = e.data(), *Hp = h.data();
  for_seqs(B, nt, [&](int64_t b) {
    embed_row(M, ids[b], Ep + b * d);
    rms(Ep + b * d, d, M.enorm, M.eps);
    for (int64_t j = 0; j < hc; ++j) rms(Hp + (b * hc + j) * d, d, M.hnorm, M.eps);
  });
  const Job jobs[2] = {job(M.e_proj, Ep, d, B, pe.data(), d), job(M.h_proj, Hp, d, B * hc, ph.data(), d)};
  run_jobs(jobs, 2, nt);
  for (int64_t r = 0; r < B * hc; ++r)
    for (int64_t k = 0; k < d; ++k) x[r * d + k] = pe[(r / hc) * d + k] + ph[r * d + k];
  if (!last || S == 1) {
    step_rows(1, &layer, B, S, x.data(), ids, seqs, Xo, &head, logits, nt);
    return;
  }
  if (layer.A->ratio) {             // a compressing block: every row in full, the last ones' outputs kept
    thread_local std::vector<float> fo, fl;
    fo.resize(B * nd), fl.resize(B * head.w.N);
    step_rows(1, &layer, B, S, x.data(), ids, seqs, fo.data(), &head, fl.data(), nt);
    for (int64_t g = 0; g < n; ++g) {
      std::memcpy(Xo + g * nd, fo.data() + ((g + 1) * S - 1) * nd, sizeof(float) * nd);
      std::memcpy(logits + g * head.w.N, fl.data() + ((g + 1) * S - 1) * head.w.N, sizeof(float) * head.w.N);
    }
    return;
  }
  thread_local std::vector<SeqP> ss, sl;
  thread_local std::vector<int64_t> il;
  xs.resize(n * (S - 1) * nd), xl.resize(n * nd), ss.resize(n * (S - 1)), sl.resize(n), il.resize(n);
  for (int64_t g = 0; g < n; ++g) {
    for (int64_t i = 0; i < S - 1; ++i) {
      std::memcpy(xs.data() + (g * (S - 1) + i) * nd, x.data() + (g * S + i) * nd, sizeof(float) * nd);
      ss[g * (S - 1) + i] = seqs[g * S + i];
    }
    std::memcpy(xl.data() + g * nd, x.data() + ((g + 1) * S - 1) * nd, sizeof(float) * nd);
    sl[g] = seqs[(g + 1) * S - 1];
    il[g] = ids[(g + 1) * S - 1];
  }
  ring_rows(layer, n * (S - 1), xs.data(), ss.data(), nt);         // earlier positions first: the last reads them
  step_rows(1, &layer, n, 1, xl.data(), il.data(), sl.data(), Xo, &head, logits, nt);
}

// -> status (chunk_status; 0: ran); n sequences of S positions, `seqs` (dsv4d_run's) from the MTP layer's
int dsv4d_mtp_step(const MtpP* M, const LayerP* layer, const HeadP* head, int64_t n, int64_t S, const float* X,
                   const int64_t* ids, const int64_t* seqs, float* Xo, float* logits, int last, int nt) {
  const int st = chunk_status(1, layer, n, S, seqs);
  if (st) return st;
  thread_local std::vector<SeqP> recs;
  recs.resize(n * S);
  chunk_records(1, layer, n, S, seqs, recs.data());
  mtp_rows(*M, *layer, *head, n * S, S, X, ids, recs.data(), Xo, logits, nt, last != 0);
  return 0;
}

// One greedy speculative iteration for n sequences in one call: the MTP block catches up k positions per
// sequence (H [n * k, hc, d] streams, nids [n * k] the tokens after them, mseqs its records) and drafts the
// argmax d of its last row; then the main model verifies [tok, d] (dsv4d_step_rows, S = 2; seqs [L][2n]) ->
// Xo [2n, hc, d], logits [2n, V] and res [n, 3] = (draft, argmax of row 0, argmax of row 1).
// -> status (chunk_status of either part; 0: ran). `mseqs` / `seqs`: dsv4d_run's tables of the MTP layer and
// of the main layers.
int dsv4d_spec_step(const MtpP* M, const LayerP* mlayer, const HeadP* mhead, int64_t n, int64_t k,
                    const float* H, const int64_t* nids, const int64_t* mseqs, int64_t L, const LayerP* layers,
                    const HeadP* head, const int64_t* tok, const int64_t* seqs, float* Xo, float* logits,
                    int64_t* res, int nt) {
  const int st = std::max(chunk_status(1, mlayer, n, k, mseqs), chunk_status(L, layers, n, 2, seqs));
  if (st) return st;
  const int64_t hc = M->hc, d = M->d, nd = hc * d, V = head->w.N;
  thread_local std::vector<float> mx, ml, xin;
  thread_local std::vector<int64_t> ids;
  thread_local std::vector<SeqP> mrecs, recs;
  mx.resize(n * nd), ml.resize(n * mhead->w.N), xin.resize(2 * n * nd), ids.resize(2 * n);
  mrecs.resize(n * k), recs.resize(L * n * 2);
  chunk_records(1, mlayer, n, k, mseqs, mrecs.data());
  chunk_records(L, layers, n, 2, seqs, recs.data());
  mtp_rows(*M, *mlayer, *mhead, n * k, k, H, nids, mrecs.data(), mx.data(), ml.data(), nt, true);
  for (int64_t b = 0; b < n; ++b) {
    ids[2 * b] = tok[b];
    ids[2 * b + 1] = res[3 * b] = argmax(ml.data() + b * mhead->w.N, mhead->w.N);
  }
  for (int64_t r = 0; r < 2 * n; ++r) {
    embed_row(*M, ids[r], xin.data() + r * nd);
    for (int64_t j = 1; j < hc; ++j) std::memcpy(xin.data() + r * nd + j * d, xin.data() + r * nd, sizeof(float) * d);
  }
  step_rows(L, layers, 2 * n, 2, xin.data(), ids.data(), recs.data(), Xo, head, logits, nt);
  for (int64_t b = 0; b < n; ++b) {
    res[3 * b + 1] = argmax(logits + 2 * b * V, V);
    res[3 * b + 2] = argmax(logits + (2 * b + 1) * V, V);
  }
  return 0;
}

// Plain greedy decoding's one-token step (backends/cpu_decode_greedy.py): dsv4d_run with the head, the step
// embedding its ids, the final streams not kept; res[0, B) its argmaxes (argmax_row), res[B] the first row whose
// logits hold a NaN / Inf (-1: none), found while they are in cache (a torch or numpy check after the call,
// its code then cold, costs several times this pass) -> dsv4d_run's status.
int dsv4d_run_greedy(int64_t L, const LayerP* layers, int64_t B, const int64_t* ids, const int64_t* seqs,
                     const HeadP* head, float* logits, int nt, const EmbedP* embed, int64_t* res) {
  const int st = dsv4d_run(L, layers, B, nullptr, ids, seqs, nullptr, head, logits, nt, embed, res);
  if (st) return st;
  const int64_t V = head->w.N;
  res[B] = -1;
  for (int64_t b = 0; b < B && res[B] < 0; ++b)
    for (int64_t k = 0; k < V; ++k)
      if (!std::isfinite(logits[b * V + k])) {
        res[B] = b;
        break;
      }
  return 0;
}

}  // extern "C"
