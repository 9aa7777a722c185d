// The k largest entries of each row of x [B, V] float32, as jax.lax.top_k returns them: in IEEE total order
// (NaN above +inf, +0 above -0, as XLA orders them), descending, equal values by lower index first; values [B, k]
// float32 (x's own bits) and indices [B, k] int32. XLA CPU computes a top-256 over a 152k vocabulary with a
// partial sort, ~0.5 ms a row; here each row is one pass for the maxima of its blocks, whose k-th largest bounds
// the k-th largest entry from below, one pass collecting the entries at or above that bound (a few hundred), and a
// sort of those. Rows are tasks on XLA's CPU thread pool. The passes' lane code (top_k_lanes.h) is compiled for
// AVX-512 and for AVX2; the handler's `avx512` attribute picks one.
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

constexpr int64_t kBlock = 128;  // entries per block whose maximum is taken in the first pass

// A float's bits as an int32 in IEEE total order: flipping a negative float's magnitude bits reverses their order.
inline int32_t Key(float x) {
  int32_t bits;
  std::memcpy(&bits, &x, 4);
  return bits ^ ((bits >> 31) & 0x7FFFFFFF);
}

struct Job {
  const float* x;
  float* values;
  int32_t* indices;
  int64_t B, V, k;
  bool avx512;  // else AVX2
  std::atomic<int64_t> next{0};
};

#define ROSA2_LANES "top_k_lanes.h"
#include "simd_targets.h"

void Row(const Job& job, int64_t b, std::vector<int32_t>& maxima, std::vector<std::pair<int32_t, int32_t>>& found) {
  const float* x = job.x + b * job.V;
  const int64_t V = job.V, k = job.k;
  // Blocks small enough that there are at least k of them; the k blocks with the largest maxima hold k entries at
  // or above the k-th largest maximum, so every one of the k largest entries is at or above it.
  const int64_t block = std::max<int64_t>(1, std::min<int64_t>(kBlock, V / k));
  maxima.resize((V + block - 1) / block);
  if (block < avx2::kLanes) {  // too short for a vector pass
    for (size_t i = 0; i < maxima.size(); ++i) {
      const int64_t end = std::min<int64_t>(V, (i + 1) * block);
      maxima[i] = INT32_MIN;
      for (int64_t j = i * block; j < end; ++j) maxima[i] = std::max(maxima[i], Key(x[j]));
    }
  } else if (job.avx512) {
    avx512::BlockMaxima(x, V, block, maxima);
  } else {
    avx2::BlockMaxima(x, V, block, maxima);
  }
  std::nth_element(maxima.begin(), maxima.begin() + (k - 1), maxima.end(), std::greater<int32_t>());
  const int32_t bound = maxima[k - 1];
  found.clear();
  if (job.avx512)
    avx512::Collect(x, V, bound, found);
  else
    avx2::Collect(x, V, bound, found);
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

ffi::Error TopK(ffi::ThreadPool pool, ffi::AnyBuffer x, bool avx512, ffi::Result<ffi::AnyBuffer> values,
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
  job->avx512 = avx512;
  rosa2::RunOnPool(pool, job->B, [job] { Work(*job); });
  return ffi::Error::Success();
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(Rosa2TopK, TopK,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Attr<bool>("avx512")
                                  .Ret<ffi::AnyBuffer>()
                                  .Ret<ffi::AnyBuffer>());

// simd_targets.h's SimdLevel: 2 on AVX-512, 1 on AVX2, 0 where the kernel does not run.
extern "C" int rosa2_top_k_simd() { return SimdLevel(); }
