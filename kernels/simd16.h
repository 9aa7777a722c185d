// Sixteen float32 or int32 lanes for the CPU kernels, written once for two instruction sets: one AVX-512 register,
// or two AVX2 registers (lanes 0-7 and 8-15). Every operation is lane by lane with the same instructions' rounding
// (fma, div, round-to-nearest), and the reductions add in one fixed order, so a kernel written on these gives the
// same bits on either. No include guard: kernels/simd_targets.h includes this file once per instruction set, each
// time in that instruction set's region and namespace, with ROSA2_SIMD_AVX512 defined as 1 or 0.
//
// Lanes are selected by a 16-bit mask (bit i: lane i); a load reads only its selected lanes (the others are 0), so
// the tail of an array can be loaded without reading past its end.

constexpr int64_t kLanes = 16;

inline uint32_t Lanes(int64_t left) { return left >= kLanes ? 0xFFFFu : left <= 0 ? 0u : (1u << left) - 1; }

#if ROSA2_SIMD_AVX512

struct Floats {
  __m512 v;
};
struct Ints {
  __m512i v;
};

inline Floats Set(float x) { return {_mm512_set1_ps(x)}; }
inline Ints SetInts(int32_t x) { return {_mm512_set1_epi32(x)}; }
inline Floats Load(const float* p, uint32_t m) { return {_mm512_maskz_loadu_ps(m, p)}; }
inline Ints LoadInts(const int32_t* p, uint32_t m) { return {_mm512_maskz_loadu_epi32(m, p)}; }
inline Floats LoadBfloat16(const uint16_t* p, uint32_t m) {  // bfloat16 -> float32, exactly
  return {_mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm256_maskz_loadu_epi16(m, p)), 16))};
}
inline void Store(float* p, uint32_t m, Floats x) { _mm512_mask_storeu_ps(p, m, x.v); }
inline Floats Add(Floats a, Floats b) { return {_mm512_add_ps(a.v, b.v)}; }
inline Floats Sub(Floats a, Floats b) { return {_mm512_sub_ps(a.v, b.v)}; }
inline Floats Mul(Floats a, Floats b) { return {_mm512_mul_ps(a.v, b.v)}; }
inline Floats Div(Floats a, Floats b) { return {_mm512_div_ps(a.v, b.v)}; }
inline Floats Max(Floats a, Floats b) { return {_mm512_max_ps(a.v, b.v)}; }  // b where either is NaN
inline Floats Fma(Floats a, Floats b, Floats c) { return {_mm512_fmadd_ps(a.v, b.v, c.v)}; }    // a b + c
inline Floats Fnma(Floats a, Floats b, Floats c) { return {_mm512_fnmadd_ps(a.v, b.v, c.v)}; }  // c - a b
inline Floats RoundToInteger(Floats x) {  // to nearest, ties to even
  return {_mm512_roundscale_ps(x.v, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC)};
}
inline Floats TimesPowerOfTwo(Floats x, Floats n) { return {_mm512_scalef_ps(x.v, n.v)}; }  // x 2^n, n integral
inline Floats Select(uint32_t m, Floats no, Floats yes) { return {_mm512_mask_blend_ps(m, no.v, yes.v)}; }
inline Ints Select(uint32_t m, Ints no, Ints yes) { return {_mm512_mask_blend_epi32(m, no.v, yes.v)}; }
inline Floats Bits(Ints x) { return {_mm512_castsi512_ps(x.v)}; }
inline Ints Bits(Floats x) { return {_mm512_castps_si512(x.v)}; }
inline Ints AddInts(Ints a, Ints b) { return {_mm512_add_epi32(a.v, b.v)}; }
inline Ints And(Ints a, Ints b) { return {_mm512_and_si512(a.v, b.v)}; }
inline Ints Xor(Ints a, Ints b) { return {_mm512_xor_si512(a.v, b.v)}; }
template <int n>
inline Ints ShiftRight(Ints x) { return {_mm512_srli_epi32(x.v, n)}; }
template <int n>
inline Ints ShiftRightSigned(Ints x) { return {_mm512_srai_epi32(x.v, n)}; }
inline Ints MaxInts(Ints a, Ints b) { return {_mm512_max_epi32(a.v, b.v)}; }
inline uint32_t AtLeast(Ints a, Ints b) { return _mm512_cmpge_epi32_mask(a.v, b.v); }  // lanes where a >= b
inline uint32_t Nonzero(const bool* p, uint32_t m) {  // lanes whose byte is nonzero
  const __m128i bytes = _mm_maskz_loadu_epi8(m, p);
  return _mm_test_epi8_mask(bytes, bytes);
}
template <int i>
inline __m256 Half(Floats x) { return _mm256_castpd_ps(_mm512_extractf64x4_pd(_mm512_castps_pd(x.v), i)); }
template <int i>
inline __m256i Half(Ints x) { return _mm512_extracti64x4_epi64(x.v, i); }

#else

struct Floats {
  __m256 lo, hi;
};
struct Ints {
  __m256i lo, hi;
};

// The lanes of a 16-bit mask as two vectors of all-ones / zero 32-bit lanes.
inline __m256i Expand(uint32_t m, int half) {
  const __m256i bit = _mm256_setr_epi32(1, 2, 4, 8, 16, 32, 64, 128);
  return _mm256_cmpeq_epi32(_mm256_and_si256(_mm256_set1_epi32(static_cast<int>(m >> (8 * half))), bit), bit);
}
inline uint32_t Collapse(__m256 lo, __m256 hi) {
  return static_cast<uint32_t>(_mm256_movemask_ps(lo)) | static_cast<uint32_t>(_mm256_movemask_ps(hi)) << 8;
}

inline Floats Set(float x) { return {_mm256_set1_ps(x), _mm256_set1_ps(x)}; }
inline Ints SetInts(int32_t x) { return {_mm256_set1_epi32(x), _mm256_set1_epi32(x)}; }
inline Floats Load(const float* p, uint32_t m) {
  if (m == 0xFFFFu) return {_mm256_loadu_ps(p), _mm256_loadu_ps(p + 8)};
  return {_mm256_maskload_ps(p, Expand(m, 0)), _mm256_maskload_ps(p + 8, Expand(m, 1))};
}
inline Ints LoadInts(const int32_t* p, uint32_t m) {
  if (m == 0xFFFFu)
    return {_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)),
            _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p + 8))};
  return {_mm256_maskload_epi32(p, Expand(m, 0)), _mm256_maskload_epi32(p + 8, Expand(m, 1))};
}
inline Floats LoadBfloat16(const uint16_t* p, uint32_t m) {  // bfloat16 -> float32, exactly
  alignas(32) uint16_t part[kLanes];
  if (m != 0xFFFFu) {  // AVX2 has no 16-bit masked load: copy the selected lanes
    for (int i = 0; i < kLanes; ++i) part[i] = (m >> i & 1) ? p[i] : 0;
    p = part;
  }
  const __m256i x = _mm256_cvtepu16_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
  const __m256i y = _mm256_cvtepu16_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p + 8)));
  return {_mm256_castsi256_ps(_mm256_slli_epi32(x, 16)), _mm256_castsi256_ps(_mm256_slli_epi32(y, 16))};
}
inline void Store(float* p, uint32_t m, Floats x) {
  if (m == 0xFFFFu) {
    _mm256_storeu_ps(p, x.lo);
    _mm256_storeu_ps(p + 8, x.hi);
  } else {
    _mm256_maskstore_ps(p, Expand(m, 0), x.lo);
    _mm256_maskstore_ps(p + 8, Expand(m, 1), x.hi);
  }
}
inline Floats Add(Floats a, Floats b) { return {_mm256_add_ps(a.lo, b.lo), _mm256_add_ps(a.hi, b.hi)}; }
inline Floats Sub(Floats a, Floats b) { return {_mm256_sub_ps(a.lo, b.lo), _mm256_sub_ps(a.hi, b.hi)}; }
inline Floats Mul(Floats a, Floats b) { return {_mm256_mul_ps(a.lo, b.lo), _mm256_mul_ps(a.hi, b.hi)}; }
inline Floats Div(Floats a, Floats b) { return {_mm256_div_ps(a.lo, b.lo), _mm256_div_ps(a.hi, b.hi)}; }
inline Floats Max(Floats a, Floats b) { return {_mm256_max_ps(a.lo, b.lo), _mm256_max_ps(a.hi, b.hi)}; }
inline Floats Fma(Floats a, Floats b, Floats c) {
  return {_mm256_fmadd_ps(a.lo, b.lo, c.lo), _mm256_fmadd_ps(a.hi, b.hi, c.hi)};
}
inline Floats Fnma(Floats a, Floats b, Floats c) {
  return {_mm256_fnmadd_ps(a.lo, b.lo, c.lo), _mm256_fnmadd_ps(a.hi, b.hi, c.hi)};
}
inline Floats RoundToInteger(Floats x) {
  constexpr int kNearest = _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC;
  return {_mm256_round_ps(x.lo, kNearest), _mm256_round_ps(x.hi, kNearest)};
}
// x 2^n for integral n in [-256, 256] with one rounding, as VSCALEFPS: 2^n as two powers of two that are normal
// floats, the first product exact for the |x| in [2^-1, 2^1) of exp's use, the second rounding once.
inline __m256 PowerOfTwo(__m256i e) {  // 2^e for e in [-126, 127]
  return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_add_epi32(e, _mm256_set1_epi32(127)), 23));
}
inline __m256 TimesPowerOfTwo(__m256 x, __m256 n) {
  const __m256i k = _mm256_cvtps_epi32(n);
  const __m256i k1 = _mm256_srai_epi32(k, 1), k2 = _mm256_sub_epi32(k, k1);
  return _mm256_mul_ps(_mm256_mul_ps(x, PowerOfTwo(k1)), PowerOfTwo(k2));
}
inline Floats TimesPowerOfTwo(Floats x, Floats n) { return {TimesPowerOfTwo(x.lo, n.lo), TimesPowerOfTwo(x.hi, n.hi)}; }
inline Floats Select(uint32_t m, Floats no, Floats yes) {
  return {_mm256_blendv_ps(no.lo, yes.lo, _mm256_castsi256_ps(Expand(m, 0))),
          _mm256_blendv_ps(no.hi, yes.hi, _mm256_castsi256_ps(Expand(m, 1)))};
}
inline Ints Select(uint32_t m, Ints no, Ints yes) {
  return {_mm256_blendv_epi8(no.lo, yes.lo, Expand(m, 0)), _mm256_blendv_epi8(no.hi, yes.hi, Expand(m, 1))};
}
inline Floats Bits(Ints x) { return {_mm256_castsi256_ps(x.lo), _mm256_castsi256_ps(x.hi)}; }
inline Ints Bits(Floats x) { return {_mm256_castps_si256(x.lo), _mm256_castps_si256(x.hi)}; }
inline Ints AddInts(Ints a, Ints b) { return {_mm256_add_epi32(a.lo, b.lo), _mm256_add_epi32(a.hi, b.hi)}; }
inline Ints And(Ints a, Ints b) { return {_mm256_and_si256(a.lo, b.lo), _mm256_and_si256(a.hi, b.hi)}; }
inline Ints Xor(Ints a, Ints b) { return {_mm256_xor_si256(a.lo, b.lo), _mm256_xor_si256(a.hi, b.hi)}; }
template <int n>
inline Ints ShiftRight(Ints x) { return {_mm256_srli_epi32(x.lo, n), _mm256_srli_epi32(x.hi, n)}; }
template <int n>
inline Ints ShiftRightSigned(Ints x) { return {_mm256_srai_epi32(x.lo, n), _mm256_srai_epi32(x.hi, n)}; }
inline Ints MaxInts(Ints a, Ints b) { return {_mm256_max_epi32(a.lo, b.lo), _mm256_max_epi32(a.hi, b.hi)}; }
inline uint32_t AtLeast(Ints a, Ints b) {  // a >= b: not b > a
  return ~Collapse(_mm256_castsi256_ps(_mm256_cmpgt_epi32(b.lo, a.lo)),
                   _mm256_castsi256_ps(_mm256_cmpgt_epi32(b.hi, a.hi))) & 0xFFFFu;
}
inline uint32_t Nonzero(const bool* p, uint32_t m) {
  uint32_t out = 0;
  for (int i = 0; i < kLanes; ++i) out |= static_cast<uint32_t>((m >> i & 1) && p[i]) << i;
  return out;
}
template <int i>
inline __m256 Half(Floats x) { return i ? x.hi : x.lo; }
template <int i>
inline __m256i Half(Ints x) { return i ? x.hi : x.lo; }

#endif

inline Floats Zero() { return Set(0.0f); }

// The sum and the maximum of the sixteen lanes, in one order on either instruction set: the halves lane by lane,
// then the quarters, then pairs two apart, then the last two (the order GCC's _mm512_reduce_add_ps takes).
inline float ReduceAdd(Floats x) {
  const __m256 h = _mm256_add_ps(Half<1>(x), Half<0>(x));
  const __m128 q = _mm_add_ps(_mm256_extractf128_ps(h, 1), _mm256_castps256_ps128(h));
  const __m128 p = _mm_add_ps(q, _mm_shuffle_ps(q, q, _MM_SHUFFLE(1, 0, 3, 2)));
  return _mm_cvtss_f32(p) + _mm_cvtss_f32(_mm_shuffle_ps(p, p, _MM_SHUFFLE(1, 1, 1, 1)));
}
inline float ReduceMax(Floats x) {
  const __m256 h = _mm256_max_ps(Half<1>(x), Half<0>(x));
  const __m128 q = _mm_max_ps(_mm256_extractf128_ps(h, 1), _mm256_castps256_ps128(h));
  const __m128 p = _mm_max_ps(q, _mm_shuffle_ps(q, q, _MM_SHUFFLE(1, 0, 3, 2)));
  return _mm_cvtss_f32(_mm_max_ps(p, _mm_shuffle_ps(p, p, _MM_SHUFFLE(1, 1, 1, 1))));
}
inline int32_t ReduceMaxInts(Ints x) {
  const __m256i h = _mm256_max_epi32(Half<1>(x), Half<0>(x));
  const __m128i q = _mm_max_epi32(_mm256_extracti128_si256(h, 1), _mm256_castsi256_si128(h));
  const __m128i p = _mm_max_epi32(q, _mm_shuffle_epi32(q, _MM_SHUFFLE(1, 0, 3, 2)));
  return _mm_cvtsi128_si32(_mm_max_epi32(p, _mm_shuffle_epi32(p, _MM_SHUFFLE(1, 1, 1, 1))));
}

// e^x to ~1 ulp: x = n ln2 + r with |r| <= ln2/2 (ln2 in two parts, Cody-Waite), e^r by its Taylor series to r^7
// (truncation < 1e-8 relative), times 2^n. x is clamped at -150, far below float32's range: a masked score (-inf)
// gives 0.
inline Floats Exp(Floats x) {
  x = Max(x, Set(-150.0f));
  const Floats n = RoundToInteger(Mul(x, Set(1.44269504088896341f)));
  Floats r = Fnma(n, Set(0.693359375f), x);
  r = Fnma(n, Set(-2.12194440e-4f), r);
  constexpr float kTaylor[] = {1.0f / 720.0f, 1.0f / 120.0f, 1.0f / 24.0f, 1.0f / 6.0f, 0.5f, 1.0f, 1.0f};
  Floats p = Set(1.0f / 5040.0f);
  for (const float c : kTaylor) p = Fma(p, r, Set(c));
  return TimesPowerOfTwo(p, n);
}

// To the nearest bfloat16, ties to even, as XLA's convert (x finite), kept as a float32.
inline Floats RoundToBfloat16(Floats x) {
  const Ints bits = Bits(x);
  const Ints odd = And(ShiftRight<16>(bits), SetInts(1));
  const Ints up = AddInts(bits, AddInts(odd, SetInts(0x7FFF)));
  return Bits(And(up, SetInts(static_cast<int32_t>(0xFFFF0000u))));
}
