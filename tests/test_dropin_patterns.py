"""The drop-in on patterns of real networks and training code (issue 15), each from a small network of its own.

Stages at construction for custom blocks, copies (EMA), activation
checkpointing, reused modules, structured outputs, in-place changes after a
hooked module, calls that bypass hooks, the guidance context manager, and the
error messages.
"""

import copy
import io
import re
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from ssattn.dropin import semantic_sensitive
from ssattn.semantic.modules import SemanticCrossAttention
from tests._accuracy import assert_same_sums

warnings.filterwarnings("ignore", message=r"ssattn\..*falling back")


def _inputs(B=2, C=3, H=8, W=8):
    return torch.randn(B, C, H, W), torch.rand(B, 1, H, W)


def _perturb(ss, std=0.5):
    with torch.no_grad():
        for blk in ss.blocks.values():
            blk.out_proj.weight.normal_(0, std)
            blk.out_proj.bias.normal_(0, std)
    return ss


def _twin(ss):
    """A hook-free copy of the wrapped model, and copies of the stages, for hand-written forwards."""
    ss_copy = copy.deepcopy(ss)
    return ss_copy.remove(), ss_copy.blocks


# ----------------------------------------------------------------------------- stages at construction
class ConvBlock(nn.Module):
    """A custom block (not a Sequential): conv, norm, activation, residual."""

    def __init__(self, cin, cout):
        super().__init__()
        self.conv = nn.Conv2d(cin, cout, 3, padding=1)
        self.norm = nn.GroupNorm(1, cout)
        self.act = nn.GELU()

    def forward(self, x):
        return self.act(self.norm(self.conv(x)))


class TokenBlock(nn.Module):
    """A transformer-style block: tokens channels-last through LayerNorm and Linear, back to (B, C, H, W)."""

    def __init__(self, cin, cout):
        super().__init__()
        self.embed = nn.Conv2d(cin, cout, 1)
        self.norm = nn.LayerNorm(cout)
        self.proj = nn.Linear(cout, cout)

    def forward(self, x):
        x = self.embed(x)
        B, C, H, W = x.shape
        t = x.flatten(2).transpose(1, 2)
        t = t + self.proj(self.norm(t))
        return t.transpose(1, 2).reshape(B, C, H, W)


class CustomNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.enc = ConvBlock(3, 6)
        self.down = nn.AvgPool2d(2)
        self.mid = TokenBlock(6, 8)
        self.up = nn.Upsample(scale_factor=2)
        self.dec = TokenBlock(8 + 6, 4)
        self.head = nn.Conv2d(4, 3, 1)

    def forward(self, x):
        e = self.enc(x)
        m = self.mid(self.down(e))
        return self.head(self.dec(torch.cat([self.up(m), e], 1)))


def test_custom_block_stages_exist_before_the_optimizer():
    """An optimizer built right after wrapping trains the stages (measured before: out_proj stayed zero)."""
    net = CustomNet()
    ss = semantic_sensitive(net, {"dec": "enc", "mid": "enc"})
    assert ss.blocks["dec"].dec_channels == 4 and ss.blocks["dec"].enc_channels == 6
    assert ss.blocks["mid"].dec_channels == 8
    opt = torch.optim.SGD(ss.parameters(), lr=0.1)
    x, g = _inputs()
    for _ in range(3):
        opt.zero_grad()
        (ss(x, guidance=g).square().mean() + ss.alignment_loss()).backward()
        opt.step()
    assert ss.blocks["dec"].out_proj.weight.abs().sum() > 0


class LayerNorm2d(nn.Module):
    """A custom channel norm (as NAFNet-style networks define it): per-channel weight and bias only."""

    def __init__(self, c):
        super().__init__()
        self.weight, self.bias = nn.Parameter(torch.ones(c)), nn.Parameter(torch.zeros(c))

    def forward(self, x):
        mu, var = x.mean(1, keepdim=True), x.var(1, keepdim=True, unbiased=False)
        return (x - mu) / (var + 1e-6).sqrt() * self.weight[:, None, None] + self.bias[:, None, None]


class GatedBlock(nn.Module):
    """conv -> simple gate (halves the channels) -> conv, then a custom norm registered last."""

    def __init__(self, c):
        super().__init__()
        self.conv1 = nn.Conv2d(c, 2 * c, 1)
        self.conv2 = nn.Conv2d(c, c, 3, padding=1)
        self.norm = LayerNorm2d(c)
        self.drop = nn.Dropout(0.0)

    def forward(self, x):
        a, b = self.conv1(self.norm(x)).chunk(2, 1)
        return x + self.drop(self.conv2(a * b))


def test_custom_norm_layers_give_their_channel_count():
    net = nn.Sequential()
    net.add_module("enc", GatedBlock(4))
    net.add_module("dec", nn.Sequential(nn.Conv2d(4, 6, 1), GatedBlock(6)))
    ss = semantic_sensitive(net, {"dec": "enc"})
    assert (ss.blocks["dec"].dec_channels, ss.blocks["dec"].enc_channels) == (6, 4)
    x = torch.randn(2, 4, 8, 8)
    assert torch.equal(ss(x, guidance=torch.rand(2, 1, 8, 8)), net(x))


class Unreadable(nn.Module):
    """A block with no layer that tells its channel count."""

    def forward(self, x):
        return torch.cat([x, x.flip(1)], 1)


class UnreadableNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.enc = nn.Conv2d(3, 4, 3, padding=1)
        self.dec = Unreadable()
        self.head = nn.Conv2d(8, 3, 1)

    def forward(self, x):
        return self.head(self.dec(self.enc(x)))


def test_a_block_whose_definition_says_nothing_is_measured_at_construction():
    """Was an error asking for channels= (issue 23: measured by the dry run now)."""
    ss = semantic_sensitive(UnreadableNet(), {"dec": "enc"})
    assert (ss.blocks["dec"].dec_channels, ss.blocks["dec"].enc_channels) == (8, 4)
    assert ss.materialized
    x, g = _inputs()
    probed = semantic_sensitive(UnreadableNet(), {"dec": "enc"}, example_inputs=x)
    assert (probed.blocks["dec"].dec_channels, probed.blocks["dec"].enc_channels) == (8, 4)


class Misleading(nn.Module):
    """The last registered layer (a gate) is not the one that makes the output: a wrong guess."""

    def __init__(self, cin, cout):
        super().__init__()
        self.body = nn.Conv2d(cin, cout, 3, padding=1)
        self.gate = nn.Conv2d(cout, 1, 1)

    def forward(self, x):
        y = self.body(x)
        return y * torch.sigmoid(self.gate(y))


class MisleadingNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.enc = nn.Conv2d(3, 4, 3, padding=1)
        self.dec = Misleading(4, 6)
        self.head = nn.Conv2d(6, 3, 1)

    def forward(self, x):
        return self.head(self.dec(self.enc(x)))


def test_channels_are_checked_at_the_call_naming_the_module():
    x, g = _inputs()
    ss = semantic_sensitive(MisleadingNet(), {"dec": "enc"})  # its definition says 1 channel: measured, 6
    assert (ss.blocks["dec"].dec_channels, ss.blocks["dec"].enc_channels) == (6, 4)
    assert torch.equal(ss(x, guidance=g), ss.model(x))
    wrong = semantic_sensitive(MisleadingNet(), {"dec": "enc"}, channels={"dec": (6, 5)})
    with pytest.raises(ValueError, match=r"decoder module 'dec'.*encoder module 'enc' 4.*from channels="):
        wrong(x, guidance=g)
    with pytest.raises(ValueError, match=r"channels: \['dek'\] are not decoder sites"):
        semantic_sensitive(MisleadingNet(), {"dec": "enc"}, channels={"dek": (6, 4)})
    fixed = semantic_sensitive(MisleadingNet(), {"dec": "enc"}, channels={"dec": (6, 4)})
    assert fixed(x, guidance=g).shape == x.shape


class TwoInputNet(nn.Module):
    """Two inputs, the second one keyword-only (e.g. a low-light network taking an illumination prior)."""

    def __init__(self):
        super().__init__()
        self.enc = nn.Conv2d(3, 4, 3, padding=1)
        self.dec = Unreadable()
        self.head = nn.Conv2d(8, 3, 1)

    def forward(self, x, *, prior):
        return self.head(self.dec(self.enc(x) * prior))


def test_example_inputs_take_keyword_arguments():
    x, g = _inputs()
    prior = torch.rand(2, 1, 8, 8)
    by_kw = semantic_sensitive(TwoInputNet(), {"dec": "enc"}, example_inputs={"x": x, "prior": prior})
    mixed = semantic_sensitive(TwoInputNet(), {"dec": "enc"}, example_inputs=((x,), {"prior": prior}))
    for ss in (by_kw, mixed):
        assert (ss.blocks["dec"].dec_channels, ss.blocks["dec"].enc_channels) == (8, 4)
        assert torch.equal(ss(x, prior=prior, guidance=g), ss.model(x, prior=prior))


# ----------------------------------------------------------------------------- copies
class SmallUNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.enc1 = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.ReLU())
        self.enc2 = nn.Sequential(nn.AvgPool2d(2), nn.Conv2d(4, 8, 3, padding=1), nn.ReLU())
        self.up = nn.Upsample(scale_factor=2)
        self.dec1 = nn.Conv2d(12, 4, 3, padding=1)
        self.head = nn.Conv2d(4, 3, 1)

    def forward(self, x):
        e1 = self.enc1(x)
        e2 = self.enc2(e1)
        return self.head(self.dec1(torch.cat([self.up(e2), e1], 1)))


def test_deepcopy_is_an_independent_ss_model():
    ss = _perturb(semantic_sensitive(SmallUNet(), {"dec1": "enc1"}))
    x, g = _inputs()
    out = ss(x, guidance=g)
    ss.alignment_loss()  # per-call state holding non-leaf tensors must not block the copy
    ema = copy.deepcopy(ss)
    torch.testing.assert_close(ema(x, guidance=g), out, rtol=0, atol=0)
    torch.testing.assert_close(ema.alignment_loss(), ss.alignment_loss(), rtol=0, atol=0)
    with torch.no_grad():
        for p in ema.parameters():
            p.mul_(0.5)
    moved = ema(x, guidance=g)
    assert not torch.allclose(moved, out)
    torch.testing.assert_close(ss(x, guidance=g), out, rtol=0, atol=0)  # the original is untouched
    ema.remove()
    torch.testing.assert_close(ss(x, guidance=g), out, rtol=0, atol=0)  # its hooks are its own
    averaged = torch.optim.swa_utils.AveragedModel(ss)  # EMA helpers deep-copy the model
    torch.testing.assert_close(averaged(x, guidance=g), out, rtol=0, atol=0)
    buffer = io.BytesIO()
    torch.save(ss, buffer)  # a whole-object pickle (hooks included) works the same way
    buffer.seek(0)
    loaded = torch.load(buffer, weights_only=False)
    torch.testing.assert_close(loaded(x, guidance=g), out, rtol=0, atol=0)


def test_wrapping_twice_is_an_error():
    net = SmallUNet()
    ss = semantic_sensitive(net, {"dec1": "enc1"})
    with pytest.raises(ValueError, match="already wrapped by semantic_sensitive"):
        semantic_sensitive(net, {"dec1": "enc1"})
    with pytest.raises(ValueError, match="already a semantic_sensitive wrapper"):
        semantic_sensitive(ss, {"model.dec1": "model.enc1"})
    semantic_sensitive(ss.remove(), {"dec1": "enc1"})  # after remove() it can be wrapped again


def test_bare_model_called_while_wrapped_is_the_plain_model():
    net = SmallUNet()
    x, g = _inputs()
    plain = net(x)
    ss = _perturb(semantic_sensitive(net, {"dec1": "enc1"}))
    assert not torch.allclose(ss(x, guidance=g), plain)
    assert torch.equal(net(x), plain)


# ----------------------------------------------------------------------------- activation checkpointing
class CheckpointedNet(SmallUNet):
    """Blocks run under torch.utils.checkpoint(use_reentrant=False), as many transformer restorers do."""

    def __init__(self, use_checkpoint=True):
        super().__init__()
        self.use_checkpoint = use_checkpoint

    def _run(self, block, *args):
        return checkpoint(block, *args, use_reentrant=False) if self.use_checkpoint else block(*args)

    def forward(self, x):
        e1 = self._run(self.enc1, x)
        e2 = self._run(self.enc2, e1)
        d = self._run(lambda a, b: self.dec1(torch.cat([self.up(a), b], 1)), e2, e1)
        return self.head(d)


def test_activation_checkpointing_recomputes_the_same_stage():
    torch.manual_seed(1)
    ck = _perturb(semantic_sensitive(CheckpointedNet(), {"dec1": "enc1", "enc2": "enc1"}), std=0.3).double()
    plain = copy.deepcopy(ck)
    plain.model.use_checkpoint = False
    x, g = (t.double() for t in _inputs())
    grads = []
    for ss in (ck, plain):
        out = ss(x, guidance=g)
        (out.square().mean() + ss.alignment_loss()).backward()
        grads.append({n: p.grad for n, p in ss.named_parameters()})
    assert_same_sums(grads[0], grads[1])  # float64: the same terms, summed in another order at most
    assert grads[0]["blocks.dec1.q_proj.weight"].abs().sum() > 0


class CheckpointedSharedDecoder(nn.Module):
    """One decoder module called twice, each call in its own checkpointed region."""

    def __init__(self):
        super().__init__()
        self.enc = nn.Conv2d(3, 4, 3, padding=1)
        self.dec = nn.Conv2d(4, 4, 3, padding=1)
        self.use_checkpoint = True

    def _run(self, x):
        return checkpoint(self.dec, x, use_reentrant=False) if self.use_checkpoint else self.dec(x)

    def forward(self, x):
        e = self.enc(x)
        y = self._run(e)
        return self._run(torch.tanh(y) + e)


@pytest.mark.parametrize("pairs", [{"dec": "enc"}, {"dec#1": "enc"}, {"dec#0": "enc", "dec#1": "enc"}])
def test_checkpointed_decoder_called_twice_recomputes_each_call(pairs):
    torch.manual_seed(3)
    x, g = _inputs()
    x = x[:, :3]
    x, g = x.double(), g.double()
    ck = _perturb(semantic_sensitive(CheckpointedSharedDecoder(), pairs), std=0.3).double()
    plain = copy.deepcopy(ck)
    plain.model.use_checkpoint = False
    grads = []
    for ss in (ck, plain):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)  # 'dec' ran 2 times
            out = ss(x, guidance=g)
        (out.square().mean() + ss.alignment_loss()).backward()
        grads.append({n: p.grad for n, p in ss.named_parameters()})
    assert_same_sums(grads[0], grads[1])  # float64: the same terms, summed in another order at most


# ----------------------------------------------------------------------------- reused modules
class SharedEncoderNet(nn.Module):
    """One encoder applied to three inputs (frames, or image + two priors), one decoder."""

    def __init__(self):
        super().__init__()
        self.enc = nn.Conv2d(3, 4, 3, padding=1)
        self.dec = nn.Conv2d(12, 4, 3, padding=1)
        self.head = nn.Conv2d(4, 3, 1)

    def forward(self, x):
        feats = [self.enc(x), self.enc(x.flip(-1)), self.enc(x.flip(-2))]
        return self.head(self.dec(torch.cat(feats, 1)))


def test_reused_encoder_rule_pick_a_call_and_warn_once():
    x, g = _inputs()
    torch.manual_seed(2)
    by_rule = _perturb(semantic_sensitive(SharedEncoderNet(), {"dec": "enc"}))
    net, blocks = _twin(by_rule)
    pinned = semantic_sensitive(copy.deepcopy(net), {"dec": "enc#0"})
    pinned.load_state_dict(by_rule.state_dict(), strict=False)
    pinned.blocks["dec"].load_state_dict(by_rule.blocks["dec"].state_dict())
    with pytest.warns(UserWarning, match=r"encoder module 'enc' ran 3 times.*most recent call.*'enc#k'"):
        out = by_rule(x, guidance=g)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # once only; and a pinned call does not warn
        by_rule(x, guidance=g)
        out0 = pinned(x, guidance=g)
    feats = [net.enc(x), net.enc(x.flip(-1)), net.enc(x.flip(-2))]
    d = net.dec(torch.cat(feats, 1))
    torch.testing.assert_close(out, net.head(blocks["dec"](d, feats[2], g)))  # the most recent call
    torch.testing.assert_close(out0, net.head(blocks["dec"](d, feats[0], g)))  # the pinned call


class SharedDecoderNet(nn.Module):
    """One decoder module applied twice (weight-shared refinement), each time after a fresh encoder call."""

    def __init__(self):
        super().__init__()
        self.enc = nn.Conv2d(3, 4, 3, padding=1)
        self.dec = nn.Conv2d(4, 4, 3, padding=1)
        self.head = nn.Conv2d(4, 3, 1)

    def forward(self, x):
        y = self.dec(self.enc(x))
        y = self.dec(self.enc(self.head(y)) + y)
        return self.head(y)


def test_reused_decoder_refines_each_call_and_the_loss_averages_them():
    x, g = _inputs()
    ss = _perturb(semantic_sensitive(SharedDecoderNet(), {"dec": "enc"}, eta=0.5, weight=0.2))
    net, blocks = _twin(ss)
    with pytest.warns(UserWarning) as record:
        out = ss(x, guidance=g)
    messages = [str(w.message) for w in record]
    assert any(re.search(r"decoder module 'dec' ran 2 times.*averages over them.*'dec#k'", m) for m in messages)
    loss = ss.alignment_loss()
    e = net.enc(x)
    y1 = blocks["dec"](net.dec(e), e, g)
    e2 = net.enc(net.head(y1))
    y2 = blocks["dec"](net.dec(e2 + y1), e2, g)
    torch.testing.assert_close(out, net.head(y2))
    terms = [f.square().mul((1 - g) ** 2).mean() - 0.5 * (f * g).mean() for f in (y1, y2)]
    torch.testing.assert_close(loss, 0.2 * (terms[0] + terms[1]) / 2)
    second = semantic_sensitive(net, {"dec#1": "enc"})  # only the second call
    second.blocks["dec#1"].load_state_dict(blocks["dec"].state_dict())
    y1 = net.dec(e)
    e2 = net.enc(net.head(y1))
    expected = net.head(blocks["dec"](net.dec(e2 + y1), e2, g))
    # the encoder also runs twice: each call of 'dec#1' pairs with the encoder's latest call, and says so
    with pytest.warns(UserWarning, match=r"encoder module 'enc' ran 2 times.*most recent call"):
        out = second(x, guidance=g)
    torch.testing.assert_close(out, expected)


class SharedBlockList(nn.Module):
    """One block appended to a ModuleList three times: one module registered under several names
    ('body', 'blocks.0', 'blocks.1', 'blocks.2'; named_modules() lists it once, as 'body')."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 4, 3, padding=1)
        self.body = nn.Sequential(nn.Conv2d(4, 4, 3, padding=1), nn.ReLU())
        self.blocks = nn.ModuleList([self.body] * 3)
        self.head = nn.Conv2d(4, 3, 1)

    def forward(self, x):
        y = self.stem(x)
        for block in self.blocks:
            y = y + block(y)
        return self.head(y)


def _wrapper_hooks(module):
    return [h for h in module._forward_hooks.values() if type(h).__name__ == "_Hook"]


def test_a_module_registered_under_several_names_is_paired_by_any_of_them():
    x, g = _inputs()
    torch.manual_seed(3)
    net = SharedBlockList()
    ss = semantic_sensitive(net, {"blocks.2": "stem"})  # the name print(model) suggests
    assert list(ss.blocks) == ["blocks__2"] and len(_wrapper_hooks(net.body)) == 1
    with pytest.warns(UserWarning, match=r"decoder 'blocks\.2' \(module 'body', registered under several "
                                         r"names\) ran 3 times.*'blocks\.2#k'"):
        assert torch.equal(ss(x, guidance=g), ss.model(x))
    _perturb(ss)
    plain, blocks = _twin(ss)
    out = ss(x, guidance=g)
    e = plain.stem(x)
    y = e
    for _ in range(3):  # the rule for a module that runs several times: every call refined by the one stage
        y = y + blocks["blocks__2"](plain.body(y), e, g)
    torch.testing.assert_close(out, plain.head(y))
    # One call pinned through the alias: only the third call is refined.
    third = semantic_sensitive(copy.deepcopy(plain), {"blocks.2#2": "stem"})
    third.blocks["blocks__2#2"].load_state_dict(blocks["blocks__2"].state_dict())
    y = e
    for k in range(3):
        d = plain.body(y)
        y = y + (blocks["blocks__2"](d, e, g) if k == 2 else d)
    torch.testing.assert_close(third(x, guidance=g), plain.head(y))


def test_two_names_of_one_module_are_one_site():
    with pytest.raises(ValueError, match=r"pairs: decoders 'blocks\.1' and 'blocks\.2' are one module.*several "
                                         r"names.*'blocks\.2#k'"):
        semantic_sensitive(SharedBlockList(), {"blocks.1": "stem", "blocks.2": "stem"})
    net = SharedBlockList()  # an alias as decoder and another as encoder: one hook on the module
    ss = semantic_sensitive(net, {"blocks.2#2": "blocks.0#0"})
    assert len(_wrapper_hooks(net.body)) == 1
    x, g = _inputs()
    assert torch.equal(ss(x, guidance=g), ss.model(x))


# ----------------------------------------------------------------------------- structured outputs
class TupleEncoder(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)

    def forward(self, x):
        f = self.conv(x)
        return f, f.mean((2, 3))  # features and a pooled descriptor


class ProbabilisticDecoder(nn.Module):
    """Returns (mean, log-variance) as probabilistic decoders do, or a dict of both."""

    def __init__(self, as_dict=False):
        super().__init__()
        self.mu = nn.Conv2d(4, 4, 3, padding=1)
        self.logvar = nn.Conv2d(4, 4, 3, padding=1)
        self.as_dict = as_dict

    def forward(self, x):
        mu, lv = self.mu(x), self.logvar(x)
        return {"mean": mu, "logvar": lv} if self.as_dict else (mu, lv)


class StructuredNet(nn.Module):
    def __init__(self, as_dict=False):
        super().__init__()
        self.mtc = TupleEncoder()
        self.dec = ProbabilisticDecoder(as_dict)
        self.head = nn.Conv2d(8, 3, 1)
        self.as_dict = as_dict

    def forward(self, x):
        f, _ = self.mtc(x)
        out = self.dec(f)
        mu, lv = (out["mean"], out["logvar"]) if self.as_dict else out
        return self.head(torch.cat([mu, lv], 1))


@pytest.mark.parametrize("as_dict", [False, True])
def test_structured_outputs_select_and_replace_one_element(as_dict):
    x, g = _inputs()
    key = "[mean]" if as_dict else "[0]"
    ss = _perturb(semantic_sensitive(StructuredNet(as_dict), {f"dec{key}": "mtc[0]"}))  # the elements are measured
    assert (ss.blocks[f"dec{key}"].dec_channels, ss.blocks[f"dec{key}"].enc_channels) == (4, 4)
    net, blocks = _twin(ss)
    out = ss(x, guidance=g)
    f = net.mtc.conv(x)
    mu, lv = net.dec.mu(f), net.dec.logvar(f)
    mu = blocks[f"dec{key}"](mu, f, g)
    torch.testing.assert_close(out, net.head(torch.cat([mu, lv], 1)))  # only the mean is refined
    torch.testing.assert_close(ss.decoder_features()[f"dec{key}"], mu)
    with pytest.raises(TypeError, match=r"encoder module 'mtc' must output a \(B, C, H, W\) tensor, got tuple; "
                                        r"select an element, e.g. 'mtc\[0\]'"):
        semantic_sensitive(StructuredNet(as_dict), {f"dec{key}": "mtc"}, channels={f"dec{key}": (4, 4)})(x, guidance=g)


# ----------------------------------------------------------------------------- in-place changes
class InPlaceNet(nn.Module):
    """ReLU(inplace=True) right after the hooked encoder and decoder modules."""

    def __init__(self):
        super().__init__()
        self.enc = nn.Conv2d(3, 4, 3, padding=1)
        self.dec = nn.Conv2d(4, 4, 3, padding=1)
        self.act = nn.ReLU(inplace=True)
        self.head = nn.Conv2d(4, 3, 1)

    def forward(self, x):
        e = self.act(self.enc(x))
        return self.head(self.act(self.dec(e)))


def test_features_are_the_values_the_module_returned():
    x, g = _inputs()
    ss = _perturb(semantic_sensitive(InPlaceNet(), {"dec": "enc"}, weight=1.0))
    net, blocks = _twin(ss)
    for _ in range(2):  # the first call finds the in-place change, the second relies on what it found
        out = ss(x, guidance=g)
        e = net.enc(x)
        refined = blocks["dec"](net.dec(F.relu(e)), e, g)  # keys and values from the pre-ReLU encoder output
        torch.testing.assert_close(out, net.head(F.relu(refined)))
        feat = ss.decoder_features()["dec"]
        torch.testing.assert_close(feat, refined)  # not the post-ReLU values
        assert feat.min() < 0


class Recorder(nn.Module):
    """Identity that keeps the tensor it was given."""

    def forward(self, x):
        self.seen = x
        return x


def test_no_copy_when_nothing_changes_in_place():
    net = nn.Sequential()
    net.add_module("enc", nn.Conv2d(3, 4, 3, padding=1))
    net.add_module("dec", nn.Conv2d(4, 4, 3, padding=1))
    net.add_module("rec", Recorder())
    ss = semantic_sensitive(net, {"dec": "enc"})
    x, g = _inputs()
    ss(x, guidance=g)  # the first call looks for in-place changes
    ss(x, guidance=g)
    assert ss.decoder_features()["dec"] is net.rec.seen


# ----------------------------------------------------------------------------- bypassed hooks
class DirectForwardNet(SmallUNet):
    def __init__(self, bypass):
        super().__init__()
        self.bypass = bypass

    def forward(self, x):
        e1 = self.enc1.forward(x) if self.bypass == "enc1" else self.enc1(x)
        e2 = self.enc2(e1)
        cat = torch.cat([self.up(e2), e1], 1)
        return self.head(self.dec1.forward(cat) if self.bypass == "dec1" else self.dec1(cat))


def test_direct_forward_calls_are_named():
    x, g = _inputs()
    with pytest.warns(UserWarning, match=r"\['enc1'\] were read from the module definitions.*module 'enc1' did not "
                                         r"run in a dry run.*\.forward\(\.\.\.\) bypasses hooks"):
        ss = semantic_sensitive(DirectForwardNet("enc1"), {"dec1": "enc1"})
    with pytest.raises(RuntimeError, match=r"encoder module 'enc1' gives no skip feature to decoder module 'dec1'.*"
                                           r"\.forward\(\.\.\.\) directly"):
        ss(x, guidance=g)
    with pytest.warns(UserWarning, match=r"\['dec1'\] were read from the module definitions"):
        ss = semantic_sensitive(DirectForwardNet("dec1"), {"dec1": "enc1"})
    with pytest.warns(UserWarning, match=r"decoder module 'dec1' was not refined.*\.forward\(\.\.\.\) directly"):
        ss(x, guidance=g)
    with pytest.raises(RuntimeError, match=r"\['dec1'\] were not refined.*\.forward\(\) call"):
        ss.alignment_loss()


# ----------------------------------------------------------------------------- training code unchanged
def their_step(net, x, target):
    """A repository's own training step: it calls net(x) and knows nothing of guidance."""
    return F.l1_loss(net(x), target)


def test_guidance_context_manager_needs_no_edit_of_the_training_loop():
    x, g = _inputs()
    target = torch.randn_like(x)
    ss = _perturb(semantic_sensitive(SmallUNet(), {"dec1": "enc1"}))
    expected = F.l1_loss(ss(x, guidance=g), target) + ss.alignment_loss()
    with ss.guidance(g):
        loss = their_step(ss.model, x, target) + ss.alignment_loss()  # the bare model, called as the repo does
        loss_ss = their_step(ss, x, target) + ss.alignment_loss()      # or the wrapper without guidance=
    torch.testing.assert_close(loss, expected, rtol=0, atol=0)
    torch.testing.assert_close(loss_ss, expected, rtol=0, atol=0)
    loss.backward()
    assert ss.blocks["dec1"].out_proj.weight.grad.abs().sum() > 0
    plain = copy.deepcopy(ss).remove()
    assert torch.equal(ss.model(x), plain(x))  # outside the block: the plain model again
    with pytest.raises(ValueError, match=r"guidance must have the input image's batch and size"):
        with ss.guidance(g[:1]):
            ss.model(x)
    with pytest.raises(ValueError, match="guidance must have values in"):
        with ss.guidance(g + 1):
            pass


# ----------------------------------------------------------------------------- messages
class TrainOnlyHeadNet(SmallUNet):
    """A deep-supervision decoder that runs in training mode only."""

    def __init__(self):
        super().__init__()
        self.aux = nn.Conv2d(4, 4, 3, padding=1)

    def forward(self, x):
        e1 = self.enc1(x)
        y = super().forward(x)
        return (y, self.aux(e1)) if self.training else y


def test_alignment_loss_message_when_decoders_did_not_run_in_this_mode():
    x, g = _inputs()
    ss = semantic_sensitive(TrainOnlyHeadNet(), {"dec1": "enc1", "aux": "enc1"})
    ss.eval()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        ss(x, guidance=g)
    with pytest.raises(RuntimeError, match=r"\['aux'\] were not refined in the last forward pass \(model in eval mode\)"):
        ss.alignment_loss()
    ss.train()
    ss(x, guidance=g)
    assert torch.isfinite(ss.alignment_loss())
    only_aux = semantic_sensitive(TrainOnlyHeadNet(), {"aux": "enc1"}).eval()  # no decoder at all runs in eval
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        only_aux(x, guidance=g)
    with pytest.raises(RuntimeError, match=r"\['aux'\] were not refined.*eval mode") as err:
        only_aux.alignment_loss()
    assert "forward call first" not in str(err.value)


def test_bad_site_syntax_is_named():
    with pytest.raises(ValueError, match=r"decoder 'dec1#x' is not a module name with optional selectors"):
        semantic_sensitive(SmallUNet(), {"dec1#x": "enc1"})
    x, g = _inputs()
    with pytest.warns(UserWarning, match=r"module 'enc1' ran 1 time\(s\), so it has no call #3"):
        ss = semantic_sensitive(SmallUNet(), {"dec1": "enc1#3"})
    with pytest.raises(RuntimeError, match=r"encoder 'enc1#3' \(module 'enc1'\).*call #3 was asked for but it ran 1"):
        ss(x, guidance=g)
