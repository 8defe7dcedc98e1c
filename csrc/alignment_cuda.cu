// CUDA kernels of the fused alignment loss. One launch covers every level
// (up to kMaxLevels; descriptors are a __grid_constant__ kernel parameter, so
// no host-to-device copy): each block is one tile of pixels of one level, reads
// F and M once, writes dF and dM once, and stores its loss partial. A second
// one-block kernel adds the partials in a fixed order: the result has the same
// bits run to run (no float atomics).
//
// Layouts: "width inner" tiles (NCHW and other strides) give each lane its own
// pixels and each warp its own channels, so a warp reads consecutive pixels of
// one channel; "channels last" tiles (f.stride(1) == 1) give each warp its own
// pixels and each lane its own channels. Both use the full strides, so any
// layout is correct; only those two are coalesced. Offsets are 64-bit.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>

#include <algorithm>
#include <type_traits>

#include "alignment.h"

namespace ssattn {
namespace {

constexpr int kThreads = 256;
constexpr int kWarps = kThreads / 32;
constexpr int kPPT = 4;                  // width-inner: pixels per lane
constexpr int kPixW = 32 * kPPT;         // width-inner: pixels per tile
constexpr int kPPW = 4;                  // channels-last: pixels per warp
constexpr int kPixC = kWarps * kPPW;     // channels-last: pixels per tile
constexpr int kFinishThreads = 1024;

struct Params {
  LevelDesc lv[kMaxLevels];
  int n;
};

template <typename T>
__device__ __forceinline__ T warp_sum(T v) {
  // Butterfly: every lane ends with the same bits (float addition commutes).
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
  return v;
}

struct Pix {
  int64_t f, df, m, dm;
};

__device__ __forceinline__ Pix pixel_offsets(const LevelDesc& d, int64_t q) {
  const int64_t hw = d.H * d.W;
  const int64_t b = q / hw;
  const int64_t rem = q - b * hw;
  const int64_t h = rem / d.W;
  const int64_t w = rem - h * d.W;
  Pix p;
  p.f = b * d.fs[0] + h * d.fs[2] + w * d.fs[3];
  p.df = b * d.dfs[0] + h * d.dfs[2] + w * d.dfs[3];
  p.m = b * d.ms[0] + h * d.ms[2] + w * d.ms[3];
  p.dm = b * d.dms[0] + h * d.dms[2] + w * d.dms[3];
  return p;
}

// Block sum of one value per thread, fixed order; result valid in thread 0.
template <typename acc_t>
__device__ __forceinline__ acc_t block_sum(acc_t v, acc_t* sh) {
  v = warp_sum(v);
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  if (lane == 0) sh[warp] = v;
  __syncthreads();
  acc_t t = 0;
  if (threadIdx.x == 0) {
    for (int i = 0; i < kWarps; ++i) t += sh[i];
  }
  return t;
}

template <typename scalar_t, typename mscalar_t, typename acc_t, bool GF, bool GM>
__device__ void tile_width_inner(const LevelDesc& d, int64_t tile, acc_t eta, double* out) {
  __shared__ acc_t sq[kWarps][kPixW];
  __shared__ acc_t sr[kWarps][kPixW];
  __shared__ acc_t sred[kWarps];
  const auto* f = static_cast<const scalar_t*>(d.f);
  const auto* m = static_cast<const mscalar_t*>(d.m);
  auto* df = static_cast<scalar_t*>(d.df);
  auto* dm = static_cast<mscalar_t*>(d.dm);
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  const int64_t npix = d.B * d.H * d.W;
  const int64_t q0 = tile * kPixW;
  const acc_t s = static_cast<acc_t>(d.scale);
  bool ok[kPPT];
  int64_t fo[kPPT], dfo[kPPT];
  acc_t a[kPPT], bb[kPPT], q[kPPT], r[kPPT];
#pragma unroll
  for (int i = 0; i < kPPT; ++i) {
    const int64_t qq = q0 + i * 32 + lane;
    ok[i] = qq < npix;
    q[i] = 0;
    r[i] = 0;
    fo[i] = 0;
    dfo[i] = 0;
    a[i] = 0;
    bb[i] = 0;
    if (ok[i]) {
      const Pix p = pixel_offsets(d, qq);
      fo[i] = p.f;
      dfo[i] = p.df;
      const acc_t mv = static_cast<acc_t>(m[p.m]);
      const acc_t om = acc_t(1) - mv;
      a[i] = acc_t(2) * s * om * om;
      bb[i] = -s * eta * mv;
    }
  }
  for (int64_t c = warp; c < d.C; c += kWarps) {
    acc_t x[kPPT];
#pragma unroll
    for (int i = 0; i < kPPT; ++i) x[i] = ok[i] ? static_cast<acc_t>(f[fo[i] + c * d.fs[1]]) : acc_t(0);
#pragma unroll
    for (int i = 0; i < kPPT; ++i) {
      q[i] += x[i] * x[i];
      r[i] += x[i];
      if (GF && ok[i]) df[dfo[i] + c * d.dfs[1]] = static_cast<scalar_t>(a[i] * x[i] + bb[i]);
    }
  }
#pragma unroll
  for (int i = 0; i < kPPT; ++i) {
    sq[warp][i * 32 + lane] = q[i];
    sr[warp][i * 32 + lane] = r[i];
  }
  __syncthreads();
  acc_t term = 0;
  if (threadIdx.x < kPixW) {
    const int j = threadIdx.x;
    const int64_t qq = q0 + j;
    if (qq < npix) {
      acc_t Q = 0, R = 0;
      for (int k = 0; k < kWarps; ++k) {
        Q += sq[k][j];
        R += sr[k][j];
      }
      const Pix p = pixel_offsets(d, qq);
      const acc_t mv = static_cast<acc_t>(m[p.m]);
      const acc_t om = acc_t(1) - mv;
      term = om * om * Q - eta * mv * R;
      if (GM) dm[p.dm] = static_cast<mscalar_t>(s * (acc_t(-2) * om * Q - eta * R));
    }
  }
  const acc_t t = block_sum(term, sred);
  if (threadIdx.x == 0) *out = d.scale * static_cast<double>(t);
}

template <typename scalar_t, typename mscalar_t, typename acc_t, bool GF, bool GM>
__device__ void tile_channels_last(const LevelDesc& d, int64_t tile, acc_t eta, double* out) {
  __shared__ acc_t sred[kWarps];
  const auto* f = static_cast<const scalar_t*>(d.f);
  const auto* m = static_cast<const mscalar_t*>(d.m);
  auto* df = static_cast<scalar_t*>(d.df);
  auto* dm = static_cast<mscalar_t*>(d.dm);
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  const int64_t npix = d.B * d.H * d.W;
  const int64_t q0 = tile * kPixC + warp * kPPW;
  const acc_t s = static_cast<acc_t>(d.scale);
  bool ok[kPPW];
  int64_t fo[kPPW], dfo[kPPW], dmo[kPPW];
  acc_t mv[kPPW], a[kPPW], bb[kPPW], q[kPPW], r[kPPW];
#pragma unroll
  for (int k = 0; k < kPPW; ++k) {
    const int64_t qq = q0 + k;
    ok[k] = qq < npix;
    q[k] = 0;
    r[k] = 0;
    fo[k] = dfo[k] = dmo[k] = 0;
    mv[k] = a[k] = bb[k] = 0;
    if (ok[k]) {
      const Pix p = pixel_offsets(d, qq);
      fo[k] = p.f;
      dfo[k] = p.df;
      dmo[k] = p.dm;
      mv[k] = static_cast<acc_t>(m[p.m]);
      const acc_t om = acc_t(1) - mv[k];
      a[k] = acc_t(2) * s * om * om;
      bb[k] = -s * eta * mv[k];
    }
  }
  for (int64_t c = lane; c < d.C; c += 32) {
    acc_t x[kPPW];
#pragma unroll
    for (int k = 0; k < kPPW; ++k) x[k] = ok[k] ? static_cast<acc_t>(f[fo[k] + c * d.fs[1]]) : acc_t(0);
#pragma unroll
    for (int k = 0; k < kPPW; ++k) {
      q[k] += x[k] * x[k];
      r[k] += x[k];
      if (GF && ok[k]) df[dfo[k] + c * d.dfs[1]] = static_cast<scalar_t>(a[k] * x[k] + bb[k]);
    }
  }
  acc_t term = 0;
#pragma unroll
  for (int k = 0; k < kPPW; ++k) {
    const acc_t Q = warp_sum(q[k]);
    const acc_t R = warp_sum(r[k]);
    if (ok[k] && lane == 0) {
      const acc_t om = acc_t(1) - mv[k];
      term += om * om * Q - eta * mv[k] * R;
      if (GM) dm[dmo[k]] = static_cast<mscalar_t>(s * (acc_t(-2) * om * Q - eta * R));
    }
  }
  const acc_t t = block_sum(term, sred);  // only lane 0 of each warp is non-zero
  if (threadIdx.x == 0) *out = d.scale * static_cast<double>(t);
}

template <typename scalar_t, typename mscalar_t, typename acc_t, bool GF, bool GM>
__global__ void __launch_bounds__(kThreads)
    fused_kernel(const __grid_constant__ Params p, acc_t eta, double* partials) {
  const int64_t tile = blockIdx.x;
  int l = 0;
  while (l + 1 < p.n && tile >= p.lv[l + 1].tile_start) ++l;
  const LevelDesc& d = p.lv[l];
  if (d.channels_last) {
    tile_channels_last<scalar_t, mscalar_t, acc_t, GF, GM>(d, tile - d.tile_start, eta, partials + tile);
  } else {
    tile_width_inner<scalar_t, mscalar_t, acc_t, GF, GM>(d, tile - d.tile_start, eta, partials + tile);
  }
}

template <typename out_t>
__global__ void __launch_bounds__(kFinishThreads) finish_kernel(const double* partials, int64_t n, out_t* loss) {
  __shared__ double sh[kFinishThreads];
  double v = 0.0;
  for (int64_t i = threadIdx.x; i < n; i += kFinishThreads) v += partials[i];
  sh[threadIdx.x] = v;
  __syncthreads();
  for (int o = kFinishThreads / 2; o > 0; o >>= 1) {
    if (threadIdx.x < o) sh[threadIdx.x] += sh[threadIdx.x + o];
    __syncthreads();
  }
  if (threadIdx.x == 0) *loss = static_cast<out_t>(sh[0]);
}

int64_t tiles_of(const LevelDesc& d) {
  const int64_t npix = d.B * d.H * d.W;
  const int64_t per = d.channels_last ? kPixC : kPixW;
  return (npix + per - 1) / per;
}

template <typename scalar_t, typename mscalar_t, bool GF, bool GM>
void launch(const Problem& pr, at::Tensor& loss) {
  using acc_t = std::conditional_t<std::is_same_v<scalar_t, double>, double, float>;
  const cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  const int64_t L = static_cast<int64_t>(pr.levels.size());
  int64_t total = 0;
  for (const LevelDesc& d : pr.levels) total += tiles_of(d);
  at::Tensor partials = at::empty({std::max<int64_t>(total, 1)}, loss.options().dtype(at::kDouble));
  double* part = partials.data_ptr<double>();
  int64_t done = 0;
  for (int64_t g0 = 0; g0 < L; g0 += kMaxLevels) {
    Params prm{};
    prm.n = static_cast<int>(std::min<int64_t>(kMaxLevels, L - g0));
    int64_t tiles = 0;
    for (int i = 0; i < prm.n; ++i) {
      prm.lv[i] = pr.levels[g0 + i];
      prm.lv[i].tile_start = tiles;
      tiles += tiles_of(prm.lv[i]);
    }
    if (tiles > 0) {
      TORCH_CHECK(tiles <= 0x7fffffff, "alignment_loss_fused: too many tiles for one launch (", tiles, ")");
      fused_kernel<scalar_t, mscalar_t, acc_t, GF, GM>
          <<<static_cast<unsigned>(tiles), kThreads, 0, stream>>>(prm, static_cast<acc_t>(pr.eta), part + done);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    }
    done += tiles;
  }
  if (loss.scalar_type() == at::kDouble) {
    finish_kernel<double><<<1, kFinishThreads, 0, stream>>>(part, total, loss.data_ptr<double>());
  } else {
    finish_kernel<float><<<1, kFinishThreads, 0, stream>>>(part, total, loss.data_ptr<float>());
  }
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

template <typename scalar_t, typename mscalar_t>
void launch_flags(const Problem& p, at::Tensor& loss) {
  if (p.grad_features && p.grad_maps) return launch<scalar_t, mscalar_t, true, true>(p, loss);
  if (p.grad_features) return launch<scalar_t, mscalar_t, true, false>(p, loss);
  if (p.grad_maps) return launch<scalar_t, mscalar_t, false, true>(p, loss);
  return launch<scalar_t, mscalar_t, false, false>(p, loss);
}

}  // namespace

void alignment_cuda(const Problem& p, at::ScalarType fdt, at::ScalarType mdt, at::Tensor& loss) {
  const c10::cuda::CUDAGuard guard(loss.device());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, fdt, "alignment_loss_fused_cuda", [&] {
    if (mdt == fdt) {
      launch_flags<scalar_t, scalar_t>(p, loss);
    } else {
      // float32 maps with half features; float64 features always come with float64 maps.
      TORCH_CHECK(mdt == at::kFloat && fdt != at::kDouble, "alignment_loss_fused: maps must be ", fdt,
                  " or float32 (half features), got ", mdt);
      if constexpr (!std::is_same_v<scalar_t, double>) launch_flags<scalar_t, float>(p, loss);
    }
  });
}

}  // namespace ssattn
