"""Text stages in the one drop-in wrapper (issue 17): ssattn.text_guided, alone and with -SS stages.

Each pattern on a small network of its own: identity at construction,
agreement with a hand-written forward, training moves the output (and the
text matters), the context manager, copies, activation checkpointing, reused
modules, channel discovery, state_dict, torch.compile, and the errors.
"""

import copy
import warnings

import pytest
import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

import ssattn
from ssattn.models import UNet
from ssattn.text import TextConditioning, TextFeatures
from tests._accuracy import assert_same_sums

warnings.filterwarnings("ignore", message=r"ssattn\..*falling back")
CT = 12


class SmallUNet(nn.Module):
    def __init__(self, use_checkpoint=False):
        super().__init__()
        self.enc1 = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.ReLU())
        self.enc2 = nn.Sequential(nn.AvgPool2d(2), nn.Conv2d(4, 8, 3, padding=1), nn.ReLU())
        self.up = nn.Upsample(scale_factor=2)
        self.dec1 = nn.Conv2d(12, 4, 3, padding=1)
        self.head = nn.Conv2d(4, 3, 1)
        self.use_checkpoint = use_checkpoint

    def _run(self, block, *args):
        return checkpoint(block, *args, use_reentrant=False) if self.use_checkpoint else block(*args)

    def forward(self, x):
        e1 = self._run(self.enc1, x)
        e2 = self._run(self.enc2, e1)
        return self.head(self._run(lambda a, b: self.dec1(torch.cat([self.up(a), b], 1)), e2, e1))


def _text(B=2, L=5, padded_from=3):
    words = torch.randn(B, L, CT)
    mask = torch.zeros(B, L, dtype=torch.bool)
    mask[-1, padded_from:] = True
    return words, mask


def _perturb(ss, std=0.5):
    with torch.no_grad():
        for blk in ss.text_blocks.values():
            for name, p in blk.named_parameters():
                if "out_proj" in name:
                    p.normal_(0, std)
    return ss


def test_new_text_wrapper_gives_the_models_outputs_bit_for_bit():
    torch.manual_seed(0)
    net = SmallUNet()
    x = torch.randn(2, 3, 8, 8)
    plain = net(x)
    ss = ssattn.text_guided(net, ["enc2", "dec1"], text_channels=CT, heads=2)
    assert ss.materialized and set(ss.text_blocks) == {"enc2", "dec1"} and not ss.takes_map and ss.takes_text
    assert torch.equal(ss(x, text=_text()), plain)
    assert torch.equal(net(x), plain)  # the bare model outside ss(...) is the plain model


def test_text_stages_refine_the_outputs_like_a_hand_written_forward():
    torch.manual_seed(1)
    ss = _perturb(ssattn.text_guided(SmallUNet(), ["enc2", "dec1"], text_channels=CT, heads=2))
    x = torch.randn(2, 3, 8, 8)
    words, mask = _text()
    net, blocks = ss.model, ss.text_blocks
    e1 = net.enc1(x)
    e2 = blocks["enc2"](net.enc2(e1), words, mask)
    expect = net.head(blocks["dec1"](net.dec1(torch.cat([net.up(e2), e1], 1)), words, mask))
    torch.testing.assert_close(ss(x, text=(words, mask)), expect, rtol=0, atol=0)
    # TextFeatures with per-word weights, and the context manager, give the same as the call argument
    weight = torch.rand(2, 5)
    y = ss(x, text=TextFeatures(words, mask, weight))
    with ss.guidance(text=(words, mask, weight)):
        torch.testing.assert_close(ss.model(x), y, rtol=0, atol=0)


def test_training_a_few_steps_moves_the_output_and_the_text_matters():
    torch.manual_seed(2)
    ss = ssattn.text_guided(UNet(3, 3, 8), ["dec2", "dec1"], text_channels=CT, heads=2)
    x, target = torch.rand(2, 3, 16, 16), torch.rand(2, 3, 16, 16)
    words, mask = _text()
    before = ss(x, text=(words, mask)).detach()
    opt = torch.optim.Adam(ss.parameters(), lr=1e-2)
    start = [p.detach().clone() for p in ss.text_blocks.parameters()]
    for _ in range(4):
        opt.zero_grad()
        loss = (ss(x, text=(words, mask)) - target).abs().mean()
        loss.backward()
        opt.step()
    after = ss(x, text=(words, mask)).detach()
    assert (after - before).abs().max() > 1e-3
    moved = [not torch.equal(a, p) for a, p in zip(start, ss.text_blocks.parameters())]
    assert any(moved)
    other = ss(x, text=(torch.randn_like(words), mask)).detach()
    assert (other - after).abs().max() > 1e-6  # the words steer the output


def test_one_wrapper_holds_ss_and_text_stages():
    torch.manual_seed(3)
    ss = ssattn.semantic_sensitive(SmallUNet(), {"dec1": "enc1"}, text_stages=["enc2"], text_channels=CT)
    assert ss.takes_map and ss.takes_text and set(ss.blocks) == {"dec1"} and set(ss.text_blocks) == {"enc2"}
    _perturb(ss)
    x, g = torch.randn(2, 3, 8, 8), torch.rand(2, 1, 8, 8)
    words, mask = _text()
    y = ss(x, guidance=g, text=(words, mask))
    loss = y.square().mean() + ss.alignment_loss()
    loss.backward()
    assert ss.text_blocks["enc2"].cross.q_proj.weight.grad.abs().sum() > 0
    assert ss.blocks["dec1"].q_proj.weight.grad is not None
    with pytest.raises(TypeError, match="needs text"):
        ss(x, guidance=g)
    with pytest.raises(TypeError, match="needs a guidance map"):
        ss(x, text=(words, mask))
    with pytest.raises(TypeError, match="needs a map and text"):
        with ss.guidance(g):
            pass
    keys = set(ss.state_dict())
    assert "text_blocks.enc2.cross.q_proj.weight" in keys and "blocks.dec1.q_proj.weight" in keys


def test_text_only_wrapper_errors():
    ss = ssattn.text_guided(SmallUNet(), "dec1", text_channels=CT)
    x = torch.randn(2, 3, 8, 8)
    words, mask = _text()
    with pytest.raises(TypeError, match="needs text"):
        ss(x)
    with pytest.raises(ValueError, match="no -SS stages"):
        ss(x, guidance=torch.rand(2, 1, 8, 8), text=(words, mask))
    with pytest.raises(ValueError, match=f"words must have {CT} features"):
        ss(x, text=(words[..., :5], mask))
    with pytest.raises(ValueError, match="batch 1"):
        ss(x, text=(words[:1], mask[:1]))
    with pytest.raises(TypeError, match="mask must be a bool"):
        ss(x, text=(words, mask.float()))
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        ss(x, text=(words, mask, torch.full((2, 5), 2.0)))
    with pytest.raises(RuntimeError, match="no -SS stages"):
        ss.alignment_loss()
    with pytest.raises(ValueError, match="not in the model"):
        ssattn.text_guided(SmallUNet(), ["dec9"], text_channels=CT)
    with pytest.raises(ValueError, match="text_channels"):
        ssattn.text_guided(SmallUNet(), ["dec1"], text_channels=0)
    with pytest.raises(ValueError, match="no text_stages"):
        ssattn.semantic_sensitive(SmallUNet(), {"dec1": "enc1"}, text_channels=CT)
    with pytest.raises(ValueError, match="already"):
        ssattn.text_guided(ss, ["model.dec1"], text_channels=CT)


def test_text_stage_channels_measured_or_from_example_inputs_or_channels():
    class Block(nn.Module):  # its channel count is not in a readable attribute
        def forward(self, x):
            return torch.cat([x, x], 1)

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(3, 4, 1)
            self.dup = Block()

        def forward(self, x):
            return self.dup(self.conv(x))

    x = torch.randn(2, 3, 4, 4)
    measured = ssattn.text_guided(Net(), ["dup"], text_channels=CT)  # by the dry run at construction
    probed = ssattn.text_guided(Net(), ["dup"], text_channels=CT, example_inputs=(x,))
    given = ssattn.text_guided(Net(), ["dup"], text_channels=CT, channels={"dup": 8})
    assert {m.text_blocks["dup"].img_channels for m in (measured, probed, given)} == {8}
    with pytest.raises(ValueError, match="a positive integer"):
        ssattn.text_guided(Net(), ["dup"], text_channels=CT, channels={"dup": (8, 8)})
    wrong = ssattn.text_guided(Net(), ["dup"], text_channels=CT, channels={"dup": 6})
    with pytest.raises(ValueError, match=r"gives 8 channels.*channels=\{'dup': 8\}"):
        wrong(x, text=_text())


def test_deepcopy_and_checkpointing_with_text_stages():
    torch.manual_seed(4)
    ck = _perturb(ssattn.text_guided(SmallUNet(use_checkpoint=True), ["enc2", "dec1"], text_channels=CT), 0.3)
    ck = ck.double()
    plain = copy.deepcopy(ck)
    plain.model.use_checkpoint = False
    x = torch.randn(2, 3, 8, 8, dtype=torch.float64)
    words, mask = _text()
    words = words.double().requires_grad_()
    grads = []
    for ss in (ck, plain):
        ss(x, text=(words, mask)).square().mean().backward()
        grads.append({n: p.grad for n, p in ss.named_parameters()})
    assert_same_sums(grads[0], grads[1])  # float64: the same terms, summed in another order at most
    assert grads[0]["text_blocks.dec1.cross.k_proj.weight"].abs().sum() > 0


def test_a_reused_text_stage_module_refines_each_call_and_warns_once():
    class Twice(nn.Module):
        def __init__(self):
            super().__init__()
            self.block = nn.Conv2d(4, 4, 3, padding=1)
            self.stem, self.head = nn.Conv2d(3, 4, 1), nn.Conv2d(4, 3, 1)

        def forward(self, x):
            return self.head(self.block(self.block(self.stem(x))))

    ss = _perturb(ssattn.text_guided(Twice(), ["block"], text_channels=CT))
    x = torch.randn(2, 3, 6, 6)
    words, mask = _text()
    with pytest.warns(UserWarning, match="text stage module 'block' ran 2 times"):
        y = ss(x, text=(words, mask))
    net, blk = ss.model, ss.text_blocks["block"]
    once = blk(net.block(net.stem(x)), words, mask)
    torch.testing.assert_close(y, net.head(blk(net.block(once), words, mask)), rtol=0, atol=0)
    pinned = ssattn.text_guided(Twice(), ["block#1"], text_channels=CT)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        pinned(x, text=(words, mask))


def test_text_wrapper_compiles_fullgraph():
    torch._dynamo.reset()
    ss = _perturb(ssattn.text_guided(SmallUNet(), ["dec1"], text_channels=CT, heads=2))
    x = torch.randn(2, 3, 8, 8)
    words, mask = _text()
    compiled = torch.compile(ss, fullgraph=True, backend="aot_eager")
    torch.testing.assert_close(compiled(x, text=(words, mask)), ss(x, text=(words, mask)))


def test_stage_module_is_the_tcm_block():
    ss = ssattn.text_guided(SmallUNet(), ["dec1"], text_channels=CT, intra_text=False, intra_image=True)
    blk = ss.text_blocks["dec1"]
    assert isinstance(blk, TextConditioning) and blk.word_attn is None and blk.image_attn is not None


def test_text_stages_under_autocast_and_channels_last():
    torch.manual_seed(5)
    ss = _perturb(ssattn.text_guided(UNet(3, 3, 8), ["dec2"], text_channels=CT, heads=2))
    torch.nn.init.normal_(ss.model.head.weight, std=0.3)  # the U-Net's zero head would hide every stage
    x = torch.rand(2, 3, 16, 16)
    words, mask = _text()
    expect = ss(x, text=(words, mask))
    assert (expect - ss(x, text=(torch.randn_like(words), mask))).abs().max() > 1e-3
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = ss(x, text=(words, mask))
    torch.testing.assert_close(y.float(), expect, rtol=0.05, atol=0.05)
    ss_cl = ss.to(memory_format=torch.channels_last)
    y_cl = ss_cl(x.contiguous(memory_format=torch.channels_last), text=(words, mask))
    torch.testing.assert_close(y_cl, expect, rtol=1e-5, atol=1e-5)


def test_a_site_with_both_kinds_of_stage_is_refined_by_both_and_recomputed_right():
    torch.manual_seed(6)

    def build(use_checkpoint):
        torch.manual_seed(6)
        ss = ssattn.semantic_sensitive(SmallUNet(use_checkpoint), {"dec1": "enc1"}, text_stages=["dec1"],
                                       text_channels=CT)
        with torch.no_grad():
            for p in ss.blocks.parameters():
                p.normal_(0, 0.3)
        return _perturb(ss, 0.3)

    ck, plain = build(True).double(), build(False).double()
    x, g = torch.randn(2, 3, 8, 8, dtype=torch.float64), torch.rand(2, 1, 8, 8, dtype=torch.float64)
    words, mask = _text()
    words = words.double()
    net = plain.model
    e1 = net.enc1(x)
    d = net.dec1(torch.cat([net.up(net.enc2(e1)), e1], 1))
    d = plain.text_blocks["dec1"](plain.blocks["dec1"](d, e1, g), words, mask)  # -SS first, then the text
    torch.testing.assert_close(plain(x, guidance=g, text=(words, mask)), net.head(d), rtol=0, atol=0)
    grads = []
    for ss in (ck, plain):
        (ss(x, guidance=g, text=(words, mask)).square().mean() + ss.alignment_loss()).backward()
        grads.append({n: p.grad for n, p in ss.named_parameters()})
    assert_same_sums(grads[0], grads[1])  # float64: the same terms, summed in another order at most
