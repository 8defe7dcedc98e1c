"""PSNR and SSIM (ssattn.metrics): agreement with scikit-image to 1e-7 in float64, their masked forms, dtypes."""

import pytest
import torch

from ssattn.metrics import masked_psnr, masked_ssim, psnr, ssim

skm = pytest.importorskip("skimage.metrics")


def _pair(seed, shape=(3, 3, 23, 30), dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    x = torch.rand(*shape, generator=g, dtype=dtype)
    y = (x + 0.1 * torch.randn(*shape, generator=g, dtype=dtype)).clamp(0, 1)
    return x, y


@pytest.mark.parametrize("seed", [0, 1])
def test_psnr_and_ssim_agree_with_skimage_to_1e7(seed):
    x, y = _pair(seed)
    ours_p, ours_s = psnr(x, y), ssim(x, y)
    assert ours_p.dtype == ours_s.dtype == torch.float64
    for i in range(x.shape[0]):
        xi, yi = x[i].permute(1, 2, 0).numpy(), y[i].permute(1, 2, 0).numpy()
        want_s = skm.structural_similarity(xi, yi, gaussian_weights=True, sigma=1.5, use_sample_covariance=False,
                                           data_range=1.0, channel_axis=2)
        want_p = skm.peak_signal_noise_ratio(xi, yi, data_range=1.0)
        assert abs(float(ours_s[i]) - want_s) < 1e-7
        assert abs(float(ours_p[i]) - want_p) < 1e-7


def test_float32_images_give_float32_and_the_same_values():
    x, y = _pair(2)
    for fn in (psnr, ssim):
        got = fn(x.float(), y.float())
        assert got.dtype == torch.float32
        torch.testing.assert_close(got.double(), fn(x.float().double(), y.float().double()), rtol=1e-6, atol=0)


def test_masked_forms_on_full_and_partial_masks():
    x, y = _pair(3)
    full = torch.ones(3, 1, 23, 30, dtype=torch.float64)
    torch.testing.assert_close(masked_psnr(x, y, full), psnr(x, y))
    torch.testing.assert_close(masked_ssim(x, y, full), ssim(x, y))
    # Inside a box the PSNR is that of the box's pixels alone.
    box = torch.zeros_like(full)
    box[..., 4:15, 6:20] = 1
    want = psnr(x[..., 4:15, 6:20].contiguous(), y[..., 4:15, 6:20].contiguous())
    torch.testing.assert_close(masked_psnr(x, y, box), want)
    with pytest.raises(ValueError, match="mask must have shape"):
        masked_ssim(x, y, full[:, :, :10])
    with pytest.raises(ValueError, match="x must be a floating"):
        masked_psnr(x[0], y, full)
