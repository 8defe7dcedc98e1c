"""The caption room (ssattn.caption): captioner, ClipCap loader, preprocessing, CaptionFeatureLoss, cache.

Tiny captioners are built from configs (ssattn.caption.testing): CLIP's
vision tower at 224 px, a 16-d projection, ClipCap's MLP or transformer
mapper with prefix length 10 and a 1-layer GPT-2, loaded through the real
from_pretrained paths (folder, hub cache offline, ClipCap checkpoint file).
"""

from __future__ import annotations

import logging

import numpy as np
import pytest
import torch

pytest.importorskip("transformers")

import ssattn  # noqa: E402
from ssattn import reference as ref  # noqa: E402
from ssattn.caption import CaptionFeatureLoss, Captioner, ClipPreprocess, load_captioner, load_clipcap  # noqa: E402
from ssattn.caption.captioner import _image_processor_class  # noqa: E402
from ssattn.caption.testing import clipcap_state, save_tiny_captioner, tiny_captioner  # noqa: E402
from ssattn.guidance import ModelNotAvailableError, testing  # noqa: E402


@pytest.fixture(scope="module")
def captioner():
    return tiny_captioner()[0]


def _images(b=2, h=40, w=52, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.rand(b, 3, h, w, generator=g)


# --------------------------------------------------------------------------- preprocessing
def _test_image(h, w, seed=0):
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:h, 0:w]
    img = np.stack([(np.sin(xx / 7 + c) + np.cos(yy / 11)) * 60 + 128 for c in range(3)], -1)
    return np.clip(img + rng.normal(0, 20, (h, w, 3)), 0, 255).astype(np.uint8)  # smooth + noise: sharp edges too


@pytest.mark.parametrize("hw", [(300, 400), (97, 113), (500, 255), (224, 224), (255, 257)])
def test_preprocessing_matches_the_image_processor(hw):
    from PIL import Image

    processor = _image_processor_class()()
    img = _test_image(*hw)
    expected = processor(images=Image.fromarray(img), return_tensors="pt")["pixel_values"]
    x = torch.from_numpy(img).permute(2, 0, 1)[None].float() / 255
    got = ClipPreprocess.from_processor(processor)(x)
    assert got.shape == expected.shape == (1, 3, 224, 224)
    # in 8-bit levels: PIL rounds each resize pass to 8 bits (up to one level in all), the tensor path does not
    levels = ((got - expected) * torch.tensor(processor.image_std).view(1, 3, 1, 1) * 255).abs()
    assert levels.max().item() <= 1.5
    assert levels.mean().item() <= 0.5


def test_preprocessing_reads_the_processor_config_and_is_differentiable():
    P = _image_processor_class()
    processor = P(size={"shortest_edge": 64}, crop_size={"height": 48, "width": 40}, image_mean=[0.5, 0.4, 0.3],
                  image_std=[0.2, 0.3, 0.4], resample=2)
    pre = ClipPreprocess.from_processor(processor)
    assert pre.mode == "bilinear" and pre.crop == (48, 40)
    x = torch.rand(2, 3, 100, 80, requires_grad=True)
    out = pre(x)
    assert out.shape == (2, 3, 48, 40)  # shortest side 80 -> 64, long side 100 -> 80, then the crop
    out.sum().backward()
    assert x.grad is not None and x.grad.abs().sum() > 0
    with pytest.raises(ValueError, match=r"images must be \(B, 3, H, W\)"):
        pre(torch.rand(2, 1, 10, 10))
    with pytest.raises(ValueError, match="resample=0 has no tensor equivalent"):
        ClipPreprocess({"resample": 0})


# --------------------------------------------------------------------------- captioner
@pytest.mark.parametrize("mapper", ["mlp", "transformer"])
def test_feature_spaces_have_the_documented_shapes(mapper):
    cap = tiny_captioner(mapper=mapper)[0]
    tokens = torch.randint(0, 64, (2, 5))
    f = cap.features(_images(), tokens=tokens)
    assert f["visual"].shape == (2, 16)
    assert f["prefix"].shape == (2, 10, 32)
    assert f["language"].shape == (2, 15, 32)  # prefix + teacher-forced tokens
    assert cap.features(_images())["language"].shape == (2, 10, 32)
    # the language space over the prefix is GPT-2's hidden states with the prefix as input embeddings
    expected = cap.language(inputs_embeds=f["prefix"]).last_hidden_state
    torch.testing.assert_close(cap.features(_images(), spaces=("language",))["language"], expected)


def test_mlp_mapper_is_clipcaps_geometry():
    cap = tiny_captioner(prefix_length=10)[0]
    lin0, act, lin2 = cap.mapper.model
    assert (lin0.in_features, lin0.out_features, lin2.out_features) == (16, 10 * 32 // 2, 10 * 32)
    assert isinstance(act, torch.nn.Tanh)


@pytest.mark.parametrize("mapper", ["mlp", "transformer"])
def test_clipcap_checkpoint_loads_by_name_and_reports_what_did_not_map(mapper):
    source = tiny_captioner(mapper=mapper, seed=1)[0]
    target = tiny_captioner(mapper=mapper, seed=2)[0]
    state = clipcap_state(source)
    state["clip_project.extra.weight"] = torch.zeros(3)  # an unknown key
    state["gpt.transformer.h.0.ln_1.weight"] = torch.zeros(7)  # a shape mismatch
    state["gpt.transformer.h.0.attn.bias"] = torch.ones(1, 1, 8, 8)  # older transformers saved the causal mask
    state["gpt.transformer.h.0.attn.masked_bias"] = torch.tensor(-1e4)
    report = load_clipcap(target, state)
    assert "causal-mask buffer" in report.unused["gpt.transformer.h.0.attn.bias"]
    assert "causal-mask buffer" in report.unused["gpt.transformer.h.0.attn.masked_bias"]
    assert "gpt.lm_head.weight" in report.unused and "clip_project.extra.weight" in report.unused
    assert any("shape (7,)" in why for why in report.unused.values())
    assert report.missing == ["language.h.0.ln_1.weight"]
    assert "language.h.0.ln_1.weight" in str(report) and "gpt.lm_head.weight" in str(report)
    for k, v in source.state_dict().items():
        if k.startswith(("mapper.", "language.")) and k != "language.h.0.ln_1.weight":
            assert torch.equal(target.state_dict()[k], v), k


def test_captioner_folder_round_trip(tmp_path):
    save_tiny_captioner(tmp_path / "cap", seed=3)
    cap = load_captioner(tmp_path / "cap")
    orig = tiny_captioner(seed=3)[0]
    x = _images()
    for s in ("visual", "prefix", "language"):
        torch.testing.assert_close(cap.features(x)[s], orig.features(x)[s])
    assert cap.settings()["source"]["captioner"] == str((tmp_path / "cap").resolve())


@pytest.mark.parametrize("mapper", ["mlp", "transformer"])
def test_captioner_from_a_clipcap_checkpoint_file(tmp_path, mapper):
    save_tiny_captioner(tmp_path / "cap", seed=4, mapper=mapper)  # its vision/ folder stands in for the CLIP model
    orig = tiny_captioner(seed=4, mapper=mapper)[0]
    torch.save(clipcap_state(orig), tmp_path / "coco_weights.pt")
    # GPT-2's config from the tiny model's folder (without it: inferred, with 64-d heads as GPT-2 has)
    cap = load_captioner(tmp_path / "coco_weights.pt", vision=tmp_path / "cap" / "vision",
                         language=tmp_path / "cap" / "language")
    assert cap.clipcap_report.complete and list(cap.clipcap_report.unused) == ["gpt.lm_head.weight"]
    assert type(cap.mapper) is type(orig.mapper) and cap.mapper.settings() == orig.mapper.settings()
    x = _images()
    torch.testing.assert_close(cap.features(x)["language"], orig.features(x)["language"])
    torch.save({"something": torch.zeros(1)}, tmp_path / "other.pt")
    with pytest.raises(ValueError, match="not a ClipCap checkpoint"):
        load_captioner(tmp_path / "other.pt", vision=tmp_path / "cap" / "vision")


def test_captioner_from_the_hub_cache_offline_and_clear_errors(tmp_path):
    hub = tmp_path / "hub"
    testing.hub_snapshot(hub, "someone/tiny-clipcap", lambda d: save_tiny_captioner(d, seed=5))
    with testing.offline_hub_cache(hub):
        cap = load_captioner("someone/tiny-clipcap")
        assert isinstance(cap, Captioner)
        with pytest.raises(ModelNotAvailableError, match="cannot load the captioner 'someone/absent'"):
            load_captioner("someone/absent")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ModelNotAvailableError, match="no captioner.json"):
        load_captioner(tmp_path / "empty")


# --------------------------------------------------------------------------- the loss module
def test_loss_is_the_weighted_sum_of_distances(captioner):
    x, y = _images(seed=1), _images(seed=2)
    for distance in ("l1", "l2", "cosine"):
        loss = CaptionFeatureLoss(captioner, distance=distance, weights=[1.0, 0.5, 2.0], cache=False)(x, y)
        fx, fy = captioner.features(x), captioner.features(y)
        expected = sum(w * ref.caption_feature_loss([fx[s]], [fy[s]], distance=distance)
                       for s, w in zip(("visual", "prefix", "language"), (1.0, 0.5, 2.0)))
        torch.testing.assert_close(loss, expected)
    one = CaptionFeatureLoss(captioner, spaces=("prefix",), distance="l2", cache=False)(x, y)
    torch.testing.assert_close(one, (captioner.features(x)["prefix"] - captioner.features(y)["prefix"]).square().mean())


def test_captioner_is_frozen_and_outside_the_module(captioner):
    loss_fn = CaptionFeatureLoss(captioner)
    assert list(loss_fn.parameters()) == [] and list(loss_fn.state_dict()) == []
    loss_fn.train()
    assert not captioner.training
    assert all(not p.requires_grad for p in captioner.parameters())
    x = _images(seed=1).requires_grad_(True)
    y = _images(seed=2).requires_grad_(True)
    loss_fn(x, y).backward()
    assert x.grad is not None and x.grad.abs().sum() > 0
    assert y.grad is None  # the reference branch runs without gradients
    assert all(p.grad is None for p in captioner.parameters())
    loss_fn.to(torch.float64)  # .to() reaches the captioner
    assert next(captioner.parameters()).dtype == torch.float64
    loss_fn.to(torch.float32)


def test_teacher_forced_tokens_enter_the_language_space(captioner):
    x, y = _images(seed=1), _images(seed=2)
    loss_fn = CaptionFeatureLoss(captioner, spaces=("language",), cache=False)
    t1, t2 = torch.randint(0, 64, (2, 4)), torch.randint(0, 64, (2, 4))
    assert loss_fn(x, y, t1).item() != loss_fn(x, y, t2).item()
    with pytest.raises(ValueError, match="only used by the 'language' space"):
        CaptionFeatureLoss(captioner, spaces=("visual",))(x, y, t1)
    with pytest.raises(ValueError, match=r"tokens must be \(B, T\) with B = 2"):
        loss_fn(x, y, t1[:1])


def test_bf16_autocast_gives_a_float32_loss(captioner):
    x, y = _images(seed=1), _images(seed=2)
    loss_fn = CaptionFeatureLoss(captioner, amp_dtype=torch.bfloat16, cache=False)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        fx = loss_fn.features(x)
    assert fx[0].dtype == torch.bfloat16
    loss = loss_fn(x, y)
    assert loss.dtype == torch.float32
    full = CaptionFeatureLoss(captioner, cache=False)(x, y)
    assert abs(loss.item() - full.item()) < 0.05 * abs(full.item()) + 1e-3


def test_bad_arguments(captioner):
    with pytest.raises(ValueError, match="spaces must be distinct names"):
        CaptionFeatureLoss(captioner, spaces=("visual", "words"))
    with pytest.raises(ValueError, match="distance must be one of"):
        CaptionFeatureLoss(captioner, distance="l0")
    with pytest.raises(ValueError, match="weights must have one value per level"):
        CaptionFeatureLoss(captioner, weights=[1.0])
    with pytest.raises(TypeError, match="captioner must be an ssattn.caption.Captioner"):
        CaptionFeatureLoss(torch.nn.Linear(2, 2))
    with pytest.raises(ValueError, match="same batch size"):
        CaptionFeatureLoss(captioner)(_images(b=2), _images(b=3))


# --------------------------------------------------------------------------- the reference-feature cache
def test_cache_hits_give_the_same_loss_and_skip_the_captioner(captioner, monkeypatch):
    x, y = _images(seed=1), _images(seed=2)
    loss_fn = CaptionFeatureLoss(captioner)
    first = loss_fn(x, y)
    assert (loss_fn.cache.hits, loss_fn.cache.misses) == (0, 2)
    calls = []
    real = captioner.features
    monkeypatch.setattr(captioner, "features", lambda imgs, *a, **k: calls.append(len(imgs)) or real(imgs, *a, **k))
    second = loss_fn(x, y)
    assert (loss_fn.cache.hits, loss_fn.cache.misses) == (2, 2)
    assert calls == [2]  # only the enhanced images ran through the captioner
    assert torch.equal(first, second)
    # one new reference in the batch: only it is computed
    y2 = torch.cat([y[:1], _images(b=1, seed=9)])
    loss_fn(x, y2)
    assert calls == [2, 1, 2] and loss_fn.cache.hits == 3


def test_cache_keys_depend_on_the_captioner_weights_and_tokens():
    a, b = tiny_captioner(seed=1)[0], tiny_captioner(seed=2)[0]
    assert CaptionFeatureLoss(a).cache_settings() != CaptionFeatureLoss(b).cache_settings()
    loss_fn = CaptionFeatureLoss(a, spaces=("language",))
    x, y = _images(seed=1), _images(seed=2)
    loss_fn(x, y, torch.zeros(2, 3, dtype=torch.long))
    loss_fn(x, y, torch.ones(2, 3, dtype=torch.long))
    assert loss_fn.cache.misses == 4 and loss_fn.cache.hits == 0


def test_disk_cache_is_reused_across_instances_and_corrupt_entries_recomputed(captioner, tmp_path, caplog):
    x, y = _images(seed=1), _images(seed=2)
    first = CaptionFeatureLoss(captioner, cache_dir=tmp_path)(x, y)
    entries = sorted(tmp_path.glob("*/*/*.pt"))
    assert len(entries) == 2 and len(list(tmp_path.glob("*/settings.json"))) == 1
    again = CaptionFeatureLoss(captioner, cache_dir=tmp_path)
    assert torch.equal(again(x, y), first)
    assert again.cache.hits == 2 and again.cache.misses == 0
    entries[0].write_bytes(entries[0].read_bytes()[:50])  # truncated
    third = CaptionFeatureLoss(captioner, cache_dir=tmp_path)
    with caplog.at_level(logging.WARNING, logger="ssattn.guidance"):
        torch.testing.assert_close(third(x, y), first)  # one image recomputed alone: the same up to rounding
    assert third.cache.rejected == 1 and "recomputing" in caplog.text


def test_functional_and_module_use_the_fused_op(captioner):
    if ssattn._backends.native_module() is None:
        pytest.skip("ssattn._C is not built")
    loss = CaptionFeatureLoss(captioner)(_images(seed=1).requires_grad_(True), _images(seed=2))
    assert "caption_loss_fused" in type(loss.grad_fn).__name__


# --------------------------------------------------------------------------- the reference's own greedy caption
def test_greedy_tokens_are_gpt2s_tied_lm_head_argmax(captioner):
    from transformers import GPT2LMHeadModel

    lm = GPT2LMHeadModel(captioner.language.config).eval()
    lm.transformer.load_state_dict(captioner.language.state_dict())
    lm.lm_head.weight = lm.transformer.wte.weight  # tied, as in ClipCap's checkpoints
    prefix = captioner.prefix(captioner.visual(_images(seed=3)))
    tokens = captioner.greedy_tokens(prefix, 4)
    assert tokens.shape == (2, 4) and tokens.dtype == torch.long
    embeds = prefix
    for t in range(4):
        nxt = lm(inputs_embeds=embeds).logits[:, -1].argmax(-1)
        assert torch.equal(nxt, tokens[:, t])
        embeds = torch.cat((embeds, lm.transformer.wte(tokens[:, t:t + 1])), dim=1)


@pytest.mark.parametrize("cache", [True, False])
def test_caption_length_teacher_forces_the_references_caption(captioner, cache):
    x, y = _images(seed=1), _images(seed=2)
    loss_fn = CaptionFeatureLoss(captioner, spaces=("language",), caption_length=3, cache=cache)
    loss = loss_fn(x, y)
    tokens = captioner.greedy_tokens(captioner.prefix(captioner.visual(y)), 3)
    expected = ref.caption_feature_loss([captioner.features(x, tokens=tokens)["language"]],
                                        [captioner.features(y, tokens=tokens)["language"]])
    torch.testing.assert_close(loss, expected)
    if cache:
        torch.testing.assert_close(loss_fn(x, y), loss)  # tokens come back from the cache with the features
        assert loss_fn.cache.hits == 2
    with pytest.raises(ValueError, match="caption_length is for the 'language' space"):
        CaptionFeatureLoss(captioner, spaces=("visual",), caption_length=2)
    with pytest.raises(ValueError, match="caption_length must be a non-negative integer"):
        CaptionFeatureLoss(captioner, caption_length=-1)


def test_memory_cache_is_bounded(captioner):
    loss_fn = CaptionFeatureLoss(captioner, cache_memory=3)
    for seed in range(3):
        loss_fn(_images(seed=10 + seed), _images(seed=20 + seed))
    assert len(loss_fn.cache) == 3 and loss_fn.cache.misses == 6
