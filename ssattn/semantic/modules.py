"""nn.Module wrappers: the cross-attention stage, the pyramid and the alignment loss."""

from __future__ import annotations

import warnings

import torch
from torch import Tensor, nn

from .. import _checks, functional
from .._heads import image_heads, project_image_out, residual_add
from ..reference.area import area_resize


class SemanticCrossAttention(nn.Module):
    """Mask-weighted K/V cross-attention for one decoder stage (SPEC 2).

    y = dec + W_o(attention(W_q dec, m * W_k enc, m * W_v enc)), with 1x1
    projections without bias and W_o zero-initialised, so a new module
    returns `dec` unchanged. `guidance` (B, 1, h, w) of any size is
    area-averaged to the encoder feature's size to give the per-key weight m.

    Options: backend ("auto"), scale (head_dim ** -0.5), check_values (True:
    each call checks that the guidance lies in [0, 1], one host sync; the
    drop-in checks its map once per forward and turns the stages' checks off).
    """

    def __init__(self, dec_channels: int, enc_channels: int, heads: int = 1, head_dim: int | None = None,
                 *, backend: str = "auto", scale: float | None = None, check_values: bool = True):
        super().__init__()
        for name, value in (("dec_channels", dec_channels), ("enc_channels", enc_channels), ("heads", heads)):
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
        if head_dim is None:
            if dec_channels % heads:
                raise ValueError(f"dec_channels ({dec_channels}) must be divisible by heads ({heads}) unless head_dim is given")
            head_dim = dec_channels // heads
        if not isinstance(head_dim, int) or head_dim < 1:
            raise ValueError(f"head_dim must be a positive integer, got {head_dim!r}")
        self.dec_channels, self.enc_channels = dec_channels, enc_channels
        self.heads, self.head_dim = heads, head_dim
        self.backend, self.scale, self.check_values = backend, _checks.scale(scale), bool(check_values)
        inner = heads * head_dim
        self.q_proj = nn.Conv2d(dec_channels, inner, 1, bias=False)
        self.k_proj = nn.Conv2d(enc_channels, inner, 1, bias=False)
        self.v_proj = nn.Conv2d(enc_channels, inner, 1, bias=False)
        self.out_proj = nn.Conv2d(inner, dec_channels, 1, bias=True)
        nn.init.zeros_(self.out_proj.weight)
        nn.init.zeros_(self.out_proj.bias)

    def extra_repr(self) -> str:
        return (f"dec_channels={self.dec_channels}, enc_channels={self.enc_channels}, "
                f"heads={self.heads}, head_dim={self.head_dim}, backend={self.backend!r}")

    def forward(self, dec: Tensor, enc: Tensor, guidance: Tensor) -> Tensor:
        _checks.tensor("dec", dec, ndim=4)
        _checks.tensor("enc", enc, ndim=4)
        _checks.tensor("guidance", guidance, ndim=4)
        _checks.same_device(dec=dec, enc=enc, guidance=guidance)
        for name, x in (("dec", dec), ("enc", enc), ("guidance", guidance)):
            _checks.nonempty_spatial(name, x)
        _checks.parameter_dtype(self.q_proj.weight.dtype, dec=dec, enc=enc)
        B, Cd, H, W = dec.shape
        if Cd != self.dec_channels:
            raise ValueError(f"dec must have {self.dec_channels} channels, got shape {tuple(dec.shape)}")
        if enc.shape[1] != self.enc_channels:
            raise ValueError(f"enc must have {self.enc_channels} channels, got shape {tuple(enc.shape)}")
        if enc.shape[0] != B or guidance.shape[0] != B:
            raise ValueError(
                f"dec, enc and guidance must share the batch size: {tuple(dec.shape)}, {tuple(enc.shape)}, {tuple(guidance.shape)}"
            )
        if guidance.shape[1] != 1:
            raise ValueError(f"guidance must have one channel (B, 1, h, w), got {tuple(guidance.shape)}")
        if self.check_values:
            _checks.unit_interval("guidance", guidance)
        He, We = enc.shape[-2:]
        h, d = self.heads, self.head_dim
        q = image_heads(self.q_proj(dec), h, d)
        k, v = image_heads(self.k_proj(enc), h, d), image_heads(self.v_proj(enc), h, d)
        m = area_resize(guidance, (He, We)).reshape(B, He * We).to(k.dtype)
        scale = self.scale if self.scale is not None else self.head_dim ** -0.5
        functional._check_attention_args(q, k, v, m, None, scale, check_values=False)
        out = functional._attention(q, k, v, m, None, float(scale), self.backend)
        return residual_add(dec, project_image_out(self.out_proj, out, B, H, W))


class GuidancePyramid(nn.Module):
    """SPEC 1 as a module: forward(scores, text=None, grid_size=None) -> list of maps.

    Options: renormalize (False), backend ("auto").
    """

    def __init__(self, sizes, gamma: float = 2.0, delta: float = 0.2, *, renormalize: bool = False,
                 backend: str = "auto"):
        super().__init__()
        self.sizes = _checks.pyramid_sizes(sizes)
        _checks.sharpening(gamma, delta)
        self.gamma, self.delta, self.renormalize, self.backend = float(gamma), float(delta), renormalize, backend

    def extra_repr(self) -> str:
        return f"sizes={self.sizes}, gamma={self.gamma}, delta={self.delta}, renormalize={self.renormalize}"

    def forward(self, scores: Tensor, text: Tensor | None = None, grid_size=None) -> list[Tensor]:
        return functional.guidance_pyramid(
            scores, self.sizes, gamma=self.gamma, delta=self.delta, text=text, grid_size=grid_size,
            renormalize=self.renormalize, backend=self.backend,
        )


class SemanticAlignmentLoss(nn.Module):
    """weight * alignment_loss(features, maps) (docs/operations.md section 3); weight is lambda_align (paper: 0.1).

    form: "paper" (the paper's formula, unbounded below) or "normalized" (the
    formula on per-sample unit-RMS features: scale invariant, bounded below).
    The weight is folded into the per-level weights rather than multiplied
    onto the loss, so the fused op's saved gradient needs no rescaling pass
    when the training loss (a sum containing this term) is backpropagated.
    check_values (True): check that the maps lie in [0, 1] (one host sync per level).

    Divergence guard: every `guard_every` calls with grad enabled (0: never)
    the scale of each level's features is compared with its value at the
    first such call, and one RuntimeWarning is raised the first time a level
    has grown by `guard_factor` or more (None: the form's own, GUARD_FACTORS).
    The scale is the statistic the form's failure inflates (GUARD_STATISTICS):
    for the paper form the RMS inside the map, for the normalized form the RMS
    over the level (docs/operations.md section 3 says how both were chosen).
    Each check is recorded in `guard_history`. It costs one host sync per
    check, none in between, and is skipped while torch.compile traces.
    """

    def __init__(self, eta: float = 1.0, weight: float = 0.1, level_weights=None, reduction: str = "mean",
                 form: str = "paper", *, backend: str = "auto", check_values: bool = True,
                 guard_every: int = 50, guard_factor: float | None = None):
        super().__init__()
        self.eta = _checks.number("eta", eta, minimum=0)
        self.weight = _checks.number("weight", weight)
        self.level_weights = None if level_weights is None else _checks.numbers_per_level("level_weights", level_weights)
        _checks.choice("reduction", reduction, ("mean", "sum"))
        _checks.choice("form", form, functional.ALIGNMENT_FORMS)
        if isinstance(guard_every, bool) or not isinstance(guard_every, int) or guard_every < 0:
            raise ValueError(f"guard_every must be an integer >= 0 (0 turns the guard off), got {guard_every!r}")
        self.guard_factor = (GUARD_FACTORS[form] if guard_factor is None
                             else _checks.number("guard_factor", guard_factor, minimum=1))
        self.reduction, self.form, self.backend = reduction, form, backend
        self.check_values = bool(check_values)
        self.guard_every = guard_every
        self._guard = _ScaleGuard()

    def extra_repr(self) -> str:
        return (f"eta={self.eta}, weight={self.weight}, level_weights={self.level_weights}, "
                f"reduction={self.reduction!r}, form={self.form!r}")

    @property
    def guard_history(self) -> list[dict]:
        """The divergence guard's checks: {"call": n, "rms": [per level], "rms_in_map": [per level]} each."""
        return self._guard.history

    def forward(self, features, maps) -> Tensor:
        features = _checks.nonempty_list("features", features)
        levels = self.level_weights if self.level_weights is not None else [1.0] * len(features)
        if len(levels) != len(features):
            raise ValueError(f"level_weights has {len(levels)} values but {len(features)} levels were given")
        loss = functional._alignment_loss(
            features, maps, self.eta, [self.weight * w for w in levels], self.reduction, self.backend,
            self.check_values, form=self.form,
        )
        if self.guard_every and torch.is_grad_enabled() and not torch.compiler.is_compiling():
            self._guard.step(features, maps, self.guard_every, self.guard_factor, self.form)
        return loss


# What the divergence guard watches per loss form, and the growth over its first check that warns (measured in
# the -SS ablation, docs/operations.md section 3). The paper form is unbounded below where the map is 1: it
# rewards inflating the features inside the map, so its guard watches their RMS there. The normalized form asks
# for energy to move into the map (the RMS there rises by design) and is scale invariant: its guard watches the
# RMS over the whole level.
GUARD_STATISTICS = {"paper": "rms_in_map", "normalized": "rms"}
GUARD_FACTORS = {"paper": 3.0, "normalized": 8.0}


def guard_warning_call(history: list[dict], form: str, factor: float | None = None) -> int | None:
    """The call at which the guard warns, replayed from `guard_history` (None: it does not): the same rule."""
    guard = _ScaleGuard()
    for check in history:
        found = guard.observe(check["call"], check["rms"], check["rms_in_map"], form,
                              GUARD_FACTORS[form] if factor is None else factor)
        if found is not None:
            return check["call"]
    return None


class _ScaleGuard:
    """Warns once when a level's feature scale grows by orders of magnitude (see SemanticAlignmentLoss).

    Two scales per level are measured and recorded: the features' RMS, sqrt(mean F^2) over the level, and
    their RMS weighted by the map, sqrt(sum M F^2 / (C sum M)). GUARD_STATISTICS names the one each form's
    warning watches.
    """

    def __init__(self):
        self.calls = 0
        self.first: list[list[float]] | None = None
        self.warned = False
        self.history: list[dict] = []

    @staticmethod
    def scales(f: Tensor, m: Tensor) -> Tensor:
        """(RMS of f, RMS of f weighted by the map m; the plain RMS when the map is all zero)."""
        f = f.detach().to(torch.promote_types(f.dtype, torch.float32))  # fp16 squares overflow
        m = m.detach().to(f.dtype)
        sq = f.square()
        plain = sq.sum() / max(f.numel(), 1)
        energy, mass = (m * sq).sum(), m.sum() * f.shape[1]
        return torch.stack([plain, torch.where(mass > 0, energy / mass.clamp_min(1e-30), plain)]).sqrt()

    def step(self, features, maps, every: int, factor: float, form: str) -> None:
        self.calls += 1
        if (self.calls - 1) % every:
            return
        if any(_checks.is_shape_only(x) for x in list(features) + list(maps)):
            return
        scales = torch.stack([self.scales(f, m).float() for f, m in zip(features, maps)]).tolist()  # one sync
        rms, rms_in = [s[0] for s in scales], [s[1] for s in scales]
        self.history.append({"call": self.calls, "rms": rms, "rms_in_map": rms_in})
        found = self.observe(self.calls, rms, rms_in, form, factor)
        if found is None:
            return
        level, (then, now), (then_in, now_in) = found
        if form == "paper":
            what = (f"grew inside the map (their RMS weighted by the map) from {then_in:.3g} to {now_in:.3g} "
                    f"({now_in / then_in:.3g}x, the warning's threshold for the paper form is {factor:g}x) in "
                    f"{self.calls - 1} calls; over the whole level their RMS went from {then:.3g} to {now:.3g}")
            advice = ("the paper's form is unbounded below where the map is 1, so training can lower it by "
                      "inflating the features inside the map: use form='normalized' (scale invariant)")
        else:
            what = (f"grew in scale (RMS) from {then:.3g} to {now:.3g} ({now / then:.3g}x, the warning's threshold "
                    f"is {factor:g}x) in {self.calls - 1} calls; inside the map their RMS went from {then_in:.3g} "
                    f"to {now_in:.3g}")
            advice = "the normalized form does not reward this: look at the other losses"
        warnings.warn(f"ssattn.SemanticAlignmentLoss: the features of level {level} {what}; {advice}",
                      RuntimeWarning, stacklevel=3)

    def observe(self, call: int, rms: list[float], rms_in: list[float], form: str, factor: float):
        """Record one check; the first time a level's watched scale reaches factor x its first value:
        (level, (first RMS, RMS now), (first RMS in the map, now)), else None."""
        scales = [list(s) for s in zip(rms, rms_in)]
        if self.first is None or len(self.first) != len(scales):
            self.first = scales
            return None
        watched = 1 if GUARD_STATISTICS[form] == "rms_in_map" else 0
        for level, (now, then) in enumerate(zip(scales, self.first)):
            if then[watched] == 0:
                self.first[level] = now  # an all-zero start says nothing about scale: take the next value
                continue
            if not self.warned and now[watched] >= factor * then[watched]:
                self.warned = True
                return level, (then[0], now[0]), (then[1], now[1])
        return None
