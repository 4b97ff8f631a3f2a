// Decode attention over the paged KV cache, for the CPU: every decoding sequence's one new
// query against its cached context, read in place through its block table (no gather copy).
//
// One task per sequence (or per (sequence, KV head) for small batches): the G query heads of a
// GQA group share each K/V row read from memory. The bfloat16 kernel also splits contexts
// longer than 256 positions into chunks and merges their partial softmaxes (flash-decoding),
// so a few long sequences keep both threads busy reading whole cache slots. Scores and the running output are float32 whatever the cache dtype.
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
#include <vector>

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
// bfloat16 cache, head size D and group size G known at compile time: a head's G queries stay
// in registers as bf16 pairs, scores come from AVX512-BF16 dot products straight off the cache
// rows (no conversion), and the G x D output accumulators stay in registers over the V pass.
// The cache is far bigger than the caches and blocks are scattered: while one block is being
// read, the same row of the next block is requested, so memory latency overlaps the math.
template <int D>
inline void prefetch_row(const uint16_t* next) {
  if (next == nullptr) return;
  const char* row = reinterpret_cast<const char*>(next);
  for (int line = 0; line < D * 2; line += 64) _mm_prefetch(row + line, _MM_HINT_T0);
}

// A whole cache slot (all KV heads of one position: Hkv x D values) towards L1. When a task
// holds all KV heads of a sequence, its first head's K pass fetches the next block's K slots
// whole and this position's V slot, so the V pass and the other heads find their rows in cache
// instead of each streaming strided rows from memory (in a full model the 30 layers' caches
// do not stay in cache between steps: 32 sequences x 150 positions, 388 -> 239 us a layer).
inline void prefetch_slot(const uint16_t* slot, int64_t values) {
  const char* p = reinterpret_cast<const char*>(slot);
  for (int64_t line = 0; line < values * 2; line += 64) _mm_prefetch(p + line, _MM_HINT_T0);
}

// A long context is split into chunks of this many positions (rounded to whole blocks) whose
// partial softmax results are merged at the end (flash-decoding): a few long sequences then
// still make enough tasks for both threads, each task reading whole cache slots with the
// prefetch above. The split depends on a sequence's own length only, never on the batch, so
// its result does too; a context of one chunk is computed exactly as without splitting.
constexpr int64_t kChunkPositions = 256;

template <int D, int G>
void decode_bf16(const uint16_t* q, const uint16_t* k, const uint16_t* v, const int64_t* tables,
                 const int64_t* lens, c10::BFloat16* out, int64_t B, int64_t Hkv, int64_t max_blocks,
                 int64_t block_size, float scale) {
  constexpr int P = D / 32;  // zmm of bf16 pairs per row
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
  at::parallel_for(0, chunks * tasks_per_chunk, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> scores;
    for (int64_t task = begin; task < end; ++task) {
      const int64_t c = task / tasks_per_chunk, h0 = (task % tasks_per_chunk) * heads;
      const int64_t b = std::upper_bound(first_chunk.begin(), first_chunk.end(), c) - first_chunk.begin() - 1;
      const int64_t L = lens[b];
      const bool split = first_chunk[b + 1] - first_chunk[b] > 1;
      const int64_t t_begin = (c - first_chunk[b]) * chunk, t_end = std::min(L, t_begin + chunk);
      const int64_t n = t_end - t_begin;
      const int64_t* table = tables + b * max_blocks;
      scores.resize(G * n);
      for (int64_t h = h0; h < h0 + heads; ++h) {
        __m512bh qv[G][P];
        for (int g = 0; g < G; ++g)
          for (int p = 0; p < P; ++p)
            qv[g][p] = (__m512bh)_mm512_loadu_si512(q + ((b * Hkv + h) * G + g) * D + p * 32);
        for_each_row(k, table, t_begin, t_end, block_size, slot_stride, h * D, [&](const uint16_t* kr, int64_t t, const uint16_t* next) {
          if (h == h0 && heads > 1) {
            // This position's V slot too: the V pass reads it right after this pass.
            if (next != nullptr) prefetch_slot(next - h * D, slot_stride);
            prefetch_slot(v + (kr - k) - h * D, slot_stride);
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
        float row_max[G], row_sum[G];
        for (int g = 0; g < G; ++g) {
          float* sg = scores.data() + g * n;
          float m = -std::numeric_limits<float>::infinity();
          for (int64_t t = 0; t < n; ++t) m = std::max(m, sg[t]);
          row_max[g] = m;
          row_sum[g] = exp_sub_sum(sg, n, m);
        }
        __m512 acc[G][V];
        for (int g = 0; g < G; ++g)
          for (int i = 0; i < V; ++i) acc[g][i] = _mm512_setzero_ps();
        for_each_row(v, table, t_begin, t_end, block_size, slot_stride, h * D, [&](const uint16_t* vr, int64_t t, const uint16_t* next) {
          if (h != h0 || heads == 1) prefetch_row<D>(next);
          __m512 vf[V];
          for (int i = 0; i < V; ++i) vf[i] = kiln::bf16x16_to_f32(vr + i * 16);
          for (int g = 0; g < G; ++g) {
            const __m512 pv = _mm512_set1_ps(scores[g * n + (t - t_begin)]);
            for (int i = 0; i < V; ++i) acc[g][i] = _mm512_fmadd_ps(pv, vf[i], acc[g][i]);
          }
        });
        for (int g = 0; g < G; ++g) {
          if (split) {
            const int64_t at = (c * Hkv + h) * G + g;
            part_max[at] = row_max[g];
            part_sum[at] = row_sum[g];
            for (int i = 0; i < V; ++i) _mm512_storeu_ps(part_acc.data() + at * D + i * 16, acc[g][i]);
            continue;
          }
          const __m512 iv = _mm512_set1_ps(1.f / row_sum[g]);
          uint16_t* ob = reinterpret_cast<uint16_t*>(out + ((b * Hkv + h) * G + g) * D);
          for (int i = 0; i < V; ++i) kiln::f32x16_to_bf16(_mm512_mul_ps(acc[g][i], iv), ob + i * 16);
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

FastKernel fast_kernel(int64_t D, int64_t G) {
#define KILN_CASE(d, g) \
  if (D == d && G == g) return &decode_bf16<d, g>;
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
    if (FastKernel fast = fast_kernel(D, G)) {
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
