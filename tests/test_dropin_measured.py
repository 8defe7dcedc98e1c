"""Stage channel counts measured at construction by a shape-only dry run (issue 23), with no options.

One small network per pattern of public enhancement networks whose counts a
definition does not state or states wrongly, each passing the five drop-in
properties (tests/_dropin_nets.check_five); what the dry run leaves behind
(nothing); the input it infers; the definitions fallback and its warning;
the order channels= > measured > definitions; the error when nothing works;
text stages; alignment-only and attention-only stages.
"""

import copy
import functools
import inspect
import math
import os
import random
import re
import warnings

import numpy as np
import pytest
import torch
from torch import nn
from torch.distributions import Distribution, Independent, Normal

import ssattn
from ssattn.dropin import semantic_sensitive, text_guided
from ssattn.dropin.dryrun import SIZES

from tests import _dropin_nets as nets

warnings.filterwarnings("ignore", message=r"ssattn\..*falling back")

X = torch.randn(2, 3, 16, 16)


# ----------------------------------------------------------------------------- one network per pattern
def _composed(enc_block, dec_block="conv", encoder="plain", decoder="cat", widths=(4, 6, 8)):
    def make():
        return nets.ComposedNet(list(widths), [enc_block] * len(widths), [dec_block] * (len(widths) - 1), encoder,
                                [decoder] * (len(widths) - 1))
    return make


PATTERNS = {
    # Refused before (the definition does not state the count).
    "eca_gate_last": _composed("eca", "eca"),
    "custom_conv_block_class": _composed("conv_block", "conv_block"),
    "droppath_last": _composed("droppath", "droppath"),
    "selective_kernel_softmax_last": _composed("sk", "sk"),
    "pixelshuffle_upsampler": _composed("conv", decoder="pixelshuffle"),
    "selector_feature_side_block": _composed("conv", decoder="side"),
    "selector_skip_down_stage": _composed("conv", encoder="skip_down"),
    "selector_encoder_list": _composed("conv", encoder="list"),
    # Silently wrong before (the definition states another count; the first forward raised).
    "pix2pix_unetup_concat_in_forward": _composed("conv", decoder="unetup"),
    "cbam_last": _composed("cbam", "cbam"),
    "spatial_gate_last": _composed("spatial_gate", "spatial_gate"),
    "attention_gate_after_conv": _composed("attention_gate", "attention_gate"),
}


@pytest.mark.parametrize("pattern", list(PATTERNS))
def test_pattern_gets_measured_stages_and_the_five_properties(pattern):
    make = PATTERNS[pattern]
    net = make()
    ss = nets.check_five(make, net.pairs, X)
    assert all("measured by a dry run" in how for how in ss.channel_sources.values())


def test_the_patterns_use_their_selectors():
    """The selector patterns pair elements of structured outputs, as their names say."""
    assert "dec0[0]" in PATTERNS["selector_feature_side_block"]().pairs
    assert set(PATTERNS["selector_skip_down_stage"]().pairs.values()) == {"enc0[0]", "enc1[0]"}
    assert set(PATTERNS["selector_encoder_list"]().pairs.values()) == {"encoder[0]", "encoder[1]"}


# ----------------------------------------------------------------------------- the dry run leaves no trace
class Noisy(nn.Module):
    """Draws noise in forward (torch, Python and NumPy generators), counts its calls in a buffer, has BatchNorm,
    weight_norm (which sets its weight as an attribute in forward), and keeps its input size and a cache."""

    def __init__(self):
        super().__init__()
        self.enc = nn.Sequential(nn.Conv2d(3, 6, 3, padding=1), nn.BatchNorm2d(6), nn.ReLU())
        self.dec = nets.DropPathBlock(6, 5)
        self.frozen = nn.BatchNorm2d(5).eval()  # a submodule in another mode than its parent
        self.register_buffer("calls", torch.zeros((), dtype=torch.long))
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)  # torch.nn.utils.weight_norm is deprecated, still used
            self.head = nn.utils.weight_norm(nn.Conv2d(5, 3, 1))

    def forward(self, x):
        self.calls.add_(1)
        self.size = tuple(x.shape[-2:])
        e = self.enc(x + 0.01 * torch.randn(x.shape, device=x.device) * random.random() * float(np.random.rand()))
        e = e + torch.zeros(e.shape).type_as(e)  # a tensor made without a device, as older code does
        self.cache = e
        return self.head(self.frozen(self.dec(e)))


def _snapshot(net):
    attrs = [{k: v for k, v in m.__dict__.items() if not k.startswith("_")} for m in net.modules()]
    return ({k: v.clone() for k, v in net.state_dict().items()}, [m.training for m in net.modules()], attrs)


def test_dry_run_leaves_parameters_buffers_rng_and_modes_bit_for_bit():
    net = Noisy()
    net(torch.randn(2, 3, 8, 8))  # the attributes set in forward exist, with real values
    state, modes, attrs = _snapshot(net)
    after = []
    for channels in ({"dec": (5, 6)}, None):  # the same construction without, then with, the dry run
        torch.manual_seed(7)
        random.seed(7)
        np.random.seed(7)
        ss = semantic_sensitive(net, {"dec": "enc"}, channels=channels)
        after.append((torch.random.get_rng_state(), random.getstate(), np.random.get_state()[1].copy()))
        ss.remove()
    assert "measured by a dry run" in ss.channel_sources["dec"]
    assert torch.equal(after[0][0], after[1][0]) and after[0][1] == after[1][1]
    assert np.array_equal(after[0][2], after[1][2])
    new_state, new_modes, new_attrs = _snapshot(net)
    assert new_modes == modes
    for before, after in zip(attrs, new_attrs):  # the same objects: no fake value left behind
        assert before.keys() == after.keys() and all(after[k] is v for k, v in before.items())
    assert new_state.keys() == state.keys()
    for k, v in state.items():
        assert torch.equal(new_state[k], v), k  # running stats, num_batches_tracked, the call counter


def _largest_allocation(prof) -> int:
    return max((max(e.self_cpu_memory_usage, 0) for e in prof.events()), default=0)


def test_dry_run_allocates_no_activation_sized_memory():
    from torch.profiler import ProfilerActivity, profile

    net = Noisy()
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        ss = semantic_sensitive(net, {"dec": "enc"})
    assert "measured by a dry run" in ss.channel_sources["dec"]
    smallest_activation = 2 * 3 * min(SIZES) ** 2 * 4  # the input itself at the smallest size tried, float32
    assert _largest_allocation(prof) < smallest_activation / 8
    # The same profile sees a real forward's activations (the check can fail).
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        with torch.no_grad():
            net(torch.randn(2, 3, 64, 64))
    assert _largest_allocation(prof) >= smallest_activation


def test_dry_run_does_not_run_when_channels_are_given(monkeypatch):
    from ssattn.dropin import wrapper

    monkeypatch.setattr(wrapper, "shape_pass", lambda *a, **k: pytest.fail("dry run with channels= given"))
    ss = semantic_sensitive(nets.ComposedNet([4, 6], ["eca"] * 2, ["eca"], "plain", ["cat"]), {"dec0": "enc0"},
                            channels={"dec0": (4, 4)})
    assert ss.channel_sources == {"dec0": "from channels="}


# ----------------------------------------------------------------------------- the input it infers
class FixedSize(nn.Module):
    """A fixed positional embedding after two downsamplings: only one input size works."""

    def __init__(self, size):
        super().__init__()
        self.enc = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nets.ECA())
        self.down = nn.Conv2d(4, 8, 4, stride=4)
        self.pos = nn.Parameter(torch.zeros(1, 8, size // 4, size // 4))
        self.dec = nets.UNetUp(8, 4)
        self.head = nn.Conv2d(8, 3, 1)

    def forward(self, x):
        e = self.enc(x)
        z = self.down(e) + self.pos
        return self.head(self.dec(nn.functional.interpolate(z, scale_factor=2), e))


@pytest.mark.parametrize("size", [256, 64])
def test_a_network_that_accepts_one_size(size):
    ss = semantic_sensitive(FixedSize(size), {"dec": "enc"})
    assert (ss.blocks["dec"].dec_channels, ss.blocks["dec"].enc_channels) == (8, 4)
    assert ss.channel_sources["dec"] == f"measured by a dry run on a fake input (2, 3, {size}, {size})"
    x, g = torch.randn(1, 3, size, size), torch.rand(1, 1, size, size)
    assert torch.equal(ss(x, guidance=g), ss.model(x))


class PatchTransformer(nn.Module):
    """A ViT-style restorer: patch embedding with a fixed positional embedding for its img_size only (96)."""

    def __init__(self, img_size=96, patch=8, dim=12):
        super().__init__()
        self.img_size = (img_size, img_size)  # as timm's PatchEmbed keeps it
        self.embed = nn.Conv2d(3, dim, patch, stride=patch)
        self.pos = nn.Parameter(torch.zeros(1, (img_size // patch) ** 2, dim))
        self.block = nn.TransformerEncoderLayer(dim, 2, 2 * dim, batch_first=True)
        self.dec = nn.Sequential(nets.pixel_shuffle_up(dim, 3), nets.ECA())
        self.up = nn.Upsample(scale_factor=4)

    def forward(self, x):
        f = self.embed(x)
        B, C, H, W = f.shape
        t = self.block(f.flatten(2).transpose(1, 2) + self.pos)
        return self.up(self.dec(t.transpose(1, 2).reshape(B, C, H, W)))


def test_a_size_the_network_declares_is_tried():
    ss = semantic_sensitive(PatchTransformer(), {"dec": "embed"})
    assert ss.channel_sources["dec"] == "measured by a dry run on a fake input (2, 3, 96, 96)"
    assert (ss.blocks["dec"].dec_channels, ss.blocks["dec"].enc_channels) == (3, 12)


class TwoImages(nn.Module):
    """Two required image inputs (a degraded image and a prior, e.g. an illumination estimate)."""

    def __init__(self):
        super().__init__()
        self.enc = nets.conv_block(3, 4)
        self.prior = nn.Conv2d(3, 4, 3, padding=1)
        self.dec = nets.cbam_block(8, 6)
        self.head = nn.Conv2d(6, 3, 1)

    def forward(self, x, prior, training: bool = False):
        return self.head(self.dec(torch.cat([self.enc(x), self.prior(prior)], 1)))


def test_two_required_inputs_get_the_same_image():
    ss = semantic_sensitive(TwoImages(), {"dec": "enc"})
    assert (ss.blocks["dec"].dec_channels, ss.blocks["dec"].enc_channels) == (6, 4)
    x, p, g = torch.randn(2, 3, 8, 8), torch.randn(2, 3, 8, 8), torch.rand(2, 1, 8, 8)
    assert torch.equal(ss(x, p, guidance=g), ss.model(x, p))


class ImageAndMap(nn.Module):
    """An image and a 1-channel map of its size (an illumination or gray map), concatenated at the input."""

    def __init__(self):
        super().__init__()
        self.enc = nn.Sequential(nn.Conv2d(4, 6, 3, padding=1), nets.ECA())
        self.dec = nets.cbam_block(6, 5)
        self.head = nn.Conv2d(5, 3, 1)

    def forward(self, img, gray):
        return self.head(self.dec(self.enc(torch.cat([img, gray], 1)) * gray))


class Inputs:
    """Records the input shapes of every forward of a network (in the dry run too, where attributes are restored)."""

    def __init__(self, cls):
        self.shapes = []
        outer = self

        class Recorded(cls):
            @functools.wraps(cls.forward)  # the network's own signature: its inputs are what the dry run reads
            def forward(self, *args):
                outer.shapes.append(tuple(tuple(a.shape) for a in args))
                return super().forward(*args)

        self.cls = Recorded


def test_a_second_input_with_one_channel_is_tried():
    seen = Inputs(ImageAndMap)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # measured, not read from the definitions
        ss = semantic_sensitive(seen.cls(), {"dec": "enc"})
    assert ss.channel_sources["dec"] == "measured by a dry run on fake inputs (2, 3, 256, 256) + (2, 1, 256, 256)"
    assert (ss.blocks["dec"].dec_channels, ss.blocks["dec"].enc_channels) == (5, 6)
    # The first convolution's 4 channels for the image, then 3: the same image for both inputs, then a 1-channel
    # map for the second. A channel mismatch is not retried at other sizes or on fake tensors.
    image, gray = (2, 4, 256, 256), (2, 1, 256, 256)
    assert seen.shapes[:4] == [(image, image), (image, gray), ((2, 3, 256, 256),) * 2, ((2, 3, 256, 256), gray)]
    assert len(seen.shapes) == 4
    x, m, g = torch.randn(2, 3, 8, 8), torch.rand(2, 1, 8, 8), torch.rand(2, 1, 8, 8)
    assert torch.equal(ss(x, m, guidance=g), ss.model(x, m))


class ScaledConv(nn.Module):
    """A convolution of its own (an equalized learning-rate conv): not an nn.Conv2d."""

    def __init__(self, cin, cout):
        super().__init__()
        self.weight = nn.Parameter(torch.randn(cout, cin, 3, 3))
        self.bias = nn.Parameter(torch.zeros(cout))
        self.scale = (2 / (cin * 9)) ** 0.5

    def forward(self, x):
        return nn.functional.conv2d(x, self.weight * self.scale, self.bias, padding=1)


class CustomConvAtTheInput(nn.Module):
    """Custom convolutions at the input; the first nn.Conv2d in module order is deep (16 -> 16, the bottleneck)."""

    def __init__(self):
        super().__init__()
        self.bottleneck = nn.Conv2d(16, 16, 3, padding=1)  # registered first, called in the middle
        self.enc = nn.Sequential(ScaledConv(3, 16), nn.LeakyReLU(0.2))
        self.dec = nn.Sequential(ScaledConv(32, 8), nets.ECA())
        self.head = ScaledConv(8, 3)

    def forward(self, x):
        e = self.enc(x)
        return self.head(self.dec(torch.cat([self.bottleneck(e), e], 1)))


def test_a_channel_mismatch_tries_three_channels_before_other_sizes():
    seen = Inputs(CustomConvAtTheInput)
    ss = semantic_sensitive(seen.cls(), {"dec": "enc"})
    assert ss.channel_sources["dec"] == "measured by a dry run on a fake input (2, 3, 256, 256)"
    assert (ss.blocks["dec"].dec_channels, ss.blocks["dec"].enc_channels) == (8, 16)
    assert seen.shapes == [((2, 16, 256, 256),), ((2, 3, 256, 256),)]  # one failed attempt, on meta tensors


class SamplesALatent(nets.Net):
    """Samples a latent from a torch.distributions object built in forward (probabilistic enhancement networks):
    the distribution checks its arguments' values (scale > 0), which no shape-only pass can read."""

    def __init__(self):
        super().__init__()
        self.enc = nets.conv(3, 4)
        self.prior = nn.Conv2d(4, 8, 1)  # the latent's mean and log-scale
        self.dec = nets.eca_block(8, 6)
        self.head = nn.Conv2d(6, 3, 1)
        self.pairs = {"dec": "enc"}

    def forward(self, x):
        e = self.run(self.enc, x)
        mean, log_scale = self.prior(e).chunk(2, 1)
        z = Independent(Normal(mean, log_scale.exp()), 1).rsample()
        return self.head(self.run(self.dec, torch.cat([e, z], 1)))


def test_a_network_that_builds_distributions_is_measured():
    ss = nets.check_five(SamplesALatent, {"dec": "enc"}, X)
    assert ss.channel_sources["dec"] == "measured by a dry run on a fake input (2, 3, 256, 256)"


@pytest.mark.parametrize("default", [True, False])
def test_distribution_argument_checks_are_off_during_the_dry_run_only(default):
    previous = Distribution._validate_args
    seen = []

    class Records(SamplesALatent):
        def forward(self, x):
            seen.append(Distribution._validate_args)
            return super().forward(x)

    Distribution.set_default_validate_args(default)
    try:
        semantic_sensitive(Records(), {"dec": "enc"})
        assert seen and not any(seen)  # off in every attempt
        assert Distribution._validate_args is default
        with pytest.raises(TypeError, match="select an element"):  # a construction that fails restores it too
            semantic_sensitive(nets.ComposedNet([4, 6], ["conv"] * 2, ["conv"], "skip_down", ["cat"]),
                               {"dec0": "enc0"})
        assert Distribution._validate_args is default
    finally:
        Distribution.set_default_validate_args(previous)


class OddChannels(nn.Module):
    """Its first registered convolution is not the first one called: the called one says the input channels."""

    def __init__(self):
        super().__init__()
        self.head = nn.Conv2d(6, 1, 1)
        self.enc = nn.Sequential(nn.Conv2d(1, 6, 3, padding=1), nets.ECA())
        self.dec = nets.SKFusion(6, 6)

    def forward(self, x):
        return self.head(self.dec(self.enc(x)))


def test_input_channels_from_the_first_convolution_called():
    ss = semantic_sensitive(OddChannels(), {"dec": "enc"})
    assert ss.channel_sources["dec"] == "measured by a dry run on a fake input (2, 1, 256, 256)"
    assert (ss.blocks["dec"].dec_channels, ss.blocks["dec"].enc_channels) == (6, 6)


class TrainOnlyHead(nn.Module):
    """A deep-supervision head that runs in training mode only."""

    def __init__(self):
        super().__init__()
        self.enc = nn.Conv2d(3, 4, 3, padding=1)
        self.dec = nets.eca_block(4, 4)
        self.aux = nets.eca_block(4, 2)

    def forward(self, x):
        y = self.dec(self.enc(x))
        return (y, self.aux(y)) if self.training else y


def test_a_site_that_runs_in_one_mode_only_is_measured_in_that_mode():
    net = TrainOnlyHead().eval()
    ss = semantic_sensitive(net, {"dec": "enc", "aux": "enc"})
    assert ss.blocks["aux"].dec_channels == 2 and not net.training and not net.dec.training


# ----------------------------------------------------------------------------- when no dry run can run
class ReadsValues(nn.Module):
    """Reads a tensor's value in forward (the 0..255 range check of many repositories): no shape-only pass runs."""

    def __init__(self, dec, dec_channels):
        super().__init__()
        self.enc = nn.Conv2d(3, 4, 3, padding=1)
        self.dec = dec
        self.head = nn.Conv2d(dec_channels, 3, 1)

    def forward(self, x):
        if x.max() > 1:
            x = x / 255
        return self.head(self.dec(self.enc(x)))


def _misleading():
    return nets.AttentionGated(4, 6)  # the definition says 1 channel, the output has 6


def test_definitions_fallback_warns_once_naming_the_sites():
    with pytest.warns(UserWarning) as record:
        ss = semantic_sensitive(ReadsValues(nn.Sequential(nn.Conv2d(4, 6, 3, padding=1), nn.ReLU()), 6),
                                {"dec": "enc"})
    messages = [str(w.message) for w in record if "definitions" in str(w.message)]
    assert len(messages) == 1
    assert record[0].filename == __file__  # the warning points at the construction in the user's code
    assert re.search(r"channels of \['dec', 'enc'\] were read from the module definitions.*\(2, 3, 256, 256\).*"
                     r"reads a tensor's values.*example_inputs=.*channels=", messages[0])
    assert ss.channel_sources["dec"] == "read from the module definitions"
    x, g = torch.rand(2, 3, 8, 8), torch.rand(2, 1, 8, 8)
    assert torch.equal(ss(x, guidance=g), ss.model(x))


def test_definitions_fallback_names_the_line_that_failed():
    lines, first = inspect.getsourcelines(ReadsValues.forward)
    line = first + next(i for i, text in enumerate(lines) if "x.max()" in text)
    with pytest.warns(UserWarning, match="read from the module definitions") as record:
        semantic_sensitive(ReadsValues(nn.Sequential(nn.Conv2d(4, 6, 3, padding=1), nn.ReLU()), 6), {"dec": "enc"})
    message = next(str(w.message) for w in record if "definitions" in str(w.message))
    assert f"{os.path.basename(__file__)}:{line}, in forward)" in message, message


def test_a_wrong_definition_still_raises_at_the_first_call_naming_channels():
    with pytest.warns(UserWarning, match="read from the module definitions"):
        ss = semantic_sensitive(ReadsValues(_misleading(), 6), {"dec": "enc"})
    x, g = torch.rand(2, 3, 8, 8), torch.rand(2, 1, 8, 8)
    with pytest.raises(ValueError, match=r"decoder module 'dec' gives 6 channels.*built for \(1, 4\).*read from the "
                                         r"module definitions.*channels=\{'dec': \(6, 4\)\}"):
        ss(x, guidance=g)


def test_example_inputs_override_a_wrong_definition():
    x, g = torch.rand(2, 3, 8, 8), torch.rand(2, 1, 8, 8)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        ss = semantic_sensitive(ReadsValues(_misleading(), 6), {"dec": "enc"}, example_inputs=x)
    assert (ss.blocks["dec"].dec_channels, ss.blocks["dec"].enc_channels) == (6, 4)
    assert ss.channel_sources["dec"] == "measured on example_inputs"
    assert torch.equal(ss(x, guidance=g), ss.model(x))
    given = semantic_sensitive(ReadsValues(_misleading(), 6), {"dec": "enc"}, example_inputs=x,
                               channels={"dec": (6, 4)})
    assert given.channel_sources["dec"] == "from channels="  # channels= first


class Unreadable(nn.Module):
    def forward(self, x):
        return torch.cat([x, x.flip(1)], 1)


def test_nothing_works_error_says_what_was_tried_and_both_ways_out():
    with pytest.raises(ValueError) as err:
        semantic_sensitive(ReadsValues(Unreadable(), 8), {"dec": "enc"})
    text = str(err.value)
    for expected in ["module 'dec' (Unreadable)", "(2, 3, 256, 256), (2, 3, 128, 128), (2, 3, 64, 64), "
                     "(2, 3, 512, 512)", "DataDependentOutputException", "reads a tensor's values",
                     "example_inputs=(x,)", "channels={'dec': (dec_channels, enc_channels)}"]:
        assert expected in text, (expected, text)
    x = torch.rand(2, 3, 8, 8)
    ss = semantic_sensitive(ReadsValues(Unreadable(), 8), {"dec": "enc"}, example_inputs=x)
    assert (ss.blocks["dec"].dec_channels, ss.blocks["dec"].enc_channels) == (8, 4)


def test_a_pinned_call_that_never_happens_is_named():
    with pytest.warns(UserWarning, match=r"\['enc0#3'\].*module 'enc0' ran 1 time\(s\), so it has no call #3 "
                                         r"in a dry run"):
        semantic_sensitive(nets.ComposedNet([4, 6], ["conv"] * 2, ["conv"], "plain", ["cat"]), {"dec0": "enc0#3"})


def test_a_structured_site_without_a_tensor_is_an_error_at_construction():
    net = nets.ComposedNet([4, 6], ["conv"] * 2, ["conv"], "skip_down", ["cat"])
    with pytest.raises(TypeError, match=r"encoder module 'enc0' must output a \(B, C, H, W\) tensor, got tuple; "
                                        r"select an element, e.g. 'enc0\[0\]'"):
        semantic_sensitive(net, {"dec0": "enc0"})


# ----------------------------------------------------------------------------- text stages
class TokenStage(nn.Module):
    """A transformer stage on tokens (B, N, C): its output is a token sequence, not a map."""

    def __init__(self, dim):
        super().__init__()
        self.norm = nn.LayerNorm(dim)
        self.mlp = nn.Sequential(nn.Linear(dim, 2 * dim), nn.GELU(), nn.Linear(2 * dim, dim))

    def forward(self, t):
        return t + self.mlp(self.norm(t))


class TokenResample(nn.Module):
    """Tokens to a map, a strided (or transposed) convolution, back to tokens: the one map inside."""

    def __init__(self, cin, cout, up=False):
        super().__init__()
        self.conv = nn.Sequential(nn.ConvTranspose2d(cin, cout, 2, stride=2) if up else
                                  nn.Conv2d(cin, cout, 4, stride=2, padding=1))

    def forward(self, t):
        B, N, C = t.shape
        side = math.isqrt(N)
        return self.conv(t.transpose(1, 2).reshape(B, C, side, side)).flatten(2).transpose(1, 2)


class TokenUNet(nn.Module):
    """A transformer encoder-decoder whose stages pass tokens; maps only in the embedding, resampling and head."""

    def __init__(self):
        super().__init__()
        self.embed = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.LeakyReLU())
        self.enc0 = TokenStage(8)
        self.down0 = TokenResample(8, 16)
        self.mid = TokenStage(16)
        self.up0 = TokenResample(16, 8, up=True)
        self.dec0 = TokenStage(16)
        self.head = nn.Conv2d(16, 3, 3, padding=1)

    def forward(self, x):
        B, _, H, W = x.shape
        t0 = self.enc0(self.embed(x).flatten(2).transpose(1, 2))
        t = self.dec0(torch.cat([self.up0(self.mid(self.down0(t0))), t0], -1))
        return self.head(t.transpose(1, 2).reshape(B, 16, H, W))


def test_a_site_that_outputs_tokens_names_the_nearest_maps():
    with pytest.raises(TypeError) as err:
        semantic_sensitive(TokenUNet(), {"dec0": "enc0"})
    text = str(err.value)
    for expected in ["encoder module 'enc0' outputs tokens (B, N, C), (2, 65536, 8), as transformer stages do, "
                     "not a (B, C, H, W) map", "the nearest modules that output a map in a dry run",
                     "'embed' (2, 8, 256, 256)", "'down0.conv' (2, 16, 128, 128)", "'up0.conv' (2, 8, 256, 256)"]:
        assert expected in text, (expected, text)
    assert "'embed.0'" not in text  # the same map as 'embed', its container
    ss = semantic_sensitive(TokenUNet(), {"up0.conv": "embed"})  # a pair the message offers
    assert ss.channel_sources["up0.conv"].startswith("measured by a dry run")
    x, g = torch.randn(2, 3, 8, 8), torch.rand(2, 1, 8, 8)
    assert torch.equal(ss(x, guidance=g), ss.model(x))


def test_text_stages_are_measured_too():
    make = PATTERNS["pix2pix_unetup_concat_in_forward"]
    tg = text_guided(make(), ["dec0", "dec1"], text_channels=12)
    widths = (4, 6, 8)
    assert [b.img_channels for b in tg.text_blocks.values()] == [widths[1] * 2, widths[0] * 2]
    assert all("measured by a dry run" in how for how in tg.channel_sources.values())
    words, mask = torch.randn(2, 5, 12), torch.zeros(2, 5, dtype=torch.bool)
    assert torch.equal(tg(X, text=(words, mask)), tg.model(X))
    both = semantic_sensitive(make(), {"dec1": "enc0"}, text_stages=["enc1"], text_channels=12)
    assert both.text_blocks["enc1"].img_channels == 6 and both.blocks["dec1"].dec_channels == 8


# ----------------------------------------------------------------------------- alignment-only and attention-only
def test_alignment_only_site_feeds_the_loss_with_no_attention_block():
    make = PATTERNS["attention_gate_after_conv"]
    torch.manual_seed(0)
    net = make()
    plain = copy.deepcopy(net)
    ss = semantic_sensitive(net, {"dec0": "enc1"}, align_sites=["dec0", "dec1"], eta=0.5, weight=0.2)
    assert list(ss.blocks) == ["dec0"] and ss.align_sites == ["dec0", "dec1"] and ss.takes_map
    nets.perturb(ss)
    g = torch.rand(2, 1, 16, 16)
    out = ss(X, guidance=g)
    feats = ss.decoder_features()
    loss = ss.alignment_loss()
    # dec1's feature is the module's own output (no stage), dec0's the refined one.
    assert feats["dec1"].shape[1] == 4 and not torch.equal(out, plain(X))
    expected = ssattn.SemanticAlignmentLoss(eta=0.5, weight=0.2)(
        [feats["dec0"], feats["dec1"]],
        [nn.functional.interpolate(g, size=f.shape[-2:], mode="area") for f in (feats["dec0"], feats["dec1"])])
    torch.testing.assert_close(loss, expected)
    loss.backward()
    assert ss.blocks["dec0"].q_proj.weight.grad is not None


def test_alignment_only_wrapper_with_no_pairs():
    make = PATTERNS["cbam_last"]
    torch.manual_seed(0)
    net = make()
    plain = copy.deepcopy(net)
    ss = semantic_sensitive(net, {}, align_sites=["dec1"])
    assert len(ss.blocks) == 0 and ss.materialized
    g = torch.rand(2, 1, 16, 16)
    out = ss(X, guidance=g)
    assert torch.equal(out, plain(X))  # no stage changes anything
    loss = ss.alignment_loss()
    assert loss.requires_grad and loss != 0
    loss.backward()
    assert net.dec1[0].weight.grad.abs().sum() > 0  # the loss trains the network itself
    copy.deepcopy(ss)(X, guidance=g)
    with pytest.raises(TypeError, match="needs a guidance map"):
        ss(X)


def test_attention_only_wrapper_has_a_zero_alignment_loss():
    make = PATTERNS["eca_gate_last"]
    ss = nets.perturb(semantic_sensitive(make(), make().pairs, align_sites=()))
    assert ss.align_sites == [] and len(ss.blocks) == 2
    g = torch.rand(2, 1, 16, 16)
    with pytest.raises(RuntimeError, match="forward call first"):
        ss.alignment_loss()
    ss(X, guidance=g).sum().backward()
    zero = ss.alignment_loss()
    assert zero.shape == () and zero.item() == 0.0


def test_align_sites_errors():
    make = PATTERNS["eca_gate_last"]
    with pytest.raises(ValueError, match=r"pairs and align_sites are both empty"):
        semantic_sensitive(make(), {})
    with pytest.raises(ValueError, match=r"pairs and align_sites are both empty"):
        semantic_sensitive(make(), {}, align_sites=())
    with pytest.raises(ValueError, match=r"align_sites: decoder module 'dek1' is not in the model.*'dec1'"):
        semantic_sensitive(make(), {}, align_sites=["dek1"])
    with pytest.raises(ValueError, match=r"align_sites: decoder 'dec1#x' is not a module name"):
        semantic_sensitive(make(), {}, align_sites=["dec1#x"])
    with pytest.raises(ValueError, match=r"align_sites must not repeat"):
        semantic_sensitive(make(), {"dec0": "enc1"}, align_sites=["dec0", "dec0"])
    with pytest.raises(ValueError, match=r"level_weights must have one value per alignment site \(2"):
        semantic_sensitive(make(), {"dec0": "enc1"}, align_sites=["dec0", "dec1"], level_weights=[1.0])
    with pytest.raises(ValueError, match=r"align_sites must be a list of decoder sites"):
        semantic_sensitive(make(), {"dec0": "enc1"}, align_sites=3)


class Lazy(nn.Module):
    def __init__(self):
        super().__init__()
        self.enc = nn.LazyConv2d(4, 3, padding=1)
        self.dec = nets.eca_block(4, 5)

    def forward(self, x):
        return self.dec(self.enc(x))


def test_lazy_modules_are_left_alone():
    net = Lazy()
    with pytest.raises(ValueError, match=r"module 'dec' \(Sequential\) could not be measured: no dry run could run: "
                                         r"the model has lazy modules not yet initialised.*call it once"):
        semantic_sensitive(net, {"dec": "enc"})
    assert nn.parameter.is_lazy(net.enc.weight)
    net(X)
    ss = semantic_sensitive(net, {"dec": "enc"})
    assert (ss.blocks["dec"].dec_channels, ss.blocks["dec"].enc_channels) == (5, 4)


class DoublingNorm(nn.BatchNorm2d):
    """A subclass of a norm whose forward changes the channel count: not passed through in the dry run."""

    def forward(self, x):
        y = super().forward(x)
        return torch.cat([y, y], 1)


def test_layers_passed_through_in_the_dry_run_are_torch_own_classes_only():
    net = nn.Sequential()
    net.add_module("enc", nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.GroupNorm(2, 4), nn.GELU()))
    net.add_module("dec", nn.Sequential(nn.Conv2d(4, 5, 1), DoublingNorm(5)))
    ss = semantic_sensitive(net, {"dec": "enc"})
    assert (ss.blocks["dec"].dec_channels, ss.blocks["dec"].enc_channels) == (10, 4)
    assert all("forward" not in m.__dict__ for m in net.modules())
