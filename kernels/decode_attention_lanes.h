// decode_attention.cc's lane code, compiled once per instruction set (simd_targets.h). Each lane's float32 sums run
// over one slot's depths or one depth's slots in order, and the reductions are simd16.h's, so both instruction sets
// give the same bits.

// Query heads per pass over a part's keys or values, their sums kept in registers: 8 in AVX-512's 32; 2 in AVX2's 16
// (3 and 4 spill, measured slower at 1,024 and 2,048 slots).
constexpr int kHeads = ROSA2_SIMD_AVX512 ? 8 : 2;

// scores[g][s - lo] = (q_g . k_s) / sqrt(D) for s in [lo, hi), -inf where masked; NG query heads from `q` [NG, D].
// A block is 32 slots, one cache line of each of the D key rows ([D, n]: one depth of every slot), its sums in
// registers; the next block's lines are prefetched while it runs.
template <int NG>
void Scores(const float* q, const uint16_t* keys, const bool* mask, int64_t n, int64_t lo, int64_t hi, int64_t D,
            float root_d, float* scores, int64_t stride) {
  const Floats masked = Set(-INFINITY), root = Set(root_d);
  for (int64_t s = lo; s < hi; s += 2 * kLanes) {
    const uint32_t m[2] = {Lanes(hi - s), Lanes(hi - s - kLanes)};
    Floats acc[NG][2];
    for (int g = 0; g < NG; ++g) acc[g][0] = acc[g][1] = Zero();
    for (int64_t d = 0; d < D; ++d) {
      const uint16_t* row = keys + d * n + s;
      _mm_prefetch(reinterpret_cast<const char*>(row + 2 * kLanes), _MM_HINT_T0);
      const Floats k0 = LoadBfloat16(row, m[0]), k1 = LoadBfloat16(row + kLanes, m[1]);
      for (int g = 0; g < NG; ++g) {
        const Floats qd = Set(q[g * D + d]);
        acc[g][0] = Fma(qd, k0, acc[g][0]);
        acc[g][1] = Fma(qd, k1, acc[g][1]);
      }
    }
    for (int half = 0; half < 2; ++half) {
      const int64_t at = s + half * kLanes;
      if (!m[half]) break;
      const uint32_t valid = Nonzero(mask + at, m[half]);
      for (int g = 0; g < NG; ++g)
        Store(scores + g * stride + (at - lo), m[half], Select(valid, masked, Div(acc[g][half], root)));
    }
  }
}

// out[g][:] = sum over valid s in [lo, hi) of probs[g][s - lo] * v_s, NG query heads, D a multiple of 16.
template <int NG>
void Weighted(const float* probs, int64_t stride, const uint16_t* values, const bool* mask, int64_t lo, int64_t hi,
              int64_t D, float* out) {
  for (int64_t d0 = 0; d0 < D; d0 += 2 * kLanes) {
    const bool pair = d0 + kLanes < D;
    Floats acc[NG][2];
    for (int g = 0; g < NG; ++g) acc[g][0] = acc[g][1] = Zero();
    for (int64_t s = lo; s < hi; ++s) {
      if (!mask[s]) continue;  // its probability is 0
      const uint16_t* v = values + s * D + d0;
      const Floats v0 = LoadBfloat16(v, 0xFFFF), v1 = pair ? LoadBfloat16(v + kLanes, 0xFFFF) : Zero();
      for (int g = 0; g < NG; ++g) {
        const Floats p = Set(probs[g * stride + (s - lo)]);
        acc[g][0] = Fma(p, v0, acc[g][0]);
        acc[g][1] = Fma(p, v1, acc[g][1]);
      }
    }
    for (int g = 0; g < NG; ++g) {
      Store(out + g * D + d0, 0xFFFF, acc[g][0]);
      if (pair) Store(out + g * D + d0 + kLanes, 0xFFFF, acc[g][1]);
    }
  }
}

template <int NG>
void HeadBlock(const Job& job, int64_t b, int64_t kv, const float* q, const int64_t* lo, const int64_t* hi,
               std::vector<float>& scratch) {
  const int64_t D = job.D, width[2] = {hi[0] - lo[0], hi[1] - lo[1]};
  const int64_t stride = width[0] + width[1];  // a head's scores: the cache's valid range, then the buffer's
  scratch.resize(NG * stride + 2 * NG * D);
  float* scores = scratch.data();
  float* sums = scores + NG * stride;  // [2, NG, D]
  const Part* parts = job.parts;
  for (int p = 0; p < 2; ++p) {
    const int64_t head = b * job.K + kv;
    Scores<NG>(q, parts[p].k + head * D * parts[p].n, parts[p].mask + b * parts[p].n, parts[p].n, lo[p], hi[p], D,
               job.root_d, scores + (p ? width[0] : 0), stride);
  }
  for (int g = 0; g < NG; ++g) {
    float* row = scores + g * stride;
    Floats top = Set(-INFINITY);
    for (int64_t s = 0; s < stride; s += kLanes) {
      const uint32_t m = Lanes(stride - s);
      top = Max(top, Select(m, top, Load(row + s, m)));
    }
    const Floats shift = Set(ReduceMax(top));
    float total[2];
    for (int p = 0; p < 2; ++p) {  // sum(cached) + sum(new), as decode_attention adds them
      Floats acc = Zero();
      for (int64_t s = p ? width[0] : 0, end = p ? stride : width[0]; s < end; s += kLanes) {
        const uint32_t m = Lanes(end - s);
        const Floats e = Exp(Sub(Load(row + s, m), shift));
        Store(row + s, m, e);
        acc = Add(acc, Select(m, Zero(), e));
      }
      total[p] = ReduceAdd(acc);
    }
    const Floats sum = Set(total[0] + total[1]);
    for (int64_t s = 0; s < stride; s += kLanes) {
      const uint32_t m = Lanes(stride - s);
      Store(row + s, m, RoundToBfloat16(Div(Load(row + s, m), sum)));
    }
  }
  for (int p = 0; p < 2; ++p) {
    const int64_t head = b * job.K + kv;
    Weighted<NG>(scores + (p ? width[0] : 0), stride, parts[p].v + head * parts[p].n * D,
                 parts[p].mask + b * parts[p].n, lo[p], hi[p], D, sums + p * NG * D);
  }
  for (int64_t i = 0; i < NG * D; ++i) sums[i] += sums[NG * D + i];
}

// HeadBlock<ng> for 1 <= ng <= NG.
template <int NG>
void HeadBlocks(int ng, const Job& job, int64_t b, int64_t kv, const float* q, const int64_t* lo, const int64_t* hi,
                std::vector<float>& scratch) {
  if constexpr (NG > 1) {
    if (ng < NG) return HeadBlocks<NG - 1>(ng, job, b, kv, q, lo, hi, scratch);
  }
  HeadBlock<NG>(job, b, kv, q, lo, hi, scratch);
}

// The attention of one (row, kv head): its G query heads in passes of up to kHeads.
void Task(const Job& job, int64_t task, const int64_t* lo, const int64_t* hi, const float* qf,
          std::vector<float>& scratch) {
  const int64_t b = task / job.K, kv = task % job.K, G = job.G, D = job.D;
  float* out = job.out + task * G * D;
  for (int64_t g0 = 0; g0 < G; g0 += kHeads) {
    const int ng = static_cast<int>(std::min<int64_t>(kHeads, G - g0));
    const float* qg = qf + g0 * D;
    HeadBlocks<kHeads>(ng, job, b, kv, qg, lo, hi, scratch);
    const int64_t width = (hi[0] - lo[0]) + (hi[1] - lo[1]);
    std::memcpy(out + g0 * D, scratch.data() + ng * width, ng * D * sizeof(float));
  }
}
