// Decode attention over the paged KV cache, for the CPU: every decoding sequence's one new
// query against its cached context, read in place through its block table (no gather copy).
//
// One task per sequence (or per (sequence, KV head) for small batches): the G query heads of a
// GQA group share each K/V row read from memory. The bfloat16 kernel also splits contexts
// longer than 256 positions into chunks and merges their partial softmaxes (flash-decoding),
// so a few long sequences keep both threads busy reading whole cache slots. Scores and the
// running output are float32 whatever the cache dtype. bfloat16 with head size 64 runs on AMX
// tiles where the CPU has them (K straight from the cache as a tile, the queries as the other
// operand; P.V on tiles), streaming the next task's blocks into L2 meanwhile; other specialised
// shapes use AVX512-BF16 dot products; the rest a generic loop.
// Built at run time by kiln/kernels/cpu_ops.py (torch.utils.cpp_extension); registered as
// torch.ops.kiln_cpu.paged_decode.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <memory>
#include <type_traits>
#include <utility>
#include <vector>

#include "amx.h"
#include "parallel.h"
#include "vec.h"

namespace {

inline float to_float(float x) { return x; }
inline float to_float(c10::BFloat16 x) { return static_cast<float>(x); }

// One cache row (D values) into float32. bfloat16 is the top half of a float32: widen the raw
// 16-bit values and shift, which compilers vectorize (c10::BFloat16's operator float is opaque
// to them).
inline void load_row(const float* src, float* dst, int64_t D) { std::memcpy(dst, src, D * sizeof(float)); }
inline void load_row(const c10::BFloat16* src, float* dst, int64_t D) {
  const uint16_t* raw = reinterpret_cast<const uint16_t*>(src);
  int64_t d = 0;
#if defined(__AVX512F__)
  for (; d + 16 <= D; d += 16) _mm512_storeu_ps(dst + d, kiln::bf16x16_to_f32(raw + d));
#endif
  for (; d < D; ++d) {
    uint32_t bits = static_cast<uint32_t>(raw[d]) << 16;
    std::memcpy(dst + d, &bits, sizeof(float));
  }
}

// Visits the cached positions t_begin <= t < t_end of one sequence (t_begin on a block boundary),
// block by block (no division per token: a block's slots are consecutive): visit(row, t, next)
// with `row` the position's cache row at `offset`, and `next` the same row of the following
// block (nullptr in the range's last block), for prefetching.
template <typename T, typename Visit>
inline void for_each_row(const T* cache, const int64_t* table, int64_t t_begin, int64_t t_end,
                         int64_t block_size, int64_t slot_stride, int64_t offset, Visit&& visit) {
  for (int64_t t0 = t_begin; t0 < t_end; t0 += block_size) {
    const int64_t blk = t0 / block_size;
    const T* row = cache + table[blk] * block_size * slot_stride + offset;
    const T* next = t0 + block_size < t_end ? cache + table[blk + 1] * block_size * slot_stride + offset : nullptr;
    const int64_t n = std::min(block_size, t_end - t0);
    for (int64_t j = 0; j < n; ++j, row += slot_stride)
      visit(row, t0 + j, next == nullptr ? nullptr : next + j * slot_stride);
  }
}

inline float dot(const float* a, const float* b, int64_t D) {
  int64_t d = 0;
  float s = 0.f;
#if defined(__AVX512F__)
  __m512 acc = _mm512_setzero_ps();
  for (; d + 16 <= D; d += 16) acc = _mm512_fmadd_ps(_mm512_loadu_ps(a + d), _mm512_loadu_ps(b + d), acc);
  s = _mm512_reduce_add_ps(acc);
#endif
  for (; d < D; ++d) s += a[d] * b[d];
  return s;
}

// exp(x - m) over a row of scores, in place; returns their sum.
inline float exp_sub_sum(float* s, int64_t L, float m) {
  int64_t t = 0;
  float sum = 0.f;
#if defined(__AVX512F__)
  const __m512 mv = _mm512_set1_ps(m);
  __m512 acc = _mm512_setzero_ps();
  for (; t + 16 <= L; t += 16) {
    const __m512 y = kiln::exp512(_mm512_sub_ps(_mm512_loadu_ps(s + t), mv));
    _mm512_storeu_ps(s + t, y);
    acc = _mm512_add_ps(acc, y);
  }
  sum = _mm512_reduce_add_ps(acc);
#endif
  for (; t < L; ++t) {
    s[t] = std::exp(s[t] - m);
    sum += s[t];
  }
  return sum;
}

inline void axpy(float p, const float* x, float* y, int64_t D) {
  int64_t d = 0;
#if defined(__AVX512F__)
  const __m512 pv = _mm512_set1_ps(p);
  for (; d + 16 <= D; d += 16)
    _mm512_storeu_ps(y + d, _mm512_fmadd_ps(pv, _mm512_loadu_ps(x + d), _mm512_loadu_ps(y + d)));
#endif
  for (; d < D; ++d) y[d] += p * x[d];
}

template <typename T>
void decode(const T* q, const T* k, const T* v, const int64_t* tables, const int64_t* lens, T* out,
            int64_t B, int64_t Hkv, int64_t G, int64_t D, int64_t max_blocks, int64_t block_size,
            float scale) {
  const int64_t slot_stride = Hkv * D;
  // A task is one sequence with all its KV heads, so each cache block is read as one
  // contiguous run (block_size slots x Hkv x D); with fewer sequences than a few per thread
  // the heads are split over tasks instead, to keep every thread busy.
  const int64_t heads = B >= 4 * at::get_num_threads() ? Hkv : 1;
  const int64_t tasks_per_seq = Hkv / heads, QH = heads * G;  // query heads in a task
  at::parallel_for(0, B * tasks_per_seq, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> qf(QH * D), acc(QH * D), row(heads * D), scores, inv_sum(QH);
    for (int64_t task = begin; task < end; ++task) {
      const int64_t b = task / tasks_per_seq, h0 = (task % tasks_per_seq) * heads;
      const int64_t L = lens[b];
      const int64_t* table = tables + b * max_blocks;
      const T* qb = q + (b * Hkv + h0) * G * D;  // q is [B, Hkv, G, D]: the task's heads are adjacent
      for (int64_t i = 0; i < QH * D; ++i) qf[i] = to_float(qb[i]) * scale;
      scores.resize(QH * L);
      // Scores: q . k for every cached position; each K row converted once for its G queries.
      for_each_row(k, table, 0, L, block_size, slot_stride, h0 * D, [&](const T* kr, int64_t t, const T*) {
        load_row(kr, row.data(), heads * D);
        for (int64_t qh = 0; qh < QH; ++qh)
          scores[qh * L + t] = dot(qf.data() + qh * D, row.data() + (qh / G) * D, D);
      });
      for (int64_t qh = 0; qh < QH; ++qh) {
        float* sq = scores.data() + qh * L;
        float m = -std::numeric_limits<float>::infinity();
        for (int64_t t = 0; t < L; ++t) m = std::max(m, sq[t]);
        inv_sum[qh] = 1.f / exp_sub_sum(sq, L, m);
      }
      // Output: the probability-weighted sum of V rows, each row converted once.
      std::fill(acc.begin(), acc.end(), 0.f);
      for_each_row(v, table, 0, L, block_size, slot_stride, h0 * D, [&](const T* vr, int64_t t, const T*) {
        load_row(vr, row.data(), heads * D);
        for (int64_t qh = 0; qh < QH; ++qh)
          axpy(scores[qh * L + t], row.data() + (qh / G) * D, acc.data() + qh * D, D);
      });
      T* ob = out + (b * Hkv + h0) * G * D;
      for (int64_t qh = 0; qh < QH; ++qh)
        for (int64_t d = 0; d < D; ++d) ob[qh * D + d] = static_cast<T>(acc[qh * D + d] * inv_sum[qh]);
    }
  });
}

#if defined(__AVX512F__) && defined(__AVX512BF16__)
// The bfloat16 cache with head size D and group size G known at compile time. A driver splits
// the work into tasks and writes results; a worker computes one (chunk of a sequence, KV head):
// its G queries' unnormalised output, score max and exp-sum. Two workers: AVX-512 (any CPU with
// AVX512-BF16) and AMX tiles (head size 64, blocks of a multiple of 16 slots).
//
// The cache is far bigger than the caches and blocks are scattered: while one block is being
// read, the next one is requested, so memory latency overlaps the math.
template <int D>
inline void prefetch_row(const uint16_t* next) {
  if (next == nullptr) return;
  const char* row = reinterpret_cast<const char*>(next);
  for (int line = 0; line < D * 2; line += 64) _mm_prefetch(row + line, _MM_HINT_T0);
}

// Cache slots (all KV heads of positions: `values` bf16) towards L1. In the AVX-512 worker, when
// a task holds all KV heads of a sequence, its first head's K pass fetches the next block's K
// slots whole and the V slots, so the V pass and the other heads find their rows in cache
// instead of each streaming strided rows from memory (in a full model the 30 layers' caches do
// not stay in cache between steps: 32 sequences x 150 positions, 388 -> 239 us a layer).
inline void prefetch_slot(const uint16_t* slot, int64_t values) {
  const char* p = reinterpret_cast<const char*>(slot);
  for (int64_t line = 0; line < values * 2; line += 64) _mm_prefetch(p + line, _MM_HINT_T0);
}

// The same towards L2, for requests far ahead of their use.
inline void prefetch_slot_l2(const uint16_t* slot, int64_t values) {
  const char* p = reinterpret_cast<const char*>(slot);
  for (int64_t line = 0; line < values * 2; line += 64) _mm_prefetch(p + line, _MM_HINT_T1);
}

// A long context is split into chunks of this many positions (rounded to whole blocks) whose
// partial softmax results are merged at the end (flash-decoding): a few long sequences then
// still make enough tasks for both threads, each task reading whole cache slots with the
// prefetch above. The split depends on a sequence's own length only, never on the batch, so
// its result does too; a context of one chunk is computed exactly as without splitting.
constexpr int64_t kChunkPositions = 256;

// What a worker reads: one chunk [t_begin, t_end) of one sequence's context, and whether it
// leads its task (the first of several KV heads: it prefetches whole slots for the others).
struct Span {
  const int64_t* table;
  int64_t t_begin, t_end, block_size, slot_stride;
  bool lead;
  // The next task's span (table nullptr: none), whose first slots the AVX-512 worker requests
  // while its own V pass reads from cache and leaves memory idle.
  const int64_t* next_table = nullptr;
  int64_t next_begin = 0, next_end = 0;

  // Position t's cache slot (all KV heads) in `cache`.
  const uint16_t* slot(const uint16_t* cache, const int64_t* tbl, int64_t t) const {
    return cache + (tbl[t / block_size] * block_size + t % block_size) * slot_stride;
  }
};

// How far ahead of its K pass the AVX-512 worker's lead head requests K slots. Blocks are
// scattered, so the hardware prefetchers see at most one block's run; one block ahead left the
// K pass waiting on memory (AMD Zen 4: 12 GB/s of a 31 GB/s machine at 64 sequences x 155
// positions).
constexpr int64_t kAheadPositions = 32;

// One (chunk, KV head)'s result: unnormalised output of its G query heads, their scaled-score
// max and exp-sum.
template <int D, int G>
struct HeadOut {
  alignas(64) float acc[G][D];
  float max[G], sum[G];
};

// AVX-512: a head's G queries stay in registers as bf16 pairs, scores come from AVX512-BF16
// dot products straight off the cache rows (no conversion), and the G x D output
// accumulators stay in registers over the V pass.
template <int D, int G>
struct AvxWorker {
  std::vector<float> scores;
  static constexpr bool kStreams = false;

  void operator()(const uint16_t* qh, const uint16_t* k, const uint16_t* v, int64_t h, const Span& sp,
                  float scale, HeadOut<D, G>& r) {
    constexpr int P = D / 32;  // zmm of bf16 pairs per row
    constexpr int V = D / 16;  // zmm of float32 per row
    const int64_t t_begin = sp.t_begin, n = sp.t_end - sp.t_begin, slot_stride = sp.slot_stride;
    scores.resize(G * n);
    __m512bh qv[G][P];
    for (int g = 0; g < G; ++g)
      for (int p = 0; p < P; ++p) qv[g][p] = (__m512bh)_mm512_loadu_si512(qh + g * D + p * 32);
    for_each_row(k, sp.table, t_begin, sp.t_end, sp.block_size, slot_stride, h * D,
                 [&](const uint16_t* kr, int64_t t, const uint16_t* next) {
      if (sp.lead) {
        // K slots kAheadPositions ahead (the first ones all at the task's start), and this
        // position's V slot: the V pass reads it right after this pass.
        if (t == t_begin)
          for (int64_t u = t + 1; u < std::min(sp.t_end, t + kAheadPositions); ++u)
            prefetch_slot_l2(sp.slot(k, sp.table, u), slot_stride);
        if (t + kAheadPositions < sp.t_end) prefetch_slot_l2(sp.slot(k, sp.table, t + kAheadPositions), slot_stride);
        prefetch_slot_l2(v + (kr - k) - h * D, slot_stride);
      } else {
        prefetch_row<D>(next);
      }
      __m512bh kv[P];
      for (int p = 0; p < P; ++p) kv[p] = (__m512bh)_mm512_loadu_si512(kr + p * 32);
      for (int g = 0; g < G; ++g) {
        __m512 a = _mm512_setzero_ps();
        for (int p = 0; p < P; ++p) a = _mm512_dpbf16_ps(a, qv[g][p], kv[p]);
        scores[g * n + (t - t_begin)] = _mm512_reduce_add_ps(a) * scale;
      }
    });
    for (int g = 0; g < G; ++g) {
      float* sg = scores.data() + g * n;
      float m = -std::numeric_limits<float>::infinity();
      for (int64_t t = 0; t < n; ++t) m = std::max(m, sg[t]);
      r.max[g] = m;
      r.sum[g] = exp_sub_sum(sg, n, m);
    }
    __m512 acc[G][V];
    for (int g = 0; g < G; ++g)
      for (int i = 0; i < V; ++i) acc[g][i] = _mm512_setzero_ps();
    for_each_row(v, sp.table, t_begin, sp.t_end, sp.block_size, slot_stride, h * D,
                 [&](const uint16_t* vr, int64_t t, const uint16_t* next) {
      if (!sp.lead) {
        prefetch_row<D>(next);
      } else if (sp.next_table != nullptr && sp.next_begin + (t - t_begin) < sp.next_end) {
        prefetch_slot_l2(sp.slot(k, sp.next_table, sp.next_begin + (t - t_begin)), slot_stride);
      }
      __m512 vf[V];
      for (int i = 0; i < V; ++i) vf[i] = kiln::bf16x16_to_f32(vr + i * 16);
      for (int g = 0; g < G; ++g) {
        const __m512 pv = _mm512_set1_ps(scores[g * n + (t - t_begin)]);
        for (int i = 0; i < V; ++i) acc[g][i] = _mm512_fmadd_ps(pv, vf[i], acc[g][i]);
      }
    });
    for (int g = 0; g < G; ++g)
      for (int i = 0; i < V; ++i) _mm512_store_ps(&r.acc[g][i * 16], acc[g][i]);
  }
};

#if defined(__AMX_TILE__) && defined(__AMX_BF16__)
#define KILN_DECODE_AMX 1
// Brings another task's cache blocks (K and V, whole slots) into L2 a few lines at a time
// while the current task computes, so the current task finds its own blocks there: the AMX
// worker is too fast for a one-block lookahead to hide memory latency.
class Streamer {
 public:
  // Queue `sp`'s blocks; each pump() then issues an even share of their lines over `calls`
  // calls (0: all of them now).
  void queue(const uint16_t* k, const uint16_t* v, const Span& sp, int64_t calls) {
    ranges_.clear();
    next_ = 0;
    offset_ = 0;
    int64_t lines = 0;
    for (int64_t t = sp.t_begin; t < sp.t_end; t += sp.block_size - t % sp.block_size) {
      const int64_t at = (sp.table[t / sp.block_size] * sp.block_size + t % sp.block_size) * sp.slot_stride;
      const int64_t bytes = std::min(sp.block_size - t % sp.block_size, sp.t_end - t) * sp.slot_stride * 2;
      ranges_.push_back({reinterpret_cast<const char*>(k + at), bytes});
      ranges_.push_back({reinterpret_cast<const char*>(v + at), bytes});
      lines += 2 * ((bytes + 63) / 64);
    }
    per_call_ = calls > 0 ? (lines + calls - 1) / calls : lines;
    if (calls == 0) pump();
  }
  void pump() {
    for (int64_t i = 0; i < per_call_ && next_ < ranges_.size(); ++i) {
      _mm_prefetch(ranges_[next_].first + offset_, _MM_HINT_T1);
      offset_ += 64;
      if (offset_ >= ranges_[next_].second) {
        ++next_;
        offset_ = 0;
      }
    }
  }

 private:
  std::vector<std::pair<const char*, int64_t>> ranges_;
  size_t next_ = 0;
  int64_t offset_ = 0, per_call_ = 0;
};

// AMX, head size 64, blocks of a multiple of 16 slots. 16 consecutive positions of a block are
// 16 cache rows at a fixed stride, so they load as a tile straight from the cache: scores =
// K (16 positions x 32 dims, twice) . Q^T (the G queries as the B operand, columns past G zero),
// no packing of K and no horizontal sums (what bounds the AVX-512 worker: ~57 cycles a
// position and head with the cache in L2). The softmax runs in AVX-512 on the score columns;
// P.V is P (G rows x 32 positions, bf16) . V (32 positions interleaved in pairs: the B
// operand), accumulated in four output tiles over the chunk.
// Tiles: scores stage: Q^T in tmm2-3, two 16-position steps in flight (K halves in tmm0-1 and
// tmm5-6, scores in tmm4 and tmm7); P.V stage: P in tmm0, V in tmm1-3, output in tmm4-7.
template <int G>
struct AmxWorker64 {
  static constexpr int D = 64;
  const int64_t cap;                     // positions a chunk can hold, a multiple of 32
  alignas(64) uint32_t qt[2][16][16];    // Q^T: [dim half][dim pair][query] pairs
  alignas(64) uint32_t vt[4][16][16];    // 32 positions of V: [16-dim tile][position pair][dim] pairs
  alignas(64) float o[16][D];            // P.V, rows past G unused
  std::vector<float> s;                  // scores tile rows: [cap][16 queries]
  std::vector<float> sg;                 // scaled scores of query g: [G][cap]
  std::vector<uint16_t> p;               // probabilities, bf16: [16 queries][cap], rows past G zero
  kiln::PairInterleave interleave;       // two V rows into the P.V operand
  Streamer stream;                       // the next task's blocks, towards L2
  static constexpr bool kStreams = true;
  // stream.pump() calls per head and 32 positions: every 16 positions of the scores, every 4 of
  // P.V. A few lines at a time: long bursts of prefetches stall on the line fill buffers
  // (a call per 32 positions was ~7 % slower at 64 x 155 positions).
  static constexpr int64_t kPumpsPerGroup = 10;
  // Chunks this short go to the AVX-512 worker: the tile path's per-head setup costs more
  // than it saves there (bench/decode_attention.py, 64 contexts, us a layer: 16 positions 40
  // vs 49 on tiles, 17: 51 vs 60; 24: 73 vs 63 and 32: 74 vs 67 in favour of the tiles).
  static constexpr int64_t kShortChunk = 20;
  AvxWorker<D, G> short_chunks;

  explicit AmxWorker64(int64_t chunk)
      : cap((chunk + 31) / 32 * 32), s(cap * 16), sg(G * cap), p(16 * cap, 0) {
    kiln::TileConfig cfg(8);
    _tile_loadconfig(&cfg);
    std::memset(qt, 0, sizeof(qt));
  }
  ~AmxWorker64() { _tile_release(); }

  void operator()(const uint16_t* qh, const uint16_t* k, const uint16_t* v, int64_t h, const Span& sp,
                  float scale, HeadOut<D, G>& r) {
    const int64_t bs = sp.block_size, stride = sp.slot_stride, n = sp.t_end - sp.t_begin;
    if (n <= kShortChunk) {  // the tile path's per-head setup outweighs this little work
      short_chunks(qh, k, v, h, sp, scale, r);
      return;
    }
    auto slot = [&](const uint16_t* cache, int64_t t) {  // position t's slot (t on a 16-boundary or any)
      return cache + (sp.table[t / bs] * bs + t % bs) * stride;
    };
    // Q^T: query g's dim pair i is column g of row i (half i / 16).
    const uint32_t* qd = reinterpret_cast<const uint32_t*>(qh);
    for (int g = 0; g < G; ++g)
      for (int i = 0; i < D / 2; ++i) qt[i / 16][i % 16][g] = qd[g * (D / 2) + i];
    _tile_loadd(2, qt[0], 64);
    _tile_loadd(3, qt[1], 64);
    // Scores, 16 positions a tile; rows past the context hold whatever the block holds and
    // are never read. Two tiles in flight (K in tmm0-1 and tmm5-6, scores in tmm4 and tmm7):
    // tiles are not renamed, so one set would wait for each product before the next load.
    // The next block's rows of this head towards L1 (from L2 where the streamer brought them).
    auto prefetch_ahead = [&](int64_t t0) {
      if (t0 % bs != 0 || t0 + bs >= sp.t_end) return;
      const uint16_t* nk = slot(k, t0 + bs) + h * D;
      for (int64_t j = 0; j < bs; ++j) prefetch_row<D>(nk + j * stride);
    };
    for (int64_t t0 = sp.t_begin; t0 < sp.t_end; t0 += 32) {
      stream.pump();
      prefetch_ahead(t0);
      const uint16_t* ka = slot(k, t0) + h * D;
      _tile_loadd(0, ka, stride * 2);
      _tile_loadd(1, ka + 32, stride * 2);
      _tile_zero(4);
      _tile_dpbf16ps(4, 0, 2);
      _tile_dpbf16ps(4, 1, 3);
      if (t0 + 16 < sp.t_end) {
        stream.pump();
        prefetch_ahead(t0 + 16);
        const uint16_t* kb = slot(k, t0 + 16) + h * D;
        _tile_loadd(5, kb, stride * 2);
        _tile_loadd(6, kb + 32, stride * 2);
        _tile_zero(7);
        _tile_dpbf16ps(7, 5, 2);
        _tile_dpbf16ps(7, 6, 3);
        _tile_stored(7, &s[(t0 + 16 - sp.t_begin) * 16], 64);
      }
      _tile_stored(4, &s[(t0 - sp.t_begin) * 16], 64);
    }
    // Softmax per query: its score column, scaled; positions past the context masked out.
    const __m512i col = _mm512_mullo_epi32(_mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15),
                                           _mm512_set1_epi32(16));
    const __m512 sv = _mm512_set1_ps(scale), neg_inf = _mm512_set1_ps(-std::numeric_limits<float>::infinity());
    const int64_t groups = (n + 31) / 32;  // 32-position groups (P.V's K dimension)
    for (int g = 0; g < G; ++g) {
      float* row = sg.data() + g * cap;
      __m512 mv = neg_inf;
      for (int64_t t = 0; t < groups * 32; t += 16) {
        const __mmask16 valid = t >= n ? 0 : n - t >= 16 ? 0xffff : static_cast<__mmask16>((1u << (n - t)) - 1u);
        __m512 x = _mm512_mask_i32gather_ps(neg_inf, valid, _mm512_add_epi32(col, _mm512_set1_epi32(g)),
                                            &s[t * 16], 4);
        x = _mm512_mask_mul_ps(neg_inf, valid, x, sv);
        _mm512_storeu_ps(row + t, x);
        mv = _mm512_max_ps(mv, x);
      }
      const float m = _mm512_reduce_max_ps(mv);
      const __m512 mm = _mm512_set1_ps(m);
      __m512 sum = _mm512_setzero_ps();
      uint16_t* pr = p.data() + g * cap;
      for (int64_t t = 0; t < groups * 32; t += 32) {
        const __m512 x0 = _mm512_loadu_ps(row + t), x1 = _mm512_loadu_ps(row + t + 16);
        // exp of a masked (-inf) score is exactly 0: a garbage V row times 0 adds nothing.
        const __m512 e0 = _mm512_maskz_mov_ps(_mm512_cmp_ps_mask(x0, neg_inf, _CMP_NEQ_OQ),
                                              kiln::exp512_fast(_mm512_sub_ps(x0, mm)));
        const __m512 e1 = _mm512_maskz_mov_ps(_mm512_cmp_ps_mask(x1, neg_inf, _CMP_NEQ_OQ),
                                              kiln::exp512_fast(_mm512_sub_ps(x1, mm)));
        sum = _mm512_add_ps(sum, _mm512_add_ps(e0, e1));
        _mm512_storeu_si512(pr + t, (__m512i)_mm512_cvtne2ps_pbh(e1, e0));
      }
      r.max[g] = m;
      r.sum[g] = _mm512_reduce_add_ps(sum);
    }
    // P.V: V rows t and t + 1 interleaved (a pair never straddles blocks: chunks start on a
    // block, blocks hold an even number of slots); rows past the context are zero.
    _tile_zero(4);
    _tile_zero(5);
    _tile_zero(6);
    _tile_zero(7);
    for (int64_t t0 = sp.t_begin; t0 < sp.t_end; t0 += 32) {
      if (t0 % bs == 0 && t0 + bs < sp.t_end) {
        const uint16_t* nv = slot(v, t0 + bs) + h * D;
        for (int64_t j = 0; j < bs; ++j) prefetch_row<D>(nv + j * stride);
      }
      const uint16_t* first = slot(v, t0) + h * D;
      const int64_t in_first = bs - t0 % bs;  // positions of the group in t0's block
      const uint16_t* second = in_first < 32 && t0 + in_first < sp.t_end ? slot(v, t0 + in_first) + h * D : nullptr;
      for (int c = 0; c < 32; c += 2) {
        if (c % 4 == 0) stream.pump();
        const int64_t t = t0 + c;
        const uint16_t* r0 = t >= sp.t_end ? nullptr : c < in_first ? first + c * stride : second + (c - in_first) * stride;
        const uint16_t* r1 = t + 1 >= sp.t_end ? nullptr : r0 + stride;
        interleave.rows<D>(r0, r1, vt, c / 2);
      }
      // V tiles in tmm1-3 (Q^T is done with), so loads do not wait for the previous product.
      _tile_loadd(0, p.data() + (t0 - sp.t_begin), cap * sizeof(uint16_t));
      _tile_loadd(1, vt[0], 64);
      _tile_loadd(2, vt[1], 64);
      _tile_loadd(3, vt[2], 64);
      _tile_dpbf16ps(4, 0, 1);
      _tile_dpbf16ps(5, 0, 2);
      _tile_dpbf16ps(6, 0, 3);
      _tile_loadd(1, vt[3], 64);
      _tile_dpbf16ps(7, 0, 1);
    }
    _tile_stored(4, &o[0][0], D * sizeof(float));
    _tile_stored(5, &o[0][16], D * sizeof(float));
    _tile_stored(6, &o[0][32], D * sizeof(float));
    _tile_stored(7, &o[0][48], D * sizeof(float));
    for (int g = 0; g < G; ++g) std::memcpy(r.acc[g], o[g], sizeof(r.acc[g]));
  }
};
#endif

// The driver: tasks over chunks (and KV heads), each thread with a worker of its own made by
// make_worker(chunk); results normalised into `out`, or merged first where a sequence was split.
template <int D, int G, typename MakeWorker>
void decode_bf16(const uint16_t* q, const uint16_t* k, const uint16_t* v, const int64_t* tables,
                 const int64_t* lens, c10::BFloat16* out, int64_t B, int64_t Hkv, int64_t max_blocks,
                 int64_t block_size, float scale, MakeWorker&& make_worker) {
  constexpr int V = D / 16;  // zmm of float32 per row
  const int64_t slot_stride = Hkv * D;
  const int64_t chunk = std::max<int64_t>(1, kChunkPositions / block_size) * block_size;
  std::vector<int64_t> first_chunk(B + 1, 0);  // sequence b owns chunks [first_chunk[b], first_chunk[b + 1])
  for (int64_t b = 0; b < B; ++b) first_chunk[b + 1] = first_chunk[b] + (lens[b] + chunk - 1) / chunk;
  const int64_t chunks = first_chunk[B];
  // A task is one chunk with all its KV heads, so each cache block is read as one contiguous
  // run (block_size slots x Hkv x D); with fewer chunks than a few per thread the heads are
  // split over tasks instead, to keep every thread busy.
  const int64_t heads = chunks >= 4 * at::get_num_threads() ? Hkv : 1;
  const int64_t tasks_per_chunk = Hkv / heads;
  // Chunks of split sequences leave their unnormalised output, running max and sum here.
  const bool any_split = chunks > B;
  std::vector<float> part_acc(any_split ? chunks * Hkv * G * D : 0);
  std::vector<float> part_max(any_split ? chunks * Hkv * G : 0), part_sum(part_max.size());
  auto span_of = [&](int64_t task) {  // the cache a task reads (all KV heads: whole slots)
    const int64_t c = task / tasks_per_chunk;
    const int64_t b = std::upper_bound(first_chunk.begin(), first_chunk.end(), c) - first_chunk.begin() - 1;
    const int64_t t_begin = (c - first_chunk[b]) * chunk;
    return Span{tables + b * max_blocks, t_begin, std::min(lens[b], t_begin + chunk), block_size, slot_stride, true};
  };
  kiln::parallel_claims(chunks * tasks_per_chunk, [&](auto claim) {
    auto worker = make_worker(chunk);
    HeadOut<D, G> r;
    // Each task is claimed one ahead, so its blocks can stream in during the one before.
    for (int64_t task = claim(), next, first = task; task >= 0; task = next) {
      next = claim();
      const int64_t c = task / tasks_per_chunk, h0 = (task % tasks_per_chunk) * heads;
      const int64_t b = std::upper_bound(first_chunk.begin(), first_chunk.end(), c) - first_chunk.begin() - 1;
      const bool split = first_chunk[b + 1] - first_chunk[b] > 1;
      const int64_t t_begin = (c - first_chunk[b]) * chunk;
      const int64_t t_end = std::min(lens[b], t_begin + chunk);
      using Worker = std::remove_reference_t<decltype(*worker)>;
      if constexpr (Worker::kStreams) {
        // Whole-slot tasks: the first one's blocks now, each next one's during this one.
        if (heads > 1) {
          if (task == first) worker->stream.queue(k, v, span_of(task), 0);
          worker->stream.queue(k, v, next >= 0 ? span_of(next) : Span{}, heads * Worker::kPumpsPerGroup * ((t_end - t_begin + 31) / 32));
        }
      }
      const Span after = next >= 0 && heads > 1 ? span_of(next) : Span{};
      for (int64_t h = h0; h < h0 + heads; ++h) {
        const Span sp{tables + b * max_blocks, t_begin, t_end, block_size, slot_stride, h == h0 && heads > 1,
                      after.table, after.t_begin, after.t_end};
        (*worker)(q + (b * Hkv + h) * G * D, k, v, h, sp, scale, r);
        for (int g = 0; g < G; ++g) {
          if (split) {
            const int64_t at = (c * Hkv + h) * G + g;
            part_max[at] = r.max[g];
            part_sum[at] = r.sum[g];
            std::memcpy(part_acc.data() + at * D, r.acc[g], D * sizeof(float));
            continue;
          }
          const __m512 iv = _mm512_set1_ps(1.f / r.sum[g]);
          uint16_t* ob = reinterpret_cast<uint16_t*>(out + ((b * Hkv + h) * G + g) * D);
          for (int i = 0; i < V; ++i) kiln::f32x16_to_bf16(_mm512_mul_ps(_mm512_load_ps(&r.acc[g][i * 16]), iv), ob + i * 16);
        }
      }
    }
  });
  if (!any_split) return;
  // Merge the chunks of each split sequence: rescale every chunk to the overall max.
  at::parallel_for(0, B, 1, [&](int64_t begin, int64_t end) {
    for (int64_t b = begin; b < end; ++b) {
      const int64_t c0 = first_chunk[b], c1 = first_chunk[b + 1];
      if (c1 - c0 == 1) continue;
      for (int64_t hg = 0; hg < Hkv * G; ++hg) {
        float m = -std::numeric_limits<float>::infinity();
        for (int64_t c = c0; c < c1; ++c) m = std::max(m, part_max[c * Hkv * G + hg]);
        __m512 acc[V];
        for (int i = 0; i < V; ++i) acc[i] = _mm512_setzero_ps();
        float sum = 0.f;
        for (int64_t c = c0; c < c1; ++c) {
          const int64_t at = c * Hkv * G + hg;
          const float w = std::exp(part_max[at] - m);
          sum += part_sum[at] * w;
          const __m512 wv = _mm512_set1_ps(w);
          for (int i = 0; i < V; ++i)
            acc[i] = _mm512_fmadd_ps(wv, _mm512_loadu_ps(part_acc.data() + at * D + i * 16), acc[i]);
        }
        const __m512 iv = _mm512_set1_ps(1.f / sum);
        uint16_t* ob = reinterpret_cast<uint16_t*>(out + (b * Hkv * G + hg) * D);
        for (int i = 0; i < V; ++i) kiln::f32x16_to_bf16(_mm512_mul_ps(acc[i], iv), ob + i * 16);
      }
    }
  });
}

using FastKernel = void (*)(const uint16_t*, const uint16_t*, const uint16_t*, const int64_t*, const int64_t*,
                            c10::BFloat16*, int64_t, int64_t, int64_t, int64_t, float);

template <int D, int G>
void decode_avx(const uint16_t* q, const uint16_t* k, const uint16_t* v, const int64_t* tables, const int64_t* lens,
                c10::BFloat16* out, int64_t B, int64_t Hkv, int64_t max_blocks, int64_t block_size, float scale) {
  decode_bf16<D, G>(q, k, v, tables, lens, out, B, Hkv, max_blocks, block_size, scale,
                    [](int64_t) { return std::make_unique<AvxWorker<D, G>>(); });
}

#ifdef KILN_DECODE_AMX
template <int G>
void decode_amx(const uint16_t* q, const uint16_t* k, const uint16_t* v, const int64_t* tables, const int64_t* lens,
                c10::BFloat16* out, int64_t B, int64_t Hkv, int64_t max_blocks, int64_t block_size, float scale) {
  decode_bf16<64, G>(q, k, v, tables, lens, out, B, Hkv, max_blocks, block_size, scale,
                     [](int64_t chunk) { return std::make_unique<AmxWorker64<G>>(chunk); });
}
#endif

// The AMX worker where it applies (the tiles granted, head size 64, blocks of 16k slots), else
// the AVX-512 one for the specialised shapes; nullptr: the generic loop.
FastKernel fast_kernel(int64_t D, int64_t G, int64_t block_size) {
#ifdef KILN_DECODE_AMX
  if (D == 64 && block_size % 16 == 0 && kiln::amx_ready()) {
#define KILN_CASE(d, g) \
    if (d == 64 && G == g) return &decode_amx<g>;
    KILN_ATTENTION_SHAPES(KILN_CASE)
#undef KILN_CASE
  }
#endif
#define KILN_CASE(d, g) \
  if (D == d && G == g) return &decode_avx<d, g>;
  KILN_ATTENTION_SHAPES(KILN_CASE)
#undef KILN_CASE
  return nullptr;
}
#endif

// q [B, Hkv, G, D]; k_cache, v_cache [slots, Hkv, D]; block_tables [B, max_blocks] int64;
// context_lens [B] int64 (each >= 1). Returns [B, Hkv, G, D] in q's dtype.
at::Tensor paged_decode(const at::Tensor& q, const at::Tensor& k_cache, const at::Tensor& v_cache,
                        const at::Tensor& block_tables, const at::Tensor& context_lens,
                        int64_t block_size, double scale) {
  TORCH_CHECK(q.dim() == 4 && k_cache.dim() == 3 && v_cache.dim() == 3, "paged_decode: bad ranks");
  TORCH_CHECK(q.is_contiguous() && k_cache.is_contiguous() && v_cache.is_contiguous(),
              "paged_decode: q and the caches must be contiguous");
  TORCH_CHECK(q.scalar_type() == k_cache.scalar_type() && q.scalar_type() == v_cache.scalar_type(),
              "paged_decode: q and the caches must share a dtype");
  TORCH_CHECK(block_tables.scalar_type() == at::kLong && context_lens.scalar_type() == at::kLong &&
                  block_tables.is_contiguous() && context_lens.is_contiguous(),
              "paged_decode: block tables and lengths must be contiguous int64");
  const int64_t B = q.size(0), Hkv = q.size(1), G = q.size(2), D = q.size(3);
  TORCH_CHECK(k_cache.size(1) == Hkv && k_cache.size(2) == D, "paged_decode: cache shape");
  TORCH_CHECK(block_tables.size(0) == B && context_lens.size(0) == B, "paged_decode: batch size");
  auto out = at::empty_like(q);
  if (B == 0) return out;
  const int64_t max_blocks = block_tables.size(1);
  if (q.scalar_type() == at::kBFloat16) {
#if defined(__AVX512F__) && defined(__AVX512BF16__)
    if (FastKernel fast = fast_kernel(D, G, block_size)) {
      fast(reinterpret_cast<const uint16_t*>(q.const_data_ptr<c10::BFloat16>()),
           reinterpret_cast<const uint16_t*>(k_cache.const_data_ptr<c10::BFloat16>()),
           reinterpret_cast<const uint16_t*>(v_cache.const_data_ptr<c10::BFloat16>()),
           block_tables.const_data_ptr<int64_t>(), context_lens.const_data_ptr<int64_t>(),
           out.mutable_data_ptr<c10::BFloat16>(), B, Hkv, max_blocks, block_size, static_cast<float>(scale));
      return out;
    }
#endif
    decode(q.const_data_ptr<c10::BFloat16>(), k_cache.const_data_ptr<c10::BFloat16>(),
           v_cache.const_data_ptr<c10::BFloat16>(), block_tables.const_data_ptr<int64_t>(),
           context_lens.const_data_ptr<int64_t>(), out.mutable_data_ptr<c10::BFloat16>(), B, Hkv, G, D,
           max_blocks, block_size, static_cast<float>(scale));
  } else {
    TORCH_CHECK(q.scalar_type() == at::kFloat, "paged_decode: float32 or bfloat16 only");
    decode(q.const_data_ptr<float>(), k_cache.const_data_ptr<float>(), v_cache.const_data_ptr<float>(),
           block_tables.const_data_ptr<int64_t>(), context_lens.const_data_ptr<int64_t>(),
           out.mutable_data_ptr<float>(), B, Hkv, G, D, max_blocks, block_size, static_cast<float>(scale));
  }
  return out;
}

}  // namespace

TORCH_LIBRARY(kiln_cpu, m) {
  m.def("paged_decode(Tensor q, Tensor k_cache, Tensor v_cache, Tensor block_tables, "
        "Tensor context_lens, int block_size, float scale) -> Tensor");
}

TORCH_LIBRARY_IMPL(kiln_cpu, CPU, m) { m.impl("paged_decode", &paged_decode); }
