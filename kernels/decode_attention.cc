// One new token per row attending to a bfloat16 cache and a decode call's buffer, as decoder.decode_attention
// computes it with a buffer: per query head, scores q.k / sqrt(D) summed in float32 over the valid slots of both,
// one softmax over them, the probabilities rounded to bfloat16, the values weighted in float32, and the cache's
// and the buffer's sums added. XLA runs this as small batched dots whose per-call cost, more than their bytes,
// dominates a decode step (BUILD_NOTES.md, "The decode step against its roofline"); here each (row, kv head) is a
// task on XLA's CPU thread pool and reads only the slots from its row's first valid one to its last. Its lane code
// (decode_attention_lanes.h) is compiled for AVX-512 and for AVX2; the handler's `avx512` attribute picks one.
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
  bool avx512;  // else AVX2
  std::atomic<int64_t> next{0};
};

#define ROSA2_LANES "decode_attention_lanes.h"
#include "simd_targets.h"

// Takes (row, kv head) tasks until none is left: each one's valid slot ranges and its query heads in float32, then
// its attention on the job's instruction set.
void Work(Job& job) {
  std::vector<float> qf, scratch;
  const int64_t G = job.G, D = job.D;
  qf.resize(G * D);
  for (int64_t task; (task = job.next.fetch_add(1)) < job.B * job.K;) {
    const int64_t b = task / job.K;
    int64_t lo[2], hi[2];
    for (int p = 0; p < 2; ++p) {  // the valid range of the row's slots
      const bool* mask = job.parts[p].mask + b * job.parts[p].n;
      const int64_t n = job.parts[p].n;
      lo[p] = 0;
      while (lo[p] < n && !mask[lo[p]]) ++lo[p];
      hi[p] = n;
      while (hi[p] > lo[p] && !mask[hi[p] - 1]) --hi[p];
    }
    const uint16_t* q = job.q + task * G * D;
    for (int64_t i = 0; i < G * D; ++i) {
      const uint32_t bits = static_cast<uint32_t>(q[i]) << 16;
      std::memcpy(&qf[i], &bits, 4);
    }
    if (job.avx512)
      avx512::Task(job, task, lo, hi, qf.data(), scratch);
    else
      avx2::Task(job, task, lo, hi, qf.data(), scratch);
  }
}

bool Is(const ffi::AnyBuffer& x, ffi::DataType type, std::initializer_list<int64_t> dims) {
  const auto d = x.dimensions();
  return x.element_type() == type && std::equal(d.begin(), d.end(), dims.begin(), dims.end());
}

ffi::Error DecodeAttention(ffi::ThreadPool pool, ffi::AnyBuffer q, ffi::AnyBuffer cache_k, ffi::AnyBuffer cache_v,
                           ffi::AnyBuffer cache_mask, ffi::AnyBuffer buffer_k, ffi::AnyBuffer buffer_v,
                           ffi::AnyBuffer buffer_mask, bool avx512, ffi::Result<ffi::AnyBuffer> out) {
  using ffi::DataType;
  const auto qd = q.dimensions();
  if (qd.size() != 4 || cache_mask.dimensions().size() != 2 || buffer_mask.dimensions().size() != 2)
    return ffi::Error::InvalidArgument("decode_attention: expected q [B, K, G, D] and masks [B, S], [B, T]");
  const int64_t B = qd[0], K = qd[1], G = qd[2], D = qd[3];
  const int64_t S = cache_mask.dimensions()[1], T = buffer_mask.dimensions()[1];
  const auto bf16 = DataType::BF16, pred = DataType::PRED;
  if (D % avx2::kLanes || !Is(q, bf16, {B, K, G, D}) || !Is(cache_k, bf16, {B, K, D, S}) ||
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
  job->avx512 = avx512;
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
                                  .Attr<bool>("avx512")
                                  .Ret<ffi::AnyBuffer>());

// simd_targets.h's SimdLevel: 2 on AVX-512, 1 on AVX2, 0 where the kernel does not run.
extern "C" int rosa2_attention_simd() { return SimdLevel(); }
