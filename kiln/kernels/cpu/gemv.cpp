// bfloat16 y = x W^T for the 1-64 rows of a decode step, for the CPU.
//
// oneDNN's kernels are built for many rows; at one row a linear only streams its weight, and
// oneDNN reads it at ~23-34 GB/s here. This kernel keeps a copy of the weight in a layout made
// for that stream: blocks of 16 output rows, each block's columns in pairs ([N/16, K/2, 16, 2]),
// so one 64-byte line holds one column pair of 16 outputs and one AVX512-BF16 dot instruction
// consumes it against the broadcast pair of x: no horizontal sums, one sequential read per
// block. Sums are float32, rounded to bfloat16 once. 2-64 rows read the same copy: as AMX
// tiles where the CPU has them, else in AVX512-BF16 passes of 6 rows (below).
// Registered as torch.ops.kiln_cpu.gemv_bf16 / pack_gemv_bf16 / gemv_bf16_supported.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <cstdint>
#include <algorithm>
#include <cstring>
#include <type_traits>
#include <vector>

#include "amx.h"
#include "gemv.h"
#include "parallel.h"
#include "vec.h"

namespace {

using kiln::kBlock;
#if KILN_GEMV
using kiln::gemv_block;
#endif
// Blocks a thread claims at a time (kiln::parallel_claims): small enough that a thread left
// running takes over most of a preempted one's share, large enough that claiming costs nothing.
constexpr int64_t kTaskBlocks = 4;
constexpr int64_t kAvxMaxRows = 64;  // rows up to which gemv_bf16 runs AVX512-BF16 passes (no AMX)

bool gemv_bf16_supported() { return KILN_GEMV; }

// w [N, K] bfloat16 -> [N/16, K/2, 16, 2]; N a multiple of 16, K even.
at::Tensor pack_gemv_bf16(const at::Tensor& w) {
  TORCH_CHECK(w.dim() == 2 && w.scalar_type() == at::kBFloat16, "pack_gemv_bf16: w must be bfloat16 [N, K]");
  const int64_t N = w.size(0), K = w.size(1);
  TORCH_CHECK(N % kBlock == 0 && K % 2 == 0, "pack_gemv_bf16: N must be a multiple of 16 and K even, got [", N,
              ", ", K, "]");
  return w.reshape({N / kBlock, kBlock, K / 2, 2}).permute({0, 2, 1, 3}).contiguous();
}

#if KILN_GEMV_AMX
// Several rows (a decode batch): AMX tile products straight from the same copy. A block's
// [K/2, 16, 2] layout is exactly an AMX B operand (each 64-byte row: one column pair of 16
// outputs), 32 columns a step. Up to 16 rows, one x tile against each weight tile as it
// streams; past that, two x tiles against two weight blocks at a time (block pairs are read
// from memory once, a second pass over rows 32-63 finds them in L2). The tile products run at
// ~3.8 TFLOP/s a core here; what bounds these shapes is moving x and w into the tiles.
using kiln::kAmxMaxRows;
using kiln::gemv_tile_path;
constexpr int64_t kPrefetchBytes = 16384;  // into L2; measured against 4-32 KB and L1

using kiln::amx_ready;

// One 16 x 16 float32 tile of y (stored to `out`), rows r0.. of y (up to M) at block b.
inline void store_tile(const float (*out)[16], uint16_t* y, int64_t M, int64_t N, int64_t r0, int64_t b) {
  for (int r = 0; r < 16 && r0 + r < M; ++r)
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(y + (r0 + r) * N + b * kBlock),
                        (__m256i)_mm512_cvtneps_pbh(_mm512_load_ps(out[r])));
}

// One weight block against MT 16-row tiles of x: y tiles in tmm0-3, x in tmm4, w in tmm5.
// At up to 16 rows x stays in L1 and this streams the weight at memory speed.
template <int MT>
void block_amx(const uint16_t* x, const uint16_t* wb, int64_t M, int64_t K, int64_t N, int64_t b, uint16_t* y,
               float (*out)[16]) {
  _tile_zero(0);
  if (MT > 1) _tile_zero(1);
  if (MT > 2) _tile_zero(2);
  if (MT > 3) _tile_zero(3);
  for (int64_t k0 = 0; k0 < K; k0 += 32) {
    // The weight is one sequential stream (blocks follow each other): ask for it ahead.
    const char* ahead = reinterpret_cast<const char*>(wb + k0 * kBlock) + kPrefetchBytes;
    for (int line = 0; line < 1024; line += 64) _mm_prefetch(ahead + line, _MM_HINT_T1);
    _tile_loadd(5, wb + k0 * kBlock, 64);
    _tile_loadd(4, x + k0, K * 2);
    _tile_dpbf16ps(0, 4, 5);
    if (MT > 1) {
      _tile_loadd(4, x + 16 * K + k0, K * 2);
      _tile_dpbf16ps(1, 4, 5);
    }
    if (MT > 2) {
      _tile_loadd(4, x + 32 * K + k0, K * 2);
      _tile_dpbf16ps(2, 4, 5);
    }
    if (MT > 3) {
      _tile_loadd(4, x + 48 * K + k0, K * 2);
      _tile_dpbf16ps(3, 4, 5);
    }
  }
  for (int mt = 0; mt < MT; ++mt) {
    if (mt == 0) _tile_stored(0, out, 64);
    if (mt == 1) _tile_stored(1, out, 64);
    if (mt == 2) _tile_stored(2, out, 64);
    if (mt == 3) _tile_stored(3, out, 64);
    store_tile(out, y, M, N, mt * 16, b);
  }
}

// Two weight blocks (w0, w1) against one or two 16-row tiles of x (rows r0 ..): y tiles in
// tmm0-3 (x tile i, block j: 2i + j), x in tmm4-5, w in tmm6-7. Past 16 rows x outgrows L1
// and block_amx re-reads all of it from L2 for every weight tile, which bounds it (~1.1
// TFLOP/s at 64 rows); here each x tile serves two weight tiles and each weight tile two x
// tiles. A second pass over the same two blocks (rows 32 ..) finds them in L2. `next0` and
// `next1` (or nullptr): the blocks after these, asked for into L2 a kilobyte a step.
template <bool two>
void pair_tiles(const uint16_t* x, int64_t r0, int64_t K, const uint16_t* w0, const uint16_t* w1,
                const uint16_t* next0, const uint16_t* next1) {
  _tile_zero(0);
  _tile_zero(1);
  if (two) {
    _tile_zero(2);
    _tile_zero(3);
  }
  for (int64_t k0 = 0; k0 < K; k0 += 32) {
    if (next0 != nullptr) {  // all of both next blocks by the pass's end
      const char* a0 = reinterpret_cast<const char*>(next0 + k0 * kBlock);
      const char* a1 = reinterpret_cast<const char*>(next1 + k0 * kBlock);
      for (int line = 0; line < 1024; line += 64) {
        _mm_prefetch(a0 + line, _MM_HINT_T1);
        _mm_prefetch(a1 + line, _MM_HINT_T1);
      }
    }
    _tile_loadd(6, w0 + k0 * kBlock, 64);
    _tile_loadd(7, w1 + k0 * kBlock, 64);
    _tile_loadd(4, x + r0 * K + k0, K * 2);
    _tile_dpbf16ps(0, 4, 6);
    _tile_dpbf16ps(1, 4, 7);
    if (two) {
      _tile_loadd(5, x + (r0 + 16) * K + k0, K * 2);
      _tile_dpbf16ps(2, 5, 6);
      _tile_dpbf16ps(3, 5, 7);
    }
  }
}

// Blocks b and b + 1 of y, rows r0 .. (one or two tiles).
template <bool two>
void pair_amx(const uint16_t* x, const uint16_t* wb, int64_t M, int64_t K, int64_t N, int64_t b, int64_t r0,
              bool prefetch_next, uint16_t* y, float (*out)[16]) {
  const int64_t block = K * kBlock;  // elements of one weight block
  pair_tiles<two>(x, r0, K, wb, wb + block, prefetch_next ? wb + 2 * block : nullptr, wb + 3 * block);
  _tile_stored(0, out, 64);
  store_tile(out, y, M, N, r0, b);
  _tile_stored(1, out, 64);
  store_tile(out, y, M, N, r0, b + 1);
  if (two) {
    _tile_stored(2, out, 64);
    store_tile(out, y, M, N, r0 + 16, b);
    _tile_stored(3, out, 64);
    store_tile(out, y, M, N, r0 + 16, b + 1);
  }
}

// x: MT * 16 rows of K (zero past M), contiguous. y [M, N].
template <int MT>
void gemm_amx(const uint16_t* x, const uint16_t* w, int64_t M, int64_t K, int64_t blocks, uint16_t* y) {
  const int64_t N = blocks * kBlock;
  kiln::parallel_claims((blocks + kTaskBlocks - 1) / kTaskBlocks, [&](auto claim) {
    kiln::TileConfig cfg(8);
    _tile_loadconfig(&cfg);
    alignas(64) float out[16][16];
    for (int64_t task; (task = claim()) >= 0;) {
      const int64_t b_end = std::min(blocks, (task + 1) * kTaskBlocks);
      for (int64_t b = task * kTaskBlocks; b < b_end; ++b) {
        const uint16_t* wb = w + b * K * kBlock;
        if (MT == 1 || b + 1 == b_end) {  // one row tile, or an odd block left
          block_amx<MT>(x, wb, M, K, N, b, y, out);
          continue;
        }
        pair_amx<true>(x, wb, M, K, N, b, 0, MT <= 2, y, out);
        if (MT == 3) pair_amx<false>(x, wb, M, K, N, b, 32, true, y, out);
        if (MT == 4) pair_amx<true>(x, wb, M, K, N, b, 32, true, y, out);
        ++b;
      }
    }
    _tile_release();
  });
}

// silu(x Wg^T) * (x Wu^T) with gate block b paired with up block b + blocks / 2: one pass over
// rows (two passes past 32), the SwiGLU applied to the tiles before they are written.
template <int MT>
void gemm_silu_amx(const uint16_t* x, const uint16_t* w, int64_t M, int64_t K, int64_t blocks, uint16_t* y) {
  const int64_t half = blocks / 2, I = half * kBlock, block = K * kBlock;
  kiln::parallel_claims((half + kTaskBlocks - 1) / kTaskBlocks, [&](auto claim) {
    kiln::TileConfig cfg(8);
    _tile_loadconfig(&cfg);
    alignas(64) float gate[16][16];
    alignas(64) float up[16][16];
    // A tile row rounded to bf16 (as gemv_bf16 writes it) and widened back, in registers.
    auto as_bf16 = [](const float* row) {
      const __m256i h = (__m256i)_mm512_cvtneps_pbh(_mm512_load_ps(row));
      return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16));
    };
    auto store = [&](int tiles, int64_t r0, int64_t b) {  // tmm 2t (gate), 2t + 1 (up): rows r0 + 16 t ..
      for (int t = 0; t < tiles; ++t) {
        if (t == 0) {
          _tile_stored(0, gate, 64);
          _tile_stored(1, up, 64);
        } else {
          _tile_stored(2, gate, 64);
          _tile_stored(3, up, 64);
        }
        for (int r = 0; r < 16 && r0 + 16 * t + r < M; ++r) {
          kiln::f32x16_to_bf16(kiln::silu_mul512(as_bf16(gate[r]), as_bf16(up[r])), y + (r0 + 16 * t + r) * I + b * kBlock);
        }
      }
    };
    for (int64_t task; (task = claim()) >= 0;) {
      const int64_t b_end = std::min(half, (task + 1) * kTaskBlocks);
      for (int64_t b = task * kTaskBlocks; b < b_end; ++b) {
        const uint16_t* wg = w + b * block;
        const uint16_t* wu = wg + half * block;
        const uint16_t* next_g = b + 1 < half ? wg + block : nullptr;
        pair_tiles<(MT >= 2)>(x, 0, K, wg, wu, MT <= 2 ? next_g : nullptr, wu + block);
        store(MT >= 2 ? 2 : 1, 0, b);
        if (MT > 2) {
          if (MT == 3) pair_tiles<false>(x, 32, K, wg, wu, next_g, wu + block);
          if (MT == 4) pair_tiles<true>(x, 32, K, wg, wu, next_g, wu + block);
          store(MT - 2, 32, b);
        }
      }
    }
    _tile_release();
  });
}

// x's M rows (row stride `stride`) as whole 16-row tiles, rows past M zero, contiguous: the
// tile paths' x operand.
std::vector<uint16_t> padded_rows(const uint16_t* x, int64_t stride, int64_t M, int64_t K) {
  std::vector<uint16_t> out((M + 15) / 16 * 16 * K, 0);
  for (int64_t m = 0; m < M; ++m) std::memcpy(out.data() + m * K, x + m * stride, K * sizeof(uint16_t));
  return out;
}

// f(std::integral_constant<int, MT>{}) for the MT = 1-4 sixteen-row tiles that M rows take.
template <typename F>
void with_row_tiles(int64_t M, F&& f) {
  switch ((M + 15) / 16) {
    case 1: f(std::integral_constant<int, 1>{}); break;
    case 2: f(std::integral_constant<int, 2>{}); break;
    case 3: f(std::integral_constant<int, 3>{}); break;
    default: f(std::integral_constant<int, 4>{}); break;
  }
}
#endif

#if KILN_GEMV
// Several rows without AMX (AVX512-BF16 dot products on the same copy). oneDNN computes these
// shapes at its full rate while a weight sits in cache, but a decode step reads every weight
// from memory once, and there oneDNN loses a fifth of its rate waiting on it. Here the weight is
// read one block pair at a time: the pass of the first rows over a pair asks for the next pair
// into L2 while it computes, the passes of the other rows find the pair in L1/L2. Each output
// is summed exactly as gemv_block sums it (even column pairs, odd column pairs, then the two), so
// a row's bits do not depend on how many rows it is computed with.
constexpr int kAvxRows = 6;  // rows a pass: 6 x 2 blocks x (even, odd) = 24 float32 accumulators

// sum[r][j] = x row r . block j, for R rows (row stride xs) and NB blocks at w[j] ([K/2, 16, 2]).
// next[j] (or nullptr): the blocks to compute after these, asked for into L2 a line of each a
// step from byte `pf` on (advanced; `pf_end`: a block's bytes).
template <int R, int NB>
inline __attribute__((always_inline)) void rows_dot(const uint16_t* x, int64_t xs, const uint16_t* const* w,
                                                    int64_t K, const uint16_t* const* next, int64_t& pf,
                                                    int64_t pf_end, __m512 (&sum)[R][NB]) {
  __m512 even[R][NB], odd[R][NB];
  for (int r = 0; r < R; ++r)
    for (int j = 0; j < NB; ++j) even[r][j] = odd[r][j] = _mm512_setzero_ps();
  auto bcast = [&](int r, int64_t p) {
    uint32_t v;
    std::memcpy(&v, x + r * xs + 2 * p, 4);
    return (__m512bh)_mm512_set1_epi32(v);
  };
  const int64_t pairs = K / 2;
  int64_t p = 0;
  for (; p + 2 <= pairs; p += 2) {
    if (pf < pf_end) {
      for (int j = 0; j < NB; ++j) _mm_prefetch(reinterpret_cast<const char*>(next[j]) + pf, _MM_HINT_T1);
      pf += 64;
    }
    __m512bh we[NB], wo[NB];
    for (int j = 0; j < NB; ++j) {
      we[j] = (__m512bh)_mm512_loadu_si512(w[j] + p * 32);
      wo[j] = (__m512bh)_mm512_loadu_si512(w[j] + (p + 1) * 32);
    }
    for (int r = 0; r < R; ++r) {
      const __m512bh xe = bcast(r, p), xo = bcast(r, p + 1);
      for (int j = 0; j < NB; ++j) {
        even[r][j] = _mm512_dpbf16_ps(even[r][j], we[j], xe);
        odd[r][j] = _mm512_dpbf16_ps(odd[r][j], wo[j], xo);
      }
    }
  }
  if (p < pairs) {
    for (int r = 0; r < R; ++r) {
      const __m512bh xe = bcast(r, p);
      for (int j = 0; j < NB; ++j) even[r][j] = _mm512_dpbf16_ps(even[r][j], (__m512bh)_mm512_loadu_si512(w[j] + p * 32), xe);
    }
  }
  for (int r = 0; r < R; ++r)
    for (int j = 0; j < NB; ++j) sum[r][j] = _mm512_add_ps(even[r][j], odd[r][j]);
}

// f(std::integral_constant<int, R>{}) for R = 1..kAvxRows.
template <typename F>
inline void with_rows(int64_t R, F&& f) {
  switch (R) {
    case 1: f(std::integral_constant<int, 1>{}); break;
    case 2: f(std::integral_constant<int, 2>{}); break;
    case 3: f(std::integral_constant<int, 3>{}); break;
    case 4: f(std::integral_constant<int, 4>{}); break;
    case 5: f(std::integral_constant<int, 5>{}); break;
    default: f(std::integral_constant<int, 6>{}); break;
  }
}

// All M rows against the NB blocks at w[] (next[]: the blocks that follow, to ask for; nullptr
// at the end), then epilogue(r0, sum) for each pass of rows r0 ...
template <int NB, typename Epilogue>
void blocks_avx(const uint16_t* x, int64_t xs, int64_t M, int64_t K, const uint16_t* const* w,
                const uint16_t* const* next, Epilogue&& epilogue) {
  int64_t pf = 0;
  const int64_t pf_end = next[0] == nullptr ? 0 : K * kBlock * int64_t(sizeof(uint16_t));
  for (int64_t r0 = 0; r0 < M; r0 += kAvxRows) {
    with_rows(std::min<int64_t>(kAvxRows, M - r0), [&](auto rows) {
      constexpr int R = decltype(rows)::value;
      __m512 sum[R][NB];
      rows_dot<R, NB>(x + r0 * xs, xs, w, K, next, pf, pf_end, sum);
      epilogue(r0, sum);
    });
  }
}

// gemv_bf16 for 2-64 rows: tasks of two blocks.
void gemm_avx(const uint16_t* x, int64_t xs, const uint16_t* w, int64_t M, int64_t K, int64_t blocks, uint16_t* y) {
  const int64_t N = blocks * kBlock, block = K * kBlock;
  kiln::parallel_claims((blocks + 1) / 2, [&](auto claim) {
    for (int64_t task; (task = claim()) >= 0;) {
      const int64_t b = 2 * task;
      const uint16_t* wb[2] = {w + b * block, w + (b + 1) * block};
      // the blocks this thread most likely claims next (claims run in order within a thread)
      const uint16_t* next[2] = {b + 3 < blocks ? w + (b + 2) * block : nullptr, w + (b + 3) * block};
      auto store = [&](int64_t r0, auto& sum) {
        constexpr int R = std::extent_v<std::remove_reference_t<decltype(sum)>>;
        constexpr int NB = std::extent_v<std::remove_reference_t<decltype(sum)>, 1>;
        for (int r = 0; r < R; ++r)
          for (int j = 0; j < NB; ++j)
            _mm256_storeu_si256(reinterpret_cast<__m256i*>(y + (r0 + r) * N + (b + j) * kBlock),
                                (__m256i)_mm512_cvtneps_pbh(sum[r][j]));
      };
      if (b + 1 < blocks)
        blocks_avx<2>(x, xs, M, K, wb, next, store);
      else
        blocks_avx<1>(x, xs, M, K, wb, next, store);
    }
  });
}

// gemv_silu_bf16 for 2-64 rows: gate block b with up block b + blocks / 2, each rounded to
// bfloat16 as gemv_bf16 writes it before the SwiGLU (the bits of the one-row path).
void gemm_silu_avx(const uint16_t* x, int64_t xs, const uint16_t* w, int64_t M, int64_t K, int64_t blocks,
                   uint16_t* y) {
  const int64_t half = blocks / 2, I = half * kBlock, block = K * kBlock;
  auto as_bf16 = [](__m512 v) {
    return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32((__m256i)_mm512_cvtneps_pbh(v)), 16));
  };
  kiln::parallel_claims(half, [&](auto claim) {
    for (int64_t b; (b = claim()) >= 0;) {
      const uint16_t* wb[2] = {w + b * block, w + (b + half) * block};
      const uint16_t* next[2] = {b + 1 < half ? w + (b + 1) * block : nullptr, w + (b + 1 + half) * block};
      blocks_avx<2>(x, xs, M, K, wb, next, [&](int64_t r0, auto& sum) {
        constexpr int R = std::extent_v<std::remove_reference_t<decltype(sum)>>;
        for (int r = 0; r < R; ++r)
          kiln::f32x16_to_bf16(kiln::silu_mul512(as_bf16(sum[r][0]), as_bf16(sum[r][1])), y + (r0 + r) * I + b * kBlock);
      });
    }
  });
}
#endif

// Rows up to which gemv_bf16 should be preferred to oneDNN (bench/gemv.py, bench/RESULTS.md).
int64_t gemv_bf16_max_rows() {
#if KILN_GEMV_AMX
  if (amx_ready()) return kAmxMaxRows;
#endif
  return KILN_GEMV ? kAvxMaxRows : 1;
}


void check_gemv_args(const at::Tensor& x, const at::Tensor& packed, const char* op) {
  TORCH_CHECK(x.dim() == 2 && x.stride(1) == 1 && x.scalar_type() == at::kBFloat16, op,
              ": x must be bfloat16 [M, K] with unit inner stride");
  TORCH_CHECK(packed.dim() == 4 && packed.is_contiguous() && packed.scalar_type() == at::kBFloat16 &&
                  packed.size(2) == kBlock && packed.size(3) == 2 && packed.size(1) * 2 == x.size(1),
              op, ": packed must come from pack_gemv_bf16 of a [N, K] weight, K = x's columns");
}

// x [M, K] bfloat16 (unit inner stride), packed from pack_gemv_bf16 -> y [M, N].
at::Tensor gemv_bf16(const at::Tensor& x, const at::Tensor& packed) {
  check_gemv_args(x, packed, "gemv_bf16");
  TORCH_CHECK(KILN_GEMV, "gemv_bf16: this CPU has no AVX512-BF16");  // after the argument checks, which hold anywhere
  const int64_t M = x.size(0), K = x.size(1), blocks = packed.size(0), N = blocks * kBlock;
  auto y = at::empty({M, N}, x.options());
#if KILN_GEMV
  const auto* xp = reinterpret_cast<const uint16_t*>(x.const_data_ptr<c10::BFloat16>());
  const auto* wp = reinterpret_cast<const uint16_t*>(packed.const_data_ptr<c10::BFloat16>());
  auto* yp = reinterpret_cast<uint16_t*>(y.mutable_data_ptr<c10::BFloat16>());
  const int64_t x_stride = x.stride(0);
#if KILN_GEMV_AMX
  if (gemv_tile_path(M, K)) {
    const std::vector<uint16_t> xpad = padded_rows(xp, x_stride, M, K);
    with_row_tiles(M, [&](auto mt) { gemm_amx<decltype(mt)::value>(xpad.data(), wp, M, K, blocks, yp); });
    return y;
  }
#endif
  if (M > 1 && M <= kAvxMaxRows) {
    gemm_avx(xp, x_stride, wp, M, K, blocks, yp);
    return y;
  }
  kiln::parallel_claims((blocks + kTaskBlocks - 1) / kTaskBlocks, [&](auto claim) {
    for (int64_t task; (task = claim()) >= 0;)
      for (int64_t b = task * kTaskBlocks; b < std::min(blocks, (task + 1) * kTaskBlocks); ++b)
        for (int64_t m = 0; m < M; ++m) gemv_block(wp + b * K * kBlock, xp + m * x_stride, K, yp + m * N + b * kBlock);
  });
#endif
  return y;
}

// x [M, K] -> silu(x Wg^T) * (x Wu^T) [M, I], `packed` from pack_gemv_bf16 of [Wg; Wu] ([2I, K]):
// gemv_bf16 and SwiGLU in one pass, the bits of silu_and_mul(gemv_bf16(x, packed)) without
// writing and re-reading the [M, 2I] product in between.
at::Tensor gemv_silu_bf16(const at::Tensor& x, const at::Tensor& packed) {
  check_gemv_args(x, packed, "gemv_silu_bf16");
  TORCH_CHECK(packed.size(0) % 2 == 0, "gemv_silu_bf16: the weight's rows must be two halves of a multiple of 16");
  TORCH_CHECK(KILN_GEMV, "gemv_silu_bf16: this CPU has no AVX512-BF16");
  const int64_t M = x.size(0), K = x.size(1), blocks = packed.size(0), half = blocks / 2, I = half * kBlock;
  auto y = at::empty({M, I}, x.options());
#if KILN_GEMV
  const auto* xp = reinterpret_cast<const uint16_t*>(x.const_data_ptr<c10::BFloat16>());
  const auto* wp = reinterpret_cast<const uint16_t*>(packed.const_data_ptr<c10::BFloat16>());
  auto* yp = reinterpret_cast<uint16_t*>(y.mutable_data_ptr<c10::BFloat16>());
  const int64_t x_stride = x.stride(0);
#if KILN_GEMV_AMX
  if (gemv_tile_path(M, K)) {
    const std::vector<uint16_t> xpad = padded_rows(xp, x_stride, M, K);
    with_row_tiles(M, [&](auto mt) { gemm_silu_amx<decltype(mt)::value>(xpad.data(), wp, M, K, blocks, yp); });
    return y;
  }
#endif
  if (M > 1 && M <= kAvxMaxRows) {
    gemm_silu_avx(xp, x_stride, wp, M, K, blocks, yp);
    return y;
  }
  kiln::parallel_claims((half + kTaskBlocks - 1) / kTaskBlocks, [&](auto claim) {
    alignas(64) uint16_t gate[kBlock], up[kBlock];
    for (int64_t task; (task = claim()) >= 0;)
      for (int64_t b = task * kTaskBlocks; b < std::min(half, (task + 1) * kTaskBlocks); ++b)
        for (int64_t m = 0; m < M; ++m) {
          gemv_block(wp + b * K * kBlock, xp + m * x_stride, K, gate);
          gemv_block(wp + (b + half) * K * kBlock, xp + m * x_stride, K, up);
          kiln::f32x16_to_bf16(kiln::silu_mul512(kiln::bf16x16_to_f32(gate), kiln::bf16x16_to_f32(up)),
                               yp + m * I + b * kBlock);
        }
  });
#endif
  return y;
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(kiln_cpu, m) {
  m.def("gemv_bf16_supported() -> bool", &gemv_bf16_supported);  // no tensor arguments: a catch-all kernel
  m.def("gemv_bf16_max_rows() -> int", &gemv_bf16_max_rows);
  m.def("pack_gemv_bf16(Tensor w) -> Tensor");
  m.def("gemv_bf16(Tensor x, Tensor packed) -> Tensor");
  m.def("gemv_silu_bf16(Tensor x, Tensor packed) -> Tensor");
}

TORCH_LIBRARY_IMPL(kiln_cpu, CPU, m) {
  m.impl("pack_gemv_bf16", &pack_gemv_bf16);
  m.impl("gemv_bf16", &gemv_bf16);
  m.impl("gemv_silu_bf16", &gemv_silu_bf16);
}
