"""BLIP aligner and LLaVA captioner on tiny random models loaded through the real from_pretrained path.

The models are written as the hub cache holds them (models--ORG--NAME/
snapshots/<hash>/ + refs/main) and loaded by their real repository ids
with HF_HUB_OFFLINE=1, so the code path is the one a user runs.
"""

import logging
import os

import pytest
import torch

transformers = pytest.importorskip("transformers")

from ssattn import reference  # noqa: E402
from ssattn.guidance import DEFAULT_ALIGNER, DEFAULT_CAPTIONER, ModelNotAvailableError, settings_id, testing  # noqa: E402
from ssattn.guidance.blip import BlipAligner  # noqa: E402
from ssattn.guidance.llava import LlavaCaptioner  # noqa: E402


@pytest.fixture(scope="module")
def hub(tmp_path_factory):
    cache = tmp_path_factory.mktemp("hf") / "hub"
    snaps = {
        DEFAULT_ALIGNER: testing.hub_snapshot(cache, DEFAULT_ALIGNER, testing.save_blip),
        DEFAULT_CAPTIONER: testing.hub_snapshot(cache, DEFAULT_CAPTIONER, testing.save_llava),
    }
    with testing.offline_hub_cache(cache):
        yield snaps


@pytest.fixture(scope="module")
def aligner(hub):
    return BlipAligner(device="cpu")


def _images():
    return [torch.rand(3, 50, 70), torch.rand(3, 5, 3), torch.rand(3, 1, 1)]


def _manual_grids(al, images, texts):
    """Reference: BLIP ITC features computed here with the model's own modules, SPEC 1 steps 1-2 in float64."""
    m = al.model
    with torch.no_grad():
        x = torch.stack([al.preprocess(im) for im in images])
        x = (x - al.mean) / al.std
        feats = m.vision_proj(m.vision_model(pixel_values=x).last_hidden_state[:, 1:])
        out = []
        for t in texts:
            tok = al.tokenizer([t], return_tensors="pt")
            tf = m.text_proj(m.text_encoder(input_ids=tok["input_ids"], attention_mask=tok["attention_mask"])
                             .last_hidden_state[:, 0])
            out.append(reference.normalize_minmax(reference.similarity_grid(feats.double(), tf[0].double(), (24, 24))))
    return out  # per text: (B, 24, 24)


def test_loads_real_ids_offline_with_real_geometry(aligner, hub):
    assert aligner.grid_size == (24, 24) and aligner.input_size == (384, 384)
    assert aligner.settings["aligner"] == DEFAULT_ALIGNER
    assert aligner.settings["aligner_revision"] == hub[DEFAULT_ALIGNER].name  # the snapshot it read
    assert type(aligner.model).__name__ == "BlipForImageTextRetrieval"


def test_aligner_grids_match_manual_itc_features(aligner):
    imgs = _images()
    single, p1 = aligner.grids(imgs, prompts=[["fish"], ["diver"], ["fish"]])  # fused text path
    multi, p2 = aligner.grids(imgs, prompts=[["fish", "coral reef"], ["diver"], ["coral reef", "fish"]])
    ref = dict(zip(["fish", "diver", "coral reef"], _manual_grids(aligner, imgs, ["fish", "diver", "coral reef"])))
    assert p1 == [["fish"], ["diver"], ["fish"]] and [g.shape for g in single] == [(1, 24, 24)] * 3
    assert [g.shape for g in multi] == [(2, 24, 24), (1, 24, 24), (2, 24, 24)]
    for b, prompts in enumerate(p1):
        torch.testing.assert_close(single[b][0].double(), ref[prompts[0]][b], atol=1e-5, rtol=0)
    for b, prompts in enumerate(p2):
        for j, t in enumerate(prompts):
            torch.testing.assert_close(multi[b][j].double(), ref[t][b], atol=1e-5, rtol=0)
    assert all(g.min() >= 0 and g.max() <= 1 and g.dtype == torch.float32 for g in multi)


def test_fixed_prompts_joint_and_maps(hub):
    al = BlipAligner(prompts=["fish", "diver"], joint=True, device="cpu")
    grids, prompts = al.grids(_images()[:2])
    assert prompts == [["fish, diver"]] * 2 and [g.shape[0] for g in grids] == [1, 1]
    sep = BlipAligner(prompts=["fish", "diver"], device="cpu")
    assert settings_id(sep.settings) != settings_id(al.settings)
    maps = sep(_images(), combine="mean")
    assert [tuple(m.shape) for m in maps] == [(1, 50, 70), (1, 5, 3), (1, 1, 1)]
    batch = sep(torch.rand(2, 3, 17, 9))
    assert batch.shape == (2, 1, 17, 9) and torch.isfinite(batch).all()
    with pytest.raises(ValueError, match="list of non-empty strings"):
        BlipAligner(prompts="fish", device="cpu")
    with pytest.raises(ValueError, match="one non-empty list of strings per image"):
        sep.grids(_images()[:2], prompts=[["fish"]])


def test_preprocess_matches_blip_image_processor(aligner):
    from PIL import Image
    from transformers import AutoProcessor

    proc = AutoProcessor.from_pretrained(DEFAULT_ALIGNER)
    # transformers 5 picks the torchvision-backed processor when torchvision is installed, else the PIL one
    assert type(proc.image_processor).__name__ in ("BlipImageProcessor", "BlipImageProcessorPil")
    arr = (torch.rand(1, 3, 12, 16) * 255).byte()
    smooth = torch.nn.functional.interpolate(arr.float(), size=(200, 300), mode="bilinear").round().byte()[0]
    pil = Image.fromarray(smooth.permute(1, 2, 0).numpy())
    theirs = proc.image_processor(pil, return_tensors="pt")["pixel_values"][0]
    ours = (aligner.preprocess(smooth.float() / 255) - aligner.mean[0]) / aligner.std[0]
    diff = (ours - theirs).abs()
    assert diff.mean() < 0.02 and diff.max() < 0.1, (diff.mean(), diff.max())


def test_captioner_feeds_parsed_prompts(hub, caplog):
    cap = LlavaCaptioner(device="cpu", max_new_tokens=6)
    imgs = _images()[:2]
    captions = cap(imgs)
    assert len(captions) == 2 and all(isinstance(c, str) for c in captions)
    assert cap(imgs) == captions  # greedy: deterministic, so cacheable
    assert cap.settings["captioner_revision"] == hub[DEFAULT_CAPTIONER].name
    auto = LlavaCaptioner(device="cpu", max_new_tokens=6, model_class="auto")
    assert type(auto.model).__name__ == "LlavaForConditionalGeneration" and auto(imgs) == captions

    from ssattn.guidance.prompts import prompts_from_caption

    al = BlipAligner(captioner=cap, device="cpu", max_prompts=3)
    assert al.needs_original and al.settings["captioner"]["question"] == cap.question
    _, prompts = al.grids(imgs)
    assert prompts == [prompts_from_caption(c, 3) for c in captions]


class _Scripted:
    """A captioner is any callable images -> list[str] with settings."""

    settings = {"captioner": "scripted"}

    def __init__(self, answers):
        self.answers = answers

    def __call__(self, images):
        return self.answers[: len(images)]


def test_scripted_captioner_and_fallback(aligner, hub, caplog):
    al = BlipAligner(captioner=_Scripted(["A diver and two fish near the coral.", "The water is murky."]),
                     device="cpu")
    with caplog.at_level(logging.WARNING, logger="ssattn.guidance"):
        grids, prompts = al.grids(_images()[:2])
    assert prompts == [["diver", "fish", "coral"], ["fish", "diver", "robot", "coral"]]
    assert "no usable object words" in caplog.text
    assert [g.shape[0] for g in grids] == [3, 4]
    with pytest.raises(ValueError, match="original images"):
        al.grids(preprocessed=torch.rand(1, 3, 384, 384))


def test_missing_model_error_says_how(hub, tmp_path):
    with pytest.raises(ModelNotAvailableError) as info:
        BlipAligner("Salesforce/blip-not-downloaded", device="cpu")
    msg = str(info.value)
    assert "Salesforce/blip-not-downloaded" in msg and "HF_HUB_OFFLINE=1" in msg and "hf download" in msg
    assert "folder" in msg
    with pytest.raises(ModelNotAvailableError, match="does not hold a loadable"):
        BlipAligner(str(tmp_path), device="cpu")
    with pytest.raises(ModelNotAvailableError, match="llava-hf/nothing"):
        LlavaCaptioner("llava-hf/nothing", device="cpu")


def test_local_folder(hub, tmp_path):
    folder = testing.save_blip(tmp_path / "my-blip", seed=1)
    al = BlipAligner(str(folder), device="cpu", prompts=["fish"])
    assert al.settings["aligner"] == str(folder.resolve()) and al.settings["aligner_revision"] is None
    default = BlipAligner(device="cpu", prompts=["fish"])
    assert settings_id(al.settings) != settings_id(default.settings)
    g1, _ = al.grids(_images()[:1])
    g2, _ = default.grids(_images()[:1])
    assert g1[0].shape == g2[0].shape == (1, 24, 24)
    assert os.environ["HF_HUB_OFFLINE"] == "1"


@pytest.mark.gpu
def test_aligner_on_cuda_fp16_matches_float64(hub):
    # fused (triton) similarity + normalisation vs the reference, both against float64 of the same fp16 features
    al = BlipAligner(device="cuda", dtype=torch.float16, prompts=["fish", "diver"])
    ref_al = BlipAligner(device="cuda", dtype=torch.float16, prompts=["fish", "diver"], backend="reference")
    imgs = [torch.rand(3, 50, 70), torch.rand(3, 384, 384), torch.rand(3, 1, 1)]
    fast, _ = al.grids(imgs)
    slow, _ = ref_al.grids(imgs)
    x = torch.stack([al.preprocess(im) for im in imgs])
    feats = al.image_features(x).double()
    text = al.text_features(["diver", "fish"]).double()  # sorted order, as grids() uses
    for j, t in enumerate(["fish", "diver"]):
        exact = reference.normalize_minmax(reference.similarity_grid(feats, text[["diver", "fish"].index(t)], (24, 24)))
        for b in range(len(imgs)):
            err_fast = (fast[b][j].double() - exact[b].cpu()).abs().max()
            err_ref = (slow[b][j].double() - exact[b].cpu()).abs().max()
            assert err_fast <= 2 * err_ref + 1e-3, (err_fast, err_ref)
    maps = al(imgs)
    assert [tuple(m.shape) for m in maps] == [(1, 50, 70), (1, 384, 384), (1, 1, 1)]
