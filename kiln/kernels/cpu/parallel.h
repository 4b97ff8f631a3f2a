// Work shared out at run time, not only in equal fixed shares. kiln's CPU server shares its
// cores with the HTTP event loop (and, on a benchmark host, the load generator): with fixed
// shares, a thread preempted in the middle of a kernel holds up the whole call until it runs
// again, and the other cores wait at the call's end. Here each thread still takes its own
// contiguous share in order (weight and cache streams stay sequential, as with fixed shares),
// but a thread that finishes its share goes on with the unclaimed front of another's.
#pragma once

#include <ATen/Parallel.h>

#include <algorithm>
#include <atomic>
#include <cstdint>
#include <memory>

namespace kiln {

// Tasks 0 .. n-1 in `shares` contiguous shares, one per thread.
class Claims {
 public:
  Claims(int64_t n, int64_t shares) : shares_(shares), range_(new Range[shares]) {
    for (int64_t s = 0; s < shares; ++s) {
      range_[s].next.store(n * s / shares, std::memory_order_relaxed);
      range_[s].end = n * (s + 1) / shares;
    }
  }
  // The next task for the thread of share `own`: the front of its own share, else of the
  // next share with tasks left; -1 when every task is claimed.
  int64_t next(int64_t own) {
    for (int64_t i = 0; i < shares_; ++i) {
      Range& r = range_[(own + i) % shares_];
      if (r.next.load(std::memory_order_relaxed) >= r.end) continue;
      const int64_t task = r.next.fetch_add(1, std::memory_order_relaxed);
      if (task < r.end) return task;
    }
    return -1;
  }

 private:
  struct alignas(64) Range {
    std::atomic<int64_t> next{0};
    int64_t end = 0;
  };
  const int64_t shares_;
  std::unique_ptr<Range[]> range_;
};

// Runs body(claim) once on each of up to at::get_num_threads() threads (inline when one thread
// or already inside a parallel region); body loops on claim() until it returns -1, keeping
// whatever per-thread state it sets up (tile configuration, scratch) across its tasks.
template <typename Body>
void parallel_claims(int64_t n, Body&& body) {
  const int64_t threads = std::max<int64_t>(1, std::min<int64_t>(at::get_num_threads(), n));
  if (threads == 1 || at::in_parallel_region()) {
    int64_t task = 0;
    body([&] { return task < n ? task++ : int64_t{-1}; });
    return;
  }
  Claims claims(n, threads);
  at::parallel_for(0, threads, 1, [&](int64_t share, int64_t) { body([&] { return claims.next(share); }); });
}

// at::parallel_for's contract, fn(b, e) over [begin, end) in pieces of `grain`, with the
// pieces claimed as above.
template <typename Fn>
void parallel_for_claims(int64_t begin, int64_t end, int64_t grain, Fn&& fn) {
  grain = std::max<int64_t>(1, grain);
  const int64_t pieces = (end - begin + grain - 1) / grain;
  parallel_claims(pieces, [&](auto claim) {
    for (int64_t p; (p = claim()) >= 0;) fn(begin + p * grain, std::min(end, begin + (p + 1) * grain));
  });
}

}  // namespace kiln
