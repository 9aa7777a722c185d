// Running a kernel's tasks on XLA's CPU thread pool, shared by the CPU kernels.
#pragma once

#include <immintrin.h>

#include <algorithm>
#include <atomic>
#include <cstdint>
#include <memory>

#include "xla/ffi/api/ffi.h"

namespace rosa2 {

// Calls work() on this thread and on helpers of XLA's thread pool (at most `useful` calls in all, one per pool
// thread) and returns when every call that started has returned. Each call takes tasks from a counter shared with
// the others until none is left, so a helper that starts after the tasks are gone does nothing; `work` is copied
// into each helper and must keep what it touches alive (capture a shared_ptr). Not waiting for helpers that have
// not started keeps a busy pool from stalling the caller.
template <typename Work>
void RunOnPool(xla::ffi::ThreadPool& pool, int64_t useful, const Work& work) {
  auto active = std::make_shared<std::atomic<int>>(0);
  const int64_t helpers = std::min<int64_t>(pool.num_threads(), useful) - 1;
  for (int64_t h = 0; h < helpers; ++h) {
    pool.Schedule([active, work] {
      active->fetch_add(1);
      work();
      active->fetch_sub(1);
    });
  }
  work();
  while (active->load() > 0) _mm_pause();
}

}  // namespace rosa2
