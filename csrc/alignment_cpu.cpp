// CPU kernel of the fused alignment loss: one at::parallel_for over the rows
// (b, h) of every level. Each row's loss is summed on its own into a per-row
// double, and the rows are added in a fixed order afterwards, so the result
// has the same bits for any thread count or chunking.
//
// Per pixel only two channel sums are needed: S2 = sum_c F^2 and S1 = sum_c F.
//   loss  = (1-M)^2 S2 - eta M S1
//   dL/dM = s (-2 (1-M) S2 - eta S1)
//   dL/dF = a F + b  with  a = 2 s (1-M)^2,  b = -s eta M
// so F is read once and dF written once.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <type_traits>
#include <vector>

#include "alignment.h"

namespace ssattn {
namespace {

constexpr int kLanes = 8;  // independent accumulators so the channel sums vectorise

template <typename acc_t, typename T>
inline acc_t ld(const T* p) {
  return static_cast<acc_t>(*p);
}

// One row, channels innermost (f.stride(1) == 1).
template <typename scalar_t, typename mscalar_t, typename acc_t, bool GF, bool GM>
double row_channels_last(const LevelDesc& d, int64_t b, int64_t h, acc_t eta) {
  const auto* f = static_cast<const scalar_t*>(d.f) + b * d.fs[0] + h * d.fs[2];
  const auto* m = static_cast<const mscalar_t*>(d.m) + b * d.ms[0] + h * d.ms[2];
  auto* df = GF ? static_cast<scalar_t*>(d.df) + b * d.dfs[0] + h * d.dfs[2] : nullptr;
  auto* dm = GM ? static_cast<mscalar_t*>(d.dm) + b * d.dms[0] + h * d.dms[2] : nullptr;
  const acc_t s = static_cast<acc_t>(d.scale);
  const int64_t C = d.C, C8 = C - C % kLanes;
  const bool df_unit = GF && d.dfs[1] == 1;
  double row = 0.0;
  for (int64_t w = 0; w < d.W; ++w) {
    const scalar_t* __restrict__ fp = f + w * d.fs[3];
    const acc_t mv = ld<acc_t>(m + w * d.ms[3]);
    const acc_t om = acc_t(1) - mv;
    const acc_t a = acc_t(2) * s * om * om, bb = -s * eta * mv;
    acc_t q[kLanes] = {}, r[kLanes] = {};
    if (GF && df_unit) {
      scalar_t* __restrict__ dp = df + w * d.dfs[3];
      for (int64_t c = 0; c < C8; c += kLanes) {
        for (int j = 0; j < kLanes; ++j) {
          const acc_t x = static_cast<acc_t>(fp[c + j]);
          q[j] += x * x;
          r[j] += x;
          dp[c + j] = static_cast<scalar_t>(a * x + bb);
        }
      }
    } else {
      for (int64_t c = 0; c < C8; c += kLanes) {
        for (int j = 0; j < kLanes; ++j) {
          const acc_t x = static_cast<acc_t>(fp[c + j]);
          q[j] += x * x;
          r[j] += x;
        }
      }
      if (GF) {
        scalar_t* dp = df + w * d.dfs[3];
        for (int64_t c = 0; c < C8; ++c) dp[c * d.dfs[1]] = static_cast<scalar_t>(a * static_cast<acc_t>(fp[c]) + bb);
      }
    }
    acc_t s2 = 0, s1 = 0;
    for (int j = 0; j < kLanes; ++j) {
      s2 += q[j];
      s1 += r[j];
    }
    for (int64_t c = C8; c < C; ++c) {
      const acc_t x = static_cast<acc_t>(fp[c]);
      s2 += x * x;
      s1 += x;
      if (GF) df[w * d.dfs[3] + c * d.dfs[1]] = static_cast<scalar_t>(a * x + bb);
    }
    row += static_cast<double>(om * om * s2 - eta * mv * s1);
    if (GM) dm[w * d.dms[3]] = static_cast<mscalar_t>(s * (acc_t(-2) * om * s2 - eta * s1));
  }
  return row;
}

// One row, width innermost (NCHW or any other strides), in blocks of kBlock
// pixels: the per-pixel sums live in local arrays (which dF cannot alias, so
// the channel loop vectorises even when dF has the accumulator's type).
constexpr int64_t kBlock = 64;

template <typename scalar_t, typename mscalar_t, typename acc_t, bool GF, bool GM>
double row_width_inner(const LevelDesc& d, int64_t b, int64_t h, acc_t eta) {
  const auto* f = static_cast<const scalar_t*>(d.f) + b * d.fs[0] + h * d.fs[2];
  const auto* m = static_cast<const mscalar_t*>(d.m) + b * d.ms[0] + h * d.ms[2];
  auto* df = GF ? static_cast<scalar_t*>(d.df) + b * d.dfs[0] + h * d.dfs[2] : nullptr;
  auto* dm = GM ? static_cast<mscalar_t*>(d.dm) + b * d.dms[0] + h * d.dms[2] : nullptr;
  const acc_t s = static_cast<acc_t>(d.scale);
  const bool unit = d.fs[3] == 1 && (!GF || d.dfs[3] == 1);
  double row = 0.0;
  for (int64_t w0 = 0; w0 < d.W; w0 += kBlock) {
    const int64_t n = std::min(kBlock, d.W - w0);
    acc_t q[kBlock], r[kBlock], av[kBlock], bv[kBlock], mv[kBlock];
    for (int64_t j = 0; j < n; ++j) {
      mv[j] = ld<acc_t>(m + (w0 + j) * d.ms[3]);
      const acc_t om = acc_t(1) - mv[j];
      av[j] = acc_t(2) * s * om * om;
      bv[j] = -s * eta * mv[j];
      q[j] = 0;
      r[j] = 0;
    }
    for (int64_t c = 0; c < d.C; ++c) {
      if (unit) {
        // restrict: F and dF never overlap, so the loop vectorises without alias checks
        const scalar_t* __restrict__ fp = f + c * d.fs[1] + w0;
        scalar_t* __restrict__ dp = GF ? df + c * d.dfs[1] + w0 : nullptr;
        for (int64_t j = 0; j < n; ++j) {
          const acc_t x = static_cast<acc_t>(fp[j]);
          q[j] += x * x;
          r[j] += x;
          if (GF) dp[j] = static_cast<scalar_t>(av[j] * x + bv[j]);
        }
      } else {
        const scalar_t* fp = f + c * d.fs[1] + w0 * d.fs[3];
        scalar_t* dp = GF ? df + c * d.dfs[1] + w0 * d.dfs[3] : nullptr;
        for (int64_t j = 0; j < n; ++j) {
          const acc_t x = static_cast<acc_t>(fp[j * d.fs[3]]);
          q[j] += x * x;
          r[j] += x;
          if (GF) dp[j * d.dfs[3]] = static_cast<scalar_t>(av[j] * x + bv[j]);
        }
      }
    }
    for (int64_t j = 0; j < n; ++j) {
      const acc_t om = acc_t(1) - mv[j];
      row += static_cast<double>(om * om * q[j] - eta * mv[j] * r[j]);
      if (GM) dm[(w0 + j) * d.dms[3]] = static_cast<mscalar_t>(s * (acc_t(-2) * om * q[j] - eta * r[j]));
    }
  }
  return row;
}

// Rows of a width-inner level whose (H, W) planes are dense are folded into
// k image rows at a time (k the largest divisor of H with k W <= kFoldWidth):
// deep levels have W = 8 or 16, and such short rows waste the vector loop.
// k depends only on the shape, so results stay the same for any thread count.
constexpr int64_t kFoldWidth = 1024;

bool plane_dense(const int64_t* st, int64_t W) { return st[3] == 1 && st[2] == W; }

LevelDesc fold_rows(LevelDesc d, bool gf, bool gm) {
  if (d.channels_last || !plane_dense(d.fs, d.W) || !plane_dense(d.ms, d.W) || (gf && !plane_dense(d.dfs, d.W)) ||
      (gm && !plane_dense(d.dms, d.W))) {
    return d;
  }
  int64_t k = 1;
  for (int64_t c = 2; c <= d.H && c * d.W <= kFoldWidth; ++c) {
    if (d.H % c == 0) k = c;
  }
  d.W *= k;
  d.H /= k;
  for (int64_t* st : {d.fs, d.ms, d.dfs, d.dms}) st[2] *= k;
  return d;
}

template <typename scalar_t, typename mscalar_t, bool GF, bool GM>
void run(const Problem& p, at::Tensor& loss) {
  using acc_t = std::conditional_t<std::is_same_v<scalar_t, double>, double, float>;
  const int64_t L = static_cast<int64_t>(p.levels.size());
  std::vector<LevelDesc> levels;
  levels.reserve(p.levels.size());
  for (const LevelDesc& d : p.levels) levels.push_back(fold_rows(d, GF, GM));
  std::vector<int64_t> row_start(L + 1, 0);
  int64_t elems = 0;
  for (int64_t l = 0; l < L; ++l) {
    const LevelDesc& d = levels[l];
    row_start[l + 1] = row_start[l] + d.B * d.H;
    elems += d.B * d.C * d.H * d.W;
  }
  const int64_t rows = row_start[L];
  std::vector<double> row_loss(static_cast<size_t>(rows), 0.0);
  const acc_t eta = static_cast<acc_t>(p.eta);
  // Chunking only affects speed: every row's value is computed the same way.
  const int64_t per_row = rows > 0 ? std::max<int64_t>(1, elems / rows) : 1;
  const int64_t grain = std::max<int64_t>(1, 32768 / per_row);
  at::parallel_for(0, rows, grain, [&](int64_t g0, int64_t g1) {
    int64_t l = static_cast<int64_t>(std::upper_bound(row_start.begin(), row_start.end(), g0) - row_start.begin()) - 1;
    for (int64_t g = g0; g < g1; ++g) {
      while (g >= row_start[l + 1]) ++l;
      const LevelDesc& d = levels[l];
      const int64_t r = g - row_start[l], b = r / d.H, h = r % d.H;
      row_loss[g] = d.channels_last ? row_channels_last<scalar_t, mscalar_t, acc_t, GF, GM>(d, b, h, eta)
                                    : row_width_inner<scalar_t, mscalar_t, acc_t, GF, GM>(d, b, h, eta);
    }
  });
  double total = 0.0;
  for (int64_t l = 0; l < L; ++l) {
    double level = 0.0;
    for (int64_t g = row_start[l]; g < row_start[l + 1]; ++g) level += row_loss[g];
    total += levels[l].scale * level;
  }
  if (loss.scalar_type() == at::kDouble) {
    *loss.data_ptr<double>() = total;
  } else {
    *loss.data_ptr<float>() = static_cast<float>(total);
  }
}

template <typename scalar_t, typename mscalar_t>
void run_flags(const Problem& p, at::Tensor& loss) {
  if (p.grad_features && p.grad_maps) return run<scalar_t, mscalar_t, true, true>(p, loss);
  if (p.grad_features) return run<scalar_t, mscalar_t, true, false>(p, loss);
  if (p.grad_maps) return run<scalar_t, mscalar_t, false, true>(p, loss);
  return run<scalar_t, mscalar_t, false, false>(p, loss);
}

}  // namespace

void alignment_cpu(const Problem& p, at::ScalarType fdt, at::ScalarType mdt, at::Tensor& loss) {
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, fdt, "alignment_loss_fused_cpu", [&] {
    if (mdt == fdt) {
      run_flags<scalar_t, scalar_t>(p, loss);
    } else {
      // float32 maps with half features; float64 features always come with float64 maps.
      TORCH_CHECK(mdt == at::kFloat && fdt != at::kDouble, "alignment_loss_fused: maps must be ", fdt,
                  " or float32 (half features), got ", mdt);
      if constexpr (!std::is_same_v<scalar_t, double>) run_flags<scalar_t, float>(p, loss);
    }
  });
}

}  // namespace ssattn
