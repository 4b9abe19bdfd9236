// A persistent worker pool for the fused decode step (decode_step.cpp): one fork / join per stage of a block
// step (a dozen per block), where spawning std::threads per call (~20-50 us each) would cost more than a
// small model's whole stage.
// A stage is cut into chunks that the calling thread and the workers claim one at a time from one atomic
// counter (work stealing): a worker that is late (asleep, or descheduled on a machine whose cores are busy
// elsewhere) only means the calling thread claims more chunks itself, never that it waits for the worker to
// be scheduled. Workers spin briefly for the next stage (they follow each other within microseconds), then
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
      posted_.fetch_add(1);
    }
    cv_.notify_all();
    for (auto& t : th_) t.join();
  }

  // fn(c) for every chunk c in [0, C), on the calling thread and up to `threads - 1` workers.
  void run(int threads, int64_t C, const std::function<void(int64_t)>& fn) {
    if (threads <= 1 || C <= 1 || C > int64_t(FIELD)) {
      for (int64_t c = 0; c < C; ++c) fn(c);
      return;
    }
    while (int(th_.size()) < threads - 1) th_.emplace_back([this, seen = posted_.load()] { work(seen); });
    const uint64_t g = (gen_ + 1) & GEN;
    gen_ = g;
    fn_ = &fn;
    done_.store(0, std::memory_order_relaxed);
    // job g with C chunks, none claimed: claims may start (the word carries its own limit, so a worker
    // holding a stale word can never claim past it)
    claim_.store(g << 40 | uint64_t(C) << 20, std::memory_order_release);
    posted_.fetch_add(1);                               // seq_cst: pairs with a worker's sleepers_ check
    if (sleepers_.load() > 0) {
      std::lock_guard<std::mutex> lk(m_);
      cv_.notify_all();
    }
    chunks(g);
    for (int spins = 0; done_.load(std::memory_order_acquire) != C; ++spins) {
      if (spins < 2048) DSV4_PAUSE();
      else std::this_thread::yield();         // a worker was descheduled inside its chunk
    }
  }

 private:
  // claim and run chunks of job g until none is left (or the job is no longer g)
  void chunks(uint64_t g) {
    for (;;) {
      uint64_t v = claim_.load(std::memory_order_acquire);
      int64_t c;
      do {
        c = int64_t(v & FIELD);
        if ((v >> 40) != g || c >= int64_t((v >> 20) & FIELD)) return;
      } while (!claim_.compare_exchange_weak(v, v + 1, std::memory_order_acq_rel));
      (*fn_)(c);                                // job g is live until chunk c is done
      done_.fetch_add(1, std::memory_order_release);
    }
  }

  void work(uint64_t seen) {
    for (;;) {
      const auto t0 = std::chrono::steady_clock::now();
      for (int i = 0; posted_.load(std::memory_order_acquire) == seen; ++i) {
        DSV4_PAUSE();
        if ((i & 63) == 63 && std::chrono::steady_clock::now() - t0 > std::chrono::microseconds(SPIN_US)) {
          std::unique_lock<std::mutex> lk(m_);
          sleepers_.fetch_add(1);
          cv_.wait(lk, [&] { return posted_.load() != seen; });
          sleepers_.fetch_sub(1);
          break;
        }
      }
      seen = posted_.load();
      if (quit_) return;
      chunks(claim_.load(std::memory_order_acquire) >> 40);
    }
  }

  static constexpr int SPIN_US = 100;        // a decode step's stages (and blocks) follow within this
  static constexpr uint64_t FIELD = (1u << 20) - 1, GEN = (1u << 24) - 1;   // claim word: gen | C | next
  std::vector<std::thread> th_;
  std::atomic<uint64_t> posted_{0}, claim_{0};
  std::atomic<int64_t> done_{0};
  std::atomic<int> sleepers_{0};
  uint64_t gen_ = 0;                          // the calling thread's job number (low 32 bits)
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
