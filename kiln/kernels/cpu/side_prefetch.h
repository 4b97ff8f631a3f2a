// Memory that the next kernel will read, brought towards the caches by the kernels before it.
//
// A decode step alternates compute-bound linears (at 8-64 rows they need a few GB/s of their
// weights, and leave the rest of the memory bandwidth idle) with memory-bound decode attention
// (each layer's KV blocks, scattered and cold: at 64 sequences it waits on memory for about
// half its time). The decode loop (decode_step.cpp) queues the next layer's KV blocks here
// after each attention; the AVX-512 row passes of gemv.cpp issue one prefetch a step from the
// queue while they compute, so the next attention finds its blocks in L2/L3. Prefetches only:
// no result depends on the queue, and a stale address costs a wasted request, never a fault.
#pragma once

#include <atomic>
#include <cstdint>
#include <vector>

namespace kiln {

struct SideRange {
  const char* begin;
  int64_t bytes;
};

// The queue: set and cleared by one thread between parallel regions (no kernel runs then);
// kernels on any thread claim whole ranges from it and walk them a line at a time.
struct SideQueue {
  std::vector<SideRange> ranges;
  std::atomic<int64_t> next{0};  // the next range to claim
  std::atomic<int64_t> size{0};  // ranges claimable (0: none)
};
inline SideQueue side_queue;  // one for every file of the extension (an inline variable)

inline void side_prefetch_set(std::vector<SideRange>&& ranges) {
  side_queue.ranges = std::move(ranges);
  side_queue.next.store(0, std::memory_order_relaxed);
  side_queue.size.store(static_cast<int64_t>(side_queue.ranges.size()), std::memory_order_relaxed);
}

inline void side_prefetch_clear() { side_queue.size.store(0, std::memory_order_relaxed); }

// A kernel thread's place in the queue: a local of one kernel call (what it has not walked of
// its last range when the call ends is left unfetched). Kernels walk [at, end) in their inner
// loop and refill() between loops: claiming a range is an atomic on a line both cores write,
// and a hot loop that might call it keeps fewer of its accumulators in registers.
struct SideCursor {
  const char* at = nullptr;
  const char* end = nullptr;
  bool empty = false;  // the queue had nothing left: stop asking

  // A new range once the last one is walked; false when there is none.
  bool refill() {
    if (at < end) return true;
    if (empty) return false;
    const int64_t i = side_queue.next.fetch_add(1, std::memory_order_relaxed);
    if (i >= side_queue.size.load(std::memory_order_relaxed)) {
      empty = true;
      return false;
    }
    at = side_queue.ranges[i].begin;
    end = at + side_queue.ranges[i].bytes;
    return true;
  }
};

}  // namespace kiln
