// CPU kernel of the fused caption-feature loss: one pass over every pair computes
// its distance and, in the same pass, dL/dx (docs/operations.md section 4).
//
// Each pair is cut into blocks of a fixed number of rows (set by D alone);
// at::parallel_for runs over the blocks of all pairs, each block's sum is kept
// on its own (a double), and blocks are added in a fixed order afterwards, so
// the loss has the same bits for any thread count.
//   l1:     loss += |x - y|,   dx = s sign(x - y)
//   l2:     loss += (x - y)^2, dx = 2 s (x - y)
//   cosine: per row c = <x, y> / (max(|x|, eps) max(|y|, eps)), loss += 1 - c,
//           dx = -s (y / (a b) - [|x| >= eps] c x / |x|^2)
// (s = w / numel for l1 and l2, w / rows for cosine). The cosine row is read
// twice (its sums, then dx), the second time from cache.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <type_traits>
#include <vector>

#include "caption_loss.h"

namespace ssattn {
namespace {

constexpr int kLanes = 8;               // independent accumulators so the row sums vectorise
constexpr int64_t kBlockElems = 16384;  // elements per block (whole rows)

template <typename acc_t, typename T>
inline acc_t ld(const T* p, int64_t i) {
  return static_cast<acc_t>(p[i]);
}

// L2 and GRAD are template parameters so that the element loop has no branch and vectorises.
template <typename scalar_t, typename acc_t, bool L2, bool GRAD>
double block_l1_l2(const CaptionPair& p, int64_t r0, int64_t r1) {
  const auto* __restrict__ x = static_cast<const scalar_t*>(p.x);
  const auto* __restrict__ y = static_cast<const scalar_t*>(p.y);
  auto* __restrict__ gx = static_cast<scalar_t*>(p.gx);
  const acc_t s = static_cast<acc_t>(L2 ? 2.0 * p.scale : p.scale);
  // The block's rows are contiguous: one flat loop over them, lanes for the sum.
  const int64_t n = (r1 - r0) * p.D, off = r0 * p.D;
  const int64_t n8 = n - n % kLanes;
  acc_t lane[kLanes] = {};
  for (int64_t i = 0; i < n8; i += kLanes) {
    for (int j = 0; j < kLanes; ++j) {
      const acc_t d = ld<acc_t>(x, off + i + j) - ld<acc_t>(y, off + i + j);
      lane[j] += L2 ? d * d : std::abs(d);
      if (GRAD) gx[off + i + j] = static_cast<scalar_t>(L2 ? s * d : s * (acc_t(d > 0) - acc_t(d < 0)));
    }
  }
  acc_t tail = 0;
  for (int64_t i = n8; i < n; ++i) {
    const acc_t d = ld<acc_t>(x, off + i) - ld<acc_t>(y, off + i);
    tail += L2 ? d * d : std::abs(d);
    if (GRAD) gx[off + i] = static_cast<scalar_t>(L2 ? s * d : s * (acc_t(d > 0) - acc_t(d < 0)));
  }
  double total = static_cast<double>(tail);
  for (int j = 0; j < kLanes; ++j) total += static_cast<double>(lane[j]);
  return total;
}

template <typename scalar_t, typename acc_t>
double block_cosine(const CaptionPair& p, int64_t r0, int64_t r1, acc_t eps, bool grad) {
  const auto* __restrict__ x = static_cast<const scalar_t*>(p.x);
  const auto* __restrict__ y = static_cast<const scalar_t*>(p.y);
  auto* __restrict__ gx = static_cast<scalar_t*>(p.gx);
  const acc_t s = static_cast<acc_t>(p.scale);
  double total = 0.0;
  for (int64_t r = r0; r < r1; ++r) {
    const int64_t off = r * p.D;
    acc_t xy[kLanes] = {}, xx[kLanes] = {}, yy[kLanes] = {};
    const int64_t D8 = p.D - p.D % kLanes;
    for (int64_t c = 0; c < D8; c += kLanes) {
      for (int j = 0; j < kLanes; ++j) {
        const acc_t a = ld<acc_t>(x, off + c + j), b = ld<acc_t>(y, off + c + j);
        xy[j] += a * b;
        xx[j] += a * a;
        yy[j] += b * b;
      }
    }
    acc_t dot = 0, nx2 = 0, ny2 = 0;
    for (int j = 0; j < kLanes; ++j) {
      dot += xy[j];
      nx2 += xx[j];
      ny2 += yy[j];
    }
    for (int64_t c = D8; c < p.D; ++c) {
      const acc_t a = ld<acc_t>(x, off + c), b = ld<acc_t>(y, off + c);
      dot += a * b;
      nx2 += a * a;
      ny2 += b * b;
    }
    const acc_t nx = std::sqrt(nx2), ny = std::sqrt(ny2);
    const acc_t na = std::max(nx, eps), nb = std::max(ny, eps);
    const acc_t inv = acc_t(1) / (na * nb);
    const acc_t cos = dot * inv;
    total += static_cast<double>(acc_t(1) - cos);
    if (grad) {
      // dx = -s (y inv - [nx >= eps] cos x / nx^2): the clamp passes the gradient where nx >= eps (torch's clamp_min).
      const acc_t ky = -s * inv;
      const acc_t kx = nx >= eps ? s * cos / nx2 : acc_t(0);
      for (int64_t c = 0; c < p.D; ++c) {
        gx[off + c] = static_cast<scalar_t>(ky * ld<acc_t>(y, off + c) + kx * ld<acc_t>(x, off + c));
      }
    }
  }
  return total;
}

template <typename scalar_t>
double run_block(const CaptionProblem& prob, const CaptionPair& p, int64_t r0, int64_t r1) {
  using acc_t = std::conditional_t<std::is_same_v<scalar_t, double>, double, float>;
  if (prob.distance == kCaptionCosine) {
    return block_cosine<scalar_t, acc_t>(p, r0, r1, static_cast<acc_t>(prob.eps), prob.grad);
  }
  const bool l2 = prob.distance == kCaptionL2;
  if (l2) {
    return prob.grad ? block_l1_l2<scalar_t, acc_t, true, true>(p, r0, r1) : block_l1_l2<scalar_t, acc_t, true, false>(p, r0, r1);
  }
  return prob.grad ? block_l1_l2<scalar_t, acc_t, false, true>(p, r0, r1) : block_l1_l2<scalar_t, acc_t, false, false>(p, r0, r1);
}

double dispatch_block(const CaptionProblem& prob, const CaptionPair& p, int64_t r0, int64_t r1) {
  switch (static_cast<at::ScalarType>(p.dtype)) {
    case at::kDouble: return run_block<double>(prob, p, r0, r1);
    case at::kFloat: return run_block<float>(prob, p, r0, r1);
    case at::kHalf: return run_block<at::Half>(prob, p, r0, r1);
    case at::kBFloat16: return run_block<at::BFloat16>(prob, p, r0, r1);
    default: TORCH_CHECK(false, "caption_loss_fused: unsupported dtype");
  }
  return 0.0;
}

}  // namespace

double caption_loss_cpu(const CaptionProblem& prob) {
  // Blocks: (pair, first row, end row); the split depends on the shapes only.
  struct Block {
    int64_t pair, r0, r1;
  };
  std::vector<Block> blocks;
  for (int64_t i = 0; i < static_cast<int64_t>(prob.pairs.size()); ++i) {
    const CaptionPair& p = prob.pairs[i];
    if (p.rows == 0 || p.D == 0) continue;  // an empty pair contributes 0
    const int64_t per = std::max<int64_t>(1, kBlockElems / p.D);
    for (int64_t r = 0; r < p.rows; r += per) blocks.push_back({i, r, std::min(p.rows, r + per)});
  }
  std::vector<double> sums(blocks.size(), 0.0);
  at::parallel_for(0, static_cast<int64_t>(blocks.size()), 1, [&](int64_t b0, int64_t b1) {
    for (int64_t b = b0; b < b1; ++b) {
      const Block& k = blocks[b];
      sums[b] = dispatch_block(prob, prob.pairs[k.pair], k.r0, k.r1);
    }
  });
  // Fixed order: per pair its blocks' sum, times the pair's scale, pairs in order.
  double total = 0.0, pair_sum = 0.0;
  for (size_t b = 0; b < blocks.size(); ++b) {
    pair_sum += sums[b];
    if (b + 1 == blocks.size() || blocks[b + 1].pair != blocks[b].pair) {
      total += prob.pairs[blocks[b].pair].scale * pair_sum;
      pair_sum = 0.0;
    }
  }
  return total;
}

}  // namespace ssattn
