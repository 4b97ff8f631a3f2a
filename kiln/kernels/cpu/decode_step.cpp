// Every decoder layer of a pure-decode step in one call, for the CPU.
//
// At one to a few sequences a decode step is ~400 small operations; issued one by one from
// Python each costs a few microseconds of interpreter and module overhead on top of its
// work, ~3 ms a step for this project's default model. This loop issues the same operations
// from C++ (the same kernels: oneDNN's prepacked linears, torch's int8 / int4 GEMVs, kiln's
// fused RMSNorm, RoPE, SwiGLU and paged decode attention), so its output is bit-identical to
// the module path. The caller (kiln/runtime/backends/cpu.py) checks that the step and the
// model qualify: decode rows only, no LoRA rows, no tensor parallelism.
// Registered as torch.ops.kiln_cpu.decode_layers.
#include <ATen/ATen.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/library.h>

#include <cstdint>
#include <cstring>
#include <optional>
#include <string_view>
#include <vector>

namespace {

// How a linear's weight is held (kiln/runtime/backends/cpu.py: LINEAR_KINDS).
enum LinearKind : int64_t {
  kDense = 0,    // weight [out, in] in the activation dtype: at::linear
  kMkldnn = 1,   // oneDNN-prepacked weight: mkldnn::_linear_pointwise (aux: kiln_cpu::gemv_bf16's copy)
  kInt8 = 2,     // int8 [out, in] + per-channel scales: at::_weight_int8pack_mm
  kInt4 = 3,     // int4pack + scale_zero, optional input permutation: at::_weight_int4pack_mm_for_cpu
};

struct LinearRef {
  int64_t kind;
  int64_t group;  // int4: the int4pack group size; oneDNN: rows up to which aux (gemv) is used
  const at::Tensor* w;
  const at::Tensor* aux;   // int8: scales; int4: scale_zero (their dtype is the activation dtype)
  const at::Tensor* perm;  // int4 act-order: input column permutation (numel 0: none)
};

at::Tensor linear_pointwise(const at::Tensor& x, const at::Tensor& packed) {
  static auto op = c10::Dispatcher::singleton()
                       .findSchemaOrThrow("mkldnn::_linear_pointwise", "")
                       .typed<at::Tensor(const at::Tensor&, const at::Tensor&, const std::optional<at::Tensor>&,
                                         std::string_view, c10::List<std::optional<at::Scalar>>,
                                         std::optional<std::string_view>)>();
  return op.call(x, packed, std::nullopt, "none", c10::List<std::optional<at::Scalar>>(), std::string_view(""));
}

at::Tensor gemv_bf16(const at::Tensor& x, const at::Tensor& packed) {
  static auto op = c10::Dispatcher::singleton()
                       .findSchemaOrThrow("kiln_cpu::gemv_bf16", "")
                       .typed<at::Tensor(const at::Tensor&, const at::Tensor&)>();
  return op.call(x, packed);
}

at::Tensor run_linear(const LinearRef& l, const at::Tensor& x) {
  switch (l.kind) {
    case kDense:
      return at::linear(x, *l.w);
    case kMkldnn:
      // aux: the one-row copy of the weight, used up to `group` rows (as Linear.forward does).
      if (l.aux->numel() > 0 && x.size(0) <= l.group && x.stride(1) == 1) return gemv_bf16(x, *l.aux);
      return linear_pointwise(x, *l.w);
    case kInt8: {
      const auto act = l.aux->scalar_type();
      const at::Tensor xa = x.scalar_type() == act ? x.contiguous() : x.to(act).contiguous();
      at::Tensor y = at::_weight_int8pack_mm(xa, *l.w, *l.aux);
      return y.scalar_type() == x.scalar_type() ? y : y.to(x.scalar_type());
    }
    case kInt4: {
      const auto act = l.aux->scalar_type();
      at::Tensor xa = x.scalar_type() == act ? x : x.to(act);
      if (l.perm->numel() > 0) xa = xa.index_select(1, *l.perm);
      at::Tensor y = at::_weight_int4pack_mm_for_cpu(xa.contiguous(), *l.w, l.group, *l.aux);
      return y.scalar_type() == x.scalar_type() ? y : y.to(x.scalar_type());
    }
    default:
      TORCH_CHECK(false, "decode_layers: unknown linear kind ", l.kind);
  }
}

at::Tensor rms_norm(const at::Tensor& x, const at::Tensor& w, double eps) {
  static auto op = c10::Dispatcher::singleton()
                       .findSchemaOrThrow("kiln_cpu::rms_norm", "")
                       .typed<at::Tensor(const at::Tensor&, const at::Tensor&, double)>();
  return op.call(x, w, eps);
}

// residual += delta in place, then its RMSNorm (fused.cpp).
at::Tensor add_rms_norm(at::Tensor& residual, const at::Tensor& delta, const at::Tensor& w, double eps) {
  static auto op = c10::Dispatcher::singleton()
                       .findSchemaOrThrow("kiln_cpu::add_rms_norm", "")
                       .typed<at::Tensor(at::Tensor&, const at::Tensor&, const at::Tensor&, double)>();
  return op.call(residual, delta, w, eps);
}

std::tuple<at::Tensor, at::Tensor> rope(const at::Tensor& q, const at::Tensor& k, const at::Tensor& positions,
                                        const at::Tensor& cos, const at::Tensor& sin) {
  static auto op = c10::Dispatcher::singleton()
                       .findSchemaOrThrow("kiln_cpu::rope", "")
                       .typed<std::tuple<at::Tensor, at::Tensor>(const at::Tensor&, const at::Tensor&, const at::Tensor&,
                                                                 const at::Tensor&, const at::Tensor&)>();
  return op.call(q, k, positions, cos, sin);
}

at::Tensor silu_and_mul(const at::Tensor& gate_up) {
  static auto op = c10::Dispatcher::singleton()
                       .findSchemaOrThrow("kiln_cpu::silu_and_mul", "")
                       .typed<at::Tensor(const at::Tensor&)>();
  return op.call(gate_up);
}

at::Tensor gemv_silu_bf16(const at::Tensor& x, const at::Tensor& packed) {
  static auto op = c10::Dispatcher::singleton()
                       .findSchemaOrThrow("kiln_cpu::gemv_silu_bf16", "")
                       .typed<at::Tensor(const at::Tensor&, const at::Tensor&)>();
  return op.call(x, packed);
}

// silu(gate) * up of the fused gate/up linear `l`: in one pass where it runs gemv_bf16 (as
// FusedMLP.forward does), else the linear then silu_and_mul.
at::Tensor swiglu(const LinearRef& l, const at::Tensor& x) {
  if (l.kind == kMkldnn && l.aux->numel() > 0 && l.aux->size(0) % 2 == 0 && x.size(0) <= l.group && x.stride(1) == 1)
    return gemv_silu_bf16(x, *l.aux);
  return silu_and_mul(run_linear(l, x));
}

at::Tensor paged_decode(const at::Tensor& q, const at::Tensor& k_cache, const at::Tensor& v_cache,
                        const at::Tensor& tables, const at::Tensor& lens, int64_t block_size, double scale) {
  static auto op = c10::Dispatcher::singleton()
                       .findSchemaOrThrow("kiln_cpu::paged_decode", "")
                       .typed<at::Tensor(const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&,
                                         const at::Tensor&, int64_t, double)>();
  return op.call(q, k_cache, v_cache, tables, lens, block_size, scale);
}

// Copies the new tokens' K (or V) rows [T, Hkv, D] (any row stride) into their cache slots.
void write_cache(at::Tensor& cache, const at::Tensor& rows, const int64_t* slots, int64_t T) {
  const int64_t row_bytes = cache.stride(0) * cache.element_size();
  const int64_t n_slots = cache.size(0);
  char* dst = static_cast<char*>(cache.data_ptr());
  const char* src = static_cast<const char*>(rows.const_data_ptr());
  const int64_t src_stride = rows.stride(0) * rows.element_size();
  for (int64_t t = 0; t < T; ++t) {
    TORCH_CHECK(slots[t] >= 0 && slots[t] < n_slots, "decode_layers: slot ", slots[t], " outside the cache");
    std::memcpy(dst + slots[t] * row_bytes, src + t * src_stride, row_bytes);
  }
}

// h [T, H]: the embedded tokens. kv [layers, 2, slots, Hkv, D]. norms: per layer its input and
// post-attention RMSNorm weights. linears: per layer qkv, o, gate_up, down, each as three
// tensors (weight, aux, perm; numel 0 where unused); kinds: per linear (kind, group).
// Returns the residual stream after the last layer (the caller applies the final norm).
at::Tensor decode_layers(const at::Tensor& h, const at::Tensor& positions, const at::Tensor& slot_mapping,
                         const at::Tensor& tables, const at::Tensor& lens, at::Tensor kv, const at::Tensor& cos,
                         const at::Tensor& sin, at::TensorList norms, at::TensorList linears, at::IntArrayRef kinds,
                         int64_t num_heads, int64_t num_kv_heads, int64_t head_dim, int64_t block_size, double eps,
                         double scale) {
  const int64_t L = kv.size(0);
  TORCH_CHECK(h.dim() == 2 && h.is_contiguous(), "decode_layers: h must be contiguous [T, H]");
  TORCH_CHECK(kv.dim() == 5 && kv.is_contiguous() && kv.size(1) == 2 && kv.size(3) == num_kv_heads &&
                  kv.size(4) == head_dim && kv.scalar_type() == h.scalar_type(),
              "decode_layers: kv must be contiguous [layers, 2, slots, Hkv, D] in h's dtype");
  TORCH_CHECK(static_cast<int64_t>(norms.size()) == 2 * L && static_cast<int64_t>(linears.size()) == 12 * L &&
                  static_cast<int64_t>(kinds.size()) == 8 * L,
              "decode_layers: expected 2 norms, 4 linears (12 tensors) and 8 kinds per layer");
  TORCH_CHECK(slot_mapping.scalar_type() == at::kLong && slot_mapping.is_contiguous() &&
                  slot_mapping.numel() == h.size(0),
              "decode_layers: slot_mapping must be contiguous int64 [T]");
  const int64_t T = h.size(0);
  const int64_t q_size = num_heads * head_dim, kv_size = num_kv_heads * head_dim;
  const int64_t G = num_heads / num_kv_heads;
  const int64_t* slots = slot_mapping.const_data_ptr<int64_t>();

  auto ref = [&](int64_t layer, int64_t i) {
    const int64_t j = layer * 4 + i;
    return LinearRef{kinds[2 * j], kinds[2 * j + 1], &linears[3 * j], &linears[3 * j + 1], &linears[3 * j + 2]};
  };

  at::Tensor residual = h.clone();
  at::Tensor x = rms_norm(residual, norms[0], eps);
  for (int64_t l = 0; l < L; ++l) {
    // Attention: fused qkv, RoPE on q and k, the new K/V into the cache, paged decode, o.
    const at::Tensor qkv = run_linear(ref(l, 0), x);
    const at::Tensor q = qkv.narrow(1, 0, q_size).view({T, num_heads, head_dim});
    const at::Tensor k = qkv.narrow(1, q_size, kv_size).view({T, num_kv_heads, head_dim});
    const at::Tensor v = qkv.narrow(1, q_size + kv_size, kv_size).view({T, num_kv_heads, head_dim});
    auto [qr, kr] = rope(q, k, positions, cos, sin);
    at::Tensor k_cache = kv.select(0, l).select(0, 0);
    at::Tensor v_cache = kv.select(0, l).select(0, 1);
    write_cache(k_cache, kr, slots, T);
    write_cache(v_cache, v, slots, T);
    const at::Tensor attn = paged_decode(qr.view({T, num_kv_heads, G, head_dim}), k_cache, v_cache, tables, lens,
                                         block_size, scale);
    x = add_rms_norm(residual, run_linear(ref(l, 1), attn.view({T, q_size})), norms[2 * l + 1], eps);
    // MLP: fused gate/up, SwiGLU, down; its sum feeds the next layer's input norm.
    const at::Tensor mlp = run_linear(ref(l, 3), swiglu(ref(l, 2), x));
    if (l + 1 < L) {
      x = add_rms_norm(residual, mlp, norms[2 * (l + 1)], eps);
    } else {
      residual.add_(mlp);
    }
  }
  return residual;
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(kiln_cpu, m) {
  m.def("decode_layers(Tensor h, Tensor positions, Tensor slot_mapping, Tensor tables, Tensor lens, Tensor(a!) kv, "
        "Tensor cos, Tensor sin, Tensor[] norms, Tensor[] linears, int[] kinds, int num_heads, int num_kv_heads, "
        "int head_dim, int block_size, float eps, float scale) -> Tensor");
}

TORCH_LIBRARY_IMPL(kiln_cpu, CPU, m) { m.impl("decode_layers", &decode_layers); }
// oneDNN-prepacked weights are MkldnnCPU tensors, which route the call to that key.
TORCH_LIBRARY_IMPL(kiln_cpu, MkldnnCPU, m) { m.impl("decode_layers", &decode_layers); }
