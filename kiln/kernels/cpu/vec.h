// Small AVX-512 helpers shared by kiln's CPU kernels; scalar fallbacks where the host's
// -march=native build has no AVX-512.
#pragma once

#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <cmath>
#include <cstdint>

#if defined(__AVX512F__)
#include <immintrin.h>

namespace kiln {

// exp(x), float32 lanes: Cephes' expf (range reduction by ln 2, degree-6 polynomial, ~1 ulp),
// 2^n applied with scalef; inputs below -88 give 0-ish, as exp does.
inline __m512 exp512(__m512 x) {
  x = _mm512_min_ps(_mm512_max_ps(x, _mm512_set1_ps(-88.f)), _mm512_set1_ps(88.f));
  const __m512 n = _mm512_roundscale_ps(_mm512_mul_ps(x, _mm512_set1_ps(1.44269504088896341f)),
                                        _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  x = _mm512_fnmadd_ps(n, _mm512_set1_ps(0.693359375f), x);
  x = _mm512_fnmadd_ps(n, _mm512_set1_ps(-2.12194440e-4f), x);
  __m512 y = _mm512_set1_ps(1.9875691500e-4f);
  y = _mm512_fmadd_ps(y, x, _mm512_set1_ps(1.3981999507e-3f));
  y = _mm512_fmadd_ps(y, x, _mm512_set1_ps(8.3334519073e-3f));
  y = _mm512_fmadd_ps(y, x, _mm512_set1_ps(4.1665795894e-2f));
  y = _mm512_fmadd_ps(y, x, _mm512_set1_ps(1.6666665459e-1f));
  y = _mm512_fmadd_ps(y, x, _mm512_set1_ps(5.0000001201e-1f));
  y = _mm512_fmadd_ps(y, _mm512_mul_ps(x, x), _mm512_add_ps(x, _mm512_set1_ps(1.f)));
  return _mm512_scalef_ps(y, n);
}

// exp(x), float32 lanes, for |x| < 87 (callers clamp or mask outside it): 2^(x log2 e) with a
// degree-4 polynomial on [-1/2, 1/2], 2.7e-6 relative error, in about half of exp512's
// instructions. For values that are then rounded to bfloat16 or summed into a softmax.
inline __m512 exp512_fast(__m512 x) {
  const __m512 t = _mm512_mul_ps(x, _mm512_set1_ps(1.44269504088896341f));
  const __m512 n = _mm512_roundscale_ps(t, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  const __m512 f = _mm512_sub_ps(t, n);
  __m512 y = _mm512_set1_ps(0.009560519829392433f);
  y = _mm512_fmadd_ps(y, f, _mm512_set1_ps(0.05591712146997452f));
  y = _mm512_fmadd_ps(y, f, _mm512_set1_ps(0.24024981260299683f));
  y = _mm512_fmadd_ps(y, f, _mm512_set1_ps(0.6931219696998596f));
  y = _mm512_fmadd_ps(y, f, _mm512_set1_ps(0.9999991655349731f));
  return _mm512_scalef_ps(y, n);
}

// silu(g) * u = g u / (1 + exp(-g)), float32 lanes: the fast exp (exp(-g) clamped at e^80,
// where the product is 0 in any case) and 1/d by rcp14 with one Newton step (~1 ulp), about
// half the time of exp512 and a division. One definition, so SwiGLU fused into a linear's
// output (gemv.cpp) gives the bits of silu_and_mul (fused.cpp).
inline __m512 silu_mul512(__m512 g, __m512 u) {
  const __m512 d = _mm512_add_ps(_mm512_set1_ps(1.f), exp512_fast(_mm512_min_ps(_mm512_sub_ps(_mm512_setzero_ps(), g),
                                                                              _mm512_set1_ps(80.f))));
  __m512 r = _mm512_rcp14_ps(d);
  r = _mm512_mul_ps(r, _mm512_fnmadd_ps(d, r, _mm512_set1_ps(2.f)));
  return _mm512_mul_ps(_mm512_mul_ps(g, u), r);
}

// 16 bfloat16 values (raw bits) to float32: bfloat16 is the top half of a float32.
inline __m512 bf16x16_to_f32(const uint16_t* p) {
  const __m256i h = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p));
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16));
}

// 16 float32 to bfloat16 bits, round to nearest even (NaN kept a NaN), as c10::BFloat16 does.
inline void f32x16_to_bf16(__m512 x, uint16_t* p) {
  const __m512i bits = _mm512_castps_si512(x);
  const __m512i lsb = _mm512_and_si512(_mm512_srli_epi32(bits, 16), _mm512_set1_epi32(1));
  __m512i rounded = _mm512_add_epi32(bits, _mm512_add_epi32(lsb, _mm512_set1_epi32(0x7fff)));
  const __mmask16 nan = _mm512_cmp_ps_mask(x, x, _CMP_UNORD_Q);
  rounded = _mm512_mask_mov_epi32(rounded, nan, _mm512_set1_epi32(0x7fc00000));
  _mm256_storeu_si256(reinterpret_cast<__m256i*>(p), _mm512_cvtepi32_epi16(_mm512_srli_epi32(rounded, 16)));
}

}  // namespace kiln
#endif

// The (head size, GQA group) pairs the attention kernels specialise: CASE(d, g) for each.
#define KILN_ATTENTION_SHAPES(CASE)                                                               \
  CASE(64, 1) CASE(64, 2) CASE(64, 3) CASE(64, 4) CASE(64, 5) CASE(64, 6) CASE(64, 7) CASE(64, 8) \
  CASE(128, 1) CASE(128, 2) CASE(128, 3) CASE(128, 4) CASE(128, 5) CASE(128, 6) CASE(128, 7) CASE(128, 8)

namespace kiln {

// One element of a model dtype to and from float32 (the scalar tails of every kernel).
inline float load_f(const float* p) { return *p; }
inline float load_f(const c10::BFloat16* p) { return static_cast<float>(*p); }
inline float load_f(const c10::Half* p) { return static_cast<float>(*p); }
inline void store_f(float* p, float x) { *p = x; }
inline void store_f(c10::BFloat16* p, float x) { *p = static_cast<c10::BFloat16>(x); }
inline void store_f(c10::Half* p, float x) { *p = static_cast<c10::Half>(x); }

#if defined(__AVX512F__)
// 16 elements of a model dtype to and from float32 lanes.
inline __m512 load16(const float* p) { return _mm512_loadu_ps(p); }
inline __m512 load16(const c10::BFloat16* p) { return bf16x16_to_f32(reinterpret_cast<const uint16_t*>(p)); }
inline __m512 load16(const c10::Half* p) { return _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p))); }
inline void store16(float* p, __m512 x) { _mm512_storeu_ps(p, x); }
inline void store16(c10::BFloat16* p, __m512 x) { f32x16_to_bf16(x, reinterpret_cast<uint16_t*>(p)); }
inline void store16(c10::Half* p, __m512 x) {
  _mm256_storeu_si256(reinterpret_cast<__m256i*>(p), _mm512_cvtps_ph(x, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC));
}
#endif

}  // namespace kiln
