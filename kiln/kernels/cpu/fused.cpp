// Fused elementwise ops of a Llama layer, for the CPU: RMSNorm, rotary embedding of q and k,
// and SwiGLU's silu(gate) * up. Each replaces several torch ops (and their temporaries) with
// one pass in float32, which matters most at small batches where a decode step is dominated
// by per-op overhead. Rows are shared out with kiln::parallel_for_claims (parallel.h).
// Registered as torch.ops.kiln_cpu.*; built with paged_decode.cpp.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <tuple>
#include <vector>

#include "parallel.h"
#include "vec.h"

// float32, bfloat16 and float16 (kiln's model dtypes); double is refused with torch's error.
#define KILN_DISPATCH(TYPE, NAME, ...)                                       \
  AT_DISPATCH_SWITCH(TYPE, NAME, AT_DISPATCH_CASE(at::kFloat, __VA_ARGS__) \
                                     AT_DISPATCH_CASE(at::kBFloat16, __VA_ARGS__) AT_DISPATCH_CASE(at::kHalf, __VA_ARGS__))

namespace {

using kiln::load_f;
using kiln::store_f;
#if defined(__AVX512F__)
using kiln::load16;
using kiln::store16;
#endif

// out = x * rsqrt(mean(x^2) + eps) * weight, row by row; x [N, H] with unit inner stride.
template <typename T>
void rms_norm_rows(const T* x, int64_t x_stride, const T* w, T* out, int64_t N, int64_t H, float eps) {
  kiln::parallel_for_claims(0, N, 16, [&](int64_t begin, int64_t end) {
    std::vector<float> wf(H), row(H);
    for (int64_t i = 0; i < H; ++i) wf[i] = load_f(w + i);
    for (int64_t n = begin; n < end; ++n) {
      const T* xr = x + n * x_stride;
      T* o = out + n * H;
      int64_t i = 0;
      float ss = 0.f;
#if defined(__AVX512F__)
      __m512 acc = _mm512_setzero_ps();
      for (; i + 16 <= H; i += 16) {
        const __m512 v = load16(xr + i);
        _mm512_storeu_ps(row.data() + i, v);
        acc = _mm512_fmadd_ps(v, v, acc);
      }
      ss = _mm512_reduce_add_ps(acc);
#endif
      for (; i < H; ++i) {
        row[i] = load_f(xr + i);
        ss += row[i] * row[i];
      }
      const float r = 1.f / std::sqrt(ss / static_cast<float>(H) + eps);
      i = 0;
#if defined(__AVX512F__)
      const __m512 rv = _mm512_set1_ps(r);
      for (; i + 16 <= H; i += 16)
        store16(o + i, _mm512_mul_ps(_mm512_mul_ps(_mm512_loadu_ps(row.data() + i), rv), _mm512_loadu_ps(wf.data() + i)));
#endif
      for (; i < H; ++i) store_f(o + i, row[i] * r * wf[i]);
    }
  });
}

// residual += delta (rounded to the dtype, as torch's add), then out = rms_norm(residual), one
// pass over each row while it is in cache: the residual stream's add and the next norm of a
// Llama layer, which otherwise read and write the [T, H] stream twice.
template <typename T>
void add_rms_norm_rows(T* res, int64_t res_stride, const T* delta, int64_t delta_stride, const T* w, T* out,
                       int64_t N, int64_t H, float eps) {
  kiln::parallel_for_claims(0, N, 16, [&](int64_t begin, int64_t end) {
    for (int64_t n = begin; n < end; ++n) {
      T* r = res + n * res_stride;
      const T* d = delta + n * delta_stride;
      int64_t i = 0;
#if defined(__AVX512F__)
      for (; i + 16 <= H; i += 16) store16(r + i, _mm512_add_ps(load16(r + i), load16(d + i)));
#endif
      for (; i < H; ++i) store_f(r + i, load_f(r + i) + load_f(d + i));
    }
    // The norm reads the rounded sums back, exactly as a separate rms_norm would.
    rms_norm_rows(res + begin * res_stride, res_stride, w, out + begin * H, end - begin, H, eps);
  });
}

at::Tensor rms_norm(const at::Tensor& x, const at::Tensor& weight, double eps) {
  TORCH_CHECK(x.dim() == 2 && x.stride(1) == 1, "rms_norm: x must be [N, H] with unit inner stride");
  TORCH_CHECK(weight.is_contiguous() && weight.numel() == x.size(1) && weight.scalar_type() == x.scalar_type(),
              "rms_norm: weight must be [H] in x's dtype");
  auto out = at::empty({x.size(0), x.size(1)}, x.options());
  KILN_DISPATCH(x.scalar_type(), "rms_norm", [&] {
    rms_norm_rows(x.const_data_ptr<scalar_t>(), x.stride(0), weight.const_data_ptr<scalar_t>(),
                  out.mutable_data_ptr<scalar_t>(), x.size(0), x.size(1), static_cast<float>(eps));
  });
  return out;
}

// residual [N, H] (updated in place), delta [N, H] (both unit inner stride) -> rms_norm(residual + delta).
at::Tensor add_rms_norm(at::Tensor& residual, const at::Tensor& delta, const at::Tensor& weight, double eps) {
  TORCH_CHECK(residual.dim() == 2 && residual.stride(1) == 1 && delta.dim() == 2 && delta.stride(1) == 1 &&
                  delta.sizes() == residual.sizes() && delta.scalar_type() == residual.scalar_type(),
              "add_rms_norm: residual and delta must be [N, H] of one dtype with unit inner stride");
  TORCH_CHECK(weight.is_contiguous() && weight.numel() == residual.size(1) && weight.scalar_type() == residual.scalar_type(),
              "add_rms_norm: weight must be [H] in the residual's dtype");
  auto out = at::empty({residual.size(0), residual.size(1)}, residual.options());
  KILN_DISPATCH(residual.scalar_type(), "add_rms_norm", [&] {
    add_rms_norm_rows(residual.mutable_data_ptr<scalar_t>(), residual.stride(0), delta.const_data_ptr<scalar_t>(),
                      delta.stride(0), weight.const_data_ptr<scalar_t>(), out.mutable_data_ptr<scalar_t>(),
                      residual.size(0), residual.size(1), static_cast<float>(eps));
  });
  return out;
}

// Hugging Face's "rotate half" RoPE of one [heads, D] row into a contiguous output row.
template <typename T>
inline void rope_row(const T* x, int64_t head_stride, int64_t heads, int64_t D, const float* cos,
                     const float* sin, T* out) {
  const int64_t half = D / 2;
  for (int64_t h = 0; h < heads; ++h) {
    const T* xh = x + h * head_stride;
    T* oh = out + h * D;
    int64_t i = 0;
#if defined(__AVX512F__)
    for (; i + 16 <= half; i += 16) {
      const __m512 x1 = load16(xh + i), x2 = load16(xh + half + i);
      const __m512 c = _mm512_loadu_ps(cos + i), s = _mm512_loadu_ps(sin + i);
      store16(oh + i, _mm512_fmsub_ps(x1, c, _mm512_mul_ps(x2, s)));
      store16(oh + half + i, _mm512_fmadd_ps(x2, c, _mm512_mul_ps(x1, s)));
    }
#endif
    for (; i < half; ++i) {
      const float x1 = load_f(xh + i), x2 = load_f(xh + half + i);
      store_f(oh + i, x1 * cos[i] - x2 * sin[i]);
      store_f(oh + half + i, x2 * cos[i] + x1 * sin[i]);
    }
  }
}

// q [T, Hq, D], k [T, Hk, D] (any row and head strides, unit inner stride); cos/sin
// [max_positions, D/2] float32; positions [T] int64. Returns contiguous rotated q and k.
std::tuple<at::Tensor, at::Tensor> rope(const at::Tensor& q, const at::Tensor& k, const at::Tensor& positions,
                                        const at::Tensor& cos, const at::Tensor& sin) {
  TORCH_CHECK(q.dim() == 3 && k.dim() == 3 && q.stride(2) == 1 && k.stride(2) == 1, "rope: q/k must be [T, H, D]");
  TORCH_CHECK(q.scalar_type() == k.scalar_type(), "rope: q and k must share a dtype");
  TORCH_CHECK(cos.scalar_type() == at::kFloat && sin.scalar_type() == at::kFloat && cos.is_contiguous() &&
                  sin.is_contiguous() && cos.size(1) * 2 == q.size(2),
              "rope: cos/sin must be contiguous float32 [positions, D/2]");
  TORCH_CHECK(positions.scalar_type() == at::kLong && positions.is_contiguous() && positions.numel() == q.size(0),
              "rope: positions must be contiguous int64 [T]");
  const int64_t T = q.size(0), Hq = q.size(1), Hk = k.size(1), D = q.size(2), half = D / 2;
  auto qo = at::empty({T, Hq, D}, q.options());
  auto ko = at::empty({T, Hk, D}, k.options());
  const int64_t* pos = positions.const_data_ptr<int64_t>();
  const int64_t max_pos = cos.size(0);
  for (int64_t t = 0; t < T; ++t)
    TORCH_CHECK(pos[t] >= 0 && pos[t] < max_pos, "rope: position ", pos[t], " outside the table");
  KILN_DISPATCH(q.scalar_type(), "rope", [&] {
    const scalar_t* qp = q.const_data_ptr<scalar_t>();
    const scalar_t* kp = k.const_data_ptr<scalar_t>();
    scalar_t* qop = qo.mutable_data_ptr<scalar_t>();
    scalar_t* kop = ko.mutable_data_ptr<scalar_t>();
    const float* c = cos.const_data_ptr<float>();
    const float* s = sin.const_data_ptr<float>();
    kiln::parallel_for_claims(0, T, 16, [&](int64_t begin, int64_t end) {
      for (int64_t t = begin; t < end; ++t) {
        const float* ct = c + pos[t] * half;
        const float* st = s + pos[t] * half;
        rope_row(qp + t * q.stride(0), q.stride(1), Hq, D, ct, st, qop + t * Hq * D);
        rope_row(kp + t * k.stride(0), k.stride(1), Hk, D, ct, st, kop + t * Hk * D);
      }
    });
  });
  return {qo, ko};
}

// gate_up [T, 2I] (unit inner stride) -> silu(gate) * up [T, I].
at::Tensor silu_and_mul(const at::Tensor& gate_up) {
  TORCH_CHECK(gate_up.dim() == 2 && gate_up.stride(1) == 1 && gate_up.size(1) % 2 == 0,
              "silu_and_mul: input must be [T, 2I] with unit inner stride");
  const int64_t T = gate_up.size(0), I = gate_up.size(1) / 2, stride = gate_up.stride(0);
  auto out = at::empty({T, I}, gate_up.options());
  KILN_DISPATCH(gate_up.scalar_type(), "silu_and_mul", [&] {
    const scalar_t* x = gate_up.const_data_ptr<scalar_t>();
    scalar_t* o = out.mutable_data_ptr<scalar_t>();
    // Tasks of 256 columns of one row: a decode row alone is a few thousand elements, too
    // few to split over threads (the grain keeps such a call on the calling thread).
    constexpr int64_t kChunk = 256;
    const int64_t chunks = (I + kChunk - 1) / kChunk;
    kiln::parallel_for_claims(0, T * chunks, 32, [&](int64_t begin, int64_t end) {
      for (int64_t task = begin; task < end; ++task) {
        const int64_t t = task / chunks, c0 = (task % chunks) * kChunk, c1 = std::min(I, c0 + kChunk);
        const scalar_t* g = x + t * stride;
        const scalar_t* u = g + I;
        scalar_t* ot = o + t * I;
        int64_t i = c0;
#if defined(__AVX512F__)
        for (; i + 16 <= c1; i += 16) store16(ot + i, kiln::silu_mul512(load16(g + i), load16(u + i)));
#endif
        for (; i < c1; ++i) {
          const float gf = load_f(g + i);
          store_f(ot + i, gf / (1.f + std::exp(-gf)) * load_f(u + i));
        }
      }
    });
  });
  return out;
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(kiln_cpu, m) {
  m.def("rms_norm(Tensor x, Tensor weight, float eps) -> Tensor");
  m.def("add_rms_norm(Tensor(a!) residual, Tensor delta, Tensor weight, float eps) -> Tensor");
  m.def("rope(Tensor q, Tensor k, Tensor positions, Tensor cos, Tensor sin) -> (Tensor, Tensor)");
  m.def("silu_and_mul(Tensor gate_up) -> Tensor");
}

TORCH_LIBRARY_IMPL(kiln_cpu, CPU, m) {
  m.impl("rms_norm", &rms_norm);
  m.impl("add_rms_norm", &add_rms_norm);
  m.impl("rope", &rope);
  m.impl("silu_and_mul", &silu_and_mul);
}
