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

// Each region opens its namespace under its instruction set: GCC takes it from `#pragma GCC target`, clang (which
// ignores that) from `#pragma clang attribute`.
#ifdef __clang__
#define ROSA2_BEGIN_AVX512 \
  _Pragma("clang attribute push(__attribute__((target(\"avx512f,avx512bw,avx512vl,fma\"))), apply_to = function)") \
  namespace avx512 {
#define ROSA2_BEGIN_AVX2 \
  _Pragma("clang attribute push(__attribute__((target(\"avx2,fma\"))), apply_to = function)") namespace avx2 {
#define ROSA2_END } _Pragma("clang attribute pop")
#else
#define ROSA2_BEGIN_AVX512 \
  _Pragma("GCC push_options") _Pragma("GCC target(\"avx512f,avx512bw,avx512vl,fma\")") namespace avx512 {
#define ROSA2_BEGIN_AVX2 _Pragma("GCC push_options") _Pragma("GCC target(\"avx2,fma\")") namespace avx2 {
#define ROSA2_END } _Pragma("GCC pop_options")
#endif

#define ROSA2_SIMD_AVX512 1
ROSA2_BEGIN_AVX512
#include "simd16.h"
#include ROSA2_LANES
ROSA2_END

#undef ROSA2_SIMD_AVX512
#define ROSA2_SIMD_AVX512 0
ROSA2_BEGIN_AVX2
#include "simd16.h"
#include ROSA2_LANES
ROSA2_END
#undef ROSA2_SIMD_AVX512
