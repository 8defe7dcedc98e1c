// Shared declarations of the fused alignment loss (SPEC 3): level descriptors
// and the CPU / CUDA entry points. Included by .cpp and .cu files, so it uses
// plain C++ types only.
#pragma once

#include <cmath>
#include <cstdint>
#include <vector>

namespace ssattn {

// form="normalized": each sample b of a level is rescaled to U = F_b / max(rms(F_b), kNormEps)
// before the paper's formula (rms over its C*H*W elements). Same value as
// ssattn.reference.alignment.NORM_EPS.
constexpr double kNormEps = 1e-6;

// Levels per CUDA launch: descriptors travel by value as a kernel parameter
// (no host-to-device copy); more levels take further launches.
constexpr int kMaxLevels = 16;

// Element strides of a (B, C, H, W) view; maps use index 1 of nothing.
struct LevelDesc {
  const void* f;   // features (B, C, H, W)
  const void* m;   // maps (B, 1, H, W)
  void* df;        // dL/dF, same sizes as f (null when not requested)
  void* dm;        // dL/dM, same sizes as m (null when not requested)
  int64_t B, C, H, W;
  int64_t fs[4], ms[4], dfs[4], dms[4];
  double scale;        // w_l, or w_l / numel(F_l) for reduction="mean"
  int64_t tile_start;  // CUDA: first tile (block) of this level
  int64_t tiles_per_sample;  // CUDA: 0 = tiles run over all B*H*W pixels; else each sample has its own tiles
  int64_t sample_start;      // index of this level's first sample among all levels' samples
  int32_t channels_last;  // 1: channels are the unit-stride dimension of f
};

struct Problem {
  std::vector<LevelDesc> levels;
  double eta;
  bool normalized;  // form="normalized" (else "paper")
  bool grad_features;
  bool grad_maps;
};

// Per-sample factors of the normalized form (rho = max(rms(F_b), kNormEps)): the paper's
// per-pixel formulas, with F^2 terms scaled by g2 = 1/rho^2, F terms by g1 = 1/rho, and dF
// given the radial term k F. The paper form is g1 = g2 = 1, k = 0.
struct SampleCoef {
  double g1, g2, k;
};

// Sums over some pixels of a sample: E = sum F^2, S2 = sum (1-M)^2 F^2, S1 = sum M F.
struct Stats {
  double e, s2, s1;
};

// The normalized form's loss term (before the level's scale) and factors of one sample
// with N = C*H*W elements. Shared by the CPU and CUDA paths so both define rho alike.
#if defined(__CUDACC__)
__host__ __device__
#endif
inline SampleCoef normalized_coef(const Stats& st, double N, double eta, double* term) {
  const double ms = N > 0 ? st.e / N : 0.0;  // mean square
  const double eps2 = kNormEps * kNormEps;
  const double rho2 = ms > eps2 ? ms : eps2;
  const double rho = sqrt(rho2);
  SampleCoef c;
  c.g1 = 1.0 / rho;
  c.g2 = 1.0 / rho2;
  const double s2 = st.s2 * c.g2, s1 = st.s1 * c.g1;  // the paper's two sums at U
  *term = s2 - eta * s1;
  // dT/dF = (g - <g, U>/N U) / rho with g = 2 U (1-M)^2 - eta M: the radial part, when rho is the RMS.
  c.k = (ms >= eps2 && N > 0) ? (eta * s1 - 2.0 * s2) / (N * rho2) : 0.0;
  return c;
}

}  // namespace ssattn
