// One new token per row attending to a bfloat16 cache and a decode call's buffer, as decoder.decode_attention
// computes it with a buffer: per query head, scores q.k / sqrt(D) summed in float32 over the valid slots of both,
// one softmax over them, the probabilities rounded to bfloat16, the values weighted in float32, and the cache's
// and the buffer's sums added. XLA runs this as small batched dots whose per-call cost, more than their bytes,
// dominates a decode step (BUILD_NOTES.md, "The decode step against its roofline"); here each (row, kv head) is a
// task on XLA's CPU thread pool and reads only the slots from its row's first valid one to its last.
//
// Shapes: q [B, K, G, D] bfloat16 (the G query heads of kv head k), keys [B, K, D, n] and values [B, K, n, D]
// bfloat16 for the cache (n = S slots) and the buffer (n = T), masks [B, S] and [B, T] bool; out [B, K, G, D]
// float32. Every row's buffer holds its own token's slot (decoder.decoder_hidden), so every softmax has a slot.
#include <immintrin.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <memory>
#include <vector>

#include "parallel.h"
#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace {

constexpr int64_t kLanes = 16;
constexpr int kHeads = 8;  // query heads per pass over a part's keys or values (their sums stay in registers)

struct Part {  // the cache or the buffer
  const uint16_t* k;  // [B, K, D, n]
  const uint16_t* v;  // [B, K, n, D]
  const bool* mask;   // [B, n]
  int64_t n;
};

struct Job {
  const uint16_t* q;  // [B, K, G, D]
  Part parts[2];
  float* out;  // [B, K, G, D]
  int64_t B, K, G, D;
  float root_d;
  std::atomic<int64_t> next{0};
};

#define AVX512 __attribute__((target("avx512f,avx512bw,avx512vl")))

AVX512 inline __m512 Load(const uint16_t* p, __mmask16 m) {  // bfloat16 -> float32, exactly
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm256_maskz_loadu_epi16(m, p)), 16));
}

AVX512 inline __mmask16 Lanes(int64_t left) { return left >= kLanes ? 0xFFFF : left <= 0 ? 0 : (1u << left) - 1; }

// e^x to ~1 ulp: x = n ln2 + r with |r| <= ln2/2 (ln2 in two parts, Cody-Waite), e^r by its Taylor series to r^7
// (truncation < 1e-8 relative), times 2^n by VSCALEFPS. x is clamped at -150, far below float32's range: a masked
// score (-inf) gives 0.
AVX512 inline __m512 Exp(__m512 x) {
  x = _mm512_max_ps(x, _mm512_set1_ps(-150.0f));
  const __m512 n = _mm512_roundscale_ps(_mm512_mul_ps(x, _mm512_set1_ps(1.44269504088896341f)),
                                        _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m512 r = _mm512_fnmadd_ps(n, _mm512_set1_ps(0.693359375f), x);
  r = _mm512_fnmadd_ps(n, _mm512_set1_ps(-2.12194440e-4f), r);
  __m512 p = _mm512_set1_ps(1.0f / 5040.0f);
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f / 720.0f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f / 120.0f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f / 24.0f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f / 6.0f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(0.5f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f));
  return _mm512_scalef_ps(p, n);
}

AVX512 inline __m512 RoundToBfloat16(__m512 x) {  // to nearest, ties to even, as XLA's convert (x finite)
  const __m512i bits = _mm512_castps_si512(x);
  const __m512i odd = _mm512_and_si512(_mm512_srli_epi32(bits, 16), _mm512_set1_epi32(1));
  const __m512i up = _mm512_add_epi32(bits, _mm512_add_epi32(odd, _mm512_set1_epi32(0x7FFF)));
  return _mm512_castsi512_ps(_mm512_and_si512(up, _mm512_set1_epi32(static_cast<int>(0xFFFF0000u))));
}

// scores[g][s - lo] = (q_g . k_s) / sqrt(D) for s in [lo, hi), -inf where masked; NG query heads from `q` [NG, D].
// A block is 32 slots, one cache line of each of the D key rows ([D, n]: one depth of every slot), its sums in
// registers; the next block's lines are prefetched while it runs.
template <int NG>
AVX512 void Scores(const float* q, const uint16_t* keys, const bool* mask, int64_t n, int64_t lo, int64_t hi,
                   int64_t D, float root_d, float* scores, int64_t stride) {
  const __m512 masked = _mm512_set1_ps(-INFINITY), root = _mm512_set1_ps(root_d);
  for (int64_t s = lo; s < hi; s += 2 * kLanes) {
    const __mmask16 m[2] = {Lanes(hi - s), Lanes(hi - s - kLanes)};
    __m512 acc[NG][2];
    for (int g = 0; g < NG; ++g) acc[g][0] = acc[g][1] = _mm512_setzero_ps();
    for (int64_t d = 0; d < D; ++d) {
      const uint16_t* row = keys + d * n + s;
      _mm_prefetch(reinterpret_cast<const char*>(row + 2 * kLanes), _MM_HINT_T0);
      const __m512 k0 = Load(row, m[0]), k1 = Load(row + kLanes, m[1]);
      for (int g = 0; g < NG; ++g) {
        const __m512 qd = _mm512_set1_ps(q[g * D + d]);
        acc[g][0] = _mm512_fmadd_ps(qd, k0, acc[g][0]);
        acc[g][1] = _mm512_fmadd_ps(qd, k1, acc[g][1]);
      }
    }
    for (int half = 0; half < 2; ++half) {
      const int64_t at = s + half * kLanes;
      if (!m[half]) break;
      const __m128i bytes = _mm_maskz_loadu_epi8(m[half], mask + at);
      const __mmask16 valid = _mm_test_epi8_mask(bytes, bytes);
      for (int g = 0; g < NG; ++g)
        _mm512_mask_storeu_ps(scores + g * stride + (at - lo), m[half],
                              _mm512_mask_blend_ps(valid, masked, _mm512_div_ps(acc[g][half], root)));
    }
  }
}

// out[g][:] = sum over valid s in [lo, hi) of probs[g][s - lo] * v_s, NG query heads, D a multiple of 16.
template <int NG>
AVX512 void Weighted(const float* probs, int64_t stride, const uint16_t* values, const bool* mask, int64_t lo,
                     int64_t hi, int64_t D, float* out) {
  for (int64_t d0 = 0; d0 < D; d0 += 2 * kLanes) {
    const bool pair = d0 + kLanes < D;
    __m512 acc[NG][2];
    for (int g = 0; g < NG; ++g) acc[g][0] = acc[g][1] = _mm512_setzero_ps();
    for (int64_t s = lo; s < hi; ++s) {
      if (!mask[s]) continue;  // its probability is 0
      const uint16_t* v = values + s * D + d0;
      const __m512 v0 = Load(v, 0xFFFF), v1 = pair ? Load(v + kLanes, 0xFFFF) : _mm512_setzero_ps();
      for (int g = 0; g < NG; ++g) {
        const __m512 p = _mm512_set1_ps(probs[g * stride + (s - lo)]);
        acc[g][0] = _mm512_fmadd_ps(p, v0, acc[g][0]);
        acc[g][1] = _mm512_fmadd_ps(p, v1, acc[g][1]);
      }
    }
    for (int g = 0; g < NG; ++g) {
      _mm512_storeu_ps(out + g * D + d0, acc[g][0]);
      if (pair) _mm512_storeu_ps(out + g * D + d0 + kLanes, acc[g][1]);
    }
  }
}

template <int NG>
AVX512 void HeadBlock(const Job& job, int64_t b, int64_t kv, const float* q, const int64_t* lo, const int64_t* hi,
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
    __m512 top = _mm512_set1_ps(-INFINITY);
    for (int64_t s = 0; s < stride; s += kLanes)
      top = _mm512_max_ps(top, _mm512_mask_loadu_ps(top, Lanes(stride - s), row + s));
    const __m512 shift = _mm512_set1_ps(_mm512_reduce_max_ps(top));
    float total[2];
    for (int p = 0; p < 2; ++p) {  // sum(cached) + sum(new), as decode_attention adds them
      __m512 acc = _mm512_setzero_ps();
      for (int64_t s = p ? width[0] : 0, end = p ? stride : width[0]; s < end; s += kLanes) {
        const __mmask16 m = Lanes(end - s);
        const __m512 e = Exp(_mm512_sub_ps(_mm512_maskz_loadu_ps(m, row + s), shift));
        _mm512_mask_storeu_ps(row + s, m, e);
        acc = _mm512_add_ps(acc, _mm512_maskz_mov_ps(m, e));
      }
      total[p] = _mm512_reduce_add_ps(acc);
    }
    const __m512 sum = _mm512_set1_ps(total[0] + total[1]);
    for (int64_t s = 0; s < stride; s += kLanes) {
      const __mmask16 m = Lanes(stride - s);
      _mm512_mask_storeu_ps(row + s, m, RoundToBfloat16(_mm512_div_ps(_mm512_maskz_loadu_ps(m, row + s), sum)));
    }
  }
  for (int p = 0; p < 2; ++p) {
    const int64_t head = b * job.K + kv;
    Weighted<NG>(scores + (p ? width[0] : 0), stride, parts[p].v + head * parts[p].n * D,
                 parts[p].mask + b * parts[p].n, lo[p], hi[p], D, sums + p * NG * D);
  }
  for (int64_t i = 0; i < NG * D; ++i) sums[i] += sums[NG * D + i];
}

AVX512 void Task(const Job& job, int64_t task, std::vector<float>& qf, std::vector<float>& scratch) {
  const int64_t b = task / job.K, kv = task % job.K, G = job.G, D = job.D;
  int64_t lo[2], hi[2];
  for (int p = 0; p < 2; ++p) {  // the valid range of the row's slots
    const bool* mask = job.parts[p].mask + b * job.parts[p].n;
    const int64_t n = job.parts[p].n;
    lo[p] = 0;
    while (lo[p] < n && !mask[lo[p]]) ++lo[p];
    hi[p] = n;
    while (hi[p] > lo[p] && !mask[hi[p] - 1]) --hi[p];
  }
  qf.resize(G * D);
  const uint16_t* q = job.q + task * G * D;
  for (int64_t i = 0; i < G * D; ++i) {
    const uint32_t bits = static_cast<uint32_t>(q[i]) << 16;
    std::memcpy(&qf[i], &bits, 4);
  }
  float* out = job.out + task * G * D;
  for (int64_t g0 = 0; g0 < G; g0 += kHeads) {
    const int ng = static_cast<int>(std::min<int64_t>(kHeads, G - g0));
    const float* qg = qf.data() + g0 * D;
    switch (ng) {
      case 1: HeadBlock<1>(job, b, kv, qg, lo, hi, scratch); break;
      case 2: HeadBlock<2>(job, b, kv, qg, lo, hi, scratch); break;
      case 3: HeadBlock<3>(job, b, kv, qg, lo, hi, scratch); break;
      case 4: HeadBlock<4>(job, b, kv, qg, lo, hi, scratch); break;
      case 5: HeadBlock<5>(job, b, kv, qg, lo, hi, scratch); break;
      case 6: HeadBlock<6>(job, b, kv, qg, lo, hi, scratch); break;
      case 7: HeadBlock<7>(job, b, kv, qg, lo, hi, scratch); break;
      default: HeadBlock<8>(job, b, kv, qg, lo, hi, scratch); break;
    }
    const int64_t width = (hi[0] - lo[0]) + (hi[1] - lo[1]);
    std::memcpy(out + g0 * D, scratch.data() + ng * width, ng * D * sizeof(float));
  }
}

void Work(Job& job) {
  std::vector<float> qf, scratch;
  for (int64_t t; (t = job.next.fetch_add(1)) < job.B * job.K;) Task(job, t, qf, scratch);
}

bool Is(const ffi::AnyBuffer& x, ffi::DataType type, std::initializer_list<int64_t> dims) {
  const auto d = x.dimensions();
  return x.element_type() == type && std::equal(d.begin(), d.end(), dims.begin(), dims.end());
}

ffi::Error DecodeAttention(ffi::ThreadPool pool, ffi::AnyBuffer q, ffi::AnyBuffer cache_k, ffi::AnyBuffer cache_v,
                           ffi::AnyBuffer cache_mask, ffi::AnyBuffer buffer_k, ffi::AnyBuffer buffer_v,
                           ffi::AnyBuffer buffer_mask, ffi::Result<ffi::AnyBuffer> out) {
  using ffi::DataType;
  const auto qd = q.dimensions();
  if (qd.size() != 4 || cache_mask.dimensions().size() != 2 || buffer_mask.dimensions().size() != 2)
    return ffi::Error::InvalidArgument("decode_attention: expected q [B, K, G, D] and masks [B, S], [B, T]");
  const int64_t B = qd[0], K = qd[1], G = qd[2], D = qd[3];
  const int64_t S = cache_mask.dimensions()[1], T = buffer_mask.dimensions()[1];
  const auto bf16 = DataType::BF16, pred = DataType::PRED;
  if (D % kLanes || !Is(q, bf16, {B, K, G, D}) || !Is(cache_k, bf16, {B, K, D, S}) ||
      !Is(cache_v, bf16, {B, K, S, D}) || !Is(cache_mask, pred, {B, S}) || !Is(buffer_k, bf16, {B, K, D, T}) ||
      !Is(buffer_v, bf16, {B, K, T, D}) || !Is(buffer_mask, pred, {B, T}) || !Is(*out, DataType::F32, {B, K, G, D}))
    return ffi::Error::InvalidArgument(
        "decode_attention: expected bfloat16 q [B, K, G, D] (D a multiple of 16), keys [B, K, D, S|T], values "
        "[B, K, S|T, D], bool masks [B, S|T] and a float32 output [B, K, G, D]");
  auto job = std::make_shared<Job>();
  job->q = reinterpret_cast<const uint16_t*>(q.untyped_data());
  job->parts[0] = {reinterpret_cast<const uint16_t*>(cache_k.untyped_data()),
                   reinterpret_cast<const uint16_t*>(cache_v.untyped_data()),
                   reinterpret_cast<const bool*>(cache_mask.untyped_data()), S};
  job->parts[1] = {reinterpret_cast<const uint16_t*>(buffer_k.untyped_data()),
                   reinterpret_cast<const uint16_t*>(buffer_v.untyped_data()),
                   reinterpret_cast<const bool*>(buffer_mask.untyped_data()), T};
  job->out = reinterpret_cast<float*>(out->untyped_data());
  job->B = B;
  job->K = K;
  job->G = G;
  job->D = D;
  job->root_d = static_cast<float>(std::sqrt(static_cast<double>(D)));
  rosa2::RunOnPool(pool, job->B * job->K, [job] { Work(*job); });
  return ffi::Error::Success();
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(Rosa2DecodeAttention, DecodeAttention,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Ret<ffi::AnyBuffer>());

// 1 when this CPU and its OS run AVX-512 F, BW and VL, else 0.
extern "C" int rosa2_attention_ready() {
  __builtin_cpu_init();
  return __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
         __builtin_cpu_supports("avx512vl");
}
