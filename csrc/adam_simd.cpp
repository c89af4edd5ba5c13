// One copy of the element-wise kernels (adam_simd_body.inc) per instruction set, and the run-time choice
// among them. The AVX2 and AVX-512 copies are compiled under `#pragma GCC target`, which applies to the
// functions defined in its region only: nothing else in the extension (and no header) is compiled for an
// instruction set the CPU may lack, and a copy runs only after the CPU (and OS) are checked to support it.
#include "adam_simd.h"

#include <c10/util/Exception.h>
#include <c10/util/StringUtil.h>

#include <atomic>
#include <cmath>
#include <cstdlib>
#include <cstring>

// GCC's `#pragma GCC target` regions (clang would need its own `#pragma clang attribute`; it builds the scalar
// kernels only).
#if defined(__GNUC__) && !defined(__clang__) && (defined(__x86_64__) || defined(__i386__))
#define ROTKERN_X86_SIMD 1
#include <immintrin.h>
#endif

namespace rotkern {
namespace simd {

// Portable scalar code: one lane, no FMA (the default x86-64 target has none; products round separately).
namespace isa_scalar {
namespace {
using V = float;
constexpr int64_t kLanes = 1;
inline V set1(float x) { return x; }
inline V add(V a, V b) { return a + b; }
inline V sub(V a, V b) { return a - b; }
inline V mul(V a, V b) { return a * b; }
inline V div(V a, V b) { return a / b; }
inline V sqrt_(V a) { return std::sqrt(a); }
inline V fmadd(V a, V b, V c) { return a * b + c; }
inline V max_nan(V a, V b) { return (std::isnan(a) || std::isnan(b)) ? a + b : (a < b ? b : a); }
template <bool kPart>
inline V load(const float* p, int64_t) { return *p; }
template <bool kPart>
inline void store(float* p, V x, int64_t) { *p = x; }
#include "adam_simd_body.inc"
}  // namespace
const Kernels kKernels{"scalar", adam_update, adam_identity, apply_update};
}  // namespace isa_scalar

#ifdef ROTKERN_X86_SIMD
#pragma GCC push_options
#pragma GCC target("avx2,fma")
namespace isa_avx2 {
namespace {
using V = __m256;
constexpr int64_t kLanes = 8;
inline V set1(float x) { return _mm256_set1_ps(x); }
inline V add(V a, V b) { return _mm256_add_ps(a, b); }
inline V sub(V a, V b) { return _mm256_sub_ps(a, b); }
inline V mul(V a, V b) { return _mm256_mul_ps(a, b); }
inline V div(V a, V b) { return _mm256_div_ps(a, b); }
inline V sqrt_(V a) { return _mm256_sqrt_ps(a); }
inline V fmadd(V a, V b, V c) { return _mm256_fmadd_ps(a, b, c); }
inline V max_nan(V a, V b) {
  // maxps returns its second operand when either is NaN; torch.maximum propagates the NaN.
  return _mm256_blendv_ps(_mm256_max_ps(a, b), _mm256_add_ps(a, b), _mm256_cmp_ps(a, b, _CMP_UNORD_Q));
}
inline __m256i mask(int64_t n) {
  return _mm256_cmpgt_epi32(_mm256_set1_epi32(static_cast<int>(n)), _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7));
}
template <bool kPart>
inline V load(const float* p, int64_t n) {
  return kPart ? _mm256_maskload_ps(p, mask(n)) : _mm256_loadu_ps(p);
}
template <bool kPart>
inline void store(float* p, V x, int64_t n) {
  if (kPart) {
    _mm256_maskstore_ps(p, mask(n), x);
  } else {
    _mm256_storeu_ps(p, x);
  }
}
#include "adam_simd_body.inc"
}  // namespace
const Kernels kKernels{"avx2", adam_update, adam_identity, apply_update};
}  // namespace isa_avx2
#pragma GCC pop_options

#pragma GCC push_options
#pragma GCC target("avx512f")
// GCC 12 warns about the deliberately undefined pass-through operand inside its own avx512fintrin.h.
#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
namespace isa_avx512 {
namespace {
using V = __m512;
constexpr int64_t kLanes = 16;
inline V set1(float x) { return _mm512_set1_ps(x); }
inline V add(V a, V b) { return _mm512_add_ps(a, b); }
inline V sub(V a, V b) { return _mm512_sub_ps(a, b); }
inline V mul(V a, V b) { return _mm512_mul_ps(a, b); }
inline V div(V a, V b) { return _mm512_div_ps(a, b); }
inline V sqrt_(V a) { return _mm512_sqrt_ps(a); }
inline V fmadd(V a, V b, V c) { return _mm512_fmadd_ps(a, b, c); }
inline V max_nan(V a, V b) {
  return _mm512_mask_add_ps(_mm512_max_ps(a, b), _mm512_cmp_ps_mask(a, b, _CMP_UNORD_Q), a, b);
}
inline __mmask16 mask(int64_t n) { return static_cast<__mmask16>((1u << n) - 1u); }
template <bool kPart>
inline V load(const float* p, int64_t n) {
  return kPart ? _mm512_maskz_loadu_ps(mask(n), p) : _mm512_loadu_ps(p);
}
template <bool kPart>
inline void store(float* p, V x, int64_t n) {
  if (kPart) {
    _mm512_mask_storeu_ps(p, mask(n), x);
  } else {
    _mm512_storeu_ps(p, x);
  }
}
#include "adam_simd_body.inc"
}  // namespace
const Kernels kKernels{"avx512", adam_update, adam_identity, apply_update};
}  // namespace isa_avx512
#pragma GCC diagnostic pop
#pragma GCC pop_options
#endif  // ROTKERN_X86_SIMD

namespace {

const Kernels* by_name(const std::string& name) {
#ifdef ROTKERN_X86_SIMD
  if (name == "avx512") return &isa_avx512::kKernels;
  if (name == "avx2") return &isa_avx2::kKernels;
#endif
  if (name == "scalar") return &isa_scalar::kKernels;
  return nullptr;
}

bool cpu_supports(const std::string& name) {
  if (name == "scalar") return true;
#ifdef ROTKERN_X86_SIMD
  // libgcc's checks include the OS's support for the wider registers (XGETBV), not just CPUID.
  __builtin_cpu_init();
  if (name == "avx512") return __builtin_cpu_supports("avx512f");
  if (name == "avx2") return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
#endif
  return false;
}

const Kernels* initial() {
  // ATEN_CPU_CAPABILITY caps torch's own kernels (default / avx2 / avx512); the same cap applies here.
  const char* cap = std::getenv("ATEN_CPU_CAPABILITY");
  const std::string c = cap ? cap : "";
  for (const auto& name : supported_isas()) {
    if (c == "default" && name != "scalar") continue;
    if (c == "avx2" && name == "avx512") continue;
    return by_name(name);
  }
  return &isa_scalar::kKernels;
}

std::atomic<const Kernels*> g_current{nullptr};

}  // namespace

std::vector<std::string> supported_isas() {
  std::vector<std::string> out;
  for (const char* name : {"avx512", "avx2", "scalar"}) {
    if (by_name(name) && cpu_supports(name)) out.emplace_back(name);
  }
  return out;
}

const Kernels& kernels() {
  const Kernels* k = g_current.load(std::memory_order_acquire);
  if (!k) {
    k = initial();
    g_current.store(k, std::memory_order_release);
  }
  return *k;
}

std::string set_isa(const std::string& name) {
  const Kernels* k = by_name(name);
  TORCH_CHECK(k && cpu_supports(name), "rotkern: instruction set '", name, "' is not available on this CPU (",
              "supported: ", c10::Join(", ", supported_isas()), ")");
  const std::string previous = kernels().name;
  g_current.store(k, std::memory_order_release);
  return previous;
}

}  // namespace simd
}  // namespace rotkern
