"""UIQM and UCIQE under the public code's conventions (ssattn.metrics, convention="funiegan" / "authors"),
against NumPy transcriptions of that code written below without ssattn:

- FUnIE-GAN's Evaluation/uqim_utils.py (xahidbuffon/FUnIE-GAN, commit 540dcfc), its loops kept; Python 2's
  integer division where that code relies on it (it targets Python 2.7);
- the UCIQE authors' UCIQE.py (JOU-UIP/UCIQE, commit 02a3cf3), on OpenCV's 8-bit Lab: from cv2 itself when it
  is installed, otherwise from a NumPy transcription of OpenCV's integer conversion (checked against cv2 on
  all 2^24 colours when cv2 is there).

And `ssattn metrics --uiqm-convention/--uciqe-convention`: the values and summary.json's record.
"""

import json
import math

import numpy as np
import pytest
import torch
from PIL import Image

from ssattn.apps.cli import main
from ssattn.images import load_image
from ssattn.metrics import uciqe, uciqe_terms, uicm, uiconm, uiqm, uiqm_terms, uism
from ssattn.metrics.opencv_lab import rgb_to_lab_opencv8

ndimage = pytest.importorskip("scipy.ndimage")


# --------------------------------------------------------------------- FUnIE-GAN's uqim_utils.py, transcribed
def _fg_mu_a(x, alpha_l=0.1, alpha_r=0.1):
    x = sorted(x)
    K = len(x)
    t_l, t_r = math.ceil(alpha_l * K), math.floor(alpha_r * K)
    weight = 1 / (K - t_l - t_r)
    return weight * sum(x[int(t_l + 1):int(K - t_r)])


def _fg_s_a(x, mu):
    return sum(math.pow(p - mu, 2) for p in x) / len(x)


def _fg_uicm(x):
    R, G, B = x[:, :, 0].flatten(), x[:, :, 1].flatten(), x[:, :, 2].flatten()
    RG, YB = R - G, (R + G) / 2 - B
    mu_rg, mu_yb = _fg_mu_a(RG), _fg_mu_a(YB)
    l = math.sqrt(mu_rg ** 2 + mu_yb ** 2)
    r = math.sqrt(_fg_s_a(RG, mu_rg) + _fg_s_a(YB, mu_yb))
    return -0.0268 * l + 0.1586 * r


def _fg_sobel(x):
    mag = np.hypot(ndimage.sobel(x, 0), ndimage.sobel(x, 1))
    mag *= 255.0 / np.max(mag)
    return mag


def _fg_eme(x, window):
    k1, k2 = x.shape[1] // window, x.shape[0] // window
    w = 2.0 / (k1 * k2)
    x = x[:window * k2, :window * k1]
    val = 0
    for l in range(k1):
        for k in range(k2):
            block = x[k * window:window * (k + 1), l * window:window * (l + 1)]
            mx, mn = np.max(block), np.min(block)
            if mn == 0.0 or mx == 0.0:
                continue
            val += math.log(mx / mn)
    return w * val


def _fg_uism(x):
    R, G, B = x[:, :, 0], x[:, :, 1], x[:, :, 2]
    emes = [_fg_eme(np.multiply(_fg_sobel(c), c), 10) for c in (R, G, B)]
    return 0.299 * emes[0] + 0.587 * emes[1] + 0.144 * emes[2]


def _fg_uiconm(x, window):
    k1, k2 = x.shape[1] // window, x.shape[0] // window    # Python 2: int / int is integer division
    w = -1.0 / (k1 * k2)
    x = x[:window * k2, :window * k1]
    val = 0
    for l in range(k1):
        for k in range(k2):
            block = x[k * window:window * (k + 1), l * window:window * (l + 1), :]
            mx, mn = np.max(block), np.min(block)
            top, bot = mx - mn, mx + mn
            if math.isnan(top) or math.isnan(bot) or bot == 0.0 or top == 0.0:
                continue
            val += math.pow(top / bot, 1) * math.log(top / bot)
    return w * val


def funiegan_uiqm(rgb_u8, dtype=np.float32):
    """getUIQM of an (H, W, 3) 8-bit image, in the dtype the code casts to (float32) or float64."""
    x = rgb_u8.astype(dtype)
    uicm_, uism_, uiconm_ = _fg_uicm(x), _fg_uism(x), _fg_uiconm(x, 10)
    return 0.0282 * uicm_ + 0.2953 * uism_ + 3.5753 * uiconm_, uicm_, uism_, uiconm_


# ---------------------------------------------------------------------------- the UCIQE authors' UCIQE.py
def authors_uciqe(img_lab):
    """UCIQE.uciqe(1, loc) after its cv2.imread and cv2.cvtColor(img_bgr, cv2.COLOR_BGR2LAB): img_lab uint8."""
    coe_metric = [0.4680, 0.2745, 0.2576]
    img_lum = img_lab[..., 0] / 255
    img_a = img_lab[..., 1] / 255
    img_b = img_lab[..., 2] / 255
    img_chr = np.sqrt(np.square(img_a) + np.square(img_b))
    img_sat = img_chr / np.sqrt(np.square(img_chr) + np.square(img_lum))
    aver_sat = np.mean(img_sat)
    aver_chr = np.mean(img_chr)
    var_chr = np.sqrt(np.mean(abs(1 - np.square(aver_chr / img_chr))))
    nbins = 256 if img_lum.dtype == "uint8" else 65536
    hist, bins = np.histogram(img_lum, nbins)
    cdf = np.cumsum(hist) / np.sum(hist)
    ilow = np.where(cdf > 0.0100)
    ihigh = np.where(cdf >= 0.9900)
    tol = [(ilow[0][0] - 1) / (nbins - 1), (ihigh[0][0] - 1) / (nbins - 1)]
    con_lum = tol[1] - tol[0]
    quality = coe_metric[0] * var_chr + coe_metric[1] * con_lum + coe_metric[2] * aver_sat
    return quality, var_chr, con_lum, aver_sat


# ------------------------------------------------- OpenCV's RGB2Lab_b (imgproc/src/color_lab.cpp), transcribed
def _cv_cbrt(x32):
    """softfloat's f32_cbrt (Turkowski's rational approximation, mantissa truncated to 24 bits), one value."""
    if x32 == 0:
        return 0.0
    m, e = math.frexp(float(x32))           # x = m 2^e, 0.5 <= m < 1: float32's exponent is e - 1
    ex = e - 1
    shx = int(math.fmod(ex, 3))
    shx = shx - 3 if shx >= 0 else shx
    ex = (ex - shx) // 3 - 1
    v = 2 * m * 2.0 ** shx                  # the mantissa 1.f scaled into [0.125, 1)
    num = (((45.2548339756803022511987494 * v + 192.2798368355061050458134625) * v + 119.1654824285581628956914143)
           * v + 13.43250139086239872172837314) * v + 0.1636161226585754240958355063
    den = (((14.80884093219134573786480845 * v + 151.9714051044435648658557668) * v + 168.5254414101568283957668343)
           * v + 33.9905941350215598754191872) * v + 1.0
    return math.floor(num / den * 2.0 ** 24) / 2.0 ** 24 * 2.0 ** (ex + 1)


def _cv_tables():
    f32 = np.float32
    gamma = []
    for i in range(256):
        x = float(f32(i) / f32(255))
        g = x / 12.92 if x <= 0.04045 else ((x + 0.055) / 1.055) ** 2.4
        gamma.append(round(2040 * g))                   # Python's round: half to even, as cvRound
    lthresh, lscale, lbias = f32(216) / f32(24389), f32(841) / f32(108), f32(16) / f32(116)
    cbrt = []
    for i in range(3072):
        x = f32(1) / f32(2040) * f32(i)
        f = float(f32(float(x) * float(lscale) + float(lbias))) if x < lthresh else _cv_cbrt(x)
        cbrt.append(round(32768 * f))
    M = [[0.412453, 0.357580, 0.180423], [0.212671, 0.715160, 0.072169], [0.019334, 0.119193, 0.950227]]
    white = [0.950456, 1.0, 1.088754]
    C = [[round(4096 * M[i][j] / white[i]) for j in range(3)] for i in range(3)]
    return np.array(gamma), np.array(cbrt), np.array(C)


_CV = None


def numpy_opencv_lab(rgb_u8):
    """cv2.cvtColor(rgb, cv2.COLOR_RGB2LAB) for uint8 (..., 3): tables, then integer arithmetic."""
    global _CV
    if _CV is None:
        _CV = _cv_tables()
    gamma, cbrt, C = _CV
    v = gamma[rgb_u8.astype(np.int64)]
    X, Y, Z = ((v @ C[i] + (1 << 11)) >> 12 for i in range(3))
    fX, fY, fZ = cbrt[X], cbrt[Y], cbrt[Z]
    L = (296 * fY - 1336934 + (1 << 14)) >> 15                    # 296 = (116*255+50)//100; 1336934 = 16*255*2^15/100
    a = (500 * (fX - fY) + (128 << 15) + (1 << 14)) >> 15
    b = (200 * (fY - fZ) + (128 << 15) + (1 << 14)) >> 15
    return np.clip(np.stack([L, a, b], -1), 0, 255).astype(np.uint8)


def _lab(rgb_u8):
    try:
        import cv2
    except ImportError:
        return numpy_opencv_lab(rgb_u8)
    return cv2.cvtColor(np.ascontiguousarray(rgb_u8[..., ::-1]), cv2.COLOR_BGR2LAB)   # as UCIQE.py: BGR in


# ------------------------------------------------------------------------------------------- test images
def _u8(x: torch.Tensor) -> np.ndarray:
    """(1, 3, H, W) in [0, 1] -> (H, W, 3) uint8, as saving it to an 8-bit file would."""
    return (x[0].permute(1, 2, 0).double().clamp(0, 1) * 255).round().numpy().astype(np.uint8)


def _images():
    """Random (odd sizes: partial blocks), smooth water, patched (black and saturated patches), strong colour
    casts, a dark low-contrast image; no channel is flat (uqim_utils.py gives NaN there, see the test below)."""
    g = torch.Generator().manual_seed(7)
    noise = torch.rand(2, 3, 37, 53, generator=g)
    yy, xx = torch.meshgrid(torch.linspace(0, 1, 40), torch.linspace(0, 1, 60), indexing="ij")
    smooth = torch.stack([0.2 + 0.3 * xx, 0.5 + 0.4 * yy * xx, 0.7 - 0.2 * yy]).unsqueeze(0)
    patched = smooth.clone()
    patched[..., 10:25, 5:40] = 0.0
    patched[..., 30:, 45:] = 1.0
    cast = torch.stack([0.05 + 0.1 * xx * yy, 0.6 + 0.3 * xx, 0.55 + 0.2 * yy]).unsqueeze(0)   # green-blue cast
    dark = 0.02 + 0.06 * torch.rand(1, 3, 30, 30, generator=g)
    return [noise[:1], noise[1:], smooth, patched, cast, dark, torch.rand(1, 3, 10, 10, generator=g)]


IMAGES = _images()


# ----------------------------------------------------------------------------------------------- UIQM
@pytest.mark.parametrize("index", range(len(IMAGES)))
def test_funiegan_uiqm_matches_the_transcription(index):
    x = IMAGES[index]
    got = uiqm_terms(x, "funiegan")
    want = funiegan_uiqm(_u8(x), np.float64)
    for name, g_, w in zip(("uiqm", "uicm", "uism", "uiconm"), got, want):
        assert float(g_) == pytest.approx(w, rel=1e-9, abs=1e-12), name


@pytest.mark.parametrize("index", range(len(IMAGES)))
def test_funiegan_uiqm_matches_the_code_run_in_float32(index):
    # uqim_utils.py casts the image to float32. Its sums stay exact there (half-integers below 2^22), so float32
    # rounds single steps, each by at most 2^-24 = 6e-8 relative: the trimmed mean and each difference from it
    # (UICM), each Sobel magnitude, its rescaling and its product with the channel (UISM), each ratio max / min
    # or (max - min) / (max + min) (UISM, UIConM). A few such roundings per value, and a variance or a mean of
    # logs that passes them on about one for one, give a few 1e-7 relative; UIConM, whose blocks' terms m log m
    # are near 0 for noise (m near 1), gets an absolute bound of the same size instead. 2e-6 leaves a margin.
    x = IMAGES[index]
    got = uiqm_terms(x, "funiegan")
    want = funiegan_uiqm(_u8(x), np.float32)
    for name, g_, w in zip(("uiqm", "uicm", "uism", "uiconm"), got, want):
        assert float(g_) == pytest.approx(w, rel=2e-6, abs=2e-7), name


def test_funiegan_differs_from_the_paper_where_documented():
    x = IMAGES[0]
    paper, fg = uiqm_terms(x), uiqm_terms(x, "funiegan")
    # UISM: the same EMEs, lambda_B 0.144 instead of 0.114.
    v = _u8(x).astype(np.float64)
    emes = [_fg_eme(np.multiply(_fg_sobel(v[..., c]), v[..., c]), 10) for c in range(3)]
    assert float(paper.uism) == pytest.approx(0.299 * emes[0] + 0.587 * emes[1] + 0.114 * emes[2], rel=1e-9)
    assert float(fg.uism - paper.uism) == pytest.approx(0.03 * emes[2], rel=1e-9)
    # UICM: one trimmed sample apart, a small difference.
    assert float(fg.uicm) != float(paper.uicm)
    assert abs(float(fg.uicm - paper.uicm)) < 1e-2 * abs(float(paper.uicm))


def test_funiegan_uicm_drops_one_more_low_sample():
    # K = 30 pixels, RG = R = 0, 8, ..., 232 (G = B = 0, YB = R / 2). uqim_utils.py: T_aL = ceil(0.1 * 30) = 3,
    # T_aR = 3, the 0-based slice [4:27] keeps 23 samples (32 .. 208) and divides their sum by 30 - 3 - 3 = 24
    # (the paper's mean: 24 samples, 24 .. 208).
    r = np.arange(30) * 8.0
    img = torch.as_tensor(np.stack([r, 0 * r, 0 * r], -1).reshape(5, 6, 3) / 255).permute(2, 0, 1)[None]
    mu_rg = sum(range(32, 209, 8)) / 24
    mu_yb = mu_rg / 2
    var = np.mean((r - mu_rg) ** 2) + np.mean((r / 2 - mu_yb) ** 2)
    expected = -0.0268 * math.hypot(mu_rg, mu_yb) + 0.1586 * math.sqrt(var)
    assert float(uicm(img, "funiegan")) == pytest.approx(expected, abs=1e-12)


def test_funiegan_uiconm_uses_block_extremes_over_the_channels_without_plip():
    # One 10x10 block: the channels' overall max 200 and min 20 (in different channels and pixels).
    v = np.full((10, 10, 3), 100.0)
    v[0, 0, 0], v[5, 5, 2] = 200, 20
    img = torch.as_tensor(v / 255).permute(2, 0, 1)[None]
    m = 180 / 220
    assert float(uiconm(img, "funiegan")) == pytest.approx(-m * math.log(m), abs=1e-12)


def test_a_flat_channel_adds_zero_where_uqim_utils_gives_nan():
    # uqim_utils.py rescales the Sobel magnitude by 255 / its max: 0 / 0 for a flat channel, so its UISM is NaN.
    # Here that channel adds 0 (no edges), as the paper convention and the copies that guard the division do.
    v = np.stack([np.tile(np.arange(20.0) * 10 + 10, (20, 1)), np.full((20, 20), 90.0),
                  np.tile(np.arange(20.0)[:, None] * 5 + 30, (1, 20))], -1)
    img = torch.as_tensor(v / 255).permute(2, 0, 1)[None]
    with np.errstate(divide="ignore", invalid="ignore"):
        assert math.isnan(_fg_uism(v.astype(np.float32)))
    emes = [_fg_eme(np.multiply(_fg_sobel(v[..., c]), v[..., c]), 10) for c in (0, 2)]
    assert float(uism(img, "funiegan")) == pytest.approx(0.299 * emes[0] + 0.144 * emes[1], rel=1e-12)


# ---------------------------------------------------------------------------------------------- UCIQE
@pytest.mark.parametrize("index", range(len(IMAGES)))
def test_authors_uciqe_matches_the_transcription(index):
    x = IMAGES[index]
    got = uciqe_terms(x, "authors")
    want = authors_uciqe(_lab(_u8(x)))
    for name, g_, w in zip(("uciqe", "chroma", "contrast", "saturation"), got, want):
        # Only the order of the sums differs (numpy's pairwise, torch's own): each mean is off by ~1e-15
        # relative. The chroma term t = sqrt(mean |1 - (mean C / C)^2|) cancels: that becomes ~1e-15 / t^2
        # relative, under 1e-13 for these images (t = 0.12 .. 0.55). 1e-10 leaves a margin.
        assert float(g_) == pytest.approx(w, rel=1e-10, abs=1e-14), name


def test_authors_uciqe_of_a_flat_image_and_of_two_levels():
    # A flat image: numpy widens the histogram's empty range, both percentiles fall in one bin: no contrast;
    # every chroma equals the mean: the chroma term is 0, up to the square root of the mean's rounding
    # (sqrt(2^-52) = 1.5e-8).
    flat = torch.full((1, 3, 12, 12), 0.4)
    t = uciqe_terms(flat, "authors")
    assert float(t.luminance_contrast) == 0.0 and float(t.chroma_std) < 2e-8
    # Black and white halves: L runs over its own min..max, so the 1st percentile is in bin 0 and the 99th in
    # the last bin: (65535 - 0) / 65535 = 1, whatever the two levels are.
    v = np.zeros((10, 10, 3), np.uint8)
    v[:, 5:] = 255
    half = torch.as_tensor(v / 255).permute(2, 0, 1)[None]
    assert float(uciqe_terms(half, "authors").luminance_contrast) == pytest.approx(1.0, abs=1e-15)
    assert float(uciqe_terms(half * 0.5, "authors").luminance_contrast) == pytest.approx(1.0, abs=1e-15)


@pytest.mark.parametrize("n", [1, 99, 100, 101, 199, 250])
def test_authors_uciqe_order_statistics_at_every_size(n):
    # The first bin with cdf > 0.01 and the first with cdf >= 0.99 at sizes around multiples of 100, where the
    # comparisons are exact ties; a handful of grey levels, so that many pixels share a bin.
    rng = np.random.default_rng(n)
    levels = rng.choice([10, 60, 61, 200, 255], size=(1, n))
    v = np.repeat(levels[..., None], 3, -1).astype(np.uint8)
    v[..., 0] = np.clip(v[..., 0].astype(int) + rng.integers(-3, 4, v.shape[:2]), 0, 255)  # some chroma
    img = torch.as_tensor(v / 255).permute(2, 0, 1)[None]
    got = uciqe_terms(img, "authors")
    want = authors_uciqe(_lab(v))
    assert float(got.luminance_contrast) == pytest.approx(want[2], abs=1e-15)
    assert float(got.uciqe) == pytest.approx(want[0], rel=1e-10)


def test_authors_uciqe_as_the_code_runs_it_from_a_file(tmp_path):
    cv2 = pytest.importorskip("cv2")
    x = IMAGES[3]
    path = tmp_path / "patched.png"
    Image.fromarray(_u8(x)).save(path)
    img_bgr = cv2.imread(str(path))                                   # UCIQE.py's two lines
    want = authors_uciqe(cv2.cvtColor(img_bgr, cv2.COLOR_BGR2LAB))[0]
    assert float(uciqe(load_image(path)[None], "authors")) == pytest.approx(want, rel=1e-10)


# ------------------------------------------------------------------------------------------ OpenCV's Lab
def _grid_colours():
    levels = np.r_[np.arange(0, 256, 3), 255]
    r, g, b = np.meshgrid(levels, levels, levels, indexing="ij")
    extra = np.random.default_rng(0).integers(0, 256, (20000, 3))
    return np.concatenate([np.stack([r, g, b], -1).reshape(-1, 3), extra, [[111, 111, 111], [0, 98, 254]]])


def test_opencv_lab_matches_the_numpy_transcription():
    rgb = _grid_colours()
    ours = rgb_to_lab_opencv8(torch.as_tensor(rgb.T[None, :, :, None]))[0, :, :, 0].T.numpy()
    np.testing.assert_array_equal(ours, numpy_opencv_lab(rgb))


def test_opencv_lab_equals_cv2_on_every_colour():
    cv2 = pytest.importorskip("cv2")
    every = np.arange(1 << 24, dtype=np.int64)
    rgb = np.stack([every >> 16, (every >> 8) & 255, every & 255], -1).reshape(4096, 4096, 3)
    for rows in range(0, 4096, 512):
        chunk = rgb[rows:rows + 512]
        ref = cv2.cvtColor(chunk.astype(np.uint8), cv2.COLOR_RGB2LAB)
        ours = rgb_to_lab_opencv8(torch.as_tensor(chunk).permute(2, 0, 1)[None])[0].permute(1, 2, 0).numpy()
        np.testing.assert_array_equal(ours, ref, err_msg=f"OpenCV {cv2.__version__}, rows {rows}..")
        if rows == 0:   # the transcription too, on a slice
            np.testing.assert_array_equal(numpy_opencv_lab(chunk[:64]), ref[:64])


# ------------------------------------------------------------------------------------------ API
def test_the_default_is_the_paper_and_a_batch_scores_each_image():
    x = torch.cat([IMAGES[0], IMAGES[1]])
    torch.testing.assert_close(uiqm(x), uiqm(x, "paper"), rtol=0, atol=0)
    torch.testing.assert_close(uciqe(x), uciqe(x, convention="paper"), rtol=0, atol=0)
    for fn, conv in ((uiqm, "funiegan"), (uciqe, "authors")):
        torch.testing.assert_close(fn(x, conv), torch.cat([fn(IMAGES[0], conv), fn(IMAGES[1], conv)]),
                                   rtol=0, atol=1e-12)
        assert fn(x, conv).dtype == torch.float64


@pytest.mark.parametrize("fn, choices", [(uiqm, "'paper', 'funiegan'"), (uiqm_terms, "'paper', 'funiegan'"),
                                         (uicm, "'paper', 'funiegan'"), (uism, "'paper', 'funiegan'"),
                                         (uiconm, "'paper', 'funiegan'"), (uciqe, "'paper', 'authors'"),
                                         (uciqe_terms, "'paper', 'authors'")])
@pytest.mark.parametrize("bad", ["authors", "FUnIE-GAN", None, 1])
def test_a_bad_convention_is_named(fn, choices, bad):
    if (bad == "authors" and "authors" in choices):
        bad = "funiegan"
    with pytest.raises(ValueError, match=rf"convention must be one of {choices}, got {bad!r}"):
        fn(IMAGES[0], bad)


# ------------------------------------------------------------------------------------------ the command
def test_metrics_command_records_and_applies_the_conventions(tmp_path, capsys):
    rng = np.random.default_rng(3)
    for s in "ab":
        (tmp_path / "m").mkdir(exist_ok=True)
        Image.fromarray(rng.integers(20, 230, (24, 32, 3)).astype(np.uint8)).save(tmp_path / "m" / f"{s}.png")
    x = torch.stack([load_image(tmp_path / "m" / f"{s}.png") for s in "ab"])
    for args, uiqm_conv, uciqe_conv in (([], "paper", "paper"),
                                        (["--uiqm-convention", "funiegan", "--uciqe-convention", "authors"],
                                         "funiegan", "authors")):
        out = tmp_path / f"out-{uiqm_conv}"
        rc = main(["metrics", str(tmp_path / "m"), "--out", str(out), "--device", "cpu", "--no-progress", *args])
        stdout = capsys.readouterr().out
        assert rc == 0
        summary = json.loads((out / "summary.json").read_text())
        assert summary["uiqm_convention"] == uiqm_conv and summary["uciqe_convention"] == uciqe_conv
        stats = summary["methods"]["m"]["metrics"]
        assert stats["uiqm"]["mean"] == pytest.approx(float(uiqm(x, uiqm_conv).mean()), rel=1e-12)
        assert stats["uciqe"]["mean"] == pytest.approx(float(uciqe(x, uciqe_conv).mean()), rel=1e-12)
        md = (out / "summary.md").read_text()
        assert f"UIQM: {uiqm_conv}" in md and f"UCIQE: {uciqe_conv}" in md
        assert (f"UIQM: {uiqm_conv}" in stdout) == (uiqm_conv != "paper")
    # The two conventions give different numbers (else the test above could not tell them apart).
    assert float(uiqm(x, "funiegan")[0]) != pytest.approx(float(uiqm(x)[0]), rel=1e-3)
    assert float(uciqe(x, "authors")[0]) != pytest.approx(float(uciqe(x)[0]), rel=1e-3)


def test_the_command_offers_the_librarys_conventions():
    from ssattn.apps.cli import metrics as cli_metrics
    from ssattn.metrics import UCIQE_CONVENTIONS, UIQM_CONVENTIONS

    assert cli_metrics.UIQM_CONVENTIONS == UIQM_CONVENTIONS and cli_metrics.UCIQE_CONVENTIONS == UCIQE_CONVENTIONS


def test_metrics_command_rejects_an_unknown_convention(tmp_path, capsys):
    (tmp_path / "m").mkdir()
    with pytest.raises(SystemExit) as exc:
        main(["metrics", str(tmp_path / "m"), "--uciqe-convention", "xuelei"])
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert "--uciqe-convention" in err and "paper" in err and "authors" in err   # argparse's wording varies
