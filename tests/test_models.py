"""ssattn.models: the baseline U-Net and its -SS version."""

import warnings

import pytest
import torch

from ssattn.dropin import SemanticSensitive
from ssattn.models import DEFAULT_PAIRS, UNet, unet_ss

warnings.filterwarnings("ignore", message=r"ssattn\..*falling back")


def _randomise_head(net):
    with torch.no_grad():
        net.head.weight.normal_(0, 0.3)
        net.head.bias.normal_(0, 0.3)


def test_unet_shapes_and_named_stages():
    net = UNet(width=4)
    x = torch.rand(2, 3, 24, 40)
    feats = {}
    names = ("enc1", "enc2", "enc3", "bottleneck", "dec3", "dec2", "dec1")
    for n in names:
        getattr(net, n).register_forward_hook(lambda m, a, o, n=n: feats.__setitem__(n, o.shape))
    y = net(x)
    assert y.shape == x.shape
    assert feats["enc1"] == (2, 4, 24, 40) and feats["enc3"] == (2, 16, 6, 10)
    assert feats["bottleneck"] == (2, 32, 3, 5)
    assert feats["dec3"] == (2, 16, 6, 10) and feats["dec2"] == (2, 8, 12, 20) and feats["dec1"] == (2, 4, 24, 40)
    # The zero-initialised residual head makes a new network the identity on its input.
    assert torch.equal(y, x)


def test_unet_rejects_bad_input():
    net = UNet(width=4)
    with pytest.raises(ValueError, match="divisible by 8"):
        net(torch.rand(1, 3, 20, 16))
    with pytest.raises(ValueError, match=r"x must have shape \(B, 3, H, W\)"):
        net(torch.rand(1, 1, 16, 16))
    with pytest.raises(ValueError, match="width"):
        UNet(width=0)


def test_unet_ss_default_pairs_identity_and_levels():
    torch.manual_seed(1)
    ss = unet_ss(width=4)
    assert isinstance(ss, SemanticSensitive) and ss.pairs == DEFAULT_PAIRS and ss.materialized
    _randomise_head(ss.model)
    plain = UNet(width=4)
    plain.load_state_dict(ss.model.state_dict())
    x, g = torch.rand(2, 3, 16, 24), torch.rand(2, 1, 16, 24)
    assert torch.equal(ss(x, guidance=g), plain(x))
    assert {k: tuple(v.shape) for k, v in ss.blocks["dec2"].state_dict().items()}["q_proj.weight"] == (8, 8, 1, 1)
    sub = unet_ss(width=4, levels=("dec3", "dec2"))
    assert list(sub.pairs) == ["dec3", "dec2"]
    with pytest.raises(ValueError, match="not decoder stages"):
        unet_ss(width=4, levels=("dec4",))


def test_unet_ss_attention_and_align_levels():
    both = unet_ss(width=4, levels=("dec3", "dec2"))
    assert list(both.pairs) == ["dec3", "dec2"] and both.align_sites == ["dec3", "dec2"]
    att = unet_ss(width=4, attention_levels=("dec3",))  # the alignment part follows levels: every stage
    assert list(att.pairs) == ["dec3"] and list(att.blocks) == ["dec3"] and att.align_sites == ["dec3", "dec2", "dec1"]
    mixed = unet_ss(width=4, levels=("dec2", "dec3"), align_levels=("dec1",))
    assert list(mixed.pairs) == ["dec3", "dec2"] and mixed.align_sites == ["dec1"]
    attention_only = unet_ss(width=4, align_levels=())
    assert len(attention_only.blocks) == 3 and attention_only.align_sites == []
    x, g = torch.rand(2, 3, 16, 16), torch.rand(2, 1, 16, 16)
    attention_only(x, guidance=g)
    assert attention_only.alignment_loss().item() == 0.0
    for bad, match in [(dict(align_levels=("dec4",)), r"align_levels \['dec4'\] are not decoder stages"),
                       (dict(attention_levels=["dec0"]), r"attention_levels \['dec0'\]"),
                       (dict(levels=()), "at least one stage"),
                       (dict(attention_levels=(), align_levels=()), "at least one stage")]:
        with pytest.raises(ValueError, match=match):
            unet_ss(width=4, **bad)


def test_unet_ss_alignment_only_is_the_plain_unet_plus_its_loss():
    torch.manual_seed(4)
    ss = unet_ss(width=4, attention_levels=(), align_levels=("dec2",), eta=0.5, weight=0.3)
    assert len(ss.blocks) == 0 and ss.align_sites == ["dec2"]
    _randomise_head(ss.model)
    plain = UNet(width=4)
    plain.load_state_dict(ss.model.state_dict())
    x, g = torch.rand(2, 3, 16, 24), torch.rand(2, 1, 16, 24)
    assert torch.equal(ss(x, guidance=g), plain(x))
    feats = {}
    plain.dec2.register_forward_hook(lambda m, a, o: feats.__setitem__("dec2", o))
    plain(x)
    f = feats["dec2"]
    m = torch.nn.functional.interpolate(g, size=f.shape[-2:], mode="area")
    expected = 0.3 * (f.square().mul((1 - m) ** 2).mean() - 0.5 * (f * m).mean())
    torch.testing.assert_close(ss.alignment_loss(), expected)


def test_unet_ss_trains_its_attention():
    torch.manual_seed(2)
    ss = unet_ss(width=4, heads=2)
    _randomise_head(ss.model)
    x, g, ref = torch.rand(2, 3, 16, 16), torch.rand(2, 1, 16, 16), torch.rand(2, 3, 16, 16)
    opt = torch.optim.Adam(ss.parameters(), lr=1e-2)
    before = ss(x, guidance=g).detach()
    for _ in range(2):
        loss = (ss(x, guidance=g) - ref).abs().mean() + ss.alignment_loss()
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert all(blk.out_proj.weight.abs().sum() > 0 for blk in ss.blocks.values())
    assert not torch.allclose(ss(x, guidance=g), before)


@pytest.mark.gpu
@pytest.mark.parametrize("amp", [False, True])
def test_unet_ss_cuda_fused_matches_reference(amp):
    """The -SS U-Net with backend="auto" (fused kernels) against backend="reference", forward and gradients."""
    torch.manual_seed(3)
    fused = unet_ss(width=8, heads=2).cuda()
    ref = unet_ss(width=8, heads=2, backend="reference").cuda()
    with torch.no_grad():
        for blk in fused.blocks.values():
            blk.out_proj.weight.normal_(0, 0.1)
        _randomise_head(fused.model)
    ref.load_state_dict(fused.state_dict())
    for blk in ref.blocks.values():
        blk.backend = "reference"
    x, g = torch.rand(2, 3, 64, 56, device="cuda"), torch.rand(2, 1, 64, 56, device="cuda")
    outs, grads = [], []
    for model in (fused, ref):
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=amp):
            y = model(x, guidance=g)
            loss = y.float().square().mean() + model.alignment_loss()
        loss.backward()
        outs.append(y.float())
        grads.append({n: p.grad.float() for n, p in model.named_parameters()})
    tol = dict(rtol=5e-2, atol=5e-2) if amp else dict(rtol=1e-3, atol=1e-4)
    torch.testing.assert_close(outs[0], outs[1], **tol)
    for n in grads[1]:
        torch.testing.assert_close(grads[0][n], grads[1][n], **tol, msg=n)
