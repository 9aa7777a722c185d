// y[M, N] float32 = x[M, K] bfloat16 . W^T, with W[N, K] bfloat16 packed once into AMX tiles (amx_matmul.py).
//
// Packed layout [N/16, K/32, 512]: tile (n, k) holds columns 16n..16n+15 over depths 32k..32k+31 as 16 depth
// pairs x 16 columns x 2, the B operand of TDPBF16PS as it sits in memory, so a call streams the weight once,
// in order. Each task owns groups of 4 column tiles and runs every 16-row block of x against them (the group's
// weight stays in L2 between row blocks); an output tile accumulates over depth in order, as XLA's YNNPACK AMX
// kernel does.
#include <immintrin.h>
#include <sys/syscall.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <cstdint>
#include <cstring>
#include <memory>

#include "parallel.h"
#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace {

constexpr int64_t kRows = 16;   // rows of x in a tile
constexpr int64_t kCols = 16;   // output columns in a tile
constexpr int64_t kDepth = 32;  // bfloat16 depth of a tile: 64 bytes a row
constexpr int64_t kTile = kDepth * kCols;
constexpr int64_t kGroup = 4;   // output tiles accumulated at once: tiles 0-3; x in tile 4, weights in 5-7

struct TileConfig {
  uint8_t palette_id;
  uint8_t start_row;
  uint8_t reserved[14];
  uint16_t colsb[16];
  uint8_t rows[16];
};

struct Job {
  const uint16_t* x;     // [M, K]
  const uint16_t* tail = nullptr;  // x's last M % 16 rows, zero-padded to 16, where M % 16 > 0
  const uint16_t* w;     // [N/16, K/32, 512]
  float* y;              // [M, N]
  int64_t M, N, K, col_tiles, depth_tiles, groups;
  std::atomic<int64_t> next{0};
};

__attribute__((target("amx-tile"))) void LoadConfig() {
  TileConfig cfg{};
  cfg.palette_id = 1;
  for (int t = 0; t < 8; ++t) {
    cfg.rows[t] = kRows;
    cfg.colsb[t] = 64;
  }
  _tile_loadconfig(&cfg);
}

__attribute__((target("amx-tile,amx-bf16"))) void RunGroup(const Job& job, int64_t group) {
  alignas(64) float out[kGroup][kRows * kCols];
  const int64_t first = group * kGroup, count = std::min(kGroup, job.col_tiles - first);
  const int64_t stride = job.depth_tiles * kTile;  // between column tiles
  const uint16_t* w = job.w + first * stride;
  for (int64_t m0 = 0; m0 < job.M; m0 += kRows) {
    const int64_t rows = std::min(kRows, job.M - m0);
    const uint16_t* x = rows == kRows ? job.x + m0 * job.K : job.tail;
    _tile_zero(0);
    _tile_zero(1);
    _tile_zero(2);
    _tile_zero(3);
    // The intrinsics take constant tile numbers, hence one line per tile.
    for (int64_t k = 0; k < job.depth_tiles; ++k) {
      const uint16_t* wk = w + k * kTile;
      _tile_loadd(4, x + k * kDepth, job.K * 2);
      _tile_loadd(5, wk, 64);
      _tile_dpbf16ps(0, 4, 5);
      if (count > 1) { _tile_loadd(6, wk + stride, 64); _tile_dpbf16ps(1, 4, 6); }
      if (count > 2) { _tile_loadd(7, wk + 2 * stride, 64); _tile_dpbf16ps(2, 4, 7); }
      if (count > 3) { _tile_loadd(5, wk + 3 * stride, 64); _tile_dpbf16ps(3, 4, 5); }
    }
    _tile_stored(0, out[0], 64);
    if (count > 1) _tile_stored(1, out[1], 64);
    if (count > 2) _tile_stored(2, out[2], 64);
    if (count > 3) _tile_stored(3, out[3], 64);
    for (int64_t t = 0; t < count; ++t)
      for (int64_t r = 0; r < rows; ++r)
        std::memcpy(job.y + (m0 + r) * job.N + (first + t) * kCols, out[t] + r * kCols, kCols * sizeof(float));
  }
}

__attribute__((target("amx-tile"))) void Work(Job& job) {
  LoadConfig();  // per call: YNNPACK's kernels configure the tiles their own way on the same threads
  for (int64_t g; (g = job.next.fetch_add(1)) < job.groups;) RunGroup(job, g);
  _tile_release();
}

ffi::Error AmxMatmul(ffi::ThreadPool pool, ffi::AnyBuffer x, ffi::AnyBuffer w, ffi::Result<ffi::AnyBuffer> y) {
  const auto xd = x.dimensions(), wd = w.dimensions(), yd = y->dimensions();
  if (xd.size() != 2 || wd.size() != 3 || yd.size() != 2 || wd[2] != kTile || wd[1] * kDepth != xd[1] ||
      wd[0] * kCols != yd[1] || xd[0] != yd[0])
    return ffi::Error::InvalidArgument("amx_matmul: expected x [M, K], tiles [N/16, K/32, 512], y [M, N]");
  auto job = std::make_shared<Job>();
  job->M = xd[0];
  job->K = xd[1];
  job->N = yd[1];
  job->col_tiles = wd[0];
  job->depth_tiles = wd[1];
  job->groups = (job->col_tiles + kGroup - 1) / kGroup;
  job->x = reinterpret_cast<const uint16_t*>(x.untyped_data());
  job->w = reinterpret_cast<const uint16_t*>(w.untyped_data());
  job->y = reinterpret_cast<float*>(y->untyped_data());
  const int64_t tail_rows = job->M % kRows;
  std::unique_ptr<uint16_t[]> tail;
  if (tail_rows) {
    tail.reset(new uint16_t[kRows * job->K]());
    std::memcpy(tail.get(), job->x + (job->M - tail_rows) * job->K, tail_rows * job->K * 2);
    job->tail = tail.get();
  }
  rosa2::RunOnPool(pool, job->groups, [job] { Work(*job); });
  return ffi::Error::Success();
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(Rosa2AmxMatmul, AmxMatmul,
                              ffi::Ffi::Bind().Ctx<ffi::ThreadPool>().Arg<ffi::AnyBuffer>().Arg<ffi::AnyBuffer>()
                                  .Ret<ffi::AnyBuffer>());

// 1 when this CPU has AMX-BF16 and Linux grants the process the tile state, else 0.
extern "C" int rosa2_amx_ready() {
  unsigned a, b, c, d;
  __asm__ volatile("cpuid" : "=a"(a), "=b"(b), "=c"(c), "=d"(d) : "a"(7), "c"(0));
  if (!((d >> 22) & 1) || !((d >> 24) & 1)) return 0;  // AMX-BF16, AMX-TILE
  constexpr long kReqXcompPerm = 0x1023, kXfeatureXtiledata = 18;
  return syscall(SYS_arch_prctl, kReqXcompPerm, kXfeatureXtiledata) == 0;
}
