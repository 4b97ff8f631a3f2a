// The batched LoRA term of decode rows on the CPU: y[rows of slot s] += (x A_s^T) B_s, straight
// from the slot buffers of kiln/runtime/lora_slots.py. Rows are grouped by slot, so each
// adapter's A and B are read once per step however many rows use it; with 16 rank-64 adapters
// on every projection those reads (not the FLOPs) are the whole cost, so the point is to stream
// them once at full bandwidth, with no gathered copies of x, no padded rows, and one rounding
// of y (torch's gather + bmm + scatter path reads the same weights through ~8 ops a linear).
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdint>
#include <vector>

#include "vec.h"

namespace {

using kiln::load_f;
using kiln::store_f;

constexpr int kRows = 8;      // rows of one slot handled together (each weight load feeds all of them)
// Output columns per expand task: a whole part of this model's widths, so B is streamed row by
// row (narrower tasks read it in strided pieces, measured slower); m rows of float32 sums stay in L2.
constexpr int64_t kCols = 2048;

// out[i] = dot(a, xs[i]) for i < m, in float32.
template <typename T>
void dot_rows(const T* a, const T* const* xs, int m, int64_t K, float* out) {
  for (int i = 0; i < m; ++i) {
    float s = 0.f;
    for (int64_t k = 0; k < K; ++k) s += load_f(a + k) * load_f(xs[i] + k);
    out[i] = s;
  }
}

#if defined(__AVX512F__)
template <>
void dot_rows<float>(const float* a, const float* const* xs, int m, int64_t K, float* out) {
  __m512 acc[kRows];
  for (int i = 0; i < m; ++i) acc[i] = _mm512_setzero_ps();
  for (int64_t k = 0; k < K; k += 16) {
    const __mmask16 mask = K - k >= 16 ? __mmask16(0xffff) : __mmask16((1u << (K - k)) - 1);
    _mm_prefetch(reinterpret_cast<const char*>(a + k + 4 * K), _MM_HINT_T0);  // four rows of A ahead
    const __m512 av = _mm512_maskz_loadu_ps(mask, a + k);
    for (int i = 0; i < m; ++i) acc[i] = _mm512_fmadd_ps(av, _mm512_maskz_loadu_ps(mask, xs[i] + k), acc[i]);
  }
  for (int i = 0; i < m; ++i) out[i] = _mm512_reduce_add_ps(acc[i]);
}
#endif

#if defined(__AVX512F__) && defined(__AVX512BF16__)
template <>
void dot_rows<c10::BFloat16>(const c10::BFloat16* a, const c10::BFloat16* const* xs, int m, int64_t K, float* out) {
  __m512 acc[kRows];
  for (int i = 0; i < m; ++i) acc[i] = _mm512_setzero_ps();
  for (int64_t k = 0; k < K; k += 32) {  // 32 bf16 pairs a dot instruction
    const __mmask32 mask = K - k >= 32 ? __mmask32(0xffffffffu) : __mmask32((1u << (K - k)) - 1);
    _mm_prefetch(reinterpret_cast<const char*>(a + k + 4 * K), _MM_HINT_T0);  // four rows of A ahead
    const __m512bh av = (__m512bh)_mm512_maskz_loadu_epi16(mask, a + k);
    for (int i = 0; i < m; ++i)
      acc[i] = _mm512_dpbf16_ps(acc[i], av, (__m512bh)_mm512_maskz_loadu_epi16(mask, xs[i] + k));
  }
  for (int i = 0; i < m; ++i) out[i] = _mm512_reduce_add_ps(acc[i]);
}
#endif

// acc[i][0..n) += t[i] * b[0..n) for i < m; acc rows are kCols apart.
template <typename T>
void axpy_rows(const T* b, int64_t b_stride, const float* t, int m, int64_t n, float* acc) {
  int64_t c = 0;
#if defined(__AVX512F__)
  for (; c + 16 <= n; c += 16) {
    _mm_prefetch(reinterpret_cast<const char*>(b + c + 4 * b_stride), _MM_HINT_T0);  // four rank rows ahead
    const __m512 bv = kiln::load16(b + c);
    for (int i = 0; i < m; ++i) {
      float* p = acc + i * kCols + c;
      _mm512_storeu_ps(p, _mm512_fmadd_ps(_mm512_set1_ps(t[i]), bv, _mm512_loadu_ps(p)));
    }
  }
#endif
  for (; c < n; ++c) {
    const float bv = load_f(b + c);
    for (int i = 0; i < m; ++i) acc[i * kCols + c] += t[i] * bv;
  }
}

struct Group {
  int64_t slot;
  const int64_t* rows;
  int m;  // <= kRows
};

struct Part {
  int64_t offset, size;  // of its columns in y
};

template <typename T>
void lora_grouped_impl(const T* x, int64_t x_stride, T* y, int64_t y_stride, const T* a, int64_t PR, int64_t K,
                       const std::vector<const T*>& bs, const std::vector<Part>& parts, int64_t R,
                       const int32_t* ranks, const std::vector<Group>& groups, int64_t num_rows_total) {
  const int64_t P = parts.size();
  const int64_t G = groups.size();
  // Shrink: t[row][j] = x[row] . A_s[j], one task per (group, 16 ranks); t is indexed by the
  // row's position in the groups (rows are distinct, so tasks never write the same entry).
  std::vector<int64_t> first(G + 1, 0);
  for (int64_t g = 0; g < G; ++g) first[g + 1] = first[g] + groups[g].m;
  std::vector<float> t(num_rows_total * PR);
  const int64_t rank_tasks = (PR + 15) / 16;
  at::parallel_for(0, G * rank_tasks, 1, [&](int64_t begin, int64_t end) {
    for (int64_t task = begin; task < end; ++task) {
      const Group& grp = groups[task / rank_tasks];
      const int64_t j0 = (task % rank_tasks) * 16, j1 = std::min(PR, j0 + 16);
      const T* xs[kRows];
      for (int i = 0; i < grp.m; ++i) xs[i] = x + grp.rows[i] * x_stride;
      float out[kRows];
      float* tg = t.data() + first[task / rank_tasks] * PR;
      for (int64_t j = j0; j < j1; ++j) {
        if (j % R >= ranks[grp.slot * P + j / R]) continue;  // past the adapter's ranks: zero rows, not read
        dot_rows(a + (grp.slot * PR + j) * K, xs, grp.m, K, out);
        for (int i = 0; i < grp.m; ++i) tg[i * PR + j] = out[i];
      }
    }
  });
  // Expand: y[row][part columns] += t[row][part's ranks] B_p,s, one task per (group, part,
  // kCols columns); the float32 sums are added to y once.
  struct Cols {
    int p;
    int64_t c0, c1;
  };
  std::vector<Cols> cols;
  for (int p = 0; p < static_cast<int>(parts.size()); ++p)
    for (int64_t c = 0; c < parts[p].size; c += kCols) cols.push_back({p, c, std::min(parts[p].size, c + kCols)});
  const int64_t C = cols.size();
  at::parallel_for(0, G * C, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> acc(kRows * kCols);
    for (int64_t task = begin; task < end; ++task) {
      const int64_t g = task / C;
      const Group& grp = groups[g];
      const Cols& col = cols[task % C];
      const int64_t r = ranks[grp.slot * P + col.p];
      if (r == 0) continue;  // the adapter has no weights for this part
      const int64_t n = col.c1 - col.c0, N = parts[col.p].size;
      for (int i = 0; i < grp.m; ++i) std::fill_n(acc.data() + i * kCols, n, 0.f);  // only what this task sums
      const float* tg = t.data() + first[g] * PR + col.p * R;
      const T* b = bs[col.p] + grp.slot * R * N + col.c0;
      for (int64_t j = 0; j < r; ++j) {
        float tj[kRows];
        bool any = false;
        for (int i = 0; i < grp.m; ++i) any |= (tj[i] = tg[i * PR + j]) != 0.f;
        if (any) axpy_rows(b + j * N, N, tj, grp.m, n, acc.data());
      }
      for (int i = 0; i < grp.m; ++i) {
        T* yr = y + grp.rows[i] * y_stride + parts[col.p].offset + col.c0;
        const float* ar = acc.data() + i * kCols;
        int64_t c = 0;
#if defined(__AVX512F__)
        for (; c + 16 <= n; c += 16) kiln::store16(yr + c, _mm512_add_ps(kiln::load16(yr + c), _mm512_loadu_ps(ar + c)));
#endif
        for (; c < n; ++c) store_f(yr + c, load_f(yr + c) + ar[c]);
      }
    }
  });
}

// x [T, K], y [T, sum of parts] (unit inner strides), a [S, P*R, K], bs[p] [S, R, N_p] (all one
// dtype, contiguous); ranks [S, P] int32: slot s's adapter has ranks[s, p] ranks for part p (the
// rows of A and B past them are zeros and are not read; 0: none); group_slot [G], group_ptr [G+1] and rows (int64): group
// g is the rows rows[group_ptr[g]:group_ptr[g+1]] of slot group_slot[g]. Rows must be distinct.
void lora_grouped(const at::Tensor& x, at::Tensor y, const at::Tensor& a, at::TensorList bs, at::IntArrayRef offsets,
                  const at::Tensor& ranks, const at::Tensor& group_slot, const at::Tensor& group_ptr,
                  const at::Tensor& rows) {
  TORCH_CHECK(x.dim() == 2 && y.dim() == 2 && a.dim() == 3, "lora_grouped: x, y [T, *] and a [S, P*R, K]");
  TORCH_CHECK(x.stride(1) == 1 && y.stride(1) == 1 && a.is_contiguous(), "lora_grouped: unit inner strides");
  TORCH_CHECK(x.scalar_type() == y.scalar_type() && x.scalar_type() == a.scalar_type(), "lora_grouped: one dtype");
  TORCH_CHECK(x.scalar_type() == at::kFloat || x.scalar_type() == at::kBFloat16,
              "lora_grouped: float32 or bfloat16 only");
  TORCH_CHECK(bs.size() == offsets.size() && !bs.empty(), "lora_grouped: one offset per part");
  TORCH_CHECK(group_slot.scalar_type() == at::kLong && group_ptr.scalar_type() == at::kLong &&
                  rows.scalar_type() == at::kLong && group_slot.is_contiguous() && group_ptr.is_contiguous() &&
                  rows.is_contiguous(),
              "lora_grouped: contiguous int64 indices");
  const int64_t K = a.size(2), PR = a.size(1), S = a.size(0), R = PR / static_cast<int64_t>(bs.size());
  TORCH_CHECK(x.size(1) == K && PR % static_cast<int64_t>(bs.size()) == 0, "lora_grouped: a's shape");
  TORCH_CHECK(ranks.scalar_type() == at::kInt && ranks.is_contiguous() && ranks.dim() == 2 && ranks.size(0) == S &&
                  ranks.size(1) == static_cast<int64_t>(bs.size()),
              "lora_grouped: ranks must be a contiguous [S, P] int32");
  const int32_t* rk = ranks.const_data_ptr<int32_t>();
  for (int64_t i = 0; i < ranks.numel(); ++i)
    TORCH_CHECK(rk[i] >= 0 && rk[i] <= R, "lora_grouped: ranks must lie in [0, ", R, "]");
  const int64_t G = group_slot.size(0);
  TORCH_CHECK(group_ptr.size(0) == G + 1, "lora_grouped: group_ptr has G+1 entries");
  const int64_t* ptr = group_ptr.const_data_ptr<int64_t>();
  const int64_t* slot = group_slot.const_data_ptr<int64_t>();
  const int64_t* row = rows.const_data_ptr<int64_t>();
  std::vector<Group> groups;
  for (int64_t g = 0; g < G; ++g) {
    TORCH_CHECK(slot[g] >= 0 && slot[g] < S && ptr[g] <= ptr[g + 1] && ptr[g + 1] <= rows.size(0),
                "lora_grouped: bad group ", g);
    for (int64_t r = ptr[g]; r < ptr[g + 1]; ++r)
      TORCH_CHECK(row[r] >= 0 && row[r] < x.size(0) && row[r] < y.size(0), "lora_grouped: row out of range");
    for (int64_t r = ptr[g]; r < ptr[g + 1]; r += kRows)
      groups.push_back({slot[g], row + r, static_cast<int>(std::min<int64_t>(kRows, ptr[g + 1] - r))});
  }
  std::vector<Part> parts;
  for (size_t p = 0; p < bs.size(); ++p) {
    TORCH_CHECK(bs[p].dim() == 3 && bs[p].is_contiguous() && bs[p].size(0) == S && bs[p].size(1) == R &&
                    bs[p].scalar_type() == x.scalar_type(),
                "lora_grouped: b[", p, "] must be a contiguous [S, R, N] of x's dtype");
    TORCH_CHECK(offsets[p] >= 0 && offsets[p] + bs[p].size(2) <= y.size(1), "lora_grouped: part ", p, " outside y");
    parts.push_back({offsets[p], bs[p].size(2)});
  }
  int64_t total = 0;
  for (const Group& grp : groups) total += grp.m;
  if (groups.empty()) return;
  auto run = [&](auto zero) {
    using scalar_t = decltype(zero);
    std::vector<const scalar_t*> b;
    for (const at::Tensor& bp : bs) b.push_back(bp.const_data_ptr<scalar_t>());
    lora_grouped_impl(x.const_data_ptr<scalar_t>(), x.stride(0), y.mutable_data_ptr<scalar_t>(), y.stride(0),
                      a.const_data_ptr<scalar_t>(), PR, K, b, parts, R, rk, groups,
                      total);
  };
  if (x.scalar_type() == at::kFloat)
    run(float{});
  else
    run(c10::BFloat16{});
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(kiln_cpu, m) {
  m.def("lora_grouped(Tensor x, Tensor(a!) y, Tensor a, Tensor[] bs, int[] offsets, Tensor ranks, "
        "Tensor group_slot, Tensor group_ptr, Tensor rows) -> ()");
}

TORCH_LIBRARY_IMPL(kiln_cpu, CPU, m) { m.impl("lora_grouped", &lora_grouped); }
