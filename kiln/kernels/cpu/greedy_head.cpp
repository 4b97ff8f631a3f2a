// Greedy decoding's LM head without the full logits, for the CPU: the argmax of the bfloat16
// logits gemv_bf16 would write, exactly, while reading an int8 copy of the weight (half the
// bytes of the largest linear of a small model's step) plus a few blocks of the bf16 copy.
//
// The screen: x's rows in two int8 terms (x ~ sx (q1 + q2 / 254)), each weight row in one
// (w ~ sw q), int32 tile products (AMX-INT8, exact). For every logit the screen's value A and a
// rigorous bound E >= |x.w - A| (Cauchy-Schwarz on each quantisation error, plus slack for the
// float32 rounding of both computations) give an interval. A block of 16 logits whose highest
// upper end lies below the row's best lower end, less a margin of two bfloat16 steps (logits
// within a step may round to the same bf16 value, where the first index wins), cannot hold the
// argmax. The blocks left (a handful a row for the default model) are recomputed exactly as
// gemv_bf16 computes them (the same tile products on the same tiles, or the same one-row dot
// kernel): first each row's block with the highest upper end, whose best exact value then
// raises the row's floor for the others, and the first maximum of those bf16 values is the
// answer.
// Registered as torch.ops.kiln_cpu.greedy_head_supported / greedy_head_bf16.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <array>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <mutex>
#include <vector>

#include "amx.h"
#include "gemv.h"
#include "parallel.h"

#if KILN_GEMV && defined(__AMX_TILE__) && defined(__AMX_BF16__) && defined(__AMX_INT8__)
#define KILN_GREEDY_HEAD 1
#else
#define KILN_GREEDY_HEAD 0
#endif

namespace {

using kiln::kBlock;
constexpr int64_t kMaxRows = 64;     // gemv_bf16's tile path: 2-64 rows
constexpr int64_t kTaskBlocks = 8;   // weight blocks a thread claims at a time
constexpr float kQ2 = 254.f;         // x's second int8 term is in units of sx / 254

bool greedy_head_supported() {
#if KILN_GREEDY_HEAD
  return kiln::amx_ready();
#else
  return false;
#endif
}

#if KILN_GREEDY_HEAD
// A float32 upper bound of a non-negative double.
inline float up(double v) { return std::nextafter(static_cast<float>(v), std::numeric_limits<float>::infinity()); }

struct RowScreen {
  float sx = 1.f;    // x's scale
  float xn = 0.f;    // ||x||_2, rounded up
  float en = 0.f;    // ||x - sx (q1 + q2 / 254)||_2, rounded up
  float emax = 0.f;  // the largest bound E of the row's logits
  bool ok = false;   // x finite
};

// Row x [K] bf16 into its two int8 terms q1, q2 and its stats (K a multiple of 8). Doubles, so
// that the error's norm is exact but for a slack far below what the bounds allow.
RowScreen quantize_row(const c10::BFloat16* x, int64_t K, int8_t* q1, int8_t* q2) {
  RowScreen r;
  const auto* raw = reinterpret_cast<const uint16_t*>(x);
  auto load8 = [&](int64_t k) {  // 8 bf16 -> 8 doubles
    const __m256 f = _mm256_castsi256_ps(_mm256_slli_epi32(
        _mm256_cvtepu16_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(raw + k))), 16));
    return _mm512_cvtps_pd(f);
  };
  __m512d amax = _mm512_setzero_pd(), xx = _mm512_setzero_pd();
  __mmask8 bad = 0;
  for (int64_t k = 0; k < K; k += 8) {
    const __m512d v = load8(k);
    bad |= _mm512_cmp_pd_mask(_mm512_sub_pd(v, v), _mm512_setzero_pd(), _CMP_NEQ_UQ);  // inf or NaN
    amax = _mm512_max_pd(amax, _mm512_abs_pd(v));
    xx = _mm512_fmadd_pd(v, v, xx);
  }
  if (bad) return r;
  const double top = _mm512_reduce_max_pd(amax), sq = _mm512_reduce_add_pd(xx);
  const double sx = top > 0.0 ? top / 127.0 : 1.0;
  r.sx = static_cast<float>(sx);  // A multiplies by this float: quantise against it
  const __m512d s = _mm512_set1_pd(r.sx), inv = _mm512_set1_pd(1.0 / r.sx), inv2 = _mm512_set1_pd(kQ2 / r.sx);
  const __m512d s2 = _mm512_set1_pd(r.sx / kQ2), lim = _mm512_set1_pd(127.0), nlim = _mm512_set1_pd(-127.0);
  __m512d ee = _mm512_setzero_pd();
  for (int64_t k = 0; k < K; k += 8) {
    const __m512d v = load8(k);
    const __m512d a = _mm512_min_pd(lim, _mm512_max_pd(nlim, _mm512_roundscale_pd(_mm512_mul_pd(v, inv), _MM_FROUND_TO_NEAREST_INT)));
    const __m512d rest = _mm512_fnmadd_pd(s, a, v);  // v - sx a
    const __m512d b = _mm512_min_pd(lim, _mm512_max_pd(nlim, _mm512_roundscale_pd(_mm512_mul_pd(rest, inv2), _MM_FROUND_TO_NEAREST_INT)));
    const __m512d e = _mm512_fnmadd_pd(s2, b, rest);  // v - sx (a + b / 254), to a few ulps
    ee = _mm512_fmadd_pd(e, e, ee);
    _mm_storel_epi64(reinterpret_cast<__m128i*>(q1 + k), _mm512_cvtepi32_epi8(_mm512_castsi256_si512(_mm512_cvtpd_epi32(a))));
    _mm_storel_epi64(reinterpret_cast<__m128i*>(q2 + k), _mm512_cvtepi32_epi8(_mm512_castsi256_si512(_mm512_cvtpd_epi32(b))));
  }
  const double xn = std::sqrt(sq);
  r.xn = up(xn * (1.0 + 1e-12));
  r.en = up(std::sqrt(_mm512_reduce_add_pd(ee)) * (1.0 + 1e-9) + 1e-9 * xn);
  r.ok = true;
  return r;
}

// The float32 tile product of a 16-row bf16 x tile (row stride K) with weight block wb, as
// gemv_bf16's tile path computes it: zeroed, then one product per 32 columns, in order.
void tile_product(const uint16_t* xt, const uint16_t* wb, int64_t K, float (*acc)[16]) {
  _tile_zero(0);
  for (int64_t k0 = 0; k0 < K; k0 += 32) {
    _tile_loadd(5, wb + k0 * kBlock, 64);
    _tile_loadd(4, xt + k0, K * 2);
    _tile_dpbf16ps(0, 4, 5);
  }
  _tile_stored(0, acc, 64);
}

inline float bf16_to_float(uint16_t h) {
  const uint32_t bits = static_cast<uint32_t>(h) << 16;
  float f;
  std::memcpy(&f, &bits, sizeof f);
  return f;
}

// Blocks whose logits lie below `best_lo - margin` cannot hold the argmax: the margin is two
// bfloat16 steps at the largest magnitude the maximum can have (|best_lo| + 2 E). Increasing
// in best_lo, so a threshold from a running best_lo never exceeds the final one.
inline float threshold(float best_lo, float emax) {
  return best_lo - std::ldexp(std::fabs(best_lo) + 2.f * emax, -6) - 1e-30f;
}

struct Found {  // a block that may hold row m's argmax
  int64_t m, b;
  float hi;     // its highest upper end
};
#endif

// x [M, K] bf16 (unit inner stride, M <= 64), packed = pack_gemv_bf16(W) [V/16, K/2, 16, 2],
// q [V/16, K/4, 16, 4] int8 and stats [3, V] float32 (sw; ||w - sw q|| + 2^-12 ||w||; ||sw q||,
// each rounded up) from kiln.kernels.cpu_ops.pack_greedy_head -> [M] int64: the first index of
// the maximum of row m of gemv_bf16(x, packed), or -1 where x's row is not finite (the caller
// computes that row's logits instead).
at::Tensor greedy_head_bf16(const at::Tensor& x, const at::Tensor& packed, const at::Tensor& q,
                            const at::Tensor& stats) {
  TORCH_CHECK(x.dim() == 2 && x.stride(1) == 1 && x.scalar_type() == at::kBFloat16,
              "greedy_head_bf16: x must be bfloat16 [M, K] with unit inner stride");
  const int64_t M = x.size(0), K = x.size(1);
  TORCH_CHECK(M >= 1 && M <= kMaxRows, "greedy_head_bf16: 1-", kMaxRows, " rows, got ", M);
  TORCH_CHECK(packed.dim() == 4 && packed.is_contiguous() && packed.scalar_type() == at::kBFloat16 &&
                  packed.size(1) * 2 == K && packed.size(2) == kBlock && packed.size(3) == 2,
              "greedy_head_bf16: packed must come from pack_gemv_bf16 of a [V, K] weight");
  const int64_t blocks = packed.size(0), V = blocks * kBlock;
  TORCH_CHECK(K % 64 == 0, "greedy_head_bf16: K must be a multiple of 64, got ", K);
  TORCH_CHECK(q.dim() == 4 && q.is_contiguous() && q.scalar_type() == at::kChar && q.size(0) == blocks &&
                  q.size(1) * 4 == K && q.size(2) == kBlock && q.size(3) == 4,
              "greedy_head_bf16: q must be int8 [V/16, K/4, 16, 4]");
  TORCH_CHECK(stats.dim() == 2 && stats.is_contiguous() && stats.scalar_type() == at::kFloat &&
                  stats.size(0) == 3 && stats.size(1) == V,
              "greedy_head_bf16: stats must be float32 [3, V]");
  TORCH_CHECK(greedy_head_supported(), "greedy_head_bf16: this CPU has no AMX-INT8");
  auto out = at::empty({M}, x.options().dtype(at::kLong));
#if KILN_GREEDY_HEAD
  int64_t* tokens = out.mutable_data_ptr<int64_t>();
  const auto* xp = x.const_data_ptr<c10::BFloat16>();
  const int64_t xs = x.stride(0);
  const float* sw = stats.const_data_ptr<float>();
  const float* alpha = sw + V;
  const float* beta = sw + 2 * V;
  float max_alpha = 0.f, max_beta = 0.f;
  {
    __m512 ma = _mm512_setzero_ps(), mb = _mm512_setzero_ps();
    for (int64_t v = 0; v < V; v += 16) {
      ma = _mm512_max_ps(ma, _mm512_loadu_ps(alpha + v));
      mb = _mm512_max_ps(mb, _mm512_loadu_ps(beta + v));
    }
    max_alpha = _mm512_reduce_max_ps(ma);
    max_beta = _mm512_reduce_max_ps(mb);
  }

  const int64_t MT = (M + 15) / 16, XT = 2 * MT;  // x tiles: q1 of rows 16t.., then q2
  std::vector<int8_t> xq(XT * 16 * K, 0);
  std::vector<RowScreen> rows(M);
  at::parallel_for(0, M, 16, [&](int64_t b, int64_t e) {
    for (int64_t m = b; m < e; ++m) {
      RowScreen& r = rows[m];
      r = quantize_row(xp + m * xs, K, xq.data() + m * K, xq.data() + (MT * 16 + m) * K);
      r.emax = r.xn * max_alpha + r.en * max_beta;
      r.emax = std::nextafter(r.emax, std::numeric_limits<float>::infinity());
    }
  });

  // The screen: every block's 16 intervals per row. A thread keeps each row's running best
  // lower ends (lane-wise) and records the blocks reaching its running threshold.
  const int8_t* qp = q.const_data_ptr<int8_t>();
  const int64_t block_bytes = K * kBlock;  // int8
  std::vector<float> best_lo(M, -std::numeric_limits<float>::infinity());
  std::vector<Found> found;
  std::mutex merge;
  kiln::parallel_claims((blocks + kTaskBlocks - 1) / kTaskBlocks, [&](auto claim) {
    kiln::TileConfig cfg(8);
    _tile_loadconfig(&cfg);
    alignas(64) int32_t c[8][16][16];
    alignas(64) float lo_run[kMaxRows][16];
    float thr[kMaxRows];
    for (int64_t m = 0; m < M; ++m) {
      _mm512_store_ps(lo_run[m], _mm512_set1_ps(-std::numeric_limits<float>::infinity()));
      thr[m] = -std::numeric_limits<float>::infinity();
    }
    std::vector<Found> mine;
    for (int64_t task; (task = claim()) >= 0;) {
      for (int64_t b = task * kTaskBlocks; b < std::min(blocks, (task + 1) * kTaskBlocks); ++b) {
        const int8_t* wb = qp + b * block_bytes;
        for (int64_t t0 = 0; t0 < XT; t0 += 4) {  // four x tiles against each weight tile
          const int64_t n = std::min<int64_t>(4, XT - t0);
          _tile_zero(0);
          if (n > 1) _tile_zero(1);
          if (n > 2) _tile_zero(2);
          if (n > 3) _tile_zero(3);
          const int8_t* xt = xq.data() + t0 * 16 * K;
          for (int64_t k0 = 0; k0 < K; k0 += 64) {
            if (t0 == 0 && b + 1 < blocks) {  // the next block into L2, a kilobyte a step
              const char* ahead = reinterpret_cast<const char*>(wb + block_bytes + k0 * kBlock);
              for (int line = 0; line < 1024; line += 64) _mm_prefetch(ahead + line, _MM_HINT_T1);
            }
            _tile_loadd(5, wb + k0 * kBlock, 64);
            _tile_loadd(4, xt + k0, K);
            _tile_dpbssd(0, 4, 5);
            if (n > 1) {
              _tile_loadd(4, xt + 16 * K + k0, K);
              _tile_dpbssd(1, 4, 5);
            }
            if (n > 2) {
              _tile_loadd(4, xt + 32 * K + k0, K);
              _tile_dpbssd(2, 4, 5);
            }
            if (n > 3) {
              _tile_loadd(4, xt + 48 * K + k0, K);
              _tile_dpbssd(3, 4, 5);
            }
          }
          _tile_stored(0, c[t0], 64);
          if (n > 1) _tile_stored(1, c[t0 + 1], 64);
          if (n > 2) _tile_stored(2, c[t0 + 2], 64);
          if (n > 3) _tile_stored(3, c[t0 + 3], 64);
        }
        const __m512 swv = _mm512_loadu_ps(sw + b * kBlock), av = _mm512_loadu_ps(alpha + b * kBlock),
                     bv = _mm512_loadu_ps(beta + b * kBlock), inv = _mm512_set1_ps(1.f / kQ2);
        for (int64_t m = 0; m < M; ++m) {
          const RowScreen& r = rows[m];
          if (!r.ok) continue;
          const __m512 c1 = _mm512_cvtepi32_ps(_mm512_load_si512(c[m / 16][m % 16]));
          const __m512 c2 = _mm512_cvtepi32_ps(_mm512_load_si512(c[MT + m / 16][m % 16]));
          const __m512 a = _mm512_mul_ps(_mm512_fmadd_ps(c2, inv, c1), _mm512_mul_ps(swv, _mm512_set1_ps(r.sx)));
          const __m512 e = _mm512_fmadd_ps(_mm512_set1_ps(r.xn), av, _mm512_mul_ps(_mm512_set1_ps(r.en), bv));
          const __m512 hi = _mm512_add_ps(a, e);
          _mm512_store_ps(lo_run[m], _mm512_max_ps(_mm512_load_ps(lo_run[m]), _mm512_sub_ps(a, e)));
          if (_mm512_cmp_ps_mask(hi, _mm512_set1_ps(thr[m]), _CMP_GE_OQ))
            mine.push_back({m, b, _mm512_reduce_max_ps(hi)});
        }
      }
      for (int64_t m = 0; m < M; ++m) thr[m] = threshold(_mm512_reduce_max_ps(_mm512_load_ps(lo_run[m])), rows[m].emax);
    }
    _tile_release();
    std::lock_guard<std::mutex> hold(merge);
    for (int64_t m = 0; m < M; ++m) best_lo[m] = std::max(best_lo[m], _mm512_reduce_max_ps(_mm512_load_ps(lo_run[m])));
    found.insert(found.end(), mine.begin(), mine.end());
  });

  // Per row: the recorded blocks still above the final threshold (its margin now from the
  // highest upper end recorded, which bounds the maximum: an unrecorded block's upper ends lie
  // below best_lo), recomputed exactly, in index order.
  std::vector<float> best_hi(M, -std::numeric_limits<float>::infinity());
  for (const Found& f : found) best_hi[f.m] = std::max(best_hi[f.m], f.hi);
  std::vector<float> floor(M);
  for (int64_t m = 0; m < M; ++m)
    floor[m] = best_lo[m] - std::ldexp(std::max(std::fabs(best_lo[m]), std::fabs(best_hi[m])), -6) - 1e-30f;
  found.erase(std::remove_if(found.begin(), found.end(), [&](const Found& f) { return f.hi < floor[f.m]; }), found.end());
  // One tile product per (block, 16-row tile) serves every row of the tile that needs the block.
  const bool tiles = kiln::gemv_tile_path(M, K);  // as gemv_bf16 computes these rows
  auto group_of = [&](const Found& f) { return f.b * 4 + (tiles ? f.m / 16 : 0); };
  std::sort(found.begin(), found.end(), [&](const Found& a, const Found& b) {
    return group_of(a) != group_of(b) ? group_of(a) < group_of(b) : a.m < b.m;
  });
  std::vector<int64_t> groups;  // start of each group in `found`, then its end
  for (size_t i = 0; i < found.size(); ++i)
    if (i == 0 || group_of(found[i]) != group_of(found[i - 1])) groups.push_back(i);
  groups.push_back(found.size());
  const auto* wp = reinterpret_cast<const uint16_t*>(packed.const_data_ptr<c10::BFloat16>());
  std::vector<uint16_t> xpad;
  if (tiles) {
    xpad.assign(MT * 16 * K, 0);
    for (int64_t m = 0; m < M; ++m) std::memcpy(xpad.data() + m * K, xp + m * xs, K * sizeof(uint16_t));
  }
  std::vector<std::array<uint16_t, 16>> logits(found.size());
  std::vector<uint8_t> done(found.size(), 0), skip(found.size(), 0);
  // First each row's block with the highest upper end (most often the one holding the answer):
  // its best exact value B raises the row's floor, since only a block that may reach B less a
  // bf16 step can hold the maximum or a tie with it. On flat logits this halves the rest.
  std::vector<int64_t> probe(M, -1);
  for (size_t i = 0; i < found.size(); ++i) {
    const int64_t m = found[i].m;
    if (probe[m] < 0 || found[i].hi > found[probe[m]].hi) probe[m] = i;
  }
  at::parallel_for(0, M, 1, [&](int64_t begin, int64_t end) {
    if (tiles) {
      kiln::TileConfig cfg(8);
      _tile_loadconfig(&cfg);
    }
    alignas(64) float acc[16][16];
    for (int64_t m = begin; m < end; ++m) {
      const int64_t i = probe[m];
      if (i < 0) continue;
      const uint16_t* wb = wp + found[i].b * K * kBlock;
      if (tiles) {
        tile_product(xpad.data() + (m / 16) * 16 * K, wb, K, acc);
        _mm256_storeu_si256(reinterpret_cast<__m256i*>(logits[i].data()),
                            (__m256i)_mm512_cvtneps_pbh(_mm512_load_ps(acc[m % 16])));
      } else {
        kiln::gemv_block(wb, reinterpret_cast<const uint16_t*>(xp + m * xs), K, logits[i].data());
      }
      done[i] = 1;
      float b = -std::numeric_limits<float>::infinity();
      for (int j = 0; j < 16; ++j) b = std::max(b, bf16_to_float(logits[i][j]));
      floor[m] = std::max(floor[m], b - std::ldexp(std::fabs(b), -6) - 1e-30f);
    }
    if (tiles) _tile_release();
  });
  for (size_t i = 0; i < found.size(); ++i) skip[i] = !done[i] && found[i].hi < floor[found[i].m];
  // The rest: one tile product per group serves every row of the tile that still needs it.
  at::parallel_for(0, static_cast<int64_t>(groups.size()) - 1, 1, [&](int64_t begin, int64_t end) {
    if (tiles) {
      kiln::TileConfig cfg(8);
      _tile_loadconfig(&cfg);
    }
    alignas(64) float acc[16][16];
    for (int64_t g = begin; g < end; ++g) {
      bool needed = false;
      for (int64_t i = groups[g]; i < groups[g + 1]; ++i) needed |= !done[i] && !skip[i];
      if (!needed) continue;
      const Found& head = found[groups[g]];
      const uint16_t* wb = wp + head.b * K * kBlock;
      if (!tiles) {
        kiln::gemv_block(wb, reinterpret_cast<const uint16_t*>(xp), K, logits[groups[g]].data());
        continue;
      }
      tile_product(xpad.data() + (head.m / 16) * 16 * K, wb, K, acc);
      for (int64_t i = groups[g]; i < groups[g + 1]; ++i)
        if (!done[i] && !skip[i])
          _mm256_storeu_si256(reinterpret_cast<__m256i*>(logits[i].data()),
                              (__m256i)_mm512_cvtneps_pbh(_mm512_load_ps(acc[found[i].m % 16])));
    }
    if (tiles) _tile_release();
  });
  // The first maximum per row: its blocks come in index order.
  std::vector<float> best(M, 0.f);
  for (int64_t m = 0; m < M; ++m) tokens[m] = -1;
  for (size_t i = 0; i < found.size(); ++i) {
    if (skip[i]) continue;
    const int64_t m = found[i].m;
    for (int j = 0; j < 16; ++j) {
      const float v = bf16_to_float(logits[i][j]);
      if (tokens[m] < 0 || v > best[m]) {
        best[m] = v;
        tokens[m] = found[i].b * kBlock + j;
      }
    }
  }
  for (int64_t m = 0; m < M; ++m)
    if (!rows[m].ok || !std::isfinite(floor[m]) || !std::isfinite(best_hi[m])) tokens[m] = -1;
#endif
  return out;
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(kiln_cpu, m) {
  m.def("greedy_head_supported() -> bool", &greedy_head_supported);
  m.def("greedy_head_bf16(Tensor x, Tensor packed, Tensor q, Tensor stats) -> Tensor");
}

TORCH_LIBRARY_IMPL(kiln_cpu, CPU, m) { m.impl("greedy_head_bf16", &greedy_head_bf16); }
