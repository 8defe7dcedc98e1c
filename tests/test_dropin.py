"""ssattn.dropin.semantic_sensitive: hooks, identity at construction, exact refinement, state, errors."""

import copy
import os
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from ssattn.dropin import SemanticSensitive, remove_semantic_sensitive, semantic_sensitive
from ssattn.semantic.modules import SemanticCrossAttention
from ssattn.reference import alignment_loss as ref_alignment_loss
from tests._accuracy import assert_same_sums

warnings.filterwarnings("ignore", message=r"ssattn\..*falling back")


class Block(nn.Module):
    """A custom block: channel count not readable from the definition (forces a probe)."""

    def __init__(self, cin, cout):
        super().__init__()
        self.a = nn.Conv2d(cin, cout, 3, padding=1)

    def forward(self, x):
        return torch.tanh(self.a(x))


class ToyNet(nn.Module):
    """Concatenation, additive and gated skips; dec_add's skip partner is at a different size."""

    def __init__(self, custom=False):
        super().__init__()
        mk = Block if custom else (lambda i, o: nn.Sequential(nn.Conv2d(i, o, 3, padding=1), nn.ReLU()))
        self.enc1 = mk(3, 8)                                         # H
        self.enc2 = nn.Sequential(nn.AvgPool2d(2), mk(8, 12))        # H/2
        self.mid = nn.Sequential(nn.AvgPool2d(2), mk(12, 12))        # H/4
        self.up = nn.Upsample(scale_factor=2)
        self.dec_cat = nn.Conv2d(24, 12, 3, padding=1)               # H/2, concat skip
        self.dec_add = mk(12, 12)                                    # H/2, additive skip
        self.gate = nn.Conv2d(8, 1, 1)
        self.dec_gate = nn.Conv2d(12, 8, 3, padding=1)               # H, gated skip
        self.head = nn.Conv2d(8, 3, 1)

    def forward(self, x):
        e1 = self.enc1(x)
        e2 = self.enc2(e1)
        m = self.mid(e2)
        d = self.dec_cat(torch.cat([self.up(m), e2], 1))
        d = self.dec_add(d + e2)
        d = self.dec_gate(self.up(d)) * torch.sigmoid(self.gate(e1))
        return self.head(d)


PAIRS = {"dec_cat": "enc2", "dec_add": "enc1", "dec_gate": "enc1"}


def _inputs(B=2, H=16, W=12, dtype=torch.float32):
    x = torch.randn(B, 3, H, W, dtype=dtype)
    g = torch.rand(B, 1, H, W, dtype=dtype)
    return x, g


def _perturb(ss, std=0.5):
    """Non-zero output projections so the stages do something."""
    with torch.no_grad():
        for blk in ss.blocks.values():
            blk.out_proj.weight.normal_(0, std)
            blk.out_proj.bias.normal_(0, std)
    return ss


def _manual(net, blocks, x, g):
    """ToyNet.forward with the -SS stages written out by hand."""
    e1 = net.enc1(x)
    e2 = net.enc2(e1)
    m = net.mid(e2)
    d = net.dec_cat(torch.cat([net.up(m), e2], 1))
    d = blocks["dec_cat"](d, e2, g)
    f1 = d
    d = blocks["dec_add"](net.dec_add(d + e2), e1, g)
    f2 = d
    d = blocks["dec_gate"](net.dec_gate(net.up(d)), e1, g)
    f3 = d
    d = d * torch.sigmoid(net.gate(e1))
    return net.head(d), [f1, f2, f3]


@pytest.mark.parametrize("custom", [False, True])
def test_identity_at_construction_bit_for_bit(custom):
    net = ToyNet(custom)
    x, g = _inputs()
    expected = net(x)
    ss = semantic_sensitive(net, PAIRS)
    assert ss.materialized  # custom blocks too: read from the last layer that makes their output
    out = ss(x, guidance=g)
    assert torch.equal(out, expected)


def test_channels_read_or_probed_at_construction():
    ss = semantic_sensitive(ToyNet(), PAIRS)
    assert ss.blocks["dec_cat"].dec_channels == 12 and ss.blocks["dec_cat"].enc_channels == 12
    assert ss.blocks["dec_gate"].dec_channels == 8 and ss.blocks["dec_gate"].enc_channels == 8
    custom = semantic_sensitive(ToyNet(custom=True), PAIRS)
    assert custom.blocks["dec_add"].dec_channels == 12 and custom.blocks["dec_add"].enc_channels == 8
    x, _ = _inputs()
    probed = semantic_sensitive(ToyNet(custom=True), PAIRS, example_inputs=(x,))
    assert [b.enc_channels for b in probed.blocks.values()] == [12, 8, 8]
    explicit = semantic_sensitive(ToyNet(custom=True), PAIRS,
                                  channels={"dec_cat": (12, 12), "dec_add": (12, 8), "dec_gate": (8, 8)})
    assert explicit.materialized


@pytest.mark.parametrize("heads", [1, 2])
def test_refinement_matches_hand_written_forward(heads):
    net = ToyNet()
    plain = copy.deepcopy(net)  # a hook-free twin for the hand-written forward
    ss = _perturb(semantic_sensitive(net, PAIRS, heads=heads, backend="reference"))
    x, g = _inputs(B=3, H=8, W=16)
    out = ss(x, guidance=g)
    expected, feats = _manual(plain, ss.blocks, x, g)
    torch.testing.assert_close(out, expected, rtol=0, atol=0)
    assert not torch.allclose(out, net.head.bias.view(1, 3, 1, 1).expand_as(out))
    for name, f in zip(PAIRS, feats):
        torch.testing.assert_close(ss.decoder_features()[name], f, rtol=0, atol=0)


def test_alignment_loss_matches_reference_float64():
    net = ToyNet().double()
    ss = _perturb(semantic_sensitive(net, PAIRS, eta=0.7, weight=0.1, level_weights=[1.0, 2.0, 0.5]))
    x, g = _inputs(B=2, H=16, W=12, dtype=torch.float64)
    ss(x, guidance=g)
    loss = ss.alignment_loss()
    feats = list(ss.decoder_features().values())
    maps = [F.interpolate(g, size=f.shape[-2:], mode="area") for f in feats]
    expected = 0.1 * ref_alignment_loss(feats, maps, eta=0.7, weights=[1.0, 2.0, 0.5], reduction="mean")
    torch.testing.assert_close(loss, expected)


def test_every_parameter_gets_a_gradient():
    ss = _perturb(semantic_sensitive(ToyNet(), PAIRS))
    x, g = _inputs()
    (ss(x, guidance=g).square().mean() + ss.alignment_loss()).backward()
    missing = [n for n, p in ss.named_parameters() if p.grad is None or not torch.isfinite(p.grad).all()]
    assert not missing
    assert all(p.grad.abs().sum() > 0 for n, p in ss.named_parameters() if n.startswith("blocks."))


def test_state_dict_roundtrip_and_to(tmp_path):
    ss = _perturb(semantic_sensitive(ToyNet(), PAIRS))
    x, g = _inputs()
    out = ss(x, guidance=g)
    path = os.path.join(tmp_path, "ss.pt")
    torch.save(ss.state_dict(), path)
    assert any(k.startswith("blocks.dec_gate.") for k in ss.state_dict())
    fresh = semantic_sensitive(ToyNet(), PAIRS)
    fresh.load_state_dict(torch.load(path, weights_only=True))
    torch.testing.assert_close(fresh(x, guidance=g), out, rtol=0, atol=0)
    fresh.to(torch.float64)
    assert all(p.dtype == torch.float64 for p in fresh.parameters())
    out64 = fresh(x.double(), guidance=g.double())
    torch.testing.assert_close(out64.float(), out, rtol=1e-4, atol=1e-5)


def test_remove_restores_the_model():
    net = ToyNet()
    x, g = _inputs()
    plain = net(x)
    ss = _perturb(semantic_sensitive(net, PAIRS))
    assert not torch.equal(ss(x, guidance=g), plain)
    assert torch.equal(net(x), plain)  # the bare model called directly runs as the plain model
    back = remove_semantic_sensitive(ss)
    assert back is net
    assert all(not m._forward_hooks for m in net.modules())
    assert torch.equal(net(x), plain)
    with pytest.raises(RuntimeError, match="removed"):
        ss(x, guidance=g)


def test_errors_name_the_problem():
    net = ToyNet()
    with pytest.raises(ValueError, match=r"decoder module 'dec_cta'.*close matches: \['dec_cat'"):
        semantic_sensitive(net, {"dec_cta": "enc1"})
    with pytest.raises(ValueError, match=r"encoder module 'enc3'"):
        semantic_sensitive(net, {"dec_cat": "enc3"})
    with pytest.raises(ValueError, match="non-empty"):
        semantic_sensitive(net, {})
    ss = semantic_sensitive(net, PAIRS)
    x, g = _inputs(H=16, W=12)
    with pytest.raises(TypeError, match="guidance"):
        ss(x)
    with pytest.raises(ValueError, match=r"guidance must have the input image's batch and size \(2, 1, 16, 12\)"):
        ss(x, guidance=g[..., :8, :8])
    with pytest.raises(ValueError, match=r"guidance must be a map of shape \(B, 1, H, W\)"):
        ss(x, guidance=g[:, 0])
    with pytest.raises(ValueError, match="guidance must have values in"):
        ss(x, guidance=g + 1)
    with pytest.raises(RuntimeError, match="forward call first"):
        semantic_sensitive(ToyNet(), PAIRS).alignment_loss()
    # An encoder that runs after its decoder cannot be a skip partner.
    with pytest.raises(RuntimeError, match="gives no skip feature to decoder module 'dec_cat'.*runs after the decoder"):
        semantic_sensitive(ToyNet(), {"dec_cat": "head"}, channels={"dec_cat": (12, 3)})(x, guidance=g)


def test_guidance_range_checked_once_per_call(monkeypatch):
    """One range check (one host sync on the GPU) per forward, none in the stages or the loss."""
    from ssattn import _checks

    calls = []
    real = _checks.unit_interval
    monkeypatch.setattr(_checks, "unit_interval", lambda name, x: (calls.append(name), real(name, x)))
    ss = semantic_sensitive(ToyNet(), PAIRS)
    x, g = _inputs(H=16, W=12)
    (ss(x, guidance=g).sum() + ss.alignment_loss()).backward()
    assert calls == ["guidance"]


def test_autocast_bf16_cpu():
    ss = _perturb(semantic_sensitive(ToyNet(), PAIRS), std=0.1)
    x, g = _inputs()
    ref = ss(x, guidance=g)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = ss(x, guidance=g)
        loss = ss.alignment_loss()
    assert out.dtype == torch.bfloat16 and loss.dtype == torch.float32
    assert torch.isfinite(out).all()
    torch.testing.assert_close(out.float(), ref, rtol=0.05, atol=0.05)


@pytest.mark.parametrize("backend", ["eager", pytest.param("aot_eager", marks=pytest.mark.slow)])
def test_torch_compile_matches_eager(backend):
    torch._dynamo.reset()
    ss = _perturb(semantic_sensitive(ToyNet(), PAIRS, backend="reference"), std=0.2)
    x, g = _inputs()
    ref = ss(x, guidance=g)
    ref_loss = ss.alignment_loss()
    compiled = torch.compile(ss, backend=backend)
    out = compiled(x, guidance=g)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(ss.alignment_loss(), ref_loss, rtol=1e-5, atol=1e-6)
    out.sum().backward()
    assert all(p.grad is not None for p in ss.blocks.parameters())


def _ddp_worker(rank, world, port, state, x, g, out_dir):
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel as DDP

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    torch.set_num_threads(1)
    ss = semantic_sensitive(ToyNet(), PAIRS).double()
    ss.load_state_dict(state)
    ddp = DDP(ss)
    out = ddp(x[rank::world], guidance=g[rank::world])
    loss = out.square().mean() + ss.alignment_loss()
    loss.backward()
    torch.save({n: p.grad.clone() for n, p in ss.named_parameters()}, os.path.join(out_dir, f"grads{rank}.pt"))
    dist.destroy_process_group()


@pytest.mark.slow  # two spawned interpreters importing torch: ~10 s alone, over a minute on a loaded CI box
def test_ddp_two_process_gloo(tmp_path):
    import socket

    import torch.multiprocessing as mp

    ss = _perturb(semantic_sensitive(ToyNet(), PAIRS), std=0.2).double()
    state = copy.deepcopy(ss.state_dict())
    x, g = _inputs(B=4, dtype=torch.float64)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.start_processes(_ddp_worker, args=(2, port, state, x, g, str(tmp_path)), nprocs=2, join=True,
                       start_method="spawn")
    grads = {r: torch.load(os.path.join(tmp_path, f"grads{r}.pt"), weights_only=True) for r in range(2)}
    # DDP averages the per-rank gradients: compare with the mean of single-process gradients per shard.
    expected = {n: torch.zeros_like(p) for n, p in ss.named_parameters()}
    for r in range(2):
        ss.zero_grad()
        out = ss(x[r::2], guidance=g[r::2])
        (out.square().mean() + ss.alignment_loss()).backward()
        for n, p in ss.named_parameters():
            expected[n] += p.grad / 2
    assert_same_sums(grads[0], expected)  # float64: the same terms, summed in another order at most
    for n in expected:
        torch.testing.assert_close(grads[1][n], grads[0][n], rtol=0, atol=0)
