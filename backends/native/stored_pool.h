// A persistent worker pool for stored_gemm.cpp's parallel regions: `parallel(T, f)` runs f(0) on the caller and
// f(1) .. f(T - 1) on pool threads, and returns when all have finished.
//
// Why: a decode step makes ~60 native GEMV calls per block, each split over the threads; starting and joining
// fresh std::threads per call costs tens of microseconds each time, the pool a wake-up. Workers wait on a
// condition variable after a short spin that yields the core (they sleep between tokens, they do not burn a
// core: the host is shared with torch's own threads). One region at a time: a call made while the pool is busy (another Python
// thread, with the GIL released by ctypes) runs on freshly started threads instead, exactly as before the pool.
// A forked child (the pool's threads do not exist there) gets a new pool. Pool threads are never joined: they
// are detached, and end with the process.
#pragma once

#include <unistd.h>

#include <atomic>
#include <condition_variable>
#include <functional>
#include <mutex>
#include <thread>
#include <vector>

namespace dsv4 {

class Pool {
 public:
  // f(1 .. T - 1) on the pool, f(0) here; false (nothing run) when the pool is busy with another region
  bool run(int T, const std::function<void(int)>& f) {
    std::unique_lock<std::mutex> busy(call_, std::try_to_lock);
    if (!busy.owns_lock()) return false;
    {
      std::lock_guard<std::mutex> lk(m_);
      while (int(started_) < T - 1) {
        const int id = started_ + 1;
        std::thread(&Pool::loop, this, id).detach();
        ++started_;
      }
      task_ = &f;
      want_ = T;
      pending_.store(T - 1);
      gen_.fetch_add(1);
    }
    cv_.notify_all();
    f(0);
    for (int i = 0; i < 200 && pending_.load(std::memory_order_acquire) != 0; ++i) relax(i);
    if (pending_.load(std::memory_order_acquire) != 0) {
      std::unique_lock<std::mutex> lk(m_);
      done_.wait(lk, [&] { return pending_.load() == 0; });
    }
    return true;
  }

 private:
  // a short spin, then yields: on an oversubscribed host (other processes, torch's own threads) the thread
  // waited for may need this core
  static void relax(int i) {
    if (i >= 32) { std::this_thread::yield(); return; }
#if defined(__x86_64__)
    __builtin_ia32_pause();
#elif defined(__aarch64__)
    asm volatile("yield");
#endif
  }

  void loop(int id) {
    uint64_t seen = 0;
    for (;;) {
      for (int i = 0; i < 200 && gen_.load(std::memory_order_acquire) == seen; ++i) relax(i);
      const std::function<void(int)>* f;
      {
        std::unique_lock<std::mutex> lk(m_);
        cv_.wait(lk, [&] { return gen_.load() != seen; });
        seen = gen_.load();
        if (id >= want_) continue;                   // not needed in this region
        f = task_;
      }
      (*f)(id);
      if (pending_.fetch_sub(1, std::memory_order_acq_rel) == 1) {
        std::lock_guard<std::mutex> lk(m_);            // the caller may be between its check and its wait
        done_.notify_one();
      }
    }
  }

  std::mutex call_, m_;
  std::condition_variable cv_, done_;
  const std::function<void(int)>* task_ = nullptr;
  std::atomic<uint64_t> gen_{0};
  std::atomic<int> pending_{0};
  int want_ = 0, started_ = 0;
};

inline void parallel(int T, const std::function<void(int)>& f) {
  static std::mutex mu;
  static Pool* pool = nullptr;                        // never deleted: its threads are detached
  static pid_t owner = 0;
  if (T <= 1) { f(0); return; }
  Pool* p;
  {
    std::lock_guard<std::mutex> lk(mu);
    if (pool == nullptr || owner != getpid()) { pool = new Pool(); owner = getpid(); }
    p = pool;
  }
  if (p->run(T, f)) return;
  std::vector<std::thread> th;                        // the pool is busy: threads of this call's own
  for (int t = 1; t < T; ++t) th.emplace_back(f, t);
  f(0);
  for (auto& t : th) t.join();
}

}  // namespace dsv4
