// bfloat16 y = x W^T for one row of x (a single sequence's decode step), for the CPU.
//
// oneDNN's AMX kernels are built for many rows; at one row a linear only streams its weight,
// and oneDNN reads it at ~23-34 GB/s here. This kernel keeps a copy of the weight in a layout
// made for that stream: blocks of 16 output rows, each block's columns in pairs
// ([N/16, K/2, 16, 2]), so one 64-byte line holds one column pair of 16 outputs and one
// AVX512-BF16 dot instruction consumes it against the broadcast pair of x: no horizontal sums,
// one sequential read per block. Sums are float32, rounded to bfloat16 once.
// Registered as torch.ops.kiln_cpu.gemv_bf16 / pack_gemv_bf16 / gemv_bf16_supported.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <cstdint>
#include <cstring>

#if defined(__AVX512F__) && defined(__AVX512BF16__)
#include <immintrin.h>
#define KILN_GEMV 1
#else
#define KILN_GEMV 0
#endif

namespace {

constexpr int64_t kBlock = 16;  // output rows a block (one float32 vector)

bool gemv_bf16_supported() { return KILN_GEMV; }

// w [N, K] bfloat16 -> [N/16, K/2, 16, 2]; N a multiple of 16, K even.
at::Tensor pack_gemv_bf16(const at::Tensor& w) {
  TORCH_CHECK(w.dim() == 2 && w.scalar_type() == at::kBFloat16, "pack_gemv_bf16: w must be bfloat16 [N, K]");
  const int64_t N = w.size(0), K = w.size(1);
  TORCH_CHECK(N % kBlock == 0 && K % 2 == 0, "pack_gemv_bf16: N must be a multiple of 16 and K even, got [", N,
              ", ", K, "]");
  return w.reshape({N / kBlock, kBlock, K / 2, 2}).permute({0, 2, 1, 3}).contiguous();
}

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

// x [M, K] bfloat16 (unit inner stride), packed from pack_gemv_bf16 -> y [M, N].
at::Tensor gemv_bf16(const at::Tensor& x, const at::Tensor& packed) {
  TORCH_CHECK(x.dim() == 2 && x.stride(1) == 1 && x.scalar_type() == at::kBFloat16,
              "gemv_bf16: x must be bfloat16 [M, K] with unit inner stride");
  TORCH_CHECK(packed.dim() == 4 && packed.is_contiguous() && packed.scalar_type() == at::kBFloat16 &&
                  packed.size(2) == kBlock && packed.size(3) == 2 && packed.size(1) * 2 == x.size(1),
              "gemv_bf16: packed must come from pack_gemv_bf16 of a [N, K] weight, K = x's columns");
  TORCH_CHECK(KILN_GEMV, "gemv_bf16: this CPU has no AVX512-BF16");  // after the argument checks, which hold anywhere
  const int64_t M = x.size(0), K = x.size(1), blocks = packed.size(0), N = blocks * kBlock;
  auto y = at::empty({M, N}, x.options());
#if KILN_GEMV
  const auto* xp = reinterpret_cast<const uint16_t*>(x.const_data_ptr<c10::BFloat16>());
  const auto* wp = reinterpret_cast<const uint16_t*>(packed.const_data_ptr<c10::BFloat16>());
  auto* yp = reinterpret_cast<uint16_t*>(y.mutable_data_ptr<c10::BFloat16>());
  const int64_t x_stride = x.stride(0);
  at::parallel_for(0, blocks, 4, [&](int64_t b0, int64_t b1) {
    for (int64_t b = b0; b < b1; ++b)
      for (int64_t m = 0; m < M; ++m) gemv_block(wp + b * K * kBlock, xp + m * x_stride, K, yp + m * N + b * kBlock);
  });
#endif
  return y;
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(kiln_cpu, m) {
  m.def("gemv_bf16_supported() -> bool", &gemv_bf16_supported);  // no tensor arguments: a catch-all kernel
  m.def("pack_gemv_bf16(Tensor w) -> Tensor");
  m.def("gemv_bf16(Tensor x, Tensor packed) -> Tensor");
}

TORCH_LIBRARY_IMPL(kiln_cpu, CPU, m) {
  m.impl("pack_gemv_bf16", &pack_gemv_bf16);
  m.impl("gemv_bf16", &gemv_bf16);
}
