// A persistent worker pool for the fused decode step (decode_step.cpp): one fork / join per stage of a block
// step (a dozen per block), where spawning std::threads per call (~20-50 us each) would cost more than a
// small model's whole stage.
// A stage is cut into chunks, dealt in T contiguous parts, one per thread: each thread claims its own part's
// chunks one at a time from that part's counter (a cache line no other core touches meanwhile: measured, one
// shared counter cost ~0.1 us a chunk in line transfers), then steals the rest of the other parts. A worker
// that is late (asleep, or descheduled on a machine whose cores are busy elsewhere) only means the others
// claim its part themselves, never that they wait for it to be scheduled. Workers spin briefly for the next stage (they follow each other within microseconds), then
// sleep on a condition variable, so an idle server holds no core.
// Which thread computes a chunk never changes its values: chunks are whole output rows or whole sequences,
// computed by the same code on any thread (the batch invariance the server needs).
#pragma once

#include <atomic>
#include <chrono>
#include <condition_variable>
#include <cstdint>
#include <functional>
#include <mutex>
#include <thread>
#include <vector>

#if defined(__x86_64__) || defined(_M_X64)
#include <immintrin.h>
#define DSV4_PAUSE() _mm_pause()
#else
#define DSV4_PAUSE() std::this_thread::yield()
#endif

namespace dsv4pool {

class Pool {
 public:
  ~Pool() {
    {
      std::lock_guard<std::mutex> g(m_);
      quit_ = true;
      posted_.store(posted_.load() + (uint64_t(1) << 8));   // a new value: the workers wake and see quit_
    }
    cv_.notify_all();
    for (auto& t : th_) t.join();
  }

  // fn(c) for every chunk c in [0, C), on the calling thread and up to `threads - 1` workers.
  void run(int threads, int64_t C, const std::function<void(int64_t)>& fn) {
    if (threads > MAX_THREADS) threads = MAX_THREADS;
    if (threads <= 1 || C <= 1 || C > int64_t(FIELD)) {
      for (int64_t c = 0; c < C; ++c) fn(c);
      return;
    }
    while (int(th_.size()) < threads - 1) {
      const int me = int(th_.size()) + 1;
      th_.emplace_back([this, me, seen = posted_.load()] { work(me, seen); });
    }
    const uint64_t g = (gen_ + 1) & GEN;
    gen_ = g;
    fn_ = &fn;
    // job g: part p holds chunks [C p / T, C (p + 1) / T), none claimed (each word carries its own limit and
    // job number, so a worker holding a stale word can never claim past it or into another job)
    for (int p = 0; p < threads; ++p)
      slot_[p].claim.store(g << 40 | uint64_t(C * (p + 1) / threads) << 20 | uint64_t(C * p / threads),
                           std::memory_order_release);
    posted_.store(g << 8 | uint64_t(threads));          // seq_cst: pairs with a worker's sleepers_ check
    if (sleepers_.load() > 0) {
      std::lock_guard<std::mutex> lk(m_);
      cv_.notify_all();
    }
    int64_t done = chunks(g, 0, threads);
    for (int spins = 0;; ++spins) {
      int64_t n = done;
      for (int p = 1; p < threads; ++p) {
        const uint64_t v = slot_[p].done.load(std::memory_order_acquire);
        if ((v >> 40) == g) n += int64_t(v & ((uint64_t(1) << 40) - 1));
      }
      if (n == C) break;
      if (spins < 2048) DSV4_PAUSE();
      else std::this_thread::yield();         // a worker was descheduled inside its chunk
    }
  }

 private:
  // thread `me` claims and runs chunks of job g, its own part first, then the other parts' rest, until none is
  // left (or the job is no longer g); returns how many it ran
  int64_t chunks(uint64_t g, int me, int T) {
    int64_t n = 0;
    for (int k = 0; k < T; ++k) {
      std::atomic<uint64_t>& word = slot_[(me + k) % T].claim;
      for (;;) {
        uint64_t v = word.load(std::memory_order_acquire);
        int64_t c;
        do {
          c = int64_t(v & FIELD);
          if ((v >> 40) != g || c >= int64_t((v >> 20) & FIELD)) break;
        } while (!word.compare_exchange_weak(v, v + 1, std::memory_order_acq_rel));
        if ((v >> 40) != g) return n;             // the job is over: its chunks are all done
        if (c >= int64_t((v >> 20) & FIELD)) break;
        (*fn_)(c);                                // job g is live until chunk c is counted done
        ++n;
        if (me) slot_[me].done.store(g << 40 | uint64_t(n), std::memory_order_release);
      }
    }
    return n;
  }

  void work(int me, uint64_t seen) {
    for (;;) {
      const auto t0 = std::chrono::steady_clock::now();
      for (int i = 0; posted_.load(std::memory_order_acquire) == seen; ++i) {
        if ((i & 63) != 63) {
          DSV4_PAUSE();
          continue;
        }
        const auto idle = std::chrono::steady_clock::now() - t0;
        if (idle > std::chrono::microseconds(SPIN_US)) std::this_thread::yield();   // the core to whoever wants it
        if (idle > std::chrono::microseconds(YIELD_US)) {
          std::unique_lock<std::mutex> lk(m_);
          sleepers_.fetch_add(1);
          cv_.wait(lk, [&] { return posted_.load() != seen; });
          sleepers_.fetch_sub(1);
          break;
        }
      }
      seen = posted_.load();
      if (quit_) return;
      const int T = int(seen & 255);             // the job number and its thread count, in the posted word
      if (me < T) chunks((seen >> 8) & GEN, me, T);
    }
  }

  // A decode step's stages follow within SPIN_US: the workers spin. Its steps follow within YIELD_US (the
  // caller's side between two steps): they keep polling but yield the core at each poll, and only then
  // sleep. Measured: waking a sleeping worker cost the calling thread ~35 us (a futex wake of an idle vCPU),
  // paid at every step of a batch whose Python side outlasted the spin.
  static constexpr int SPIN_US = 100;
  static constexpr int YIELD_US = 2000;
  static constexpr int MAX_THREADS = 64;
  static constexpr uint64_t FIELD = (1u << 20) - 1, GEN = (1u << 24) - 1;   // claim word: gen | limit | next
  // one thread's part of a job: its claim word (the owner claims here without sharing the line until others
  // steal at the end) and its count of chunks done (job | count, read by the calling thread)
  struct alignas(64) Slot {
    std::atomic<uint64_t> claim{0};
    alignas(64) std::atomic<uint64_t> done{0};
  };
  Slot slot_[MAX_THREADS];
  std::vector<std::thread> th_;
  std::atomic<uint64_t> posted_{0};           // the latest job: number << 8 | threads
  std::atomic<int> sleepers_{0};
  uint64_t gen_ = 0;                          // the calling thread's job number
  const std::function<void(int64_t)>* fn_ = nullptr;
  bool quit_ = false;
  std::mutex m_;
  std::condition_variable cv_;
};

inline Pool& pool() {
  static Pool p;
  return p;
}

// [lo, hi) of `n` items for part t of T (contiguous, sizes differing by at most one)
inline void split(int64_t n, int64_t t, int64_t T, int64_t& lo, int64_t& hi) {
  lo = n * t / T;
  hi = n * (t + 1) / T;
}

}  // namespace dsv4pool
