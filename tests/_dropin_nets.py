"""Small encoder-decoders built from the patterns of public enhancement networks, for the drop-in's tests.

Blocks whose definitions do not state their output channels (an ECA gate,
a custom activation, DropPath, a selective-kernel fusion ending in Softmax,
PixelShuffle), blocks whose definitions state a wrong count (a concatenation
inside forward, a CBAM or spatial gate, an attention gate registered after
the conv) and structured outputs ((feature, side), (skip, down), a list of
encoder features). `random_net(seed)` composes them into a random
encoder-decoder. Every network runs its stages through `Net.run`, which
checkpoints them (torch.utils.checkpoint, non-reentrant) when
`use_checkpoint` is set.

`check_five(make, pairs, x)` checks the five drop-in properties on one
network, with no options: stages at construction (sized as a real forward
measures them), identity, deepcopy, training changes the output, and
activation checkpointing.
"""

from __future__ import annotations

import copy
import random
import warnings

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from ssattn.dropin import semantic_sensitive
from ssattn.dropin.sites import parse_site, select


class Net(nn.Module):
    """Base of the test networks: `run` checkpoints a stage when use_checkpoint is set."""

    use_checkpoint = False

    def run(self, block, *args):
        return checkpoint(block, *args, use_reentrant=False) if self.use_checkpoint else block(*args)


def conv(cin, cout, norm="bn"):
    layers = [nn.Conv2d(cin, cout, 3, padding=1)]
    if norm == "bn":
        layers.append(nn.BatchNorm2d(cout))
    elif norm == "gn":
        layers.append(nn.GroupNorm(1, cout))
    return nn.Sequential(*layers, nn.LeakyReLU(0.1))


# ----------------------------------------------------------------------------- counts a definition does not state
class ECA(nn.Module):
    """Efficient channel attention: a 1-D convolution over the pooled channels, then a sigmoid gate."""

    def __init__(self, k=3):
        super().__init__()
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.conv = nn.Conv1d(1, 1, k, padding=k // 2, bias=False)
        self.sigmoid = nn.Sigmoid()

    def forward(self, x):
        y = self.pool(x)
        y = self.conv(y.squeeze(-1).transpose(-1, -2)).transpose(-1, -2).unsqueeze(-1)
        return x * self.sigmoid(y)


def eca_block(cin, cout):
    return nn.Sequential(nn.Conv2d(cin, cout, 3, padding=1), nn.ReLU(), ECA())


class Swish(nn.Module):
    def forward(self, x):
        return x * torch.sigmoid(x)


class conv_block(nn.Module):  # noqa: N801 - named as the networks that use this pattern name it
    """A custom block class whose last layer is a custom activation."""

    def __init__(self, cin, cout):
        super().__init__()
        self.conv = nn.Sequential(nn.Conv2d(cin, cout, 3, padding=1), nn.BatchNorm2d(cout), Swish(),
                                  nn.Conv2d(cout, cout, 3, padding=1), nn.BatchNorm2d(cout), Swish())

    def forward(self, x):
        return self.conv(x)


class DropPath(nn.Module):
    """Stochastic depth: drops whole samples of a residual branch in training (draws random numbers)."""

    def __init__(self, p=0.3):
        super().__init__()
        self.p = p

    def forward(self, x):
        if not self.training or self.p == 0:
            return x
        keep = torch.rand(x.shape[0], 1, 1, 1, dtype=x.dtype, device=x.device) >= self.p
        return x * keep / (1 - self.p)


class DropPathBlock(nn.Module):
    """A residual block whose last registered layer is DropPath."""

    def __init__(self, cin, cout):
        super().__init__()
        self.proj = nn.Conv2d(cin, cout, 1)
        self.body = nn.Sequential(nn.Conv2d(cout, cout, 3, padding=1), nn.GELU(), nn.Conv2d(cout, cout, 3, padding=1))
        self.drop_path = DropPath()

    def forward(self, x):
        x = self.proj(x)
        return x + self.drop_path(self.body(x))


class SKFusion(nn.Module):
    """Selective-kernel fusion: two branches weighted per channel by a softmax over the branches."""

    def __init__(self, cin, cout, r=2):
        super().__init__()
        self.conv3 = nn.Conv2d(cin, cout, 3, padding=1)
        self.conv5 = nn.Conv2d(cin, cout, 5, padding=2)
        self.fc = nn.Sequential(nn.Conv2d(cout, max(cout // r, 1), 1), nn.ReLU())
        self.fcs = nn.ModuleList([nn.Conv2d(max(cout // r, 1), cout, 1) for _ in range(2)])
        self.softmax = nn.Softmax(dim=1)

    def forward(self, x):
        feats = torch.stack([self.conv3(x), self.conv5(x)], 1)
        s = self.fc(feats.sum(1).mean((2, 3), keepdim=True))
        att = self.softmax(torch.stack([fc(s) for fc in self.fcs], 1))
        return (feats * att).sum(1)


def pixel_shuffle_up(cin, cout):
    """Sub-pixel upsampling: a convolution to 4x the channels, then PixelShuffle(2)."""
    return nn.Sequential(nn.Conv2d(cin, 4 * cout, 3, padding=1), nn.PixelShuffle(2))


# ----------------------------------------------------------------------------- counts a definition states wrongly
class UNetUp(nn.Module):
    """pix2pix's decoder stage: upsample, then concatenate the skip inside forward."""

    def __init__(self, cin, cout):
        super().__init__()
        self.model = nn.Sequential(nn.ConvTranspose2d(cin, cout, 4, 2, 1, bias=False), nn.InstanceNorm2d(cout),
                                   nn.ReLU(inplace=True))

    def forward(self, x, skip):
        x = self.model(x)
        return torch.cat((x, skip), 1)


class ChannelGate(nn.Module):
    def __init__(self, c, r=2):
        super().__init__()
        self.mlp = nn.Sequential(nn.Flatten(), nn.Linear(c, max(c // r, 1)), nn.ReLU(), nn.Linear(max(c // r, 1), c))

    def forward(self, x):
        att = self.mlp(x.mean((2, 3), keepdim=True)) + self.mlp(x.amax((2, 3), keepdim=True))
        return x * torch.sigmoid(att)[..., None, None]


class SpatialGate(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(2, 1, 7, padding=3)

    def forward(self, x):
        pooled = torch.cat([x.amax(1, keepdim=True), x.mean(1, keepdim=True)], 1)
        return x * torch.sigmoid(self.conv(pooled))


class CBAM(nn.Module):
    def __init__(self, c):
        super().__init__()
        self.channel_gate = ChannelGate(c)
        self.spatial_gate = SpatialGate()

    def forward(self, x):
        return self.spatial_gate(self.channel_gate(x))


def cbam_block(cin, cout):
    return nn.Sequential(nn.Conv2d(cin, cout, 3, padding=1), nn.ReLU(), CBAM(cout))


def spatial_gate_block(cin, cout):
    return nn.Sequential(nn.Conv2d(cin, cout, 3, padding=1), nn.ReLU(), SpatialGate())


class AttentionGated(nn.Module):
    """A conv, then an attention gate registered after it: the gate's last conv has 1 channel."""

    def __init__(self, cin, cout):
        super().__init__()
        self.conv = conv(cin, cout)
        self.att = nn.Sequential(nn.Conv2d(cout, max(cout // 2, 1), 1), nn.ReLU(),
                                 nn.Conv2d(max(cout // 2, 1), 1, 1), nn.Sigmoid())

    def forward(self, x):
        y = self.conv(x)
        return y * self.att(y)


# ----------------------------------------------------------------------------- structured outputs
class SideOutput(nn.Module):
    """A decoder block returning (feature, side prediction), as deeply supervised decoders do."""

    def __init__(self, block):
        super().__init__()
        self.block = block

    def forward(self, x):
        f = self.block(x)
        return f, f.mean(1, keepdim=True)


class SkipDown(nn.Module):
    """An encoder stage returning (skip, downsampled)."""

    def __init__(self, block):
        super().__init__()
        self.block = block
        self.pool = nn.MaxPool2d(2)

    def forward(self, x):
        s = self.block(x)
        return s, self.pool(s)


class ListEncoder(nn.Module):
    """An encoder submodule returning the list of its stages' outputs."""

    def __init__(self, blocks):
        super().__init__()
        self.blocks = nn.ModuleList(blocks)
        self.pool = nn.AvgPool2d(2)

    def forward(self, x):
        feats = []
        for i, b in enumerate(self.blocks):
            x = b(self.pool(x) if i else x)
            feats.append(x)
        return feats


# ----------------------------------------------------------------------------- composed networks
BLOCKS = {  # name -> (cin, cout) -> block whose output has cout channels
    "conv": conv,
    "eca": eca_block,
    "conv_block": conv_block,
    "droppath": DropPathBlock,
    "sk": SKFusion,
    "cbam": cbam_block,
    "spatial_gate": spatial_gate_block,
    "attention_gate": AttentionGated,
}
ENCODERS = ("plain", "skip_down", "list")            # how the encoder gives its skip features
DECODERS = ("cat", "unetup", "side", "pixelshuffle")  # how a decoder stage takes its skip


class ComposedNet(Net):
    """An encoder-decoder of `depth` levels: encoder kind, a block per stage, a decoder kind per stage.

    pairs: each decoder stage's site paired with its skip feature's site.
    """

    def __init__(self, widths, enc_blocks, dec_blocks, encoder="plain", decoders=None, in_ch=3, out_ch=3):
        super().__init__()
        depth = len(widths)
        decoders = decoders or ["cat"] * (depth - 1)
        self.encoder_kind, self.decoder_kinds, self.in_ch = encoder, list(decoders), in_ch
        chans = [in_ch, *widths]
        blocks = [BLOCKS[enc_blocks[i]](chans[i], chans[i + 1]) for i in range(depth)]
        self.pairs = {}
        if encoder == "list":
            self.encoder = ListEncoder(blocks)
            skip_sites = [f"encoder[{i}]" for i in range(depth)]
        else:
            for i, b in enumerate(blocks):
                self.add_module(f"enc{i}", SkipDown(b) if encoder == "skip_down" else b)
            skip_sites = [f"enc{i}[0]" if encoder == "skip_down" else f"enc{i}" for i in range(depth)]
            self.pool = nn.AvgPool2d(2)
        c = widths[-1]
        for j, kind in enumerate(self.decoder_kinds):  # decoder stage j: from level depth-1-j up to level depth-2-j
            lvl = depth - 2 - j
            skip_c, cout = widths[lvl], widths[lvl]
            name = f"dec{j}"
            if kind == "unetup":
                self.add_module(name, UNetUp(c, cout))
                c = cout + skip_c
                site = name
            elif kind == "pixelshuffle":
                self.add_module(f"up{j}", pixel_shuffle_up(c, cout))
                self.add_module(name, BLOCKS[dec_blocks[j]](cout + skip_c, cout))
                c = cout
                self.pairs[f"up{j}"] = skip_sites[lvl]  # the upsampler's output is at the skip's size too
                site = name
            else:
                self.add_module(f"up{j}", nn.Upsample(scale_factor=2))
                block = BLOCKS[dec_blocks[j]](c + skip_c, cout)
                self.add_module(name, SideOutput(block) if kind == "side" else block)
                c = cout
                site = f"{name}[0]" if kind == "side" else name
            self.pairs[site] = skip_sites[lvl]
        self.head = nn.Conv2d(c, out_ch, 1)

    def forward(self, x):
        if self.encoder_kind == "list":
            skips = self.run(self.encoder, x)
        else:
            skips, h = [], x
            for i in range(len(self.decoder_kinds) + 1):
                stage = getattr(self, f"enc{i}")
                if self.encoder_kind == "skip_down":
                    s, h = self.run(stage, h)
                    skips.append(s)
                else:
                    s = self.run(stage, h if i == 0 else self.pool(h))
                    skips.append(s)
                    h = s
        h = skips[-1]
        depth = len(skips)
        for j, kind in enumerate(self.decoder_kinds):
            skip = skips[depth - 2 - j]
            dec = getattr(self, f"dec{j}")
            if kind == "unetup":
                h = self.run(dec, h, skip)
            else:
                up = self.run(getattr(self, f"up{j}"), h)
                out = self.run(dec, torch.cat([up, skip], 1))
                h = out[0] if kind == "side" else out
        return self.head(h)


def random_net(seed: int) -> ComposedNet:
    """A random encoder-decoder composed of the patterns above (2 to 4 levels, widths 4 to 12, 1, 3 or 4 inputs)."""
    rng = random.Random(seed)
    depth = rng.choice((2, 3, 4))
    widths = [rng.choice((4, 6, 8, 12)) for _ in range(depth)]
    names = list(BLOCKS)
    enc_blocks = [rng.choice(names) for _ in range(depth)]
    dec_blocks = [rng.choice(names) for _ in range(depth - 1)]
    encoder = rng.choice(ENCODERS)
    decoders = [rng.choice(DECODERS) for _ in range(depth - 1)]
    in_ch = rng.choice((3, 3, 1, 4))
    return ComposedNet(widths, enc_blocks, dec_blocks, encoder, decoders, in_ch=in_ch, out_ch=in_ch)


# ----------------------------------------------------------------------------- the five properties
def measured_channels(net: nn.Module, pairs: dict, *inputs) -> dict:
    """{decoder site: (dec_channels, enc_channels)} from a real forward pass with hooks (independent of the drop-in)."""
    found, handles = {}, []
    sites = [parse_site("decoder", d) for d in pairs] + [parse_site("encoder", e) for e in pairs.values()]
    for s in sites:
        def hook(module, args, out, s=s):
            found[s.spec] = select(s, "site", out).shape[1]
        handles.append(net.get_submodule(s.module).register_forward_hook(hook))
    with torch.no_grad():
        net(*inputs)
    for h in handles:
        h.remove()
    return {d: (found[d], found[e]) for d, e in pairs.items()}


def perturb(ss, std=0.3):
    """Non-zero output projections, so that the stages change the output."""
    with torch.no_grad():
        for blk in ss.blocks.values():
            blk.out_proj.weight.normal_(0, std)
            blk.out_proj.bias.normal_(0, std)
    return ss


def _seeded(f, *args, **kwargs):
    torch.manual_seed(123)  # DropPath draws random numbers: the same ones in each compared forward
    return f(*args, **kwargs)


def _grads(ss, x, g):
    ss.zero_grad(set_to_none=True)
    out = _seeded(ss, x, guidance=g)
    (out.square().mean() + ss.alignment_loss()).backward()
    return {n: p.grad.clone() for n, p in ss.named_parameters() if p.grad is not None}


def check_five(make, pairs, x, *, steps=2):
    """The five drop-in properties of `make()` wrapped with `pairs` and no options; returns the wrapper."""
    torch.manual_seed(0)
    net = make()
    plain = copy.deepcopy(net)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no definitions fallback, no other warning
        ss = semantic_sensitive(net, pairs)
    g = torch.rand(x.shape[0], 1, *x.shape[-2:])
    # 1. Stages at construction, sized as a real forward pass measures the sites.
    assert ss.materialized
    expected = measured_channels(copy.deepcopy(plain).eval(), pairs, x)
    got = {d: (ss.blocks[d.replace(".", "__")].dec_channels, ss.blocks[d.replace(".", "__")].enc_channels)
           for d in pairs}
    assert got == expected, (got, expected)
    opt = torch.optim.Adam(ss.parameters(), lr=1e-2)  # built before any forward: it must see the stages
    # 2. Identity, bit for bit.
    assert torch.equal(_seeded(ss, x, guidance=g), _seeded(plain, x))
    # 3. deepcopy: an independent wrapper.
    perturb(ss)
    out = _seeded(ss, x, guidance=g)
    twin = copy.deepcopy(ss)
    assert torch.equal(_seeded(twin, x, guidance=g), out)
    with torch.no_grad():
        for p in twin.blocks.parameters():
            p.mul_(0.5)
    assert not torch.equal(_seeded(twin, x, guidance=g), out)
    assert torch.equal(_seeded(ss, x, guidance=g), out)
    # 4. Training changes the output (the optimizer built at construction trains the stages).
    before = [blk.q_proj.weight.detach().clone() for blk in ss.blocks.values()]
    for _ in range(steps):
        opt.zero_grad()
        loss = _seeded(ss, x, guidance=g).square().mean() + ss.alignment_loss()
        loss.backward()
        opt.step()
    assert all(not torch.equal(b, blk.q_proj.weight) for b, blk in zip(before, ss.blocks.values()))
    assert not torch.equal(_seeded(ss, x, guidance=g), out)
    # 5. Activation checkpointing recomputes the same stages: the same gradients.
    ck = copy.deepcopy(ss)
    ck.model.use_checkpoint = True
    ref, got = _grads(ss, x, g), _grads(ck, x, g)
    assert ref.keys() == got.keys() and any(k.startswith("blocks.") for k in ref)
    for name, grad in ref.items():
        torch.testing.assert_close(got[name], grad, rtol=1e-5, atol=1e-6, msg=name)
    return ss
