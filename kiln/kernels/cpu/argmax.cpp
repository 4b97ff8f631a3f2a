// Row-wise argmax for the sampler (greedy rows, and the exponential race of sampled rows):
// [N, V] float32 or bfloat16 -> [N] int64, the first index of each row's maximum, a NaN counting
// as the maximum (first NaN), as torch.max(dim) and argmax answer. torch's reduction walks a
// 49,152-wide row at ~10 GB/s here; this one is two AVX-512 passes over a row still in cache
// (64 rows: 1.2 -> ~0.3 ms a decode step). Registered as torch.ops.kiln_cpu.argmax_rows.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <cmath>
#include <cstdint>
#include <limits>

#include "vec.h"

namespace {

using kiln::load_f;

template <typename T>
int64_t argmax_row(const T* r, int64_t V) {
  float m = -std::numeric_limits<float>::infinity();
  bool nan = false;
  int64_t i = 0;
#if defined(__AVX512F__)
  __m512 mv = _mm512_set1_ps(m);
  __mmask16 unordered = 0;
  for (; i + 16 <= V; i += 16) {
    const __m512 x = kiln::load16(r + i);
    unordered |= _mm512_cmp_ps_mask(x, x, _CMP_UNORD_Q);
    mv = _mm512_max_ps(mv, x);
  }
  m = _mm512_reduce_max_ps(mv);
  nan = unordered != 0;
#endif
  for (; i < V; ++i) {
    const float x = load_f(r + i);
    nan |= std::isnan(x);
    m = x > m ? x : m;
  }
  if (nan) {
    for (int64_t j = 0; j < V; ++j)
      if (std::isnan(load_f(r + j))) return j;
  }
  i = 0;
#if defined(__AVX512F__)
  const __m512 target = _mm512_set1_ps(m);
  for (; i + 16 <= V; i += 16) {
    const __mmask16 hit = _mm512_cmp_ps_mask(kiln::load16(r + i), target, _CMP_EQ_OQ);
    if (hit) return i + __builtin_ctz(hit);
  }
#endif
  for (; i < V; ++i)
    if (load_f(r + i) == m) return i;
  return 0;  // unreachable: m is one of the row's values
}

at::Tensor argmax_rows(const at::Tensor& x) {
  TORCH_CHECK(x.dim() == 2 && x.size(1) > 0 && x.stride(1) == 1,
              "argmax_rows: x must be [N, V] with V > 0 and unit inner stride");
  const int64_t N = x.size(0), V = x.size(1), stride = x.stride(0);
  auto out = at::empty({N}, x.options().dtype(at::kLong));
  int64_t* o = out.mutable_data_ptr<int64_t>();
  if (x.scalar_type() == at::kBFloat16) {
    const c10::BFloat16* p = x.const_data_ptr<c10::BFloat16>();
    at::parallel_for(0, N, 1, [&](int64_t b, int64_t e) {
      for (int64_t n = b; n < e; ++n) o[n] = argmax_row(p + n * stride, V);
    });
  } else {
    TORCH_CHECK(x.scalar_type() == at::kFloat, "argmax_rows: float32 or bfloat16 only");
    const float* p = x.const_data_ptr<float>();
    at::parallel_for(0, N, 1, [&](int64_t b, int64_t e) {
      for (int64_t n = b; n < e; ++n) o[n] = argmax_row(p + n * stride, V);
    });
  }
  return out;
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(kiln_cpu, m) { m.def("argmax_rows(Tensor x) -> Tensor"); }

TORCH_LIBRARY_IMPL(kiln_cpu, CPU, m) { m.impl("argmax_rows", &argmax_rows); }
