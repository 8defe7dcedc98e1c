// Shared declarations of the fused caption-feature loss (docs/operations.md section 4).
#pragma once

#include <cstdint>
#include <vector>

namespace ssattn {

// Distance codes; the same order as ssattn.reference.caption_loss.DISTANCES.
enum CaptionDistance : int64_t { kCaptionL1 = 0, kCaptionL2 = 1, kCaptionCosine = 2 };

// One (enhanced, reference) pair as dense (rows, D) matrices.
struct CaptionPair {
  const void* x;  // enhanced features
  const void* y;  // reference features
  void* gx;       // dL/dx, same layout (null when not requested)
  int64_t rows, D;
  int dtype;       // at::ScalarType of x, y and gx
  double scale;    // w / numel (l1, l2) or w / rows (cosine)
};

struct CaptionProblem {
  std::vector<CaptionPair> pairs;
  int64_t distance;
  double eps;
  bool grad;
};

}  // namespace ssattn
