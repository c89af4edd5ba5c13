// Vectorised element-wise kernels of the CPU step, dispatched at run time to the best instruction set the
// machine has (AVX-512F, AVX2+FMA, or portable scalar code), so that the default build needs no -march flag
// and runs on any x86-64 (or other) CPU. adam_simd.cpp compiles one copy of each kernel per instruction set.
//
// Every kernel computes each element with the same sequence of fp32 operations whatever its position (tails
// use masked loads, not a scalar loop), so results do not depend on alignment, chunking or the thread count.
// The operation order is the eager reference's (torch's vectorised CPU ops: lerp and `add(alpha)` as FMAs),
// except on the scalar path, which has no FMA and rounds the products separately.
#pragma once

#include <cstdint>
#include <string>
#include <vector>

#include "rotated_adamw.h"

namespace rotkern {
namespace simd {

struct Kernels {
  const char* name;
  // Adam on rotated coordinates: m, v (and vmax with amsgrad; else nullptr) updated in place from the
  // rotated gradient g; the un-scaled update m / (sqrt(v') / sqrt(1 - b2^t) + eps) written to out.
  // g and out must not alias.
  void (*adam_update)(const AdamScalars& s, const float* g, float* m, float* v, float* vmax, float* out,
                      int64_t n);
  // An unrotated unit in one pass: g read with s.sign, then p = p * decay + s.step * update.
  void (*adam_identity)(const AdamScalars& s, float decay, float* p, const float* g, float* m, float* v,
                        float* vmax, int64_t n);
  // p = p * decay + step * z.
  void (*apply_update)(float decay, float step, float* p, const float* z, int64_t n);
};

// The kernels in use: the best the CPU supports, capped by ATEN_CPU_CAPABILITY (default / avx2 / avx512) as
// torch's own kernels are, or what set_isa chose.
const Kernels& kernels();
// Instruction sets this CPU can run, best first (always ends with "scalar").
std::vector<std::string> supported_isas();
// Use `name` ("avx512", "avx2" or "scalar"); returns the previous choice. Raises if the CPU cannot run it.
std::string set_isa(const std::string& name);

}  // namespace simd
}  // namespace rotkern
