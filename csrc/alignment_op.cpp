// ssattn::alignment_loss_fused: schema, argument checks, output allocation
// and the CPU / CUDA registrations. The kernels live in alignment_cpu.cpp and
// alignment_cuda.cu; the fake kernel and autograd are registered from Python
// (ssattn/ops/alignment.py).
#include <ATen/ATen.h>
#include <torch/library.h>

#include <tuple>

#include "alignment.h"

namespace ssattn {

void alignment_cpu(const Problem& p, at::ScalarType fdt, at::ScalarType mdt, at::Tensor& loss);
int64_t alignment_cpu_sweeps();
#ifdef SSATTN_WITH_CUDA
void alignment_cuda(const Problem& p, at::ScalarType fdt, at::ScalarType mdt, at::Tensor& loss);
#endif

namespace {

using Result = std::tuple<at::Tensor, std::vector<at::Tensor>, std::vector<at::Tensor>>;

bool is_float_type(at::ScalarType t) {
  return t == at::kFloat || t == at::kDouble || t == at::kHalf || t == at::kBFloat16;
}

void fill_strides(int64_t* dst, const at::Tensor& t) {
  for (int i = 0; i < 4; ++i) dst[i] = t.stride(i);
}

Result alignment_loss_fused(const std::vector<at::Tensor>& features, const std::vector<at::Tensor>& maps,
                            at::ArrayRef<double> weights, double eta, bool mean, bool normalized,
                            bool grad_features, bool grad_maps) {
  const size_t L = features.size();
  TORCH_CHECK(L > 0, "alignment_loss_fused: features must be a non-empty list of (B, C, H, W) tensors");
  TORCH_CHECK(maps.size() == L, "alignment_loss_fused: features and maps must have the same number of levels, got ",
              L, " and ", maps.size());
  TORCH_CHECK(weights.size() == L, "alignment_loss_fused: weights must have one value per level (", L, "), got ",
              weights.size());
  const at::ScalarType fdt = features[0].scalar_type();
  const at::ScalarType mdt = maps[0].scalar_type();
  TORCH_CHECK(is_float_type(fdt), "alignment_loss_fused: features[0] must be float16, bfloat16, float32 or float64, got ",
              fdt);
  TORCH_CHECK(mdt == fdt || (mdt == at::kFloat && fdt != at::kDouble),
              "alignment_loss_fused: maps must have the dtype of the features (", fdt,
              ") or float32 for half features, got ", mdt);
  const at::Device device = features[0].device();
  const at::ScalarType acc = fdt == at::kDouble ? at::kDouble : at::kFloat;

  Problem p;
  p.eta = eta;
  p.normalized = normalized;
  p.grad_features = grad_features;
  p.grad_maps = grad_maps;
  std::vector<at::Tensor> gf, gm;
  int64_t samples = 0;
  for (size_t l = 0; l < L; ++l) {
    const at::Tensor& f = features[l];
    const at::Tensor& m = maps[l];
    TORCH_CHECK(f.dim() == 4, "alignment_loss_fused: features[", l, "] must be (B, C, H, W), got shape ", f.sizes());
    TORCH_CHECK(m.dim() == 4 && m.size(1) == 1 && m.size(0) == f.size(0) && m.size(2) == f.size(2) &&
                    m.size(3) == f.size(3),
                "alignment_loss_fused: maps[", l, "] must be (", f.size(0), ", 1, ", f.size(2), ", ", f.size(3),
                "), got ", m.sizes());
    TORCH_CHECK(f.scalar_type() == fdt, "alignment_loss_fused: features[", l, "] has dtype ", f.scalar_type(),
                " but features[0] has ", fdt);
    TORCH_CHECK(m.scalar_type() == mdt, "alignment_loss_fused: maps[", l, "] has dtype ", m.scalar_type(),
                " but maps[0] has ", mdt);
    TORCH_CHECK(f.device() == device && m.device() == device, "alignment_loss_fused: features[", l, "] and maps[", l,
                "] must be on ", device, ", got ", f.device(), " and ", m.device());
    LevelDesc d{};
    d.f = f.data_ptr();
    d.m = m.data_ptr();
    d.B = f.size(0);
    d.C = f.size(1);
    d.H = f.size(2);
    d.W = f.size(3);
    d.sample_start = samples;
    samples += d.B;
    fill_strides(d.fs, f);
    fill_strides(d.ms, m);
    // Channels are the unit-stride dimension: loop over channels innermost.
    d.channels_last = (d.C > 1 && f.stride(1) == 1) ? 1 : 0;
    const double numel = static_cast<double>(f.numel());
    // An empty level's sum is 0, and so is its mean (not 0/0).
    d.scale = mean ? (numel > 0 ? weights[l] / numel : 0.0) : weights[l];
    if (grad_features) {
      // Same strides as f when f is dense (so loops stay unit-stride), else contiguous.
      gf.push_back(at::empty_like(f));
      d.df = gf.back().data_ptr();
      fill_strides(d.dfs, gf.back());
    }
    if (grad_maps) {
      gm.push_back(at::empty_like(m));
      d.dm = gm.back().data_ptr();
      fill_strides(d.dms, gm.back());
    }
    p.levels.push_back(d);
  }
  at::Tensor loss = at::empty({}, features[0].options().dtype(acc));
  if (device.is_cpu()) {
    alignment_cpu(p, fdt, mdt, loss);
  } else {
#ifdef SSATTN_WITH_CUDA
    TORCH_CHECK(device.is_cuda(), "alignment_loss_fused: unsupported device ", device);
    alignment_cuda(p, fdt, mdt, loss);
#else
    TORCH_CHECK(false, "alignment_loss_fused: ssattn._C was built without CUDA kernels; device ", device);
#endif
  }
  return {loss, gf, gm};
}

}  // namespace
}  // namespace ssattn

TORCH_LIBRARY_FRAGMENT(ssattn, m) {
  m.def(
      "alignment_loss_fused(Tensor[] features, Tensor[] maps, float[] weights, float eta, bool mean, "
      "bool normalized, bool grad_features, bool grad_maps) -> (Tensor loss, Tensor[] grad_features, Tensor[] grad_maps)");
  // Passes over the features the CPU kernel has made since the library loaded (a diagnostic
  // for tests: the paper form makes one per call, the normalized form two when it writes gradients).
  m.def("alignment_loss_cpu_sweeps() -> int", &ssattn::alignment_cpu_sweeps);
}

TORCH_LIBRARY_IMPL(ssattn, CPU, m) { m.impl("alignment_loss_fused", &ssattn::alignment_loss_fused); }

#ifdef SSATTN_WITH_CUDA
TORCH_LIBRARY_IMPL(ssattn, CUDA, m) { m.impl("alignment_loss_fused", &ssattn::alignment_loss_fused); }
#endif
