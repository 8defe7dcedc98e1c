// CUDA kernels of the fused alignment loss. One launch covers every level
// (up to kMaxLevels; descriptors are a __grid_constant__ kernel parameter, so
// no host-to-device copy): each block is one tile of pixels of one level, reads
// F and M once, writes dF and dM once, and stores its loss partial. A second
// one-block kernel adds the partials in a fixed order: the result has the same
// bits run to run (no float atomics).
//
// form="normalized" takes three passes per group of levels: a stats pass (tiles
// that never cross a sample: each stores E = sum F^2, S2 = sum (1-M)^2 F^2,
// S1 = sum M F), a one-thread-per-sample kernel that adds its tiles' sums in a
// fixed order and computes the sample's loss term and factors (SampleCoef), and
// a gradient pass in double (dF = a F + b cancels for small samples, see
// alignment_cpu.cpp). The finishing kernel then adds the per-sample terms.
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

// What one launch of fused_kernel does.
enum Mode : int {
  kPaper = 0,  // paper form: loss partial per tile, gradients in the same pass
  kStats = 1,  // normalized form, pass 1: (E, S2, S1) per tile, no writes
  kGrad = 2,   // normalized form, pass 2: gradients with each sample's factors
};

// A tile's first pixel and the end of the pixels it may take (sample-aligned tiles stop at their sample's end).
__device__ __forceinline__ void tile_range(const LevelDesc& d, int64_t tile, int64_t per, int64_t& q0, int64_t& qend) {
  if (d.tiles_per_sample > 0) {
    const int64_t hw = d.H * d.W;
    const int64_t b = tile / d.tiles_per_sample;
    q0 = b * hw + (tile - b * d.tiles_per_sample) * per;
    qend = (b + 1) * hw;
  } else {
    q0 = tile * per;
    qend = d.B * d.H * d.W;
  }
}

// The factors (g1, g2, k) of pixel qq's sample: from the per-sample table in kGrad, else the paper's (1, 1, 0).
template <int MODE, typename acc_t>
__device__ __forceinline__ void pixel_coef(const LevelDesc& d, const double* coefs, int64_t qq, acc_t& g1, acc_t& g2,
                                           acc_t& k) {
  if (MODE == kGrad) {
    const int64_t b = qq / (d.H * d.W);
    const double* c = coefs + 3 * (d.sample_start + b);
    g1 = static_cast<acc_t>(c[0]);
    g2 = static_cast<acc_t>(c[1]);
    k = static_cast<acc_t>(c[2]);
  } else {
    g1 = acc_t(1);
    g2 = acc_t(1);
    k = acc_t(0);
  }
}

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
  __syncthreads();  // sh may still be read by thread 0 from a previous call
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

// Stores the tile's result: kPaper one scaled loss partial, kStats the three sums; kGrad nothing.
template <int MODE, typename acc_t>
__device__ __forceinline__ void store_tile(const LevelDesc& d, acc_t e, acc_t s2, acc_t s1, acc_t eta, acc_t* sred,
                                           double* out) {
  if (MODE == kPaper) {
    const acc_t t = block_sum(s2 - eta * s1, sred);
    if (threadIdx.x == 0) *out = d.scale * static_cast<double>(t);
  } else if (MODE == kStats) {
    const acc_t te = block_sum(e, sred);
    const acc_t t2 = block_sum(s2, sred);
    const acc_t t1 = block_sum(s1, sred);
    if (threadIdx.x == 0) {
      out[0] = static_cast<double>(te);
      out[1] = static_cast<double>(t2);
      out[2] = static_cast<double>(t1);
    }
  }
}

template <int MODE, typename scalar_t, typename mscalar_t, typename acc_t, bool GF, bool GM>
__device__ void tile_width_inner(const LevelDesc& d, int64_t tile, acc_t eta, const double* coefs, double* out) {
  __shared__ acc_t sq[kWarps][kPixW];
  __shared__ acc_t sr[kWarps][kPixW];
  __shared__ acc_t sred[kWarps];
  const auto* f = static_cast<const scalar_t*>(d.f);
  const auto* m = static_cast<const mscalar_t*>(d.m);
  auto* df = static_cast<scalar_t*>(d.df);
  auto* dm = static_cast<mscalar_t*>(d.dm);
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  int64_t q0, qend;
  tile_range(d, tile, kPixW, q0, qend);
  const acc_t s = static_cast<acc_t>(d.scale);
  bool ok[kPPT];
  int64_t fo[kPPT], dfo[kPPT];
  acc_t a[kPPT], bb[kPPT], q[kPPT], r[kPPT];
#pragma unroll
  for (int i = 0; i < kPPT; ++i) {
    const int64_t qq = q0 + i * 32 + lane;
    ok[i] = qq < qend;
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
      if (GF) {
        acc_t g1, g2, k;
        pixel_coef<MODE>(d, coefs, qq, g1, g2, k);
        const acc_t mv = static_cast<acc_t>(m[p.m]);
        const acc_t om = acc_t(1) - mv;
        a[i] = s * (acc_t(2) * g2 * om * om + k);
        bb[i] = -s * eta * g1 * mv;
      }
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
  if (MODE == kGrad && !GM) return;  // nothing per pixel left to do (uniform across the block)
#pragma unroll
  for (int i = 0; i < kPPT; ++i) {
    sq[warp][i * 32 + lane] = q[i];
    sr[warp][i * 32 + lane] = r[i];
  }
  __syncthreads();
  acc_t e = 0, s2 = 0, s1 = 0;
  if (threadIdx.x < kPixW) {
    const int j = threadIdx.x;
    const int64_t qq = q0 + j;
    if (qq < qend) {
      acc_t Q = 0, R = 0;
      for (int k = 0; k < kWarps; ++k) {
        Q += sq[k][j];
        R += sr[k][j];
      }
      const Pix p = pixel_offsets(d, qq);
      const acc_t mv = static_cast<acc_t>(m[p.m]);
      const acc_t om = acc_t(1) - mv;
      e = Q;
      s2 = om * om * Q;
      s1 = mv * R;
      if (GM) {
        acc_t g1, g2, k;
        pixel_coef<MODE>(d, coefs, qq, g1, g2, k);
        dm[p.dm] = static_cast<mscalar_t>(s * (acc_t(-2) * g2 * om * Q - eta * g1 * R));
      }
    }
  }
  store_tile<MODE>(d, e, s2, s1, eta, sred, out);
}

template <int MODE, typename scalar_t, typename mscalar_t, typename acc_t, bool GF, bool GM>
__device__ void tile_channels_last(const LevelDesc& d, int64_t tile, acc_t eta, const double* coefs, double* out) {
  __shared__ acc_t sred[kWarps];
  const auto* f = static_cast<const scalar_t*>(d.f);
  const auto* m = static_cast<const mscalar_t*>(d.m);
  auto* df = static_cast<scalar_t*>(d.df);
  auto* dm = static_cast<mscalar_t*>(d.dm);
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  int64_t t0, qend;
  tile_range(d, tile, kPixC, t0, qend);
  const int64_t q0 = t0 + warp * kPPW;
  const acc_t s = static_cast<acc_t>(d.scale);
  bool ok[kPPW];
  int64_t fo[kPPW], dfo[kPPW], dmo[kPPW];
  acc_t mv[kPPW], a[kPPW], bb[kPPW], q[kPPW], r[kPPW], g1[kPPW], g2[kPPW];
#pragma unroll
  for (int k = 0; k < kPPW; ++k) {
    const int64_t qq = q0 + k;
    ok[k] = qq < qend;
    q[k] = 0;
    r[k] = 0;
    fo[k] = dfo[k] = dmo[k] = 0;
    mv[k] = a[k] = bb[k] = g1[k] = g2[k] = 0;
    if (ok[k]) {
      const Pix p = pixel_offsets(d, qq);
      fo[k] = p.f;
      dfo[k] = p.df;
      dmo[k] = p.dm;
      mv[k] = static_cast<acc_t>(m[p.m]);
      acc_t kk;
      pixel_coef<MODE>(d, coefs, qq, g1[k], g2[k], kk);
      const acc_t om = acc_t(1) - mv[k];
      a[k] = s * (acc_t(2) * g2[k] * om * om + kk);
      bb[k] = -s * eta * g1[k] * mv[k];
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
  if (MODE == kGrad && !GM) return;  // uniform across the block
  acc_t e = 0, s2 = 0, s1 = 0;  // only lane 0 of each warp is non-zero
#pragma unroll
  for (int k = 0; k < kPPW; ++k) {
    const acc_t Q = warp_sum(q[k]);
    const acc_t R = warp_sum(r[k]);
    if (ok[k] && lane == 0) {
      const acc_t om = acc_t(1) - mv[k];
      e += Q;
      s2 += om * om * Q;
      s1 += mv[k] * R;
      if (GM) dm[dmo[k]] = static_cast<mscalar_t>(s * (acc_t(-2) * g2[k] * om * Q - eta * g1[k] * R));
    }
  }
  store_tile<MODE>(d, e, s2, s1, eta, sred, out);
}

// out: kPaper one partial per tile, kStats three per tile (this group's), kGrad unused.
template <int MODE, typename scalar_t, typename mscalar_t, typename acc_t, bool GF, bool GM>
__global__ void __launch_bounds__(kThreads)
    fused_kernel(const __grid_constant__ Params p, acc_t eta, const double* coefs, double* out) {
  const int64_t tile = blockIdx.x;
  int l = 0;
  while (l + 1 < p.n && tile >= p.lv[l + 1].tile_start) ++l;
  const LevelDesc& d = p.lv[l];
  double* o = MODE == kStats ? out + 3 * tile : out + tile;
  if (d.channels_last) {
    tile_channels_last<MODE, scalar_t, mscalar_t, acc_t, GF, GM>(d, tile - d.tile_start, eta, coefs, o);
  } else {
    tile_width_inner<MODE, scalar_t, mscalar_t, acc_t, GF, GM>(d, tile - d.tile_start, eta, coefs, o);
  }
}

// Normalized form: one thread per sample of this group adds its tiles' sums in tile order
// and writes the sample's factors (coefs, 3 per sample) and scaled loss term (terms).
__global__ void sample_kernel(const __grid_constant__ Params p, double eta, const double* stats, int64_t samples,
                              double* coefs, double* terms) {
  const int64_t t = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (t >= samples) return;
  const int64_t gs = p.lv[0].sample_start + t;
  int l = 0;
  while (l + 1 < p.n && gs >= p.lv[l + 1].sample_start) ++l;
  const LevelDesc& d = p.lv[l];
  const int64_t b = gs - d.sample_start;
  Stats st{0.0, 0.0, 0.0};
  const int64_t first = d.tile_start + b * d.tiles_per_sample;
  for (int64_t i = first; i < first + d.tiles_per_sample; ++i) {
    st.e += stats[3 * i];
    st.s2 += stats[3 * i + 1];
    st.s1 += stats[3 * i + 2];
  }
  const double N = static_cast<double>(d.C) * static_cast<double>(d.H) * static_cast<double>(d.W);
  double term = 0.0;
  const SampleCoef c = normalized_coef(st, N, eta, &term);
  coefs[3 * gs] = c.g1;
  coefs[3 * gs + 1] = c.g2;
  coefs[3 * gs + 2] = c.k;
  terms[gs] = d.scale * term;
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

// Tiles of a level: over all B*H*W pixels, or (sample_aligned) ceil(H*W / per) per sample.
int64_t tiles_of(const LevelDesc& d, bool sample_aligned) {
  const int64_t per = d.channels_last ? kPixC : kPixW;
  if (sample_aligned) return d.B * ((d.H * d.W + per - 1) / per);
  return (d.B * d.H * d.W + per - 1) / per;
}

// The levels [g0, g0 + n) as one launch's parameters; sets tile_start (and tiles_per_sample when aligned).
Params group_params(const Problem& pr, int64_t g0, bool sample_aligned, int64_t& tiles) {
  Params prm{};
  prm.n = static_cast<int>(std::min<int64_t>(kMaxLevels, static_cast<int64_t>(pr.levels.size()) - g0));
  tiles = 0;
  for (int i = 0; i < prm.n; ++i) {
    LevelDesc& d = prm.lv[i];
    d = pr.levels[g0 + i];
    const int64_t per = d.channels_last ? kPixC : kPixW;
    d.tiles_per_sample = sample_aligned ? (d.H * d.W + per - 1) / per : 0;
    d.tile_start = tiles;
    tiles += tiles_of(d, sample_aligned);
  }
  TORCH_CHECK(tiles <= 0x7fffffff, "alignment_loss_fused: too many tiles for one launch (", tiles, ")");
  return prm;
}

template <int MODE, typename scalar_t, typename mscalar_t, typename acc_t, bool GF, bool GM>
void launch_tiles(const Params& prm, int64_t tiles, acc_t eta, const double* coefs, double* out, cudaStream_t stream) {
  if (tiles == 0) return;
  fused_kernel<MODE, scalar_t, mscalar_t, acc_t, GF, GM>
      <<<static_cast<unsigned>(tiles), kThreads, 0, stream>>>(prm, eta, coefs, out);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

void finish(const double* part, int64_t n, at::Tensor& loss, cudaStream_t stream) {
  if (loss.scalar_type() == at::kDouble) {
    finish_kernel<double><<<1, kFinishThreads, 0, stream>>>(part, n, loss.data_ptr<double>());
  } else {
    finish_kernel<float><<<1, kFinishThreads, 0, stream>>>(part, n, loss.data_ptr<float>());
  }
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

template <typename scalar_t, typename mscalar_t, bool GF, bool GM>
void launch_paper(const Problem& pr, at::Tensor& loss, cudaStream_t stream) {
  using acc_t = std::conditional_t<std::is_same_v<scalar_t, double>, double, float>;
  const int64_t L = static_cast<int64_t>(pr.levels.size());
  int64_t total = 0;
  for (const LevelDesc& d : pr.levels) total += tiles_of(d, false);
  at::Tensor partials = at::empty({std::max<int64_t>(total, 1)}, loss.options().dtype(at::kDouble));
  double* part = partials.data_ptr<double>();
  int64_t done = 0;
  for (int64_t g0 = 0; g0 < L; g0 += kMaxLevels) {
    int64_t tiles = 0;
    const Params prm = group_params(pr, g0, false, tiles);
    launch_tiles<kPaper, scalar_t, mscalar_t, acc_t, GF, GM>(prm, tiles, static_cast<acc_t>(pr.eta), nullptr,
                                                             part + done, stream);
    done += tiles;
  }
  finish(part, total, loss, stream);
}

template <typename scalar_t, typename mscalar_t, bool GF, bool GM>
void launch_normalized(const Problem& pr, at::Tensor& loss, cudaStream_t stream) {
  using acc_t = std::conditional_t<std::is_same_v<scalar_t, double>, double, float>;
  const int64_t L = static_cast<int64_t>(pr.levels.size());
  int64_t total_tiles = 0, samples = 0;
  for (const LevelDesc& d : pr.levels) {
    total_tiles += tiles_of(d, true);
    samples += d.B;
  }
  // One buffer: 3 stats per tile, then 3 factors and 1 term per sample.
  at::Tensor buf = at::empty({std::max<int64_t>(3 * total_tiles + 4 * samples, 1)}, loss.options().dtype(at::kDouble));
  double* stats = buf.data_ptr<double>();
  double* coefs = stats + 3 * total_tiles;
  double* terms = coefs + 3 * samples;
  int64_t done = 0;
  for (int64_t g0 = 0; g0 < L; g0 += kMaxLevels) {
    int64_t tiles = 0;
    const Params prm = group_params(pr, g0, true, tiles);
    launch_tiles<kStats, scalar_t, mscalar_t, acc_t, false, false>(prm, tiles, static_cast<acc_t>(pr.eta), nullptr,
                                                                   stats + 3 * done, stream);
    const LevelDesc& last = prm.lv[prm.n - 1];
    const int64_t group_samples = last.sample_start + last.B - prm.lv[0].sample_start;
    if (group_samples > 0) {
      constexpr int kSampleThreads = 128;
      const int64_t blocks = (group_samples + kSampleThreads - 1) / kSampleThreads;
      sample_kernel<<<static_cast<unsigned>(blocks), kSampleThreads, 0, stream>>>(prm, pr.eta, stats + 3 * done,
                                                                                  group_samples, coefs, terms);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    }
    if (GF || GM) {  // pass 2 over all pixels (tiles may cross samples: each pixel reads its own factors)
      int64_t gtiles = 0;
      const Params gprm = group_params(pr, g0, false, gtiles);
      launch_tiles<kGrad, scalar_t, mscalar_t, double, GF, GM>(gprm, gtiles, pr.eta, coefs, nullptr, stream);
    }
    done += tiles;
  }
  finish(terms, samples, loss, stream);
}

template <typename scalar_t, typename mscalar_t, bool GF, bool GM>
void launch(const Problem& p, at::Tensor& loss) {
  const cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  if (p.normalized) {
    launch_normalized<scalar_t, mscalar_t, GF, GM>(p, loss, stream);
  } else {
    launch_paper<scalar_t, mscalar_t, GF, GM>(p, loss, stream);
  }
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
