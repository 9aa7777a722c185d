// y[M, N] float32 = x[M, K] . W^T for a bfloat16 weight W[N, K] packed once into panels of 16 output columns
// (fma_matmul.py), with the CPU's FMA units: for CPUs without AMX, where XLA runs a decode step's small-row matmuls
// at a fraction of its square-matmul rate. x holds bfloat16 values (rounded by the caller) in float32, so each
// product is exact and each output rounds once per depth step.
//
// Packed layout [N/16, K, 16]: panel n holds columns 16n..16n+15, depth by depth, each depth's 16 columns
// interleaved [c0, c8, c1, c9, ...] so that one 32-byte load gives both halves as float32 with one operation each.
// A task is a group of panels run against every row of x while they sit in cache, so the weight is read from
// memory once. The lane code (fma_matmul_lanes.h) is compiled for AVX-512 and for AVX2; the handler's `avx512`
// attribute picks one, and both give the same bits.
#include <immintrin.h>

#include <algorithm>
#include <atomic>
#include <cstdint>
#include <memory>

#include "parallel.h"
#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace {

// Panels a task, about: with fewer a one-row pass fills its accumulators less often, with more the tasks spread
// worse over the threads (timed in BUILD_NOTES.md, "The FMA matmul").
constexpr int64_t kTaskPanels = 24;

struct Job {
  const float* x;     // [M, K]
  const uint16_t* w;  // [N/16, K, 16]
  float* y;           // [M, N]
  int64_t M, N, K, panels_per_task, tasks;
  bool avx512;  // else AVX2
  std::atomic<int64_t> next{0};
};

#define ROSA2_LANES "fma_matmul_lanes.h"
#include "simd_targets.h"

void Work(Job& job) {
  for (int64_t t; (t = job.next.fetch_add(1)) < job.tasks;) {
    const int64_t first = t * job.panels_per_task, end = std::min(job.N / avx2::kLanes, first + job.panels_per_task);
    if (job.avx512)
      avx512::Panels(job.x, job.w, job.y, job.M, job.K, job.N, first, end);
    else
      avx2::Panels(job.x, job.w, job.y, job.M, job.K, job.N, first, end);
  }
}

ffi::Error FmaMatmul(ffi::ThreadPool pool, ffi::AnyBuffer x, ffi::AnyBuffer w, bool avx512,
                     ffi::Result<ffi::AnyBuffer> y) {
  const auto xd = x.dimensions(), wd = w.dimensions(), yd = y->dimensions();
  if (x.element_type() != ffi::DataType::F32 || w.element_type() != ffi::DataType::BF16 ||
      y->element_type() != ffi::DataType::F32 || xd.size() != 2 || wd.size() != 3 || yd.size() != 2 ||
      wd[2] != avx2::kLanes || wd[1] != xd[1] || wd[0] * avx2::kLanes != yd[1] || xd[0] != yd[0])
    return ffi::Error::InvalidArgument("fma_matmul: expected float32 x [M, K], bfloat16 panels [N/16, K, 16], "
                                       "float32 y [M, N]");
  auto job = std::make_shared<Job>();
  job->x = reinterpret_cast<const float*>(x.untyped_data());
  job->w = reinterpret_cast<const uint16_t*>(w.untyped_data());
  job->y = reinterpret_cast<float*>(y->untyped_data());
  job->M = xd[0];
  job->K = xd[1];
  job->N = yd[1];
  job->avx512 = avx512;
  if (job->M == 0 || job->N == 0) return ffi::Error::Success();
  // Tasks in a multiple of the pool's threads, their panels spread evenly: the last task is as long as the rest.
  const int64_t panels = wd[0], threads = std::max<int64_t>(1, pool.num_threads());
  job->tasks = threads * ((panels + threads * kTaskPanels - 1) / (threads * kTaskPanels));
  job->panels_per_task = (panels + job->tasks - 1) / job->tasks;
  rosa2::RunOnPool(pool, job->tasks, [job] { Work(*job); });
  return ffi::Error::Success();
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(Rosa2FmaMatmul, FmaMatmul,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Attr<bool>("avx512")
                                  .Ret<ffi::AnyBuffer>());

// simd_targets.h's SimdLevel: 2 on AVX-512, 1 on AVX2, 0 where the kernel does not run.
extern "C" int rosa2_fma_matmul_simd() { return SimdLevel(); }
