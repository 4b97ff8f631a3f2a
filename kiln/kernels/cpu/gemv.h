// The one-row bfloat16 dot kernel of gemv.cpp's layout, shared with greedy_head.cpp (whose
// exact recomputation of a few logits must round exactly as gemv_bf16 does).
#pragma once

#include <cstdint>
#include <cstring>

#include "amx.h"

#if defined(__AVX512F__) && defined(__AVX512BF16__)
#include <immintrin.h>
#define KILN_GEMV 1
#else
#define KILN_GEMV 0
#endif

namespace kiln {

constexpr int64_t kBlock = 16;  // output rows a block of the packed weight (one float32 vector)

#if KILN_GEMV
// One block of 16 outputs: w the block ([K/2, 16, 2]), x one row [K], y 16 outputs.
inline void gemv_block(const uint16_t* w, const uint16_t* x, int64_t K, uint16_t* y) {
  __m512 acc0 = _mm512_setzero_ps(), acc1 = _mm512_setzero_ps();
  const int64_t pairs = K / 2;
  int64_t p = 0;
  for (; p + 2 <= pairs; p += 2) {
    _mm_prefetch(reinterpret_cast<const char*>(w + (p + 16) * 32), _MM_HINT_T0);
    uint32_t x0, x1;
    std::memcpy(&x0, x + 2 * p, 4);
    std::memcpy(&x1, x + 2 * p + 2, 4);
    acc0 = _mm512_dpbf16_ps(acc0, (__m512bh)_mm512_loadu_si512(w + p * 32), (__m512bh)_mm512_set1_epi32(x0));
    acc1 = _mm512_dpbf16_ps(acc1, (__m512bh)_mm512_loadu_si512(w + (p + 1) * 32), (__m512bh)_mm512_set1_epi32(x1));
  }
  if (p < pairs) {
    uint32_t x0;
    std::memcpy(&x0, x + 2 * p, 4);
    acc0 = _mm512_dpbf16_ps(acc0, (__m512bh)_mm512_loadu_si512(w + p * 32), (__m512bh)_mm512_set1_epi32(x0));
  }
  // Round to nearest even, as c10::BFloat16 does.
  _mm256_storeu_si256(reinterpret_cast<__m256i*>(y), (__m256i)_mm512_cvtneps_pbh(_mm512_add_ps(acc0, acc1)));
}
#endif

#if KILN_GEMV && defined(__AMX_TILE__) && defined(__AMX_BF16__)
#define KILN_GEMV_AMX 1
constexpr int64_t kAmxMaxRows = 64;  // rows up to which the tile path runs

// Whether gemv_bf16 and gemv_silu_bf16 compute M rows of K columns on AMX tiles (else one row
// at a time with gemv_block): the rounding of their results depends on it.
inline bool gemv_tile_path(int64_t M, int64_t K) { return M > 1 && M <= kAmxMaxRows && K % 32 == 0 && amx_ready(); }
#else
#define KILN_GEMV_AMX 0
#endif

}  // namespace kiln
