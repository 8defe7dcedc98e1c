"""Image statistics that tell degradations apart whatever the content, vectorised over a batch.

features(images) maps a (B, 3, H, W) batch in [0, 1] (H, W >= 32) to (B, F)
numbers. Every statistic is measured per pixel and pooled over the image, so
any size and aspect gives the same kind of numbers, and most are ratios
(of one image to itself) so that what the photograph shows cancels out:

- spectrum (Welch: the mean power spectrum of 32x32 Hann-windowed tiles,
  half overlapping on small images, side by side on large ones): log power in 7 frequency bands relative to the lowest
  (blur, noise and JPEG change how it falls), and in 8 orientations, each
  orientation relative to its own lowest band (motion blur removes the
  high frequencies of one direction only; content that is merely
  directional removes them at every frequency alike). Orientations are
  turned so that the one losing most comes first and folded (+k, -k), so
  the numbers do not depend on the direction of the motion.
- noise: Immerkaer's Laplacian-difference response, over the whole image
  and in the quietest 8x8 blocks (a clean photograph has some almost flat
  blocks; a noisy one has none), in luma and in chroma, and at half
  resolution (noise halves there, texture does not).
- JPEG: the step across 8x8 block boundaries over the steps inside blocks,
  at the grid's usual offset and at the strongest offset, in x and y.
- band-pass (difference of Gaussians at 1, 2 and 4 px): energy ratios
  between bands and their sparsity (kurtosis, L1 / L2): a sum of two
  images (a reflection) is less sparse than one.
- structure tensor coherence at three scales, and whether the dominant
  direction agrees between the finest and the coarsest.
- intensity: luma percentiles and spread, the darkest channel, saturation,
  colour casts, and how the darkest 16x16 blocks compare with the rest (a
  reflection lifts and flattens the blacks).
- detail over brightness in the darkest quarter of the blocks against the
  brightest quarter (light multiplies, so in a photograph the two match; a
  veil of reflected light adds brightness without detail).
- ghost: the largest isolated peak of the band-pass autocorrelation at lags
  2-24 px (the double edges of a thick glass reflection), at two bands.
- sharpness mix: per 16x16 block, fine over mid band energy; its spread
  over the structured blocks (a blurred reflection lies over a sharp scene).

FEATURES names the columns in order.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

LUMA = (0.299, 0.587, 0.114)
EPS = 1e-8
MIN_SIDE = 32
TILE = 32
BAND_EDGES = (0.045, 0.09, 0.14, 0.2, 0.27, 0.35, 0.44, 0.71)  # cycles per pixel
N_ORIENT = 8
GHOST_MIN, GHOST_MAX = 2, 24
GHOST_SIDE = 256  # the autocorrelation is measured on the centre crop of at most this size


def _names() -> tuple[str, ...]:
    nb = len(BAND_EDGES) - 1
    names = [f"falloff{r}" for r in range(1, nb)]
    names += [f"orient{k}_band{r}" for k in range(N_ORIENT // 2 + 1) for r in range(1, nb)]
    names += [f"aniso_band{r}" for r in range(1, nb)]
    names += ["noise", "noise_q10", "noise_q25", "noise_q50", "noise_half", "chroma_noise", "chroma_noise_q25"]
    names += ["block_x", "block_y", "block_x_any", "block_y_any"]
    names += ["band01", "band12", "band2_var", "kurt0", "kurt1", "kurt2", "l1l2_0", "l1l2_1", "l1l2_2"]
    names += ["coherence1", "coherence2", "coherence4", "direction_agree"]
    names += ["p001", "p01", "p05", "p25", "p50", "p75", "p95", "p99", "p999", "range", "contrast", "dark_pixels",
              "dark_q50", "dark_q90", "saturation",
              "cast_rg", "cast_bg", "dark_blocks_mean", "dark_blocks_contrast", "mean_contrast_corr",
              "weber_fine", "weber_mid"]
    names += ["ghost_fine", "ghost_coarse", "ghost_fine_height", "ghost_coarse_height"]
    names += ["sharp_q10", "sharp_q50", "sharp_q90"]
    return tuple(names)


FEATURES = _names()


def _gauss(y: Tensor, sigma: float) -> Tensor:
    """Separable Gaussian blur of (B, 1, H, W), edges replicated: a weighted sum of shifted views per axis
    (a handful of taps: faster on a CPU than a one-channel convolution)."""
    r = max(1, int(math.ceil(3 * sigma)))
    t = torch.arange(-r, r + 1, dtype=torch.float64)
    g = torch.exp(-0.5 * (t / sigma) ** 2)
    g = (g / g.sum()).tolist()
    h, w = y.shape[-2:]
    x = F.pad(y, (r, r, 0, 0), mode="replicate")
    out = x[..., 0:w] * g[0]
    for i in range(1, 2 * r + 1):
        out = out.add_(x[..., i:i + w], alpha=g[i])
    x = F.pad(out, (0, 0, r, r), mode="replicate")
    out = x[..., 0:h, :] * g[0]
    for i in range(1, 2 * r + 1):
        out = out.add_(x[..., i:i + h, :], alpha=g[i])
    return out


QUANTILE_SAMPLES = 1 << 14


def _quantiles(x: Tensor, qs) -> Tensor:
    """(B, N) -> (B, len(qs)) per-row quantiles, of an evenly strided sample of at most QUANTILE_SAMPLES."""
    step = -(-x.shape[1] // QUANTILE_SAMPLES)
    x = x[:, ::step]
    n = x.shape[1]
    ks = [min(n - 1, max(0, int(round(q * (n - 1))))) for q in qs]
    if len(ks) <= 2:  # a selection is cheaper than a sort
        return torch.stack([x.kthvalue(k + 1, dim=1).values for k in ks], 1)
    return x.sort(1).values[:, ks]


# ------------------------------------------------------------------ spectrum
_GRID_CACHE: dict = {}


def _spectral_bins(device) -> tuple[Tensor, Tensor, Tensor]:
    """(orientation x band) membership of the rfft2 grid of a TILE x TILE tile, as a (O*R, TILE*(TILE//2+1)) matrix."""
    key = str(device)
    if key not in _GRID_CACHE:
        fy = torch.fft.fftfreq(TILE, dtype=torch.float64).view(-1, 1)
        fx = torch.fft.rfftfreq(TILE, dtype=torch.float64).view(1, -1)
        fy, fx = torch.broadcast_tensors(fy, fx)
        r = (fx.square() + fy.square()).sqrt()
        theta = torch.atan2(fy, fx) % math.pi
        o = torch.round(theta / (math.pi / N_ORIENT)).long() % N_ORIENT
        edges = torch.tensor(BAND_EDGES, dtype=torch.float64)
        band = torch.bucketize(r, edges, right=True) - 1  # -1 below the first edge, len-1 above the last
        nb = len(BAND_EDGES) - 1
        # the Nyquist row and column are left out: +1/2 and -1/2 cycles are one frequency there, of no one direction
        valid = (band >= 0) & (band < nb) & (fx.abs() < 0.5) & (fy.abs() < 0.5)
        cell = torch.where(valid, o * nb + band, torch.full_like(band, -1)).flatten()
        # the half plane of rfft2 stands for the whole: a column 0 < fx < 1/2 also for its mirror (-fx, -fy)
        weight = torch.full(fx.shape, 2.0, dtype=torch.float64)
        weight[:, 0] = 1.0
        weight = weight.flatten()
        m = torch.zeros(N_ORIENT * nb, cell.numel(), dtype=torch.float64)
        at = torch.nonzero(cell >= 0).flatten()
        m[cell[at], at] = weight[at]
        m = m / m.sum(1, keepdim=True)
        # the annulus of each band over all orientations
        ann = torch.zeros(nb, cell.numel(), dtype=torch.float64)
        at = torch.nonzero(valid.flatten()).flatten()
        ann[band.flatten()[at], at] = weight[at]
        ann = ann / ann.sum(1, keepdim=True)
        win = torch.hann_window(TILE, periodic=False, dtype=torch.float64)
        _GRID_CACHE[key] = (m.float().to(device), ann.float().to(device), (win[:, None] * win[None, :]).float().to(device))
    return _GRID_CACHE[key]


def _spectrum(y: Tensor) -> list[Tensor]:
    m, ann, win = _spectral_bins(y.device)
    b = y.shape[0]
    # half-overlapping tiles where the image has few; side by side on large images (the same mean, less work)
    few = (y.shape[-2] // TILE) * (y.shape[-1] // TILE) < 64
    step = TILE // 2 if few else TILE
    tiles = y[:, 0].unfold(1, TILE, step).unfold(2, TILE, step)  # (B, nH, nW, T, T)
    tiles = tiles - tiles.mean((-1, -2), keepdim=True)
    power = torch.fft.rfft2(tiles * win).abs().square().mean((1, 2)).flatten(1)  # (B, T*(T//2+1))
    nb = len(BAND_EDGES) - 1
    total = power @ ann.T  # (B, nb) mean power per band
    # a floor 50 dB under the mean: what is lower is rounding (8-bit levels, float32), not the image
    floor = 1e-5 * total.mean(1, keepdim=True) + EPS
    falloff = torch.log(total[:, 1:] + floor) - torch.log(total[:, :1] + floor)
    cells = torch.log(power @ m.T + floor).view(b, N_ORIENT, nb)
    rel = cells[:, :, 1:] - cells[:, :, :1]  # each orientation against its own lowest band
    rel = rel - rel.mean(1, keepdim=True)
    # turn the orientations so that the one losing most of its high bands comes first, fold +k with -k
    lost = rel[:, :, nb // 2:].mean(2)
    first = lost.argmin(1)
    idx = (first[:, None] + torch.arange(N_ORIENT, device=y.device)[None]) % N_ORIENT
    turned = rel.gather(1, idx[:, :, None].expand(-1, -1, nb - 1))
    folded = [turned[:, 0]] + [(turned[:, k] + turned[:, N_ORIENT - k]) / 2 for k in range(1, N_ORIENT // 2)]
    folded.append(turned[:, N_ORIENT // 2])
    aniso = rel.amax(1) - rel.amin(1)
    return [falloff, torch.cat(folded, 1), aniso]


# ------------------------------------------------------------------ noise and JPEG
_NOISE_SCALE = math.sqrt(math.pi / 2) / 6  # mean |response| -> noise sigma, for white Gaussian noise


def _noise_response(c: Tensor) -> Tensor:
    """|Immerkaer's mask [[1,-2,1],[-2,4,-2],[1,-2,1]]| * scale: the outer product of two second differences."""
    d = c[..., :-2] - 2 * c[..., 1:-1] + c[..., 2:]
    d = d[..., :-2, :] - 2 * d[..., 1:-1, :] + d[..., 2:, :]
    return d.abs() * _NOISE_SCALE


def _noise(y: Tensor, chroma: Tensor) -> list[Tensor]:
    resp = _noise_response(y)
    whole = torch.log(_quantiles(resp.flatten(1), (0.5,))[:, 0] + 1e-4)
    blocks = F.avg_pool2d(resp, 8).flatten(1)
    q = torch.log(_quantiles(blocks, (0.10, 0.25, 0.50)) + 1e-4)
    half = _quantiles(_noise_response(F.avg_pool2d(y, 2)).flatten(1), (0.5,))[:, 0]
    half = torch.log(half + 1e-4) - whole
    cresp = _noise_response(chroma.flatten(0, 1)[:, None]).view(chroma.shape[0], 2, -1).mean(1)  # mean of 2 chroma
    cwhole = torch.log(_quantiles(cresp, (0.5,))[:, 0] + 1e-4)
    cblocks = F.avg_pool2d(cresp.view(chroma.shape[0], 1, *resp.shape[-2:]), 8).flatten(1)
    cq = torch.log(_quantiles(cblocks, (0.25,)) + 1e-4)
    return [whole[:, None], q, half[:, None], cwhole[:, None], cq]


def _block_profile(y: Tensor, dim: int) -> Tensor:
    """Mean |step| between neighbours along `dim`, by position modulo 8: (B, 8); position 7 steps across 8k+7 -> 8k+8."""
    d = (y.narrow(dim, 1, y.shape[dim] - 1) - y.narrow(dim, 0, y.shape[dim] - 1)).abs()
    n = (d.shape[dim] // 8) * 8
    d = d.narrow(dim, 0, n).mean(2 if dim == 3 else 3)[:, 0]  # (B, n)
    return d.unflatten(1, (n // 8, 8)).mean(1)


def _blockiness(y: Tensor) -> list[Tensor]:
    out, anys = [], []
    for dim in (3, 2):
        p = _block_profile(y, dim) + 1e-5
        out.append(torch.log(p[:, 7] / p[:, :7].mean(1)))
        anys.append(torch.log(p.amax(1) / p.median(1).values))
    return [torch.stack(out + anys, 1)]


# ------------------------------------------------------------------ band-pass, structure, intensity
def _bands(y: Tensor) -> tuple[list[Tensor], list[Tensor]]:
    """Difference-of-Gaussian bands at 1, 2 and 4 px on a pyramid (each band at the resolution it needs)."""
    g1 = _gauss(y, 1.0)
    half = g1[..., ::2, ::2]  # g1 is smooth enough to keep every other pixel
    g2 = _gauss(half, math.sqrt(3) / 2)  # sigma 2 in full-resolution pixels
    quarter = g2[..., ::2, ::2]
    g4 = _gauss(quarter, math.sqrt(3) / 2)  # sigma 4
    bands = [y - g1, half - g2, quarter - g4]
    e = [torch.log(b.square().mean((1, 2, 3)) + EPS) for b in bands]
    var = torch.log(y.var((1, 2, 3)) + EPS)
    energy = torch.stack([e[0] - e[1], e[1] - e[2], e[2] - var], 1)
    kurt, l1l2 = [], []
    for b in bands:
        m2 = b.square().mean((1, 2, 3)) + EPS
        kurt.append(torch.log(b.pow(4).mean((1, 2, 3)) / m2.square() + EPS))
        l1l2.append(b.abs().mean((1, 2, 3)) / m2.sqrt())
    return [energy, torch.stack(kurt, 1), torch.stack(l1l2, 1)], [g1, g2, bands]


def _tensor(ys: Tensor, step: int) -> tuple[Tensor, Tensor]:
    """(coherence, orientation 2*theta) of the image-wide structure tensor of ys, gradient by central steps."""
    gx = ys[..., step:-step, 2 * step:] - ys[..., step:-step, : -2 * step]
    gy = ys[..., 2 * step:, step:-step] - ys[..., : -2 * step, step:-step]
    jxx, jyy, jxy = gx.square().mean((1, 2, 3)), gy.square().mean((1, 2, 3)), (gx * gy).mean((1, 2, 3))
    disc = ((jxx - jyy).square() + 4 * jxy.square()).sqrt()
    return disc / (jxx + jyy + EPS), torch.atan2(2 * jxy, jxx - jyy)


def _structure(g1: Tensor, g2: Tensor) -> list[Tensor]:
    """g1: sigma 1 at full resolution; g2: sigma 2 at half resolution."""
    c1, a1 = _tensor(g1, 1)
    c2, _ = _tensor(g1, 2)
    c4, a4 = _tensor(g2, 2)
    return [torch.stack([c1, c2, c4, torch.cos(a1 - a4) * c1.sqrt() * c4.sqrt()], 1)]


def _intensity(x: Tensor, y: Tensor) -> list[Tensor]:
    flat = y.flatten(1)
    q = _quantiles(flat, (0.001, 0.01, 0.05, 0.25, 0.50, 0.75, 0.95, 0.99, 0.999))
    spread = (q[:, 7] - q[:, 1])[:, None]  # p99 - p01: a veil (reflection, haze) narrows it
    contrast = torch.log(flat.std(1) + 1e-4)
    dark_pixels = _quantiles(x.amin(1).flatten(1), (0.005,))  # the blackest pixels of any channel
    dark = -F.max_pool2d(-x.amin(1, keepdim=True), 7, stride=4)  # the darkest channel's 7x7 minimum
    dq = _quantiles(dark.flatten(1), (0.5, 0.9))
    sat = (x.amax(1) - x.amin(1)).mean((1, 2))
    ch = x.mean((2, 3))
    mean_b = F.avg_pool2d(y, 16, stride=8).flatten(1)
    std_b = (F.avg_pool2d(y.square(), 16, stride=8).flatten(1) - mean_b.square()).clamp_min(0).sqrt()
    order = mean_b.argsort(1)
    k = max(1, order.shape[1] // 10)
    darkest = order[:, :k]
    dark_mean = mean_b.gather(1, darkest).mean(1)
    dark_contrast = torch.log((std_b.gather(1, darkest).mean(1) + 1e-4) / (std_b.median(1).values + 1e-4))
    ls = torch.log(std_b + 1e-3)
    lm = mean_b - mean_b.mean(1, keepdim=True)
    ls = ls - ls.mean(1, keepdim=True)
    corr = (lm * ls).mean(1) / (lm.square().mean(1).sqrt() * ls.square().mean(1).sqrt() + 1e-6)
    return [q, spread, contrast[:, None], dark_pixels, dq, sat[:, None], (ch[:, 0] - ch[:, 1])[:, None],
            (ch[:, 2] - ch[:, 1])[:, None], torch.stack([dark_mean, dark_contrast, corr], 1)]


def _weber(y: Tensor, bands: list[Tensor]) -> list[Tensor]:
    """Detail relative to brightness in the darkest quarter of the blocks over the brightest quarter.

    Light multiplies: a photograph's detail scales with its brightness, so detail / brightness is alike
    in dark and bright blocks. A veil adds light without detail (a reflection, haze): the dark blocks
    are lifted and their relative detail falls.
    """
    out = []
    for b, pool, scale in ((bands[0], 8, 1), (bands[2], 4, 4)):  # fine band in 8x8 blocks; mid band in 16x16
        mu = F.avg_pool2d(y, pool * scale)
        sd = F.avg_pool2d(b.square(), pool).sqrt()
        h, w = min(mu.shape[-2], sd.shape[-2]), min(mu.shape[-1], sd.shape[-1])
        mu, sd = mu[..., :h, :w].flatten(1), sd[..., :h, :w].flatten(1)
        n = mu.shape[1]
        rel = sd / (mu + 0.02)
        order = mu.argsort(1)
        q = max(1, n // 4)
        dark = rel.gather(1, order[:, :q]).median(1).values
        bright = rel.gather(1, order[:, -q:]).median(1).values
        out.append(torch.log((dark + 1e-6) / (bright + 1e-6)))
    return [torch.stack(out, 1)]


def _ghost_of(band: Tensor, lo: float, hi: float) -> tuple[Tensor, Tensor]:
    """(prominence, height) of the largest isolated autocorrelation peak of a band at lags lo..hi (pixels)."""
    band = band - band.mean((2, 3), keepdim=True)
    h, w = band.shape[-2:]
    spec = torch.fft.rfft2(band[:, 0], s=(2 * h, 2 * w))  # zero padding: no wrap-around
    ac = torch.fft.irfft2(spec.abs().square(), s=(2 * h, 2 * w))
    ac = ac / (ac[:, :1, :1] + EPS)
    m = int(hi) + 2
    ac = torch.roll(ac, (m, m), dims=(1, 2))[:, : 2 * m + 1, : 2 * m + 1]  # lags -m..m, zero lag at the centre
    # neighbours two lags away: a ridge (a long straight edge) has some as high, an isolated ghost none
    nb = torch.stack([torch.roll(ac, (dy, dx), dims=(1, 2)) for dy in (-2, 0, 2) for dx in (-2, 0, 2)
                      if (dy, dx) != (0, 0)]).amax(0)
    r = torch.arange(-m, m + 1, device=band.device, dtype=band.dtype)
    rad = (r.view(-1, 1).square() + r.view(1, -1).square()).sqrt()
    ring = (rad >= lo) & (rad <= hi)
    prominence = (ac - nb)[:, ring]
    i = prominence.argmax(1, keepdim=True)
    return prominence.gather(1, i)[:, 0], ac[:, ring].gather(1, i)[:, 0]


def _ghost(g1: Tensor, band1: Tensor) -> list[Tensor]:
    """Ghost peaks of a fine band (sigma 1 - 2.4 at full resolution) and of band 1 (at half resolution)."""
    h, w = g1.shape[-2:]
    top, left = max(0, (h - GHOST_SIDE) // 2), max(0, (w - GHOST_SIDE) // 2)
    c = g1[..., top:top + GHOST_SIDE, left:left + GHOST_SIDE]
    pf, hf = _ghost_of(c - _gauss(c, 2.2), GHOST_MIN, GHOST_MAX)
    h, w = band1.shape[-2:]
    top, left = max(0, (h - GHOST_SIDE // 2) // 2), max(0, (w - GHOST_SIDE // 2) // 2)
    pc, hc = _ghost_of(band1[..., top:top + GHOST_SIDE // 2, left:left + GHOST_SIDE // 2], GHOST_MIN / 2, GHOST_MAX / 2)
    return [torch.stack([pf, pc, hf, hc], 1)]


def _sharpness_mix(bands: list[Tensor]) -> list[Tensor]:
    fine = F.avg_pool2d(bands[0].square(), 16, stride=8)
    mid = F.avg_pool2d(bands[2].square(), 4, stride=2)  # the same 16 x 16 blocks at quarter resolution
    h, w = min(fine.shape[-2], mid.shape[-2]), min(fine.shape[-1], mid.shape[-1])
    fine, mid = fine[..., :h, :w].flatten(1), mid[..., :h, :w].flatten(1)
    ratio = torch.log((fine + 1e-7) / (mid + 1e-7))
    # only the blocks with structure (mid-band energy above the image's median) say how sharp it is
    keep = mid >= mid.median(1, keepdim=True).values
    ratio = torch.where(keep, ratio, torch.full_like(ratio, float("nan")))
    return [ratio.nanquantile(torch.tensor([0.1, 0.5, 0.9], device=ratio.device, dtype=ratio.dtype), dim=1).T]


def features(images: Tensor) -> Tensor:
    """(B, len(FEATURES)) float32 statistics of a batch (B, 3, H, W) in [0, 1] (H, W >= 32)."""
    if not (isinstance(images, Tensor) and images.dim() == 4 and images.shape[1] == 3):
        raise ValueError(f"images must be a batch (B, 3, H, W), got {getattr(images, 'shape', type(images))}")
    if min(images.shape[-2:]) < MIN_SIDE:
        raise ValueError(f"images must be at least {MIN_SIDE}x{MIN_SIDE} pixels, got {tuple(images.shape[-2:])}")
    x = images.detach().float().clamp(0, 1)
    y = (x * x.new_tensor(LUMA).view(1, 3, 1, 1)).sum(1, keepdim=True)
    chroma = torch.stack([x[:, 0] - x[:, 1], x[:, 2] - x[:, 1]], 1)
    band_feats, (g1, g2, bands) = _bands(y)
    cols = (_spectrum(y) + _noise(y, chroma) + _blockiness(y) + band_feats + _structure(g1, g2)
            + _intensity(x, y) + _weber(y, bands) + _ghost(g1, bands[1]) + _sharpness_mix(bands))
    out = torch.cat([c if c.dim() == 2 else c[:, None] for c in cols], 1)
    if out.shape[1] != len(FEATURES):
        raise AssertionError(f"features: {out.shape[1]} columns for {len(FEATURES)} names")
    return out
