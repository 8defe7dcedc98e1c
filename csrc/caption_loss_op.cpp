// ssattn::caption_loss_fused: schema, argument checks, output allocation and
// the CPU / CUDA registrations. The kernels live in caption_loss_cpu.cpp and
// caption_loss_cuda.cu; the fake kernel and autograd are registered from
// Python (ssattn/ops/caption_loss.py).
#include <ATen/ATen.h>
#include <torch/library.h>

#include <tuple>

#include "caption_loss.h"

namespace ssattn {

double caption_loss_cpu(const CaptionProblem& prob);
#ifdef SSATTN_WITH_CUDA
void caption_loss_cuda(const CaptionProblem& prob, at::Tensor& loss);
#endif

namespace {

bool is_float_type(at::ScalarType t) {
  return t == at::kFloat || t == at::kDouble || t == at::kHalf || t == at::kBFloat16;
}

std::tuple<at::Tensor, std::vector<at::Tensor>> caption_loss_fused(const std::vector<at::Tensor>& enhanced,
                                                                   const std::vector<at::Tensor>& reference,
                                                                   at::ArrayRef<double> weights, int64_t distance,
                                                                   double eps, bool grad) {
  const size_t L = enhanced.size();
  TORCH_CHECK(L > 0, "caption_loss_fused: enhanced must be a non-empty list of tensors");
  TORCH_CHECK(reference.size() == L, "caption_loss_fused: enhanced and reference must have the same length, got ", L,
              " and ", reference.size());
  TORCH_CHECK(weights.size() == L, "caption_loss_fused: weights must have one value per pair (", L, "), got ",
              weights.size());
  TORCH_CHECK(distance >= kCaptionL1 && distance <= kCaptionCosine,
              "caption_loss_fused: distance must be 0 (l1), 1 (l2) or 2 (cosine), got ", distance);
  TORCH_CHECK(eps > 0, "caption_loss_fused: eps must be > 0, got ", eps);
  CaptionProblem prob;
  prob.distance = distance;
  prob.eps = eps;
  prob.grad = grad;
  std::vector<at::Tensor> keep, gx;  // contiguous copies live until the kernel is done
  bool wide = false;
  for (size_t i = 0; i < L; ++i) {
    const at::Tensor& x = enhanced[i];
    const at::Tensor& y = reference[i];
    TORCH_CHECK(x.dim() >= 1, "caption_loss_fused: enhanced[", i, "] must have at least one dimension (..., D)");
    TORCH_CHECK(x.sizes() == y.sizes(), "caption_loss_fused: reference[", i, "] has shape ", y.sizes(),
                " but enhanced[", i, "] has ", x.sizes());
    TORCH_CHECK(is_float_type(x.scalar_type()), "caption_loss_fused: enhanced[", i,
                "] must be float16, bfloat16, float32 or float64, got ", x.scalar_type());
    TORCH_CHECK(y.scalar_type() == x.scalar_type(), "caption_loss_fused: reference[", i, "] has dtype ",
                y.scalar_type(), " but enhanced[", i, "] has ", x.scalar_type());
    TORCH_CHECK(x.device() == enhanced[0].device() && y.device() == enhanced[0].device(), "caption_loss_fused: enhanced[",
                i, "] and reference[", i, "] must be on ", enhanced[0].device(), ", got ", x.device(), " and ",
                y.device());
    wide = wide || x.scalar_type() == at::kDouble;
    keep.push_back(x.contiguous());
    keep.push_back(y.contiguous());
    CaptionPair p{};
    p.x = keep[keep.size() - 2].data_ptr();
    p.y = keep.back().data_ptr();
    p.D = x.size(-1);
    p.rows = p.D > 0 ? x.numel() / p.D : 0;
    p.dtype = static_cast<int>(x.scalar_type());
    const double n = static_cast<double>(distance == kCaptionCosine ? p.rows : x.numel());
    p.scale = n > 0 ? weights[i] / n : 0.0;
    if (grad) {
      gx.push_back(at::empty(x.sizes(), x.options().memory_format(at::MemoryFormat::Contiguous)));
      p.gx = gx.back().data_ptr();
    }
    prob.pairs.push_back(p);
  }
  at::Tensor loss = at::empty({}, enhanced[0].options().dtype(wide ? at::kDouble : at::kFloat));
  if (enhanced[0].device().is_cpu()) {
    const double total = caption_loss_cpu(prob);
    if (wide) {
      *loss.data_ptr<double>() = total;
    } else {
      *loss.data_ptr<float>() = static_cast<float>(total);
    }
  } else {
#ifdef SSATTN_WITH_CUDA
    TORCH_CHECK(enhanced[0].device().is_cuda(), "caption_loss_fused: unsupported device ", enhanced[0].device());
    caption_loss_cuda(prob, loss);
#else
    TORCH_CHECK(false, "caption_loss_fused: ssattn._C was built without CUDA kernels; device ", enhanced[0].device());
#endif
  }
  return {loss, gx};
}

}  // namespace
}  // namespace ssattn

TORCH_LIBRARY_FRAGMENT(ssattn, m) {
  m.def(
      "caption_loss_fused(Tensor[] enhanced, Tensor[] reference, float[] weights, int distance, float eps, "
      "bool grad) -> (Tensor loss, Tensor[] grad_enhanced)");
}

TORCH_LIBRARY_IMPL(ssattn, CPU, m) { m.impl("caption_loss_fused", &ssattn::caption_loss_fused); }

#ifdef SSATTN_WITH_CUDA
TORCH_LIBRARY_IMPL(ssattn, CUDA, m) { m.impl("caption_loss_fused", &ssattn::caption_loss_fused); }
#endif
