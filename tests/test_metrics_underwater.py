"""UIQM and UCIQE (ssattn.metrics.underwater): hand-computed values on tiny images, and agreement with a NumPy
transcription of the definitions in docs/metrics.md written separately below (loops, scipy's Sobel, skimage's
CIELab, numpy's percentiles), on random, smooth, flat-patched and odd-sized images."""

import math
from fractions import Fraction

import numpy as np
import pytest
import torch

from ssattn.metrics import rgb_to_lab, uciqe, uciqe_terms, uicm, uiconm, uiqm, uiqm_terms, uism

ndimage = pytest.importorskip("scipy.ndimage")
skcolor = pytest.importorskip("skimage.color")


def _image(values_255) -> torch.Tensor:
    """(H, W, 3) 8-bit values -> a (1, 3, H, W) image in [0, 1] (what load_image gives for an 8-bit file)."""
    a = torch.as_tensor(np.asarray(values_255, dtype=np.float64))
    return (a / 255.0).permute(2, 0, 1).unsqueeze(0).float()


# ----------------------------------------------------------------------------------------- hand-computed
def test_uicm_of_a_uniform_colour():
    img = _image(np.broadcast_to([200, 100, 50], (10, 10, 3)))
    # RG = 100 and YB = (200 + 100) / 2 - 50 = 100 everywhere: no spread, the mean term only.
    expected = -0.0268 * math.hypot(100, 100)
    assert float(uicm(img)) == pytest.approx(expected, abs=1e-12)


def test_uicm_trims_ceil_and_floor_of_a_tenth():
    # K = 10 pixels, R = 0, 10, ..., 90 and G = B = 0: RG = R, YB = R / 2.
    # T_aL = ceil(1) = 1 and T_aR = floor(1) = 1: the trimmed means drop 0 and 90 -> 45 and 22.5.
    # The variances are over all ten values about those means: 825 and 825 / 4.
    r = np.arange(10) * 10.0
    img = _image(np.stack([r, 0 * r, 0 * r], -1).reshape(2, 5, 3))
    expected = -0.0268 * math.hypot(45, 22.5) + 0.1586 * math.sqrt(825 + 825 / 4)
    assert float(uicm(img)) == pytest.approx(expected, abs=1e-12)
    # K = 15: ceil(1.5) = 2 low and floor(1.5) = 1 high samples go (the trimming is asymmetric).
    r = np.arange(15) * 10.0
    img = _image(np.stack([r, 0 * r, 0 * r], -1).reshape(3, 5, 3))
    mu_rg = np.mean(r[2:14])
    var_rg, var_yb = np.mean((r - mu_rg) ** 2), np.mean((r / 2 - mu_rg / 2) ** 2)
    expected = -0.0268 * math.hypot(mu_rg, mu_rg / 2) + 0.1586 * math.sqrt(var_rg + var_yb)
    assert float(uicm(img)) == pytest.approx(expected, abs=1e-12)


def _ramp(c, d, h=10, w=10):
    """A channel rising by d per column from c (8-bit values)."""
    return np.broadcast_to(c + d * np.arange(w, dtype=np.float64), (h, w))


def test_uism_of_ramps_by_hand():
    # Along a ramp v = c + d x the Sobel x-gradient is 8d inside and 4d in the first and last columns (the border
    # pixel repeated), the y-gradient 0. Edge map = |gradient| x v. One 10x10 block per channel:
    # R (c = d = 10): min 4*10*10 = 400 (column 0), max 8*10*90 = 7200 (column 8): log 18.
    # G flat: gradient 0 everywhere, every block has min 0 and adds 0.
    # B (c = 10, d = 5): min 4*5*10 = 200, max 8*5*50 = 2000: log 10.
    img = _image(np.stack([_ramp(10, 10), _ramp(120, 0), _ramp(10, 5)], -1))
    expected = 0.299 * 2 * math.log(18) + 0.587 * 0 + 0.114 * 2 * math.log(10)
    assert float(uism(img)) == pytest.approx(expected, abs=1e-12)
    # Two blocks down (identical rows): the same mean; a partial block (15 rows) is dropped.
    tall = _image(np.stack([_ramp(10, 10, h=20), _ramp(120, 0, h=20), _ramp(10, 5, h=20)], -1))
    part = _image(np.stack([_ramp(10, 10, h=15), _ramp(120, 0, h=15), _ramp(10, 5, h=15)], -1))
    assert float(uism(tall)) == pytest.approx(expected, abs=1e-12)
    assert float(uism(part)) == pytest.approx(expected, abs=1e-12)


def test_uiconm_by_hand_with_plip_operations():
    # A grey 10x10 block with intensity from 50 to 200: m = (200 (-) 50) / (200 (+) 50) with
    # a (-) b = 1026 (a - b) / (1026 - b) and a (+) b = a + b - a b / 1026; UIConM = -m ln m (one block).
    v = np.full((10, 10), 120.0)
    v[0, 0], v[9, 9] = 50, 200
    img = _image(np.stack([v, v, v], -1))
    m = (1026 * 150 / (1026 - 50)) / (250 - 200 * 50 / 1026)
    assert float(uiconm(img)) == pytest.approx(-m * math.log(m), abs=1e-12)
    # The intensity is (R + G + B) / 3: the same block spread over the channels gives the same value.
    rgb = np.stack([v, np.full_like(v, 120.0), np.full_like(v, 120.0)], -1)
    rgb[..., 1] = rgb[..., 2] = 120.0
    rgb[0, 0] = [30, 60, 60]       # intensity 50
    rgb[9, 9] = [220, 190, 190]    # intensity 200
    assert float(uiconm(_image(rgb))) == pytest.approx(-m * math.log(m), abs=1e-12)
    # A flat image has no contrast.
    assert float(uiconm(_image(np.full((10, 10, 3), 77.0)))) == 0.0


def test_uiqm_is_the_weighted_sum_of_its_terms():
    g = torch.Generator().manual_seed(0)
    x = torch.rand(3, 3, 23, 31, generator=g)
    t = uiqm_terms(x)
    torch.testing.assert_close(t.uiqm, 0.0282 * t.uicm + 0.2953 * t.uism + 3.5753 * t.uiconm, rtol=0, atol=1e-12)
    torch.testing.assert_close(uiqm(x), t.uiqm)
    torch.testing.assert_close(uicm(x), t.uicm)
    torch.testing.assert_close(uism(x), t.uism)
    torch.testing.assert_close(uiconm(x), t.uiconm)


def test_uciqe_of_black_and_white_halves():
    # L* is 0 and 100 (L / 100: 0 and 1): the 1st and 99th percentiles of 50 + 50 pixels are 0 and 1.
    # Black has a* = b* = 0 exactly; white's a*, b* are ~1e-3 (skimage's matrix rows do not sum to the white
    # point exactly), so chroma and saturation are ~1e-5 after dividing by 255.
    v = np.zeros((10, 10, 3))
    v[:, 5:] = 255
    t = uciqe_terms(_image(v))
    assert float(t.luminance_contrast) == pytest.approx(1.0, abs=1e-12)
    assert float(t.chroma_std) < 1e-4 and float(t.saturation_mean) < 1e-4
    assert float(t.uciqe) == pytest.approx(0.2745, abs=1e-4)
    # A uniform grey: nothing varies and there is no colour.
    assert float(uciqe(_image(np.full((10, 10, 3), 128.0)))) == pytest.approx(0.0, abs=1e-5)


def test_uciqe_of_two_colours_by_hand():
    # Half pure red, half pure blue (8-bit), each of known CIELab (skimage's constants):
    # the chroma std of two equal halves is half their difference; the saturation mean is their average.
    v = np.zeros((10, 10, 3))
    v[:, :5] = [255, 0, 0]
    v[:, 5:] = [0, 0, 255]
    red = skcolor.rgb2lab(np.array([[[1.0, 0.0, 0.0]]]))[0, 0]
    blue = skcolor.rgb2lab(np.array([[[0.0, 0.0, 1.0]]]))[0, 0]
    c_red, c_blue = math.hypot(red[1], red[2]) / 255, math.hypot(blue[1], blue[2]) / 255
    l_red, l_blue = red[0] / 100, blue[0] / 100
    s_red, s_blue = c_red / math.hypot(c_red, l_red), c_blue / math.hypot(c_blue, l_blue)
    t = uciqe_terms(_image(v))
    assert float(t.chroma_std) == pytest.approx(abs(c_red - c_blue) / 2, abs=1e-12)
    assert float(t.saturation_mean) == pytest.approx((s_red + s_blue) / 2, abs=1e-12)
    assert float(t.luminance_contrast) == pytest.approx(abs(l_red - l_blue), abs=1e-12)


# ---------------------------------------------------------------------------------- NumPy transcription
def _trimmed_mean(values):
    """Asymmetric alpha-trimmed mean, alpha_L = alpha_R = 0.1: samples T_aL + 1 .. K - T_aR (1-based) of the
    sorted values, T_aL = ceil(alpha_L K), T_aR = floor(alpha_R K) (exact fractions)."""
    s = sorted(values.ravel().tolist())
    K = len(s)
    t_l, t_r = math.ceil(Fraction(K, 10)), math.floor(Fraction(K, 10))
    return sum(s[i - 1] for i in range(t_l + 1, K - t_r + 1)) / (K - t_l - t_r)


def _eme(edge, block=10):
    k1, k2 = edge.shape[1] // block, edge.shape[0] // block
    total = 0.0
    for l in range(k1):
        for k in range(k2):
            b = edge[k * block:(k + 1) * block, l * block:(l + 1) * block]
            if b.min() > 0:
                total += math.log(b.max() / b.min())
    return 2.0 / (k1 * k2) * total


def _logamee(intensity, block=10, gamma=1026.0, k=1026.0):
    k1, k2 = intensity.shape[1] // block, intensity.shape[0] // block
    total = 0.0
    for l in range(k1):
        for kk in range(k2):
            b = intensity[kk * block:(kk + 1) * block, l * block:(l + 1) * block]
            hi, lo = b.max(), b.min()
            minus = k * (hi - lo) / (k - lo)
            plus = hi + lo - hi * lo / gamma
            m = minus / plus if plus > 0 else 0.0
            if m > 0:
                total += m * math.log(m)
    return -total / (k1 * k2)


def numpy_uiqm(img):
    """img (H, W, 3) in [0, 1] -> (uiqm, uicm, uism, uiconm), 8-bit values."""
    v = np.round(np.clip(img, 0, 1) * 255)
    R, G, B = v[..., 0], v[..., 1], v[..., 2]
    rg, yb = R - G, (R + G) / 2 - B
    mu_rg, mu_yb = _trimmed_mean(rg), _trimmed_mean(yb)
    var_rg, var_yb = np.mean((rg - mu_rg) ** 2), np.mean((yb - mu_yb) ** 2)
    uicm_ = -0.0268 * math.sqrt(mu_rg ** 2 + mu_yb ** 2) + 0.1586 * math.sqrt(var_rg + var_yb)

    def edge(c):  # scipy's default border mode ("reflect")
        return np.hypot(ndimage.sobel(c, axis=0), ndimage.sobel(c, axis=1)) * c

    uism_ = 0.299 * _eme(edge(R)) + 0.587 * _eme(edge(G)) + 0.114 * _eme(edge(B))
    uiconm_ = _logamee((R + G + B) / 3)
    return 0.0282 * uicm_ + 0.2953 * uism_ + 3.5753 * uiconm_, uicm_, uism_, uiconm_


def numpy_uciqe(img):
    """img (H, W, 3) in [0, 1] -> (uciqe, chroma std, luminance contrast, mean saturation)."""
    v = np.round(np.clip(img, 0, 1) * 255) / 255
    lab = skcolor.rgb2lab(v)
    L, a, b = lab[..., 0] / 100, lab[..., 1] / 255, lab[..., 2] / 255
    C = np.sqrt(a ** 2 + b ** 2)
    r = np.sqrt(C ** 2 + L ** 2)
    S = np.where(r > 0, C / np.where(r > 0, r, 1), 0.0)
    sigma_c = np.std(C)
    con_l = np.percentile(L, 99) - np.percentile(L, 1)
    mu_s = np.mean(S)
    return 0.4680 * sigma_c + 0.2745 * con_l + 0.2576 * mu_s, sigma_c, con_l, mu_s


def _test_images():
    g = torch.Generator().manual_seed(1)
    noise = torch.rand(2, 3, 37, 53, generator=g)                     # odd sizes: partial blocks dropped
    yy, xx = torch.meshgrid(torch.linspace(0, 1, 40), torch.linspace(0, 1, 60), indexing="ij")
    smooth = torch.stack([0.2 + 0.3 * xx, 0.5 + 0.4 * yy * xx, 0.7 - 0.2 * yy]).unsqueeze(0)  # blue-green water
    patched = smooth.clone()
    patched[..., 10:25, 5:40] = 0.0                                  # black patch: zero edges and minima
    patched[..., 30:, 45:] = 1.0                                     # saturated patch
    return [noise[:1], noise[1:], smooth, patched, torch.rand(1, 3, 10, 10, generator=g)]


@pytest.mark.parametrize("index", range(5))
def test_uiqm_matches_the_numpy_transcription(index):
    x = _test_images()[index]
    got = uiqm_terms(x)
    want = numpy_uiqm(x[0].permute(1, 2, 0).double().numpy())
    for name, g_, w in zip(("uiqm", "uicm", "uism", "uiconm"), got, want):
        assert float(g_) == pytest.approx(w, rel=1e-9, abs=1e-12), name


@pytest.mark.parametrize("index", range(5))
def test_uciqe_matches_the_numpy_transcription(index):
    x = _test_images()[index]
    got = uciqe_terms(x)
    want = numpy_uciqe(x[0].permute(1, 2, 0).double().numpy())
    for name, g_, w in zip(("uciqe", "chroma_std", "contrast", "saturation"), got, want):
        assert float(g_) == pytest.approx(w, rel=1e-9, abs=1e-12), name


def test_rgb_to_lab_matches_skimage():
    g = torch.Generator().manual_seed(2)
    x = torch.rand(2, 3, 9, 7, generator=g, dtype=torch.float64)
    x[0, :, 0, 0] = 0.0
    x[0, :, 0, 1] = 1.0
    x[0, :, 0, 2] = 0.01   # below the sRGB and the CIELab thresholds
    ours = rgb_to_lab(x)
    for b in range(2):
        ref = skcolor.rgb2lab(x[b].permute(1, 2, 0).numpy())
        np.testing.assert_allclose(ours[b].permute(1, 2, 0).numpy(), ref, rtol=0, atol=1e-10)


def test_a_batch_scores_each_image_on_its_own():
    images = _test_images()[:2]
    batch = torch.cat(images)
    for fn in (uiqm, uciqe):
        torch.testing.assert_close(fn(batch), torch.cat([fn(x) for x in images]), rtol=0, atol=1e-12)


def test_images_on_the_8_bit_grid_and_clipped():
    g = torch.Generator().manual_seed(3)
    x = torch.rand(1, 3, 20, 20, generator=g)
    on_grid = (x * 255).round() / 255
    # Off-grid values score as their 8-bit rounding; values outside [0, 1] as their clipping.
    torch.testing.assert_close(uiqm(x), uiqm(on_grid))
    torch.testing.assert_close(uciqe(x.double()), uciqe(on_grid))
    over = x.clone()
    over[..., :5, :5] = 1.7
    clipped = over.clamp(0, 1)
    torch.testing.assert_close(uiqm(over), uiqm(clipped))
    torch.testing.assert_close(uciqe(over), uciqe(clipped))


def test_bad_inputs_are_named():
    with pytest.raises(ValueError, match=r"images must be a floating RGB tensor \(B, 3, H, W\)"):
        uiqm(torch.rand(1, 1, 16, 16))
    with pytest.raises(ValueError, match="RGB tensor"):
        uciqe(torch.randint(0, 255, (1, 3, 16, 16)))
    with pytest.raises(ValueError, match="at least 10x10 pixels"):
        uiqm(torch.rand(1, 3, 9, 16))
    with pytest.raises(ValueError, match="at least 2 pixels"):
        uicm(torch.rand(1, 3, 1, 1))


@pytest.mark.parametrize("K", [1, 2, 3, 7, 100, 101, 257])
def test_percentiles_are_numpys(K):
    from ssattn.metrics.underwater import _percentile

    g = torch.Generator().manual_seed(K)
    v = torch.randint(0, 9, (2, K), generator=g).double()     # ties, as luminance on the 8-bit grid has
    for q in (0.01, 0.99, 0.5):
        np.testing.assert_allclose(_percentile(v, q).numpy(), np.percentile(v.numpy(), 100 * q, axis=1),
                                   rtol=0, atol=1e-12)
