// Shared declarations of the fused alignment loss (SPEC 3): level descriptors
// and the CPU / CUDA entry points. Included by .cpp and .cu files, so it uses
// plain C++ types only.
#pragma once

#include <cstdint>
#include <vector>

namespace ssattn {

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
  int32_t channels_last;  // 1: channels are the unit-stride dimension of f
};

struct Problem {
  std::vector<LevelDesc> levels;
  double eta;
  bool grad_features;
  bool grad_maps;
};

}  // namespace ssattn
