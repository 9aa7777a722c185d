// The k largest entries of each row of x [B, V] float32, as jax.lax.top_k returns them: in IEEE total order
// (NaN above +inf, +0 above -0, as XLA orders them), descending, equal values by lower index first; values [B, k]
// float32 (x's own bits) and indices [B, k] int32. XLA CPU computes a top-256 over a 152k vocabulary with a
// partial sort, ~0.5 ms a row; here each row is one pass for the maxima of its blocks, whose k-th largest bounds
// the k-th largest entry from below, one pass collecting the entries at or above that bound (a few hundred), and a
// sort of those. Rows are tasks on XLA's CPU thread pool.
#include <immintrin.h>

#include <algorithm>
#include <atomic>
#include <cstdint>
#include <cstring>
#include <memory>
#include <utility>
#include <vector>

#include "parallel.h"
#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace {

constexpr int64_t kLanes = 16;
constexpr int64_t kBlock = 128;  // entries per block whose maximum is taken in the first pass

#define AVX512 __attribute__((target("avx512f")))

// A float's bits as an int32 in IEEE total order: flipping a negative float's magnitude bits reverses their order.
inline int32_t Key(float x) {
  int32_t bits;
  std::memcpy(&bits, &x, 4);
  return bits ^ ((bits >> 31) & 0x7FFFFFFF);
}

AVX512 inline __m512i Keys(const float* x, __mmask16 m) {
  const __m512i bits = _mm512_maskz_loadu_epi32(m, x);
  return _mm512_xor_si512(bits, _mm512_and_si512(_mm512_srai_epi32(bits, 31), _mm512_set1_epi32(0x7FFFFFFF)));
}

AVX512 inline __mmask16 Lanes(int64_t left) { return left >= kLanes ? 0xFFFF : (1u << left) - 1; }

struct Job {
  const float* x;
  float* values;
  int32_t* indices;
  int64_t B, V, k;
  std::atomic<int64_t> next{0};
};

AVX512 void Row(const Job& job, int64_t b, std::vector<int32_t>& maxima,
                std::vector<std::pair<int32_t, int32_t>>& found) {
  const float* x = job.x + b * job.V;
  const int64_t V = job.V, k = job.k;
  // Blocks small enough that there are at least k of them; the k blocks with the largest maxima hold k entries at
  // or above the k-th largest maximum, so every one of the k largest entries is at or above it.
  const int64_t block = std::max<int64_t>(1, std::min<int64_t>(kBlock, V / k));
  const int64_t blocks = (V + block - 1) / block;
  maxima.resize(blocks);
  for (int64_t i = 0; i < blocks; ++i) {
    const int64_t start = i * block, end = std::min(V, start + block);
    if (block >= kLanes) {
      __m512i top = _mm512_set1_epi32(INT32_MIN);
      for (int64_t j = start; j < end; j += kLanes) {
        const __mmask16 m = Lanes(end - j);
        top = _mm512_mask_max_epi32(top, m, top, Keys(x + j, m));
      }
      maxima[i] = _mm512_reduce_max_epi32(top);
    } else {
      int32_t top = INT32_MIN;
      for (int64_t j = start; j < end; ++j) top = std::max(top, Key(x[j]));
      maxima[i] = top;
    }
  }
  std::nth_element(maxima.begin(), maxima.begin() + (k - 1), maxima.end(), std::greater<int32_t>());
  const int32_t bound = maxima[k - 1];
  found.clear();
  const __m512i at_least = _mm512_set1_epi32(bound);
  for (int64_t j = 0; j < V; j += kLanes) {
    const __mmask16 m = Lanes(V - j);
    __mmask16 hit = _mm512_mask_cmpge_epi32_mask(m, Keys(x + j, m), at_least);
    while (hit) {
      const int lane = __builtin_ctz(hit);
      hit &= hit - 1;
      found.emplace_back(Key(x[j + lane]), static_cast<int32_t>(j + lane));
    }
  }
  // Descending keys, ascending indices among equal keys.
  std::partial_sort(found.begin(), found.begin() + k, found.end(), [](const auto& a, const auto& c) {
    return a.first != c.first ? a.first > c.first : a.second < c.second;
  });
  for (int64_t i = 0; i < k; ++i) {
    job.values[b * k + i] = x[found[i].second];
    job.indices[b * k + i] = found[i].second;
  }
}

void Work(Job& job) {
  std::vector<int32_t> maxima;
  std::vector<std::pair<int32_t, int32_t>> found;
  for (int64_t b; (b = job.next.fetch_add(1)) < job.B;) Row(job, b, maxima, found);
}

ffi::Error TopK(ffi::ThreadPool pool, ffi::AnyBuffer x, ffi::Result<ffi::AnyBuffer> values,
                ffi::Result<ffi::AnyBuffer> indices) {
  const auto xd = x.dimensions(), vd = values->dimensions(), id = indices->dimensions();
  if (x.element_type() != ffi::DataType::F32 || values->element_type() != ffi::DataType::F32 ||
      indices->element_type() != ffi::DataType::S32 || xd.size() != 2 || vd.size() != 2 || id.size() != 2 ||
      vd[0] != xd[0] || id[0] != xd[0] || vd[1] != id[1] || vd[1] < 1 || vd[1] > xd[1])
    return ffi::Error::InvalidArgument("top_k: expected float32 x [B, V], float32 values and int32 indices [B, k], "
                                       "1 <= k <= V");
  auto job = std::make_shared<Job>();
  job->x = reinterpret_cast<const float*>(x.untyped_data());
  job->values = reinterpret_cast<float*>(values->untyped_data());
  job->indices = reinterpret_cast<int32_t*>(indices->untyped_data());
  job->B = xd[0];
  job->V = xd[1];
  job->k = vd[1];
  rosa2::RunOnPool(pool, job->B, [job] { Work(*job); });
  return ffi::Error::Success();
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(Rosa2TopK, TopK,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Ret<ffi::AnyBuffer>()
                                  .Ret<ffi::AnyBuffer>());

// 1 when this CPU and its OS run AVX-512 F, else 0.
extern "C" int rosa2_top_k_ready() {
  __builtin_cpu_init();
  return __builtin_cpu_supports("avx512f");
}
