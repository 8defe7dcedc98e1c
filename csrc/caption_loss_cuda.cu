// CUDA kernels of the fused caption-feature loss (docs/operations.md section 4).
// One launch per pair (pairs may differ in dtype): each block takes a fixed
// chunk of whole rows (set by D alone), reads X and Y once, writes dL/dX once
// and stores its scaled loss partial; a one-block kernel then adds the
// partials in a fixed order, so the loss has the same bits run to run (no
// float atomics). l1/l2: threads stride over the chunk's elements; cosine:
// one warp per row (lanes stride over D, shuffles add the row's sums, then
// the lanes write the row's gradient). Offsets are 64-bit. Not yet run on a
// GPU by this project: "auto" does not pick it (backend="native" only).
#include <ATen/ATen.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>

#include <algorithm>
#include <type_traits>

#include "caption_loss.h"

namespace ssattn {
namespace {

constexpr int kThreads = 256;
constexpr int kWarps = kThreads / 32;
constexpr int64_t kChunkElems = 8192;  // elements per block (whole rows)
constexpr int kFinishThreads = 1024;

template <typename acc_t>
__device__ inline acc_t warp_sum(acc_t v) {
  for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
  return v;  // the same value in every lane, added in a fixed order
}

// Sum of one double per thread over the block, in a fixed order; valid in thread 0.
__device__ inline double block_sum(double v, double* sh) {
  v = warp_sum(v);
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  if (lane == 0) sh[warp] = v;
  __syncthreads();
  double t = 0.0;
  if (threadIdx.x == 0) {
    for (int w = 0; w < kWarps; ++w) t += sh[w];
  }
  return t;
}

template <typename scalar_t, typename acc_t, bool L2, bool GRAD>
__global__ void l1_l2_kernel(const scalar_t* __restrict__ x, const scalar_t* __restrict__ y,
                             scalar_t* __restrict__ gx, int64_t n, int64_t chunk, acc_t s, double scale,
                             double* __restrict__ partial) {
  __shared__ double sh[kWarps];
  const int64_t i0 = static_cast<int64_t>(blockIdx.x) * chunk;
  const int64_t i1 = i0 + chunk < n ? i0 + chunk : n;
  acc_t acc = 0;
  for (int64_t i = i0 + threadIdx.x; i < i1; i += kThreads) {
    const acc_t d = static_cast<acc_t>(x[i]) - static_cast<acc_t>(y[i]);
    acc += L2 ? d * d : fabs(d);
    if (GRAD) gx[i] = static_cast<scalar_t>(L2 ? s * d : s * (acc_t(d > 0) - acc_t(d < 0)));
  }
  const double t = block_sum(static_cast<double>(acc), sh);
  if (threadIdx.x == 0) partial[blockIdx.x] = scale * t;
}

template <typename scalar_t, typename acc_t, bool GRAD>
__global__ void cosine_kernel(const scalar_t* __restrict__ x, const scalar_t* __restrict__ y,
                              scalar_t* __restrict__ gx, int64_t rows, int64_t D, int64_t rows_per_block, acc_t s,
                              acc_t eps, double scale, double* __restrict__ partial) {
  __shared__ double sh[kWarps];
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int64_t r0 = static_cast<int64_t>(blockIdx.x) * rows_per_block;
  const int64_t r1 = r0 + rows_per_block < rows ? r0 + rows_per_block : rows;
  double mine = 0.0;  // lane 0: this warp's rows' (1 - cos)
  for (int64_t r = r0 + warp; r < r1; r += kWarps) {
    const int64_t off = r * D;
    acc_t xy = 0, xx = 0, yy = 0;
    for (int64_t c = lane; c < D; c += 32) {
      const acc_t a = static_cast<acc_t>(x[off + c]), b = static_cast<acc_t>(y[off + c]);
      xy += a * b;
      xx += a * a;
      yy += b * b;
    }
    xy = warp_sum(xy);
    xx = warp_sum(xx);
    yy = warp_sum(yy);
    const acc_t nx = sqrt(xx), ny = sqrt(yy);
    const acc_t inv = acc_t(1) / (max(nx, eps) * max(ny, eps));
    const acc_t cs = xy * inv;
    if (lane == 0) mine += static_cast<double>(acc_t(1) - cs);
    if (GRAD) {
      // dx = -s (y inv - [nx >= eps] cos x / nx^2), as csrc/caption_loss_cpu.cpp
      const acc_t ky = -s * inv;
      const acc_t kx = nx >= eps ? s * cs / xx : acc_t(0);
      for (int64_t c = lane; c < D; c += 32) {
        gx[off + c] = static_cast<scalar_t>(ky * static_cast<acc_t>(y[off + c]) + kx * static_cast<acc_t>(x[off + c]));
      }
    }
  }
  const double t = block_sum(lane == 0 ? mine : 0.0, sh);
  if (threadIdx.x == 0) partial[blockIdx.x] = scale * t;
}

template <typename out_t>
__global__ void finish_kernel(const double* __restrict__ partials, int64_t n, out_t* loss) {
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

// Blocks one pair takes: element chunks (l1, l2) or row chunks (cosine); 0 for an empty pair.
int64_t blocks_of(const CaptionPair& p, bool cosine) {
  if (p.rows == 0 || p.D == 0) return 0;
  if (cosine) {
    const int64_t per = std::max<int64_t>(1, kChunkElems / p.D);
    return (p.rows + per - 1) / per;
  }
  const int64_t n = p.rows * p.D;
  return (n + kChunkElems - 1) / kChunkElems;
}

template <typename scalar_t>
void launch_pair(const CaptionProblem& prob, const CaptionPair& p, double* partial, cudaStream_t stream) {
  using acc_t = std::conditional_t<std::is_same_v<scalar_t, double>, double, float>;
  const bool cosine = prob.distance == kCaptionCosine;
  const int64_t blocks = blocks_of(p, cosine);
  if (blocks == 0) return;
  TORCH_CHECK(blocks <= 0x7fffffff, "caption_loss_fused: too many blocks for one launch (", blocks, ")");
  const auto* x = static_cast<const scalar_t*>(p.x);
  const auto* y = static_cast<const scalar_t*>(p.y);
  auto* gx = static_cast<scalar_t*>(p.gx);
  const unsigned grid = static_cast<unsigned>(blocks);
  if (cosine) {
    const int64_t per = std::max<int64_t>(1, kChunkElems / p.D);
    const acc_t s = static_cast<acc_t>(p.scale), eps = static_cast<acc_t>(prob.eps);
    if (prob.grad) {
      cosine_kernel<scalar_t, acc_t, true><<<grid, kThreads, 0, stream>>>(x, y, gx, p.rows, p.D, per, s, eps,
                                                                         p.scale, partial);
    } else {
      cosine_kernel<scalar_t, acc_t, false><<<grid, kThreads, 0, stream>>>(x, y, gx, p.rows, p.D, per, s, eps,
                                                                          p.scale, partial);
    }
  } else {
    const int64_t n = p.rows * p.D;
    const bool l2 = prob.distance == kCaptionL2;
    const acc_t s = static_cast<acc_t>(l2 ? 2.0 * p.scale : p.scale);
    if (l2) {
      if (prob.grad) {
        l1_l2_kernel<scalar_t, acc_t, true, true><<<grid, kThreads, 0, stream>>>(x, y, gx, n, kChunkElems, s, p.scale,
                                                                                partial);
      } else {
        l1_l2_kernel<scalar_t, acc_t, true, false><<<grid, kThreads, 0, stream>>>(x, y, gx, n, kChunkElems, s,
                                                                                 p.scale, partial);
      }
    } else if (prob.grad) {
      l1_l2_kernel<scalar_t, acc_t, false, true><<<grid, kThreads, 0, stream>>>(x, y, gx, n, kChunkElems, s, p.scale,
                                                                               partial);
    } else {
      l1_l2_kernel<scalar_t, acc_t, false, false><<<grid, kThreads, 0, stream>>>(x, y, gx, n, kChunkElems, s,
                                                                                p.scale, partial);
    }
  }
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

}  // namespace

void caption_loss_cuda(const CaptionProblem& prob, at::Tensor& loss) {
  const c10::cuda::CUDAGuard guard(loss.device());
  const cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  const bool cosine = prob.distance == kCaptionCosine;
  int64_t total = 0;
  for (const CaptionPair& p : prob.pairs) total += blocks_of(p, cosine);
  at::Tensor partials = at::zeros({std::max<int64_t>(total, 1)}, loss.options().dtype(at::kDouble));
  double* part = partials.data_ptr<double>();
  int64_t done = 0;
  for (const CaptionPair& p : prob.pairs) {
    switch (static_cast<at::ScalarType>(p.dtype)) {
      case at::kDouble: launch_pair<double>(prob, p, part + done, stream); break;
      case at::kFloat: launch_pair<float>(prob, p, part + done, stream); break;
      case at::kHalf: launch_pair<at::Half>(prob, p, part + done, stream); break;
      case at::kBFloat16: launch_pair<at::BFloat16>(prob, p, part + done, stream); break;
      default: TORCH_CHECK(false, "caption_loss_fused: unsupported dtype");
    }
    done += blocks_of(p, cosine);
  }
  if (loss.scalar_type() == at::kDouble) {
    finish_kernel<double><<<1, kFinishThreads, 0, stream>>>(part, total, loss.data_ptr<double>());
  } else {
    finish_kernel<float><<<1, kFinishThreads, 0, stream>>>(part, total, loss.data_ptr<float>());
  }
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

}  // namespace ssattn
