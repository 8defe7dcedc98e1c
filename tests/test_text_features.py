"""The text pipeline: captions from files and captioners, CLIP word features (a tiny CLIP), the feature cache."""

import json
import logging

import pytest
import torch

from ssattn.guidance.feature_cache import FeatureCache, content_key
from ssattn.guidance.hub import ModelNotAvailableError
from ssattn.routing.testing import save_clip
from ssattn.text import TextEncoder, TextFeatures, caption_images, pad_features, read_captions


@pytest.fixture(scope="module")
def clip_dir(tmp_path_factory):
    return save_clip(tmp_path_factory.mktemp("clip") / "tiny-clip", hidden=32)


# --------------------------------------------------------------------------- captions
def test_read_captions_from_a_folder_a_json_table_a_tsv_and_one_text(tmp_path):
    folder = tmp_path / "captions"
    folder.mkdir()
    (folder / "a.txt").write_text("a diver near a reef\n")
    (folder / "b.txt").write_text("two fish")
    assert read_captions(folder, ["a", "b"]) == ["a diver near a reef", "two fish"]
    (tmp_path / "t.json").write_text(json.dumps({"a": "a turtle", "b": "a shark", "c": "x"}))
    assert read_captions(tmp_path / "t.json", ["b", "a"]) == ["a shark", "a turtle"]
    (tmp_path / "t.tsv").write_text("a\ta crab on a rock\nb\tcoral\n")
    assert read_captions(tmp_path / "t.tsv", ["a", "b"]) == ["a crab on a rock", "coral"]
    (tmp_path / "one.txt").write_text("  the sea  \n")
    assert read_captions(tmp_path / "one.txt", ["a", "b", "c"]) == ["the sea"] * 3


def test_read_captions_errors_name_what_is_missing(tmp_path):
    folder = tmp_path / "captions"
    folder.mkdir()
    (folder / "a.txt").write_text("fish")
    with pytest.raises(ValueError, match=r"no entry for 1 of 2 image\(s\), e.g. \['b'\]"):
        read_captions(folder, ["a", "b"])
    (folder / "b.txt").write_text("   ")
    with pytest.raises(ValueError, match="empty"):
        read_captions(folder, ["a", "b"])
    (tmp_path / "bad.json").write_text("[1, 2]")
    with pytest.raises(ValueError, match="JSON object"):
        read_captions(tmp_path / "bad.json", ["a"])
    with pytest.raises(FileNotFoundError, match="neither a folder"):
        read_captions(tmp_path / "nope", ["a"])


def test_a_caption_given_as_text_is_every_images_caption_and_a_missing_path_is_an_error(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert read_captions("a fish over sand", ["0", "1"]) == ["a fish over sand"] * 2
    assert read_captions("  two divers. ", ["a"]) == ["two divers."]
    for typo in ("captions/", "data/captions", "captoins.txt", "names.JSON", "table.tsv"):
        with pytest.raises(FileNotFoundError, match=f"captions '{typo}': no such file or folder"):
            read_captions(typo, ["a"])
    with pytest.raises(ValueError, match="empty"):
        read_captions("   ", ["a"])
    (tmp_path / "sea.txt").write_text("the open sea")  # an existing file is still read as one
    assert read_captions("sea.txt", ["a"]) == ["the open sea"]


class _CountingCaptioner:
    settings = {"captioner": "fake", "question": "what is there?"}

    def __init__(self):
        self.seen = 0

    def __call__(self, images):
        self.seen += len(images)
        return [f"a picture of brightness {float(im.mean()):.3f}" for im in images]


def test_caption_images_asks_the_captioner_once_per_image_content(tmp_path):
    images = [torch.rand(3, 8, 8), torch.rand(3, 8, 8)]
    captioner = _CountingCaptioner()
    first = caption_images(images, captioner, cache_dir=tmp_path)
    assert captioner.seen == 2 and first[0].startswith("a picture")
    again = caption_images([images[1], images[0].clone()], _c := _CountingCaptioner(), cache_dir=tmp_path)
    assert _c.seen == 0 and again == first[::-1]  # from the disk cache, by content


# --------------------------------------------------------------------------- feature cache
def test_feature_cache_round_trip_memory_bound_and_corruption(tmp_path, caplog):
    cache = FeatureCache("test", {"model": "m"}, tmp_path, memory=1)
    a, b = content_key("a"), content_key("b")
    cache.put(a, {"x": torch.arange(6.0).view(2, 3), "n": torch.tensor([1, 2])})
    cache.put(b, {"x": torch.ones(1)})
    assert len(cache) == 1  # the bound: a left memory, not the disk
    got = cache.get(a)
    assert torch.equal(got["x"], torch.arange(6.0).view(2, 3)) and got["n"].dtype == torch.int64
    assert cache.hits == 1
    other = FeatureCache("test", {"model": "other"}, tmp_path)
    assert other.id != cache.id and other.get(a) is None  # other settings, other folder
    path = cache.path(b)
    path.write_bytes(path.read_bytes()[:40])  # truncated
    fresh = FeatureCache("test", {"model": "m"}, tmp_path)
    with caplog.at_level(logging.WARNING, logger="ssattn.guidance"):
        assert fresh.get(b) is None
    assert fresh.rejected == 1 and "unreadable" in caplog.text
    assert fresh.stored_settings() == {"model": "m"}


def test_feature_cache_rejects_an_entry_with_another_key(tmp_path):
    cache = FeatureCache("test", {}, tmp_path)
    a, b = content_key("a"), content_key("b")
    cache.put(a, {"x": torch.zeros(2)})
    cache.path(b).parent.mkdir(parents=True, exist_ok=True)
    cache.path(b).write_bytes(cache.path(a).read_bytes())  # a's entry under b's name
    assert FeatureCache("test", {}, tmp_path).get(b) is None


def test_content_key_tells_tensors_apart():
    x = torch.zeros(2, 3)
    assert content_key(x) == content_key(x.clone())
    assert content_key(x) != content_key(x.view(3, 2))
    assert content_key(x) != content_key(x.double())
    assert content_key("a", "b") != content_key("ab")


# --------------------------------------------------------------------------- CLIP word features
def test_text_encoder_gives_clip_hidden_states_and_the_padding_mask(clip_dir):
    from transformers import CLIPTextModel, CLIPTokenizer

    enc = TextEncoder(clip_dir)
    captions = ["a fish", "a diver near a coral reef"]
    feats = enc(captions)
    assert isinstance(feats, TextFeatures) and enc.channels == 32
    tok = CLIPTokenizer.from_pretrained(clip_dir)(captions, padding=True, return_tensors="pt")
    assert feats.words.shape == (2, tok["input_ids"].shape[1], 32)
    assert torch.equal(feats.mask, tok["attention_mask"] == 0)
    model = CLIPTextModel.from_pretrained(clip_dir).eval()
    with torch.no_grad():
        expect = model(**tok).last_hidden_state
    keep = ~feats.mask
    torch.testing.assert_close(feats.words[keep], expect[keep], rtol=1e-5, atol=1e-5)
    assert torch.equal(feats.words[feats.mask], torch.zeros_like(feats.words[feats.mask]))


def test_text_encoder_caches_each_caption(clip_dir, tmp_path, monkeypatch):
    enc = TextEncoder(clip_dir, cache_dir=tmp_path)
    first = enc(["a fish", "a reef", "a fish"])
    assert enc.cache.misses == 2 and len(enc.cache) == 2  # the repeat is encoded once
    again = TextEncoder(clip_dir, cache_dir=tmp_path)
    monkeypatch.setattr(again, "_encode", lambda captions: pytest.fail(f"encoded {captions} again"))
    second = again(["a reef", "a fish"])
    assert again.cache.hits == 2
    torch.testing.assert_close(second.words[0, : (~second.mask[0]).sum()], first.words[1, : (~first.mask[1]).sum()])
    other = TextEncoder(clip_dir, cache_dir=tmp_path, max_length=4)
    assert other.cache.id != enc.cache.id and other(["a diver near a coral reef"]).words.shape[1] == 4


def test_text_encoder_errors(clip_dir, tmp_path):
    enc = TextEncoder(clip_dir)
    with pytest.raises(TypeError, match="list of strings"):
        enc("a fish")
    with pytest.raises(ValueError, match=r"captions\[1\]"):
        enc(["a fish", ""])
    with pytest.raises(ModelNotAvailableError, match="CLIP tokenizer"):
        TextEncoder(tmp_path / "missing-model")


def test_pad_features_pads_with_zeros_and_marks_the_padding():
    feats = pad_features([torch.ones(2, 4), torch.ones(3, 4)])
    assert feats.words.shape == (2, 3, 4) and feats.mask.tolist() == [[False, False, True], [False, False, False]]
    sub = feats.index(torch.tensor([1]))
    assert sub.words.shape == (1, 3, 4) and sub.weight is None
