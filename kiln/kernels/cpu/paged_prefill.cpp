// Prefill attention over the paged KV cache, for the CPU, bfloat16: every prefill (or prefill
// chunk) of a step in one call per layer. Each sequence's new queries attend causally to its
// whole context (cached prefix + the new tokens, already written to the cache), read in place
// through its block table, so a prompt behind a cached prefix needs no gather copy and no mask.
//
// On AMX tiles (CPUs with AMX-BF16; elsewhere the backend keeps SDPA). A task is (sequence, KV
// head, 16 query positions) with the G query heads of its group; each (sequence, KV head)'s keys
// are packed once into tile operands for all its query tiles. Scores (16 queries x 32 keys) and
// P.V are tile products; scale, causal mask and the online softmax run in AVX-512 on the score
// rows, with probabilities rounded to bf16 for the P.V product (as SDPA's bf16 kernel does).
// Key tiles past a query tile's last position are never visited. Scores, softmax and the
// output accumulate in float32.
// Registered as torch.ops.kiln_cpu.paged_prefill (in place into `out`); built by cpu_ops.py.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <initializer_list>
#include <limits>
#include <memory>
#include <vector>

#include "amx.h"
#include "vec.h"

namespace {

#if defined(__AVX512F__) && defined(__AVX512BF16__)
#define KILN_PREFILL 1
constexpr int QT = 16;  // query positions per tile: an AMX tile's rows
constexpr int KT = 32;  // keys per key tile: an AMX tile's bf16 columns (two 16-key score tiles)

// exp(x) for x <= 0, exactly 0 below -87 (masked keys are -inf; a denormal there would send
// every later multiply-add down a slow microcode path). The fast form (vec.h): its 2.7e-6
// relative error is far below the bf16 rounding the probabilities get, and the exponentials
// bound this kernel.
inline __m512 exp_or_zero(__m512 x) {
  return _mm512_maskz_mov_ps(_mm512_cmp_ps_mask(x, _mm512_set1_ps(-87.f), _CMP_GE_OQ), kiln::exp512_fast(x));
}

// One query row's scores of a key tile (32 floats): scaled, causally masked (the row sees key
// j0 + c iff c <= lim = its position - j0), stored back; returns their max.
inline float scale_mask_row(float* row, __m512 scale, int64_t lim) {
  __m512 s0 = _mm512_mul_ps(_mm512_load_ps(row), scale);
  __m512 s1 = _mm512_mul_ps(_mm512_load_ps(row + 16), scale);
  if (lim < KT - 1) {
    const __m512i iota = _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15);
    const __m512i lv = _mm512_set1_epi32(static_cast<int>(lim));
    const __m512 neg_inf = _mm512_set1_ps(-std::numeric_limits<float>::infinity());
    s0 = _mm512_mask_mov_ps(s0, _mm512_cmpgt_epi32_mask(iota, lv), neg_inf);
    s1 = _mm512_mask_mov_ps(s1, _mm512_cmpgt_epi32_mask(_mm512_add_epi32(iota, _mm512_set1_epi32(16)), lv), neg_inf);
  }
  _mm512_store_ps(row, s0);
  _mm512_store_ps(row + 16, s1);
  return _mm512_reduce_max_ps(_mm512_max_ps(s0, s1));
}

// Every tile is 16 rows of 64 bytes: scores (tmm0, tmm1: 16 queries x 16 keys each),
// queries (tmm2: 32 head dims), keys (tmm3: 16 dim pairs x 16 keys), probabilities (tmm4:
// 32 keys), values (tmm5: 16 key pairs x 16 dims) and the P.V product (tmm6). Head size 64
// instead: queries then probabilities in tmm2, keys then values in tmm3, the output in tmm4-7.

// One key tile of one (sequence, KV head), packed for the tile multiplies: K as [D/32 steps]
// [2 halves][16 dim pairs][16 keys] pairs (the score product's B operand), V as [D/16 column
// tiles][16 key pairs][16 dims] pairs (the P.V product's B operand). Keys past the context are 0.
template <int D>
struct alignas(64) PackedKeys {
  uint32_t k[D / 32][2][16][16];
  uint32_t v[D / 16][16][16];
};

template <int D>
void pack_keys(const uint16_t* k, const uint16_t* v, const int64_t* table, int64_t block_size,
               int64_t slot_stride, int64_t h, int64_t j0, int64_t ctx, PackedKeys<D>& out) {
  const int nk = static_cast<int>(std::min<int64_t>(KT, ctx - j0));
  auto row = [&](const uint16_t* cache, int c) {
    const int64_t pos = j0 + c;
    return cache + (table[pos / block_size] * block_size + pos % block_size) * slot_stride + h * D;
  };
  if (block_size % 16 != 0) {  // keys of a half-tile may straddle blocks: element by element
    std::memset(&out, 0, sizeof(out));
    for (int c = 0; c < nk; ++c) {
      const uint32_t* kr = reinterpret_cast<const uint32_t*>(row(k, c));
      for (int dp = 0; dp < D / 2; ++dp) out.k[dp / 16][c / 16][dp % 16][c % 16] = kr[dp];
      const uint16_t* vr = row(v, c);
      uint16_t* vv = reinterpret_cast<uint16_t*>(out.v);
      for (int d = 0; d < D; ++d) vv[((d / 16) * 16 + c / 2) * 32 + (d % 16) * 2 + c % 2] = vr[d];
    }
    return;
  }
  // 16 consecutive keys from a 16-aligned position share a block: consecutive slots.
  const __m512i iota = _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15);
  const __m512i rows = _mm512_mullo_epi32(iota, _mm512_set1_epi32(static_cast<int>(slot_stride / 2)));
  for (int half = 0; half < 2; ++half) {
    const int n = std::max(0, std::min(16, nk - half * 16));
    const __mmask16 valid = static_cast<__mmask16>((1u << n) - 1u);
    const int* base = n ? reinterpret_cast<const int*>(row(k, half * 16)) : nullptr;
    for (int dp = 0; dp < D / 2; ++dp) {
      const __m512i col = n ? _mm512_mask_i32gather_epi32(_mm512_setzero_si512(), valid,
                                                            _mm512_add_epi32(rows, _mm512_set1_epi32(dp)), base, 4)
                            : _mm512_setzero_si512();
      _mm512_store_si512(out.k[dp / 16][half][dp % 16], col);
    }
  }
  // V: rows c and c + 1 interleaved element by element, 16 columns per output row.
  static const kiln::PairInterleave interleave;
  for (int c = 0; c < KT; c += 2)
    interleave.rows<D>(c < nk ? row(v, c) : nullptr, c + 1 < nk ? row(v, c + 1) : nullptr, out.v, c / 2);
}

// Pass 1 of both kernels: every (sequence, KV head, key tile) packed once, all query tiles of
// the sequence then share it; and where each prefill's packs and tasks start.
template <int D>
struct PackedPrefills {
  std::vector<int64_t> first_pack, first_task;
  std::unique_ptr<PackedKeys<D>[]> keys;
  // The packs of prefill p's KV head h.
  const PackedKeys<D>* of(int64_t p, int64_t h, const int64_t* ctxlens) const {
    return keys.get() + first_pack[p] + h * ((ctxlens[p] + KT - 1) / KT);
  }
};

template <int D>
PackedPrefills<D> pack_prefills(const uint16_t* k, const uint16_t* v, const int64_t* tables, int64_t max_blocks,
                                const int64_t* qlens, const int64_t* ctxlens, int64_t P, int64_t Hkv,
                                int64_t block_size) {
  PackedPrefills<D> pp{std::vector<int64_t>(P + 1, 0), std::vector<int64_t>(P + 1, 0), nullptr};
  for (int64_t p = 0; p < P; ++p) {
    pp.first_pack[p + 1] = pp.first_pack[p] + Hkv * ((ctxlens[p] + KT - 1) / KT);
    pp.first_task[p + 1] = pp.first_task[p] + Hkv * ((qlens[p] + QT - 1) / QT);
  }
  // Left uninitialised: pack_keys writes every element (a vector would zero them all first).
  pp.keys.reset(new PackedKeys<D>[pp.first_pack[P]]);
  at::parallel_for(0, pp.first_pack[P], 8, [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) {
      const int64_t p = std::upper_bound(pp.first_pack.begin(), pp.first_pack.end(), i) - pp.first_pack.begin() - 1;
      const int64_t tiles = (ctxlens[p] + KT - 1) / KT, local = i - pp.first_pack[p];
      pack_keys<D>(k, v, tables + p * max_blocks, block_size, Hkv * D, local / tiles, (local % tiles) * KT,
                   ctxlens[p], pp.keys[i]);
    }
  });
  return pp;
}

// Pass 2's unit: (sequence p, KV head h, up to 16 query positions from i0) with the G heads of
// its group.
struct QueryTile {
  int64_t p, h, i0, qbase, row0;  // qbase: position of the tile's first query; row0: its row of q
  int nq;
};

inline QueryTile query_tile(const std::vector<int64_t>& first_task, const int64_t* starts, const int64_t* qlens,
                            const int64_t* ctxlens, int64_t task) {
  const int64_t p = std::upper_bound(first_task.begin(), first_task.end(), task) - first_task.begin() - 1;
  const int64_t qlen = qlens[p], tiles = (qlen + QT - 1) / QT, local = task - first_task[p];
  // A query tile's cost grows with its position (causal) and each thread gets one contiguous
  // range of tasks: take a sequence's tiles first, last, second, second last... so that any
  // range holds early and late tiles alike.
  const int64_t h = local / tiles, j = local % tiles;
  const int64_t i0 = (j % 2 == 0 ? j / 2 : tiles - 1 - j / 2) * QT;
  return QueryTile{p, h, i0, ctxlens[p] - qlen + i0, starts[p] + i0, static_cast<int>(std::min<int64_t>(QT, qlen - i0))};
}

// A tile's queries (rows past the prompt zero), and its running output, max and sum reset.
template <int D, int G>
void start_tile(const QueryTile& t, const uint16_t* q, int64_t q_stride, uint16_t (*qbuf)[QT][D],
                float (*o)[QT][D], float (*m)[QT], float (*l)[QT]) {
  std::memset(qbuf, 0, sizeof(uint16_t) * G * QT * D);
  for (int r = 0; r < t.nq; ++r)
    for (int g = 0; g < G; ++g)
      std::memcpy(qbuf[g][r], q + (t.row0 + r) * q_stride + (t.h * G + g) * D, D * sizeof(uint16_t));
  std::memset(o, 0, sizeof(float) * G * QT * D);
  for (int g = 0; g < G; ++g)
    for (int r = 0; r < QT; ++r) {
      m[g][r] = -std::numeric_limits<float>::infinity();
      l[g][r] = 0.f;
    }
}

// The tile's output rows: the running output over its sum, in bf16.
template <int D, int G>
void finish_tile(const QueryTile& t, const float (*o)[QT][D], const float (*l)[QT], uint16_t* out, int64_t Hkv) {
  for (int g = 0; g < G; ++g)
    for (int r = 0; r < t.nq; ++r) {
      const __m512 inv = _mm512_set1_ps(1.f / l[g][r]);
      uint16_t* orow = out + (t.row0 + r) * Hkv * G * D + (t.h * G + g) * D;
      for (int i = 0; i < D / 16; ++i) kiln::f32x16_to_bf16(_mm512_mul_ps(_mm512_load_ps(&o[g][r][i * 16]), inv), orow + i * 16);
    }
}

#endif  // KILN_PREFILL

#if defined(KILN_PREFILL) && defined(__AMX_TILE__) && defined(__AMX_BF16__)
#define KILN_AMX 1
constexpr float kLazyMax = 8.f;  // head size 64: how far scores may pass the running max unrescaled
using kiln::amx_ready;

template <int D, int G>
void prefill_amx(const uint16_t* q, int64_t q_stride, const uint16_t* k, const uint16_t* v,
                 const int64_t* tables, int64_t max_blocks, const int64_t* starts, const int64_t* qlens,
                 const int64_t* ctxlens, int64_t P, uint16_t* out, int64_t Hkv, int64_t block_size,
                 float scale) {
  constexpr int V16 = D / 16;
  const PackedPrefills<D> pp = pack_prefills<D>(k, v, tables, max_blocks, qlens, ctxlens, P, Hkv, block_size);
  at::parallel_for(0, pp.first_task[P], 1, [&](int64_t begin, int64_t end) {
    kiln::TileConfig cfg(8);
    _tile_loadconfig(&cfg);
    alignas(64) uint16_t qbuf[G][QT][D];  // the tile's queries, rows past the prompt zero
    alignas(64) float o[G][QT][D];        // running output (unnormalised)
    alignas(64) float sbuf[QT][KT];       // one key tile's scores
    alignas(64) uint16_t pbuf[QT][KT];    // ... and probabilities, bf16
    alignas(64) float tbuf[QT][16];       // P.V of one column tile
    alignas(64) float m[G][QT], l[G][QT], mnew[QT], sums[QT], alpha[QT];
    const __m512 sv = _mm512_set1_ps(scale);
    for (int64_t task = begin; task < end; ++task) {
      const QueryTile t = query_tile(pp.first_task, starts, qlens, ctxlens, task);
      const int nq = t.nq;
      const int64_t qbase = t.qbase;
      const PackedKeys<D>* keys = pp.of(t.p, t.h, ctxlens);
      start_tile<D, G>(t, q, q_stride, qbuf, o, m, l);
      const int64_t kend = qbase + nq;  // keys [0, kend): the last query's causal limit
      if constexpr (D == 64) {
        // Head size 64: a head's whole output is four tiles (tmm4-7), so P.V accumulates in
        // the tiles across key tiles. The running max moves only when a row's new scores
        // exceed it by more than kLazyMax (e^8: no overflow, and bf16 probabilities keep their
        // relative precision at any scale); only then are the output tiles stored, rescaled
        // and reloaded. Heads one at a time; the packed keys stay in L2 between them.
        for (int g = 0; g < G; ++g) {
          _tile_zero(4);
          _tile_zero(5);
          _tile_zero(6);
          _tile_zero(7);
          for (int64_t j0 = 0, kt = 0; j0 < kend; j0 += KT, ++kt) {
            const PackedKeys<D>& pk = keys[kt];
            _tile_zero(0);
            _tile_zero(1);
            _tile_loadd(2, &qbuf[g][0][0], D * sizeof(uint16_t));
            _tile_loadd(3, pk.k[0][0], 64);
            _tile_dpbf16ps(0, 2, 3);
            _tile_loadd(3, pk.k[0][1], 64);
            _tile_dpbf16ps(1, 2, 3);
            _tile_loadd(2, &qbuf[g][0][32], D * sizeof(uint16_t));
            _tile_loadd(3, pk.k[1][0], 64);
            _tile_dpbf16ps(0, 2, 3);
            _tile_loadd(3, pk.k[1][1], 64);
            _tile_dpbf16ps(1, 2, 3);
            _tile_stored(0, &sbuf[0][0], KT * sizeof(float));
            _tile_stored(1, &sbuf[0][16], KT * sizeof(float));
            for (int r = 0; r < QT; ++r) mnew[r] = scale_mask_row(sbuf[r], sv, qbase + r - j0);
            const __m512 mo = _mm512_load_ps(m[g]), mt = _mm512_load_ps(mnew);
            if (_mm512_cmp_ps_mask(mt, _mm512_add_ps(mo, _mm512_set1_ps(kLazyMax)), _CMP_GT_OQ)) {
              const __m512 mn = _mm512_max_ps(mo, mt);
              _mm512_store_ps(alpha, exp_or_zero(_mm512_sub_ps(mo, mn)));
              _mm512_store_ps(m[g], mn);
              _mm512_store_ps(l[g], _mm512_mul_ps(_mm512_load_ps(l[g]), _mm512_load_ps(alpha)));
              if (j0 > 0) {  // (the first key tile finds them zero) o[g] is this head's scratch until its end
                _tile_stored(4, &o[g][0][0], D * sizeof(float));
                _tile_stored(5, &o[g][0][16], D * sizeof(float));
                _tile_stored(6, &o[g][0][32], D * sizeof(float));
                _tile_stored(7, &o[g][0][48], D * sizeof(float));
                for (int r = 0; r < QT; ++r) {
                  const __m512 a = _mm512_set1_ps(alpha[r]);
                  for (int i = 0; i < D; i += 16) _mm512_store_ps(&o[g][r][i], _mm512_mul_ps(_mm512_load_ps(&o[g][r][i]), a));
                }
                _tile_loadd(4, &o[g][0][0], D * sizeof(float));
                _tile_loadd(5, &o[g][0][16], D * sizeof(float));
                _tile_loadd(6, &o[g][0][32], D * sizeof(float));
                _tile_loadd(7, &o[g][0][48], D * sizeof(float));
              }
            }
            for (int r = 0; r < QT; ++r) {
              const __m512 mr = _mm512_set1_ps(m[g][r]);
              const __m512 e0 = exp_or_zero(_mm512_sub_ps(_mm512_load_ps(&sbuf[r][0]), mr));
              const __m512 e1 = exp_or_zero(_mm512_sub_ps(_mm512_load_ps(&sbuf[r][16]), mr));
              sums[r] = _mm512_reduce_add_ps(_mm512_add_ps(e0, e1));
              _mm512_store_si512(pbuf[r], (__m512i)_mm512_cvtne2ps_pbh(e1, e0));
            }
            _mm512_store_ps(l[g], _mm512_add_ps(_mm512_load_ps(l[g]), _mm512_load_ps(sums)));
            _tile_loadd(2, &pbuf[0][0], KT * sizeof(uint16_t));
            _tile_loadd(3, pk.v[0], 64);
            _tile_dpbf16ps(4, 2, 3);
            _tile_loadd(3, pk.v[1], 64);
            _tile_dpbf16ps(5, 2, 3);
            _tile_loadd(3, pk.v[2], 64);
            _tile_dpbf16ps(6, 2, 3);
            _tile_loadd(3, pk.v[3], 64);
            _tile_dpbf16ps(7, 2, 3);
          }
          _tile_stored(4, &o[g][0][0], D * sizeof(float));
          _tile_stored(5, &o[g][0][16], D * sizeof(float));
          _tile_stored(6, &o[g][0][32], D * sizeof(float));
          _tile_stored(7, &o[g][0][48], D * sizeof(float));
        }
      } else {
        for (int64_t j0 = 0, kt = 0; j0 < kend; j0 += KT, ++kt) {
          const PackedKeys<D>& pk = keys[kt];
          for (int g = 0; g < G; ++g) {
            _tile_zero(0);
            _tile_zero(1);
            for (int ks = 0; ks < D / 32; ++ks) {
              _tile_loadd(2, &qbuf[g][0][ks * 32], D * sizeof(uint16_t));
              _tile_loadd(3, pk.k[ks][0], 64);
              _tile_dpbf16ps(0, 2, 3);
              _tile_loadd(3, pk.k[ks][1], 64);
              _tile_dpbf16ps(1, 2, 3);
            }
            _tile_stored(0, &sbuf[0][0], KT * sizeof(float));
            _tile_stored(1, &sbuf[0][16], KT * sizeof(float));
            for (int r = 0; r < QT; ++r) mnew[r] = std::max(m[g][r], scale_mask_row(sbuf[r], sv, qbase + r - j0));
            // Every query sees key 0, so each row's max is finite from the first key tile on.
            const __m512 mo = _mm512_load_ps(m[g]), mn = _mm512_load_ps(mnew);
            _mm512_store_ps(alpha, exp_or_zero(_mm512_sub_ps(mo, mn)));
            _mm512_store_ps(m[g], mn);
            for (int r = 0; r < QT; ++r) {
              const __m512 mr = _mm512_set1_ps(mnew[r]);
              const __m512 e0 = exp_or_zero(_mm512_sub_ps(_mm512_load_ps(&sbuf[r][0]), mr));
              const __m512 e1 = exp_or_zero(_mm512_sub_ps(_mm512_load_ps(&sbuf[r][16]), mr));
              sums[r] = _mm512_reduce_add_ps(_mm512_add_ps(e0, e1));
              _mm512_store_si512(pbuf[r], (__m512i)_mm512_cvtne2ps_pbh(e1, e0));
            }
            _mm512_store_ps(l[g], _mm512_fmadd_ps(_mm512_load_ps(l[g]), _mm512_load_ps(alpha), _mm512_load_ps(sums)));
            _tile_loadd(4, &pbuf[0][0], KT * sizeof(uint16_t));
            for (int dt = 0; dt < V16; ++dt) {
              _tile_zero(6);
              _tile_loadd(5, pk.v[dt], 64);
              _tile_dpbf16ps(6, 4, 5);
              _tile_stored(6, &tbuf[0][0], 64);
              for (int r = 0; r < QT; ++r) {
                float* orow = &o[g][r][dt * 16];
                _mm512_store_ps(orow, _mm512_fmadd_ps(_mm512_load_ps(orow), _mm512_set1_ps(alpha[r]),
                                                      _mm512_load_ps(tbuf[r])));
              }
            }
          }
        }
      }
      finish_tile<D, G>(t, o, l, out, Hkv);
    }
    _tile_release();
  });
}

#endif  // KILN_AMX

#if defined(KILN_PREFILL)
// CPUs with AVX512-BF16 but no AMX: the same tasks, packed keys and online softmax, with the two
// products as AVX512-BF16 dot products laid out so that no score needs a horizontal sum. Scores:
// a vector holds one query's 16 keys (the packed K half-tile: a dim pair of 16 keys per vector),
// and each broadcast query dim pair multiplies it; 4 query rows share every key load. P.V: a
// vector holds 16 output dims of one query (the packed V: a key pair of 16 dims per vector), and
// each broadcast pair of probabilities multiplies it; 4 query rows share every value load.
template <int D, int G>
void prefill_avx(const uint16_t* q, int64_t q_stride, const uint16_t* k, const uint16_t* v,
                 const int64_t* tables, int64_t max_blocks, const int64_t* starts, const int64_t* qlens,
                 const int64_t* ctxlens, int64_t P, uint16_t* out, int64_t Hkv, int64_t block_size,
                 float scale) {
  constexpr int V16 = D / 16, DP = D / 2, R = 4;  // R query rows per register block
  const PackedPrefills<D> pp = pack_prefills<D>(k, v, tables, max_blocks, qlens, ctxlens, P, Hkv, block_size);
  at::parallel_for(0, pp.first_task[P], 1, [&](int64_t begin, int64_t end) {
    alignas(64) uint16_t qbuf[G][QT][D];   // the tile's queries, rows past the prompt zero
    alignas(64) float o[G][QT][D];         // running output (unnormalised)
    alignas(64) float sbuf[QT][KT];        // one key tile's scores
    alignas(64) uint32_t pbuf[QT][KT / 2]; // ... and probabilities as bf16 key pairs
    alignas(64) float m[G][QT], l[G][QT], mnew[QT], sums[QT], alpha[QT];
    const __m512 sv = _mm512_set1_ps(scale);
    for (int64_t task = begin; task < end; ++task) {
      const QueryTile t = query_tile(pp.first_task, starts, qlens, ctxlens, task);
      const int nq = t.nq;
      const int nr = (nq + R - 1) / R * R;  // rows computed: whole register blocks
      const int64_t qbase = t.qbase;
      const PackedKeys<D>* keys = pp.of(t.p, t.h, ctxlens);
      start_tile<D, G>(t, q, q_stride, qbuf, o, m, l);
      const int64_t kend = qbase + nq;
      for (int64_t j0 = 0, kt = 0; j0 < kend; j0 += KT, ++kt) {
        const PackedKeys<D>& pk = keys[kt];
        for (int g = 0; g < G; ++g) {
          for (int r0 = 0; r0 < nr; r0 += R) {
            __m512 acc[R][2];
            for (int r = 0; r < R; ++r) acc[r][0] = acc[r][1] = _mm512_setzero_ps();
            for (int dp = 0; dp < DP; ++dp) {
              const __m512bh k0 = (__m512bh)_mm512_load_si512(pk.k[dp / 16][0][dp % 16]);
              const __m512bh k1 = (__m512bh)_mm512_load_si512(pk.k[dp / 16][1][dp % 16]);
              for (int r = 0; r < R; ++r) {
                uint32_t pair;  // query dims 2 dp, 2 dp + 1
                std::memcpy(&pair, &qbuf[g][r0 + r][2 * dp], 4);
                const __m512bh qb = (__m512bh)_mm512_set1_epi32(static_cast<int>(pair));
                acc[r][0] = _mm512_dpbf16_ps(acc[r][0], qb, k0);
                acc[r][1] = _mm512_dpbf16_ps(acc[r][1], qb, k1);
              }
            }
            for (int r = 0; r < R; ++r) {
              _mm512_store_ps(&sbuf[r0 + r][0], acc[r][0]);
              _mm512_store_ps(&sbuf[r0 + r][16], acc[r][1]);
            }
          }
          for (int r = 0; r < nr; ++r) mnew[r] = std::max(m[g][r], scale_mask_row(sbuf[r], sv, qbase + r - j0));
          // Every query sees key 0, so each row's max is finite from the first key tile on
          // (rows past the prompt see it too: their limits only grow).
          for (int r = 0; r < nr; ++r) {
            alpha[r] = std::exp(m[g][r] - mnew[r]);
            m[g][r] = mnew[r];
            const __m512 mr = _mm512_set1_ps(mnew[r]);
            const __m512 e0 = exp_or_zero(_mm512_sub_ps(_mm512_load_ps(&sbuf[r][0]), mr));
            const __m512 e1 = exp_or_zero(_mm512_sub_ps(_mm512_load_ps(&sbuf[r][16]), mr));
            sums[r] = _mm512_reduce_add_ps(_mm512_add_ps(e0, e1));
            l[g][r] = l[g][r] * alpha[r] + sums[r];
            // bf16 probabilities in key order: consecutive keys pair up as the packed V expects.
            _mm512_store_si512(pbuf[r], (__m512i)_mm512_cvtne2ps_pbh(e1, e0));
          }
          for (int r0 = 0; r0 < nr; r0 += R) {
            __m512 acc[R][V16];
            for (int r = 0; r < R; ++r) {
              const __m512 a = _mm512_set1_ps(alpha[r0 + r]);
              for (int i = 0; i < V16; ++i) acc[r][i] = _mm512_mul_ps(_mm512_load_ps(&o[g][r0 + r][i * 16]), a);
            }
            for (int kp = 0; kp < KT / 2; ++kp) {
              __m512bh vv[V16];
              for (int i = 0; i < V16; ++i) vv[i] = (__m512bh)_mm512_load_si512(pk.v[i][kp]);
              for (int r = 0; r < R; ++r) {
                const __m512bh pb = (__m512bh)_mm512_set1_epi32(static_cast<int>(pbuf[r0 + r][kp]));
                for (int i = 0; i < V16; ++i) acc[r][i] = _mm512_dpbf16_ps(acc[r][i], pb, vv[i]);
              }
            }
            for (int r = 0; r < R; ++r)
              for (int i = 0; i < V16; ++i) _mm512_store_ps(&o[g][r0 + r][i * 16], acc[r][i]);
          }
        }
      }
      finish_tile<D, G>(t, o, l, out, Hkv);
    }
  });
}

using Kernel = void (*)(const uint16_t*, int64_t, const uint16_t*, const uint16_t*, const int64_t*, int64_t,
                        const int64_t*, const int64_t*, const int64_t*, int64_t, uint16_t*, int64_t, int64_t,
                        float);

// AMX tiles where the CPU grants them, else AVX512-BF16 dot products.
Kernel kernel_for(int64_t D, int64_t G) {
#if defined(KILN_AMX)
  if (amx_ready()) {
#define KILN_CASE(d, g) \
    if (D == d && G == g) return &prefill_amx<d, g>;
    KILN_ATTENTION_SHAPES(KILN_CASE)
#undef KILN_CASE
    return nullptr;
  }
#endif
#define KILN_CASE(d, g) \
  if (D == d && G == g) return &prefill_avx<d, g>;
  KILN_ATTENTION_SHAPES(KILN_CASE)
#undef KILN_CASE
  return nullptr;
}
#endif  // KILN_PREFILL

bool paged_prefill_supported(int64_t head_dim, int64_t group) {
#if defined(KILN_PREFILL)
  return kernel_for(head_dim, group) != nullptr;
#else
  (void)head_dim;
  (void)group;
  return false;
#endif
}

// out [T, Hkv, G, D] (written in place: each prefill's rows); q [T, Hkv * G, D] with unit
// stride inside a token's row; caches [slots, Hkv, D]; block_tables [P, max_blocks] int64;
// query_starts / query_lens / context_lens [P] int64: prefill p's queries are rows
// [start, start + len) of q, the last len positions of its context_len.
void paged_prefill(at::Tensor& out, const at::Tensor& q, const at::Tensor& k_cache, const at::Tensor& v_cache,
                   const at::Tensor& block_tables, const at::Tensor& query_starts, const at::Tensor& query_lens,
                   const at::Tensor& context_lens, int64_t block_size, double scale) {
  TORCH_CHECK(out.dim() == 4 && q.dim() == 3 && k_cache.dim() == 3 && v_cache.dim() == 3, "paged_prefill: bad ranks");
  const int64_t T = out.size(0), Hkv = out.size(1), G = out.size(2), D = out.size(3);
  TORCH_CHECK(out.is_contiguous() && k_cache.is_contiguous() && v_cache.is_contiguous(),
              "paged_prefill: out and the caches must be contiguous");
  TORCH_CHECK(q.size(0) == T && q.size(1) == Hkv * G && q.size(2) == D && q.stride(2) == 1 && q.stride(1) == D,
              "paged_prefill: q must be [T, Hkv * G, D] with contiguous heads");
  TORCH_CHECK(k_cache.size(1) == Hkv && k_cache.size(2) == D && v_cache.sizes() == k_cache.sizes(),
              "paged_prefill: cache shape");
  for (const at::Tensor* t : std::initializer_list<const at::Tensor*>{&q, &k_cache, &v_cache, &out})
    TORCH_CHECK(t->scalar_type() == at::kBFloat16, "paged_prefill: bfloat16 only");
  const int64_t P = query_lens.size(0);
  for (const at::Tensor* t : std::initializer_list<const at::Tensor*>{&block_tables, &query_starts, &query_lens, &context_lens})
    TORCH_CHECK(t->scalar_type() == at::kLong && t->is_contiguous(), "paged_prefill: tables and lengths must be contiguous int64");
  TORCH_CHECK(block_tables.dim() == 2 && block_tables.size(0) == P && query_starts.size(0) == P &&
                  context_lens.size(0) == P, "paged_prefill: one table, start and length per prefill");
  const int64_t* starts = query_starts.const_data_ptr<int64_t>();
  const int64_t* qlens = query_lens.const_data_ptr<int64_t>();
  const int64_t* ctx = context_lens.const_data_ptr<int64_t>();
  const int64_t max_blocks = block_tables.size(1);
  for (int64_t p = 0; p < P; ++p)
    TORCH_CHECK(qlens[p] >= 1 && ctx[p] >= qlens[p] && starts[p] >= 0 && starts[p] + qlens[p] <= T &&
                    ctx[p] <= max_blocks * block_size,
                "paged_prefill: prefill ", p, " has a bad start, query length or context length");
  if (P == 0) return;
#if defined(KILN_PREFILL)
  Kernel kernel = kernel_for(D, G);
  TORCH_CHECK(kernel != nullptr, "paged_prefill: no kernel for head size ", D, " and group ", G);
  kernel(reinterpret_cast<const uint16_t*>(q.const_data_ptr<c10::BFloat16>()), q.stride(0),
         reinterpret_cast<const uint16_t*>(k_cache.const_data_ptr<c10::BFloat16>()),
         reinterpret_cast<const uint16_t*>(v_cache.const_data_ptr<c10::BFloat16>()),
         block_tables.const_data_ptr<int64_t>(), max_blocks, starts, qlens, ctx, P,
         reinterpret_cast<uint16_t*>(out.mutable_data_ptr<c10::BFloat16>()), Hkv, block_size,
         static_cast<float>(scale));
#else
  TORCH_CHECK(false, "paged_prefill: needs a CPU with AVX512-BF16");
#endif
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(kiln_cpu, m) {
  m.def("paged_prefill(Tensor(a!) out, Tensor q, Tensor k_cache, Tensor v_cache, Tensor block_tables, "
        "Tensor query_starts, Tensor query_lens, Tensor context_lens, int block_size, float scale) -> ()");
  m.def("paged_prefill_supported(int head_dim, int group) -> bool", &paged_prefill_supported);  // a catch-all kernel
}

TORCH_LIBRARY_IMPL(kiln_cpu, CPU, m) { m.impl("paged_prefill", &paged_prefill); }
