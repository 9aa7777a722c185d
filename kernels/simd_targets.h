// Compiles a kernel's lane code (the header named by ROSA2_LANES, written on simd16.h) twice: for AVX-512 in
// namespace avx512 and for AVX2 with FMA in namespace avx2, so one library runs on either CPU and its handler picks
// at run time. No include guard: a kernel includes it once, after the headers its lane code uses, with
// `#define ROSA2_LANES "<kernel>_lanes.h"`.

// 2 when this CPU and its OS run AVX-512 F, BW and VL, 1 when they run AVX2 and FMA, else 0.
inline int SimdLevel() {
  __builtin_cpu_init();
  if (__builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") && __builtin_cpu_supports("avx512vl"))
    return 2;
  return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") ? 1 : 0;
}

// GCC takes the instruction set of a region from `#pragma GCC target`, clang from `#pragma clang attribute`.
#define ROSA2_SIMD_AVX512 1
#ifdef __clang__
#pragma clang attribute push(__attribute__((target("avx512f,avx512bw,avx512vl,fma"))), apply_to = function)
#else
#pragma GCC push_options
#pragma GCC target("avx512f,avx512bw,avx512vl,fma")
#endif
namespace avx512 {
#include "simd16.h"
#include ROSA2_LANES
}  // namespace avx512
#ifdef __clang__
#pragma clang attribute pop
#else
#pragma GCC pop_options
#endif
#undef ROSA2_SIMD_AVX512

#define ROSA2_SIMD_AVX512 0
#ifdef __clang__
#pragma clang attribute push(__attribute__((target("avx2,fma"))), apply_to = function)
#else
#pragma GCC push_options
#pragma GCC target("avx2,fma")
#endif
namespace avx2 {
#include "simd16.h"
#include ROSA2_LANES
}  // namespace avx2
#ifdef __clang__
#pragma clang attribute pop
#else
#pragma GCC pop_options
#endif
#undef ROSA2_SIMD_AVX512
