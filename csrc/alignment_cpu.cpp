// CPU kernel of the fused alignment loss: at::parallel_for over the rows (b, h)
// of every level. Each row's sums are kept on their own (doubles), and rows are
// added in a fixed order afterwards, so the result has the same bits for any
// thread count or chunking.
//
// Per pixel only two channel sums are needed: q = sum_c F^2 and r = sum_c F.
// With per-sample factors g1, g2, k (paper form: 1, 1, 0; see SampleCoef):
//   loss  = g2 (1-M)^2 q - eta g1 M r
//   dL/dM = s (-2 g2 (1-M) q - eta g1 r)
//   dL/dF = a F + b  with  a = s (2 g2 (1-M)^2 + k),  b = -s eta g1 M
// so the paper form reads F once and writes dF once. The normalized form first
// sums E = sum F^2 per sample (a pass without writes), then makes the same pass.
// Every pass over F is counted (alignment_cpu_sweeps), so tests can check that
// the paper form keeps its single pass without timing anything.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <atomic>
#include <type_traits>
#include <vector>

#include "alignment.h"

namespace ssattn {
namespace {

std::atomic<int64_t> sweeps{0};  // passes over the features since the library loaded

constexpr int kLanes = 8;  // independent accumulators so the channel sums vectorise

template <typename acc_t, typename T>
inline acc_t ld(const T* p) {
  return static_cast<acc_t>(*p);
}

// One row, channels innermost (f.stride(1) == 1).
template <typename acc_t>
struct Coef {
  acc_t g1, g2, k;
};

inline void add_pixel(Stats& st, double q, double r, double mv) {
  const double om = 1.0 - mv;
  st.e += q;
  st.s2 += om * om * q;
  st.s1 += mv * r;
}

template <typename scalar_t, typename mscalar_t, typename acc_t, bool GF, bool GM>
Stats row_channels_last(const LevelDesc& d, int64_t b, int64_t h, acc_t eta, Coef<acc_t> cf) {
  const auto* f = static_cast<const scalar_t*>(d.f) + b * d.fs[0] + h * d.fs[2];
  const auto* m = static_cast<const mscalar_t*>(d.m) + b * d.ms[0] + h * d.ms[2];
  auto* df = GF ? static_cast<scalar_t*>(d.df) + b * d.dfs[0] + h * d.dfs[2] : nullptr;
  auto* dm = GM ? static_cast<mscalar_t*>(d.dm) + b * d.dms[0] + h * d.dms[2] : nullptr;
  const acc_t s = static_cast<acc_t>(d.scale);
  const int64_t C = d.C, C8 = C - C % kLanes;
  const bool df_unit = GF && d.dfs[1] == 1;
  Stats row{0.0, 0.0, 0.0};
  for (int64_t w = 0; w < d.W; ++w) {
    const scalar_t* __restrict__ fp = f + w * d.fs[3];
    const acc_t mv = ld<acc_t>(m + w * d.ms[3]);
    const acc_t om = acc_t(1) - mv;
    const acc_t a = s * (acc_t(2) * cf.g2 * om * om + cf.k), bb = -s * eta * cf.g1 * mv;
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
    add_pixel(row, s2, s1, mv);
    if (GM) dm[w * d.dms[3]] = static_cast<mscalar_t>(s * (acc_t(-2) * cf.g2 * om * s2 - eta * cf.g1 * s1));
  }
  return row;
}

// One row, width innermost (NCHW or any other strides), in blocks of kBlock
// pixels: the per-pixel sums live in local arrays (which dF cannot alias, so
// the channel loop vectorises even when dF has the accumulator's type).
// 256 pixels: each channel is read in runs of 1 KiB (float32), long enough for
// the hardware prefetcher when F is not in cache (runs of 64 pixels were not).
constexpr int64_t kBlock = 256;
// Channels per step over a block: each pixel's two sums stay in registers for
// kGroup channels, so the local arrays are loaded and stored once per group,
// not once per channel (that traffic, more than F's, limited the loop when F
// was in cache). The sums still add the channels one at a time, in order: the
// result has the same bits as a loop over single channels.
constexpr int kGroup = 4;

// K channels of one block: f and df point at the first channel's pixel w0,
// the next channels are fst / dfst elements further (unit stride along width).
// restrict: F, dF and the local arrays never overlap, so the pixel loop
// vectorises without alias checks.
template <int K, typename scalar_t, typename acc_t, bool GF>
inline void channel_group(const scalar_t* __restrict__ f, int64_t fst, scalar_t* __restrict__ df, int64_t dfst,
                          int64_t n, acc_t* __restrict__ q, acc_t* __restrict__ r, const acc_t* __restrict__ av,
                          const acc_t* __restrict__ bv) {
  for (int64_t j = 0; j < n; ++j) {
    acc_t qj = q[j], rj = r[j];
    for (int k = 0; k < K; ++k) {
      const acc_t x = static_cast<acc_t>(f[k * fst + j]);
      qj += x * x;
      rj += x;
      if (GF) df[k * dfst + j] = static_cast<scalar_t>(av[j] * x + bv[j]);
    }
    q[j] = qj;
    r[j] = rj;
  }
}

template <typename scalar_t, typename mscalar_t, typename acc_t, bool GF, bool GM>
Stats row_width_inner(const LevelDesc& d, int64_t b, int64_t h, acc_t eta, Coef<acc_t> cf) {
  const auto* f = static_cast<const scalar_t*>(d.f) + b * d.fs[0] + h * d.fs[2];
  const auto* m = static_cast<const mscalar_t*>(d.m) + b * d.ms[0] + h * d.ms[2];
  auto* df = GF ? static_cast<scalar_t*>(d.df) + b * d.dfs[0] + h * d.dfs[2] : nullptr;
  auto* dm = GM ? static_cast<mscalar_t*>(d.dm) + b * d.dms[0] + h * d.dms[2] : nullptr;
  const acc_t s = static_cast<acc_t>(d.scale);
  const bool unit = d.fs[3] == 1 && (!GF || d.dfs[3] == 1);
  const int64_t fst = d.fs[1], dfst = GF ? d.dfs[1] : 0;
  Stats row{0.0, 0.0, 0.0};
  for (int64_t w0 = 0; w0 < d.W; w0 += kBlock) {
    const int64_t n = std::min(kBlock, d.W - w0);
    acc_t q[kBlock], r[kBlock], av[kBlock], bv[kBlock], mv[kBlock];
    for (int64_t j = 0; j < n; ++j) {
      mv[j] = ld<acc_t>(m + (w0 + j) * d.ms[3]);
      const acc_t om = acc_t(1) - mv[j];
      av[j] = s * (acc_t(2) * cf.g2 * om * om + cf.k);
      bv[j] = -s * eta * cf.g1 * mv[j];
      q[j] = 0;
      r[j] = 0;
    }
    if (unit) {
      const scalar_t* fp = f + w0;
      scalar_t* dp = GF ? df + w0 : nullptr;
      int64_t c = 0;
      for (; c + kGroup <= d.C; c += kGroup) {
        channel_group<kGroup, scalar_t, acc_t, GF>(fp + c * fst, fst, GF ? dp + c * dfst : nullptr, dfst, n, q, r, av,
                                                   bv);
      }
      for (; c < d.C; ++c) {
        channel_group<1, scalar_t, acc_t, GF>(fp + c * fst, fst, GF ? dp + c * dfst : nullptr, dfst, n, q, r, av, bv);
      }
    } else {
      for (int64_t c = 0; c < d.C; ++c) {
        const scalar_t* fp = f + c * fst + w0 * d.fs[3];
        scalar_t* dp = GF ? df + c * dfst + w0 * d.dfs[3] : nullptr;
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
      add_pixel(row, q[j], r[j], mv[j]);
      if (GM) {
        dm[(w0 + j) * d.dms[3]] = static_cast<mscalar_t>(s * (acc_t(-2) * cf.g2 * om * q[j] - eta * cf.g1 * r[j]));
      }
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

// One parallel pass over every row of every level: row_stats[g] gets row g's sums;
// coef(g) gives the factors of row g's sample. GF/GM: write dF/dM.
template <typename scalar_t, typename mscalar_t, typename acc_t, bool GF, bool GM, typename CoefOf>
void pass(const std::vector<LevelDesc>& levels, const std::vector<int64_t>& row_start, acc_t eta,
          std::vector<Stats>& row_stats, const CoefOf& coef) {
  sweeps.fetch_add(1, std::memory_order_relaxed);
  const int64_t L = static_cast<int64_t>(levels.size());
  const int64_t rows = row_start[L];
  int64_t elems = 0;
  for (const LevelDesc& d : levels) elems += d.B * d.C * d.H * d.W;
  // Chunking only affects speed: every row's value is computed the same way.
  const int64_t per_row = rows > 0 ? std::max<int64_t>(1, elems / rows) : 1;
  const int64_t grain = std::max<int64_t>(1, 32768 / per_row);
  at::parallel_for(0, rows, grain, [&](int64_t g0, int64_t g1) {
    int64_t l = static_cast<int64_t>(std::upper_bound(row_start.begin(), row_start.end(), g0) - row_start.begin()) - 1;
    for (int64_t g = g0; g < g1; ++g) {
      while (g >= row_start[l + 1]) ++l;
      const LevelDesc& d = levels[l];
      const int64_t r = g - row_start[l], b = r / d.H, h = r % d.H;
      const Coef<acc_t> cf = coef(l, b);
      row_stats[g] = d.channels_last ? row_channels_last<scalar_t, mscalar_t, acc_t, GF, GM>(d, b, h, eta, cf)
                                     : row_width_inner<scalar_t, mscalar_t, acc_t, GF, GM>(d, b, h, eta, cf);
    }
  });
}

template <typename scalar_t, typename mscalar_t, bool GF, bool GM>
void run(const Problem& p, at::Tensor& loss) {
  using acc_t = std::conditional_t<std::is_same_v<scalar_t, double>, double, float>;
  const int64_t L = static_cast<int64_t>(p.levels.size());
  std::vector<LevelDesc> levels;
  levels.reserve(p.levels.size());
  for (const LevelDesc& d : p.levels) levels.push_back(fold_rows(d, GF, GM));
  std::vector<int64_t> row_start(L + 1, 0);
  for (int64_t l = 0; l < L; ++l) row_start[l + 1] = row_start[l] + levels[l].B * levels[l].H;
  std::vector<Stats> row_stats(static_cast<size_t>(row_start[L]), Stats{0.0, 0.0, 0.0});
  const acc_t eta = static_cast<acc_t>(p.eta);
  double total = 0.0;
  if (!p.normalized) {
    const Coef<acc_t> one{acc_t(1), acc_t(1), acc_t(0)};
    pass<scalar_t, mscalar_t, acc_t, GF, GM>(levels, row_start, eta, row_stats, [&](int64_t, int64_t) { return one; });
    for (int64_t l = 0; l < L; ++l) {
      double s2 = 0.0, s1 = 0.0;
      for (int64_t g = row_start[l]; g < row_start[l + 1]; ++g) {
        s2 += row_stats[g].s2;
        s1 += row_stats[g].s1;
      }
      total += levels[l].scale * (s2 - p.eta * s1);
    }
  } else {
    // Pass 1: per-sample sums (no writes); then each sample's factors, in a fixed order.
    pass<scalar_t, mscalar_t, acc_t, false, false>(levels, row_start, eta, row_stats,
                                                   [](int64_t, int64_t) { return Coef<acc_t>{}; });
    std::vector<int64_t> sample_start(L + 1, 0);
    for (int64_t l = 0; l < L; ++l) sample_start[l + 1] = sample_start[l] + levels[l].B;
    // Pass 2 works in double: dF = a F + b cancels (its radial part removes most of 2 g2 (1-M)^2 F
    // when a sample has few elements), and float rounding of the parts would show in the result.
    std::vector<Coef<double>> coefs(static_cast<size_t>(sample_start[L]));
    for (int64_t l = 0; l < L; ++l) {
      const LevelDesc& d = levels[l];
      const double N = static_cast<double>(d.C) * static_cast<double>(d.H) * static_cast<double>(d.W);
      double level = 0.0;
      for (int64_t b = 0; b < d.B; ++b) {
        Stats st{0.0, 0.0, 0.0};
        const int64_t g0 = row_start[l] + b * d.H;
        for (int64_t g = g0; g < g0 + d.H; ++g) {
          st.e += row_stats[g].e;
          st.s2 += row_stats[g].s2;
          st.s1 += row_stats[g].s1;
        }
        double term = 0.0;
        const SampleCoef c = normalized_coef(st, N, p.eta, &term);
        coefs[sample_start[l] + b] = Coef<double>{c.g1, c.g2, c.k};
        level += term;
      }
      total += d.scale * level;
    }
    // Pass 2: the gradients with each sample's factors.
    if (GF || GM) {
      pass<scalar_t, mscalar_t, double, GF, GM>(levels, row_start, p.eta, row_stats,
                                                [&](int64_t l, int64_t b) { return coefs[sample_start[l] + b]; });
    }
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

int64_t alignment_cpu_sweeps() { return sweeps.load(std::memory_order_relaxed); }

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
