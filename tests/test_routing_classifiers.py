"""Degradation classifiers: the embedded one on a held-out generated set; CLIP and a VLM on tiny models.

The tiny models are written as the hub cache holds them and loaded through
the real from_pretrained path (as tests/test_guidance_models.py does).
"""

import pytest
import torch

from ssattn.routing import ALL_CLASSES, FEATURES, PAPER_CLASSES, EmbeddedClassifier, features
from ssattn.routing import _embedded_fit

FIT_SEED = int(_embedded_fit.FITS[0]["trained_on"].split("seed=")[1].split(",")[0])


# ----------------------------------------------------------------- embedded
@pytest.fixture(scope="module")
def held_out():
    pytest.importorskip("skimage")
    from ssattn.apps.data.degradations import DegradationSet

    # Another seed than the fit's: other crops, reflections and parameters.
    return DegradationSet(n=120, size=128, seed=FIT_SEED + 1000, split="train", kinds=PAPER_CLASSES).tensors()


def test_embedded_reaches_85_percent_on_held_out_paper_classes(held_out):
    x, y, sev = held_out
    clf = EmbeddedClassifier(PAPER_CLASSES)
    p = clf(x)
    pred = p.argmax(1)
    acc = (pred == y).float().mean().item()
    confusion = torch.zeros(4, 4, dtype=torch.long).index_put_((y, pred), torch.ones_like(y), accumulate=True)
    assert acc >= 0.85, (acc, confusion)
    recall = confusion.diag().float() / confusion.sum(1)
    assert (recall >= 0.6).all(), confusion  # no class given up for the others
    torch.testing.assert_close(p.sum(1), torch.ones(len(x)))


def test_embedded_batch_list_and_subsets_agree(held_out):
    x = held_out[0][:6]
    clf = EmbeddedClassifier()
    batch = clf(x)
    torch.testing.assert_close(clf(list(x)), batch)
    sizes = [torch.rand(3, 40, 70), torch.rand(3, 16, 16), torch.rand(3, 600, 530), torch.rand(3, 1, 5)]
    assert clf(sizes).shape == (4, 4)
    sub = EmbeddedClassifier(("none", "motion_blur"))
    assert sub.settings["fit"] == "paper4" and sub(x).shape == (6, 2)
    # restricting the classes is a softmax over the chosen logits
    torch.testing.assert_close(sub(x), batch[:, [3, 2]] / batch[:, [3, 2]].sum(1, keepdim=True))
    six = EmbeddedClassifier(ALL_CLASSES)
    assert six.settings["fit"] == "all6" and six(x).shape == (6, 6)
    with pytest.raises(ValueError, match="unknown here"):
        EmbeddedClassifier(("fog",))
    with pytest.raises(ValueError, match="at least 16x16"):
        features(torch.rand(1, 3, 8, 8))


def test_features_are_finite_and_blockiness_sees_a_jpeg_grid():
    x = torch.rand(2, 3, 64, 64) * 0.1 + 0.45
    f = features(x)
    assert f.shape == (2, len(FEATURES)) and torch.isfinite(f).all()
    blocky = x.clone()
    blocky[..., 8::8] += 0.05  # a step at every 8th column: what JPEG block edges look like
    g = features(blocky)
    assert (g[:, FEATURES.index("block_x")] > f[:, FEATURES.index("block_x")] + 0.5).all()
    assert torch.allclose(g[:, FEATURES.index("block_y")], f[:, FEATURES.index("block_y")], atol=0.2)


def test_embedded_fit_matches_the_features():
    for fit in _embedded_fit.FITS:
        assert tuple(fit["features"]) == FEATURES
        assert len(fit["weight"]) == len(FEATURES) and len(fit["weight"][0]) == len(fit["classes"])


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
