"""Degradation classifiers: the embedded one on held-out photographs and generators; CLIP and a VLM on tiny models.

The embedded classifier's bar (the paper's 92.7% overall, every class's recall at least 85%) is checked
on two sets drawn here, on photographs no fit saw: (a) with the training parameter ranges, (b) with every
parameter outside them. The tiny models are written as the hub cache holds them and loaded through the
real from_pretrained path (as tests/test_guidance_models.py does).
"""

import base64
import dataclasses
import hashlib

import pytest
import torch

from ssattn.routing import ALL_CLASSES, FEATURES, PAPER_CLASSES, EmbeddedClassifier, features
from ssattn.routing import _embedded_weights
from ssattn.routing.embedded import MAX_SIDE, SIDE_STEP, prepare

BAR_ACCURACY, BAR_RECALL = 0.927, 0.85  # the bar: the paper's accuracy, every class's recall
# What this release reaches (800 images per set in benchmarks/RESULTS.md), less a margin for 240 images:
FLOOR = {"train": (0.80, 0.55), "outside": (0.74, 0.55)}  # (accuracy, every class's recall)
N_HELD_OUT = 240  # per set, 60 per class


# ----------------------------------------------------------------- embedded
def _held_out(ranges):
    pytest.importorskip("skimage")
    from ssattn.apps.data import routing_data as rd

    if ranges == "outside":
        # the largest sizes of (b) cost most to draw: up to 400 px here (still beyond the 320 px of training)
        r = dataclasses.replace(rd.OUTSIDE, side=((32, 48), (320, 400)))
        return rd.heldout_set(N_HELD_OUT, 27002, r)
    return rd.heldout_set(N_HELD_OUT, 27001, rd.TRAIN)


@pytest.fixture(scope="module", params=["train", "outside"])
def held_out_scores(request):
    """(ranges, accuracy, recall per class, confusion) of the embedded classifier on set (a) or (b)."""
    images, y, _ = _held_out(request.param)
    p = EmbeddedClassifier(PAPER_CLASSES)(images)
    torch.testing.assert_close(p.sum(1), torch.ones(len(y)))
    pred = p.argmax(1)
    cm = torch.zeros(4, 4, dtype=torch.long).index_put_((y, pred), torch.ones_like(y), accumulate=True)
    return request.param, (pred == y).float().mean().item(), cm.diag().float() / cm.sum(1), cm


def test_embedded_holds_its_measured_floor_on_held_out_photographs(held_out_scores):
    ranges, acc, recall, cm = held_out_scores
    floor_acc, floor_recall = FLOOR[ranges]
    assert acc >= floor_acc, (ranges, acc, cm)
    assert (recall >= floor_recall).all(), (ranges, recall, cm)


@pytest.mark.xfail(strict=True, reason="not reached yet: none vs reflection on unseen photographs "
                                       "(benchmarks/RESULTS.md, embedded classifier of issue 27)")
def test_embedded_meets_the_papers_bar_on_held_out_photographs(held_out_scores):
    ranges, acc, recall, cm = held_out_scores
    assert acc >= BAR_ACCURACY and (recall >= BAR_RECALL).all(), (ranges, acc, cm)


def test_embedded_batch_list_and_subsets_agree():
    g = torch.Generator().manual_seed(0)
    x = torch.rand(6, 3, 96, 96, generator=g)
    clf = EmbeddedClassifier()
    batch = clf(x)
    torch.testing.assert_close(clf(list(x)), batch)
    sub = EmbeddedClassifier(("none", "motion_blur"))
    assert sub.settings["fit"] == "paper4" and sub(x).shape == (6, 2)
    # restricting the classes is a softmax over the chosen logits
    torch.testing.assert_close(sub(x), batch[:, [3, 2]] / batch[:, [3, 2]].sum(1, keepdim=True))
    six = EmbeddedClassifier(ALL_CLASSES)
    assert six.settings["fit"] == "all6" and six(x).shape == (6, 6)
    with pytest.raises(ValueError, match="unknown here"):
        EmbeddedClassifier(("fog",))
    with pytest.raises(ValueError, match="temperature must be"):
        EmbeddedClassifier(temperature=0)
    with pytest.raises(ValueError, match="at least 32x32"):
        features(torch.rand(1, 3, 16, 40))


def test_any_size_and_aspect_gets_a_class_and_a_list_is_batched_by_crop_size():
    g = torch.Generator().manual_seed(1)
    sizes = [(32, 32), (1, 5), (20, 300), (31, 200), (40, 70), (1500, 2000), (600, 530), (97, 97), (96, 127)]
    images = [torch.rand(3, h, w, generator=g) for h, w in sizes]
    clf = EmbeddedClassifier()
    p = clf(images)
    assert p.shape == (len(sizes), 4) and torch.isfinite(p).all()
    torch.testing.assert_close(p.sum(1), torch.ones(len(sizes)))
    # each image alone gives the same answer as in the mixed list
    alone = torch.cat([clf([x]) for x in images])
    torch.testing.assert_close(p, alone, atol=1e-5, rtol=0)
    # the crop: at most MAX_SIDE, a multiple of SIDE_STEP, from an offset on the 8x8 grid (JPEG blocks stay put)
    big = torch.arange(1500 * 2000, dtype=torch.float32).view(1, 1500, 2000).expand(3, -1, -1)
    crop = prepare(big)
    assert crop.shape == (3, MAX_SIDE, MAX_SIDE)
    top, left = divmod(int(crop[0, 0, 0]), 2000)
    assert top % 8 == 0 and left % 8 == 0
    assert prepare(torch.rand(3, 97, 130)).shape == (3, 96, 128) and SIDE_STEP == 32
    assert prepare(torch.rand(3, 1, 5)).shape == (3, 32, 32)


def test_features_are_finite_and_blockiness_sees_a_jpeg_grid():
    x = torch.rand(2, 3, 64, 64) * 0.1 + 0.45
    f = features(x)
    assert f.shape == (2, len(FEATURES)) and torch.isfinite(f).all()
    blocky = x.clone()
    blocky[..., 8::8] += 0.05  # a step at every 8th column: what JPEG block edges look like
    g = features(blocky)
    assert (g[:, FEATURES.index("block_x")] > f[:, FEATURES.index("block_x")] + 0.5).all()
    assert torch.allclose(g[:, FEATURES.index("block_y")], f[:, FEATURES.index("block_y")], atol=0.2)


def test_motion_features_do_not_depend_on_the_direction():
    # a blurred texture turned by 90 degrees: the direction-folded spectrum numbers are the same
    g = torch.Generator().manual_seed(2)
    x = torch.rand(1, 3, 128, 128, generator=g)
    k = torch.zeros(1, 1, 1, 9) + 1 / 9
    blurred = torch.nn.functional.conv2d(x.view(3, 1, 128, 128), k, padding=(0, 4)).view(1, 3, 128, 128)
    blurred = (blurred * 255).round() / 255  # 8 bits, as an image file holds it
    turned = blurred.transpose(-1, -2)
    cols = [i for i, n in enumerate(FEATURES) if n.startswith(("orient", "falloff", "aniso"))]
    torch.testing.assert_close(features(turned)[:, cols], features(blurred)[:, cols], atol=0.05, rtol=0)


def test_shipped_weights_match_the_features_and_their_checksum():
    for fit in _embedded_weights.FITS:
        assert tuple(fit["features"]) == FEATURES and fit["temperature"] > 0
        arrays = fit["arrays"]
        digest = hashlib.sha256("".join(a["data"] for a in arrays.values()).encode()).hexdigest()
        assert digest == fit["sha256"]
        m, f, h = arrays["w1"]["shape"]
        assert f == len(FEATURES) and arrays["w3"]["shape"] == [m, h, len(fit["classes"])]
        for a in arrays.values():
            assert len(base64.b64decode(a["data"])) == 4 * int(torch.tensor(a["shape"]).prod())


# ----------------------------------------------------------------- tiny models
transformers = pytest.importorskip("transformers")
from ssattn.guidance import DEFAULT_CAPTIONER, testing  # noqa: E402
from ssattn.routing import testing as routing_testing  # noqa: E402
from ssattn.routing.clip import DEFAULT_CLIP, ClipClassifier  # noqa: E402
from ssattn.routing.vlm import VlmClassifier, letter_token_ids  # noqa: E402


@pytest.fixture(scope="module")
def hub(tmp_path_factory):
    cache = tmp_path_factory.mktemp("hf") / "hub"
    testing.hub_snapshot(cache, DEFAULT_CLIP, routing_testing.save_clip)
    testing.hub_snapshot(cache, DEFAULT_CAPTIONER, lambda d: testing.save_llava(d, extra_chars="ABCDEF"))
    testing.hub_snapshot(cache, "tiny/lowercase-llava", testing.save_llava)
    with testing.offline_hub_cache(cache):
        yield cache


def _images():
    return [torch.rand(3, 50, 70), torch.rand(3, 20, 20), torch.rand(3, 64, 48), torch.rand(3, 30, 30),
            torch.rand(3, 9, 40)]


def test_clip_scores_are_clips_own_logits(hub):
    prompts = {c: [f"a photo of {c.replace('_', ' ')}"] for c in PAPER_CLASSES}
    clf = ClipClassifier(classes=PAPER_CLASSES, prompts=prompts, device="cpu", batch_size=2)
    imgs = _images()
    p = clf(imgs)
    from ssattn.routing.base import to_pil

    inputs = clf.processor(text=[prompts[c][0] for c in PAPER_CLASSES], images=[to_pil(x) for x in imgs],
                           return_tensors="pt", padding=True)
    with torch.no_grad():
        ref = clf.model(**inputs).logits_per_image.softmax(-1)
    torch.testing.assert_close(p, ref, atol=1e-5, rtol=0)
    whole = ClipClassifier(classes=PAPER_CLASSES, prompts=prompts, device="cpu", batch_size=8)
    torch.testing.assert_close(whole(imgs), p, atol=1e-5, rtol=0)  # batching does not change an answer
    assert clf.settings["classes"] == list(PAPER_CLASSES)


def test_clip_prompt_ensemble_is_the_mean_embedding(hub):
    two = {"none": ["a clear photo", "a sharp photo"], "motion_blur": ["a blurry photo"]}
    clf = ClipClassifier(classes=("none", "motion_blur"), prompts=two, device="cpu")
    single = ClipClassifier(classes=("none", "motion_blur"), prompts={"none": ["a clear photo"],
                                                                      "motion_blur": ["a blurry photo"]}, device="cpu")
    emb = clf.class_embeddings()
    tok = clf.processor(text=two["none"], return_tensors="pt", padding=True)
    with torch.no_grad():
        from ssattn.routing.clip import _features

        e = torch.nn.functional.normalize(_features(clf.model.get_text_features(**tok)), dim=-1)
    torch.testing.assert_close(emb[0], torch.nn.functional.normalize(e.mean(0), dim=0), atol=1e-6, rtol=0)
    assert not torch.allclose(emb[0], single.class_embeddings()[0])
    assert clf(torch.rand(2, 3, 32, 32)).shape == (2, 2)
    with pytest.raises(ValueError, match="no entry for classes"):
        ClipClassifier(classes=("none", "reflection"), prompts=two, device="cpu")


def test_vlm_reads_the_letters_at_the_first_generated_position(hub):
    clf = VlmClassifier(device="cpu", batch_size=2)
    text = clf.chat_text()
    assert "A. super-resolution degradation" in text and "D. no visible degradation" in text
    assert text.rstrip().endswith("ASSISTANT:")
    imgs = _images()
    p = clf(imgs)
    assert p.shape == (5, 4) and torch.allclose(p.sum(1), torch.ones(5))
    # The same position greedy decoding scores first: generate's first-step scores.
    from ssattn.routing.base import to_pil

    inputs = clf.processor(images=[to_pil(x) for x in imgs[:2]], text=[text] * 2, return_tensors="pt", padding=True)
    with torch.no_grad():
        gen = clf.model.generate(**inputs, max_new_tokens=1, do_sample=False, output_scores=True,
                                 return_dict_in_generate=True)
    ids = clf.letter_ids
    ref = torch.stack([gen.scores[0][:, i].logsumexp(-1) for i in ids], -1).softmax(-1)
    torch.testing.assert_close(p[:2], ref, atol=1e-5, rtol=0)
    one = VlmClassifier(device="cpu", batch_size=1)
    torch.testing.assert_close(one(imgs), p, atol=1e-5, rtol=0)  # batching does not change an answer


def test_vlm_prompt_classes_and_letters_are_configurable(hub):
    clf = VlmClassifier(classes=("motion_blur", "none"), question="What is wrong with this photo?",
                        descriptions={"motion_blur": "it is shaky", "none": "nothing"}, device="cpu")
    assert clf.prompt().startswith("What is wrong with this photo?\nA. it is shaky\nB. nothing")
    assert clf(torch.rand(3, 3, 24, 24)).shape == (3, 2)
    low = VlmClassifier("tiny/lowercase-llava", letters="abcd", device="cpu")
    assert low.letters == "abcd" and low(_images()[:1]).shape == (1, 4)
    with pytest.raises(ValueError, match="no token for the option letters"):
        VlmClassifier("tiny/lowercase-llava", device="cpu")
    with pytest.raises(ValueError, match="letters must be"):
        VlmClassifier(letters="AAB", device="cpu")


def test_letter_token_ids_take_every_spelling():
    class Tok:
        def get_vocab(self):
            return {"A": 5, "\u2581A": 9, "\u0120B": 7, "B": 3, "AB": 11, "a": 2}

    assert letter_token_ids(Tok(), "AB") == [[5, 9], [3, 7]]
    with pytest.raises(ValueError, match=r"\['C'\]"):
        letter_token_ids(Tok(), "ABC")
