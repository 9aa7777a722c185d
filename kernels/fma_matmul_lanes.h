// fma_matmul.cc's lane code, compiled once per instruction set (simd_targets.h). Every output is one float32
// accumulator over depth in order, acc = fma(x[k], w[k], acc) from k = 0: the blocking below (which the two
// instruction sets size differently) decides only which outputs share a pass over the weight, never a sum.

// Accumulators a pass keeps: AVX2's sixteen registers hold six 16-lane accumulators (two registers each) beside a
// weight and a broadcast; AVX-512's thirty-two hold twelve. Enough for the FMA units' latency at any row count.
constexpr int kAccumulators = ROSA2_SIMD_AVX512 ? 12 : 6;
constexpr int kMaxRows = 6;

// The 16 bfloat16 weights of one depth of a panel, stored [c0, c8, c1, c9, ..., c7, c15] (fma_matmul.pack_panels)
// so each 32-bit pair gives column i in its low half and column i + 8 in its high half, as float32 exactly.
inline Floats LoadPanelDepth(const uint16_t* p) {
  const __m256i pairs = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p));
  const __m256 low = _mm256_castsi256_ps(_mm256_slli_epi32(pairs, 16));
  const __m256 high = _mm256_castsi256_ps(_mm256_and_si256(pairs, _mm256_set1_epi32(static_cast<int>(0xFFFF0000u))));
#if ROSA2_SIMD_AVX512
  return {_mm512_castpd_ps(_mm512_insertf64x4(_mm512_castpd256_pd512(_mm256_castps_pd(low)), _mm256_castps_pd(high),
                                              1))};
#else
  return {low, high};
#endif
}

// y[m0 .. m0+R, 16 p0 .. 16 (p0+P)] for R rows of x [M, K] and P panels of w [N/16, K, 16] (a panel's 16
// columns are a vector's lanes).
template <int R, int P>
void Block(const float* x, const uint16_t* w, float* y, int64_t K, int64_t N, int64_t m0, int64_t p0) {
  Floats acc[R][P];
  for (int r = 0; r < R; ++r)
    for (int p = 0; p < P; ++p) acc[r][p] = Zero();
  const float* xr = x + m0 * K;
  const uint16_t* wp = w + p0 * K * kLanes;
  for (int64_t k = 0; k < K; ++k) {
    for (int p = 0; p < P; ++p) {
      const Floats wk = LoadPanelDepth(wp + (p * K + k) * kLanes);
      for (int r = 0; r < R; ++r) acc[r][p] = Fma(Set(xr[r * K + k]), wk, acc[r][p]);
    }
  }
  for (int r = 0; r < R; ++r)
    for (int p = 0; p < P; ++p) Store(y + (m0 + r) * N + (p0 + p) * kLanes, 0xFFFFu, acc[r][p]);
}

// Rows m0 .. m0+R of panels [first, end): as many panels a pass as the accumulators allow, then halves as many.
template <int R, int P = kAccumulators / R>
void Rows(const float* x, const uint16_t* w, float* y, int64_t K, int64_t N, int64_t m0, int64_t first,
          int64_t end) {
  for (; first + P <= end; first += P) Block<R, P>(x, w, y, K, N, m0, first);
  if constexpr (P > 1) Rows<R, P / 2>(x, w, y, K, N, m0, first, end);
}

// All M rows of panels [first, end), in passes of at most kMaxRows rows spread evenly (16 rows: 5, 5, 6).
void Panels(const float* x, const uint16_t* w, float* y, int64_t M, int64_t K, int64_t N, int64_t first,
            int64_t end) {
  const int64_t passes = (M + kMaxRows - 1) / kMaxRows;
  for (int64_t i = 0, m0 = 0; i < passes; ++i) {
    const int64_t rows = (M - m0) / (passes - i);  // the rest spread evenly over the passes left
    switch (rows) {
      case 1: Rows<1>(x, w, y, K, N, m0, first, end); break;
      case 2: Rows<2>(x, w, y, K, N, m0, first, end); break;
      case 3: Rows<3>(x, w, y, K, N, m0, first, end); break;
      case 4: Rows<4>(x, w, y, K, N, m0, first, end); break;
      case 5: Rows<5>(x, w, y, K, N, m0, first, end); break;
      default: Rows<6>(x, w, y, K, N, m0, first, end); break;
    }
    m0 += rows;
  }
}
