// A persistent worker pool for the fused decode step (decode_step.cpp): one fork / join per stage of a block
// step (a dozen per block), where spawning std::threads per call (~20-50 us each) would cost more than a
// small model's whole stage. Workers spin briefly on a generation counter (the next stage comes within
// microseconds), then sleep on a condition variable (between decode steps, or on a machine whose cores are
// busy elsewhere), so an idle server holds no core.
// Which thread computes a row never changes its value: every parallel stage splits whole output rows or
// whole sequences, each computed by the same code as on one thread (the batch-invariance the server needs).
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
      gen_.fetch_add(1);
    }
    cv_.notify_all();
    for (auto& t : th_) t.join();
  }

  // fn(t, T) for t in [0, T), t = 0 on the calling thread; returns when all are done.
  void run(int T, const std::function<void(int, int)>& fn) {
    if (T <= 1) { fn(0, 1); return; }
    while (int(th_.size()) < T - 1) {
      const int id = int(th_.size()) + 1;
      const uint64_t seen = gen_.load();      // the job about to be posted is this worker's first
      th_.emplace_back([this, id, seen] { work(id, seen); });
    }
    fn_ = &fn;
    T_ = T;
    left_.store(T - 1);
    gen_.fetch_add(1);                          // seq_cst: pairs with a worker's sleepers_ / gen_ check
    if (sleepers_.load() > 0) {
      std::lock_guard<std::mutex> g(m_);
      cv_.notify_all();
    }
    fn(0, T);
    for (int spins = 0; left_.load(std::memory_order_acquire) != 0; ++spins) {
      if (spins < 4096) DSV4_PAUSE();
      else std::this_thread::yield();          // a worker was descheduled (a busy machine)
    }
  }

 private:
  void work(int id, uint64_t seen) {
    for (;;) {
      uint64_t g = gen_.load(std::memory_order_acquire);
      if (g == seen) {
        const auto t0 = std::chrono::steady_clock::now();
        for (int i = 0; (g = gen_.load(std::memory_order_acquire)) == seen; ++i) {
          DSV4_PAUSE();
          if ((i & 255) == 255 && std::chrono::steady_clock::now() - t0 > std::chrono::microseconds(SPIN_US)) {
            std::unique_lock<std::mutex> lk(m_);
            sleepers_.fetch_add(1);
            cv_.wait(lk, [&] { return gen_.load() != seen; });
            sleepers_.fetch_sub(1);
            g = gen_.load();
            break;
          }
        }
      }
      seen = g;
      if (quit_) return;
      if (id < T_) {
        (*fn_)(id, T_);
        left_.fetch_sub(1, std::memory_order_release);
      }
    }
  }

  static constexpr int SPIN_US = 300;          // a decode step's stages follow each other within this
  std::vector<std::thread> th_;
  std::atomic<uint64_t> gen_{0};
  std::atomic<int> left_{0}, sleepers_{0};
  const std::function<void(int, int)>* fn_ = nullptr;
  int T_ = 1;
  bool quit_ = false;
  std::mutex m_;
  std::condition_variable cv_;
};

inline Pool& pool() {
  static Pool p;
  return p;
}

// [lo, hi) of `n` items for part t of T (contiguous, sizes differing by at most one)
inline void split(int64_t n, int t, int T, int64_t& lo, int64_t& hi) {
  lo = n * t / T;
  hi = n * (t + 1) / T;
}

}  // namespace dsv4pool
