"""Guidance cache: keyed by content + settings, atomic writes, corrupt and stale entries detected."""

import logging

import pytest
import torch

from ssattn.guidance import GuidanceCache, settings_id

SHA_A = "a" * 64
SHA_B = "b" * 64


def _cache(tmp_path, **extra):
    return GuidanceCache(tmp_path / "c", {"method": "test", "grid": 4, **extra})


def test_roundtrip_and_render(tmp_path):
    c = _cache(tmp_path)
    grids = torch.rand(2, 4, 4)
    c.put(SHA_A, grids, ["fish", "diver"], (30, 20))
    e = c.get(SHA_A)
    assert torch.equal(e.grids, grids) and e.prompts == ["fish", "diver"] and e.image_size == (30, 20)
    (m,) = e.render(gamma=2.0, delta=0.2)
    assert m.shape == (1, 30, 20)
    levels = e.render([(30, 20), (15, 10)], combine="mean")
    assert [tuple(x.shape) for x in levels] == [(1, 30, 20), (1, 15, 10)]
    assert c.get(SHA_B) is None and c.hits == 1 and c.misses == 1
    assert (c.dir / "settings.json").exists()
    assert not list(c.dir.rglob("*.tmp"))  # no temporary file left behind
    reopened = GuidanceCache.open_existing(tmp_path / "c")
    assert reopened.id == c.id and reopened.settings == c.settings and torch.equal(reopened.get(SHA_A).grids, grids)


def test_settings_change_the_key():
    base = {"method": "blip", "aligner": "x", "prompts": ["fish"], "joint": False}
    ids = {settings_id(base), settings_id({**base, "aligner": "y"}), settings_id({**base, "prompts": ["diver"]}),
           settings_id({**base, "joint": True}), settings_id({**base, "method": "saliency"})}
    assert len(ids) == 5
    assert settings_id(dict(reversed(list(base.items())))) == settings_id(base)  # order does not matter


@pytest.mark.parametrize("damage", ["truncate", "garbage", "empty", "flip"])
def test_corrupt_entry_is_rejected(tmp_path, damage, caplog):
    c = _cache(tmp_path)
    c.put(SHA_A, torch.rand(1, 4, 4), ["fish"], (8, 8))
    path = c.path(SHA_A)
    data = path.read_bytes()
    if damage == "truncate":
        path.write_bytes(data[: len(data) // 2])
    elif damage == "garbage":
        path.write_bytes(b"\x00garbage" * 50)
    elif damage == "empty":
        path.write_bytes(b"")
    else:  # valid file, content changed after the checksum was taken
        d = torch.load(path, weights_only=True)
        d["grids"] = d["grids"] + 0.5
        torch.save(d, path)
    with caplog.at_level(logging.WARNING, logger="ssattn.guidance"):
        assert c.get(SHA_A) is None
    assert c.rejected == 1 and "recomputing" in caplog.text
    c.put(SHA_A, torch.rand(1, 4, 4), ["fish"], (8, 8))  # recompute replaces it
    assert c.get(SHA_A) is not None


def test_stale_entry_is_rejected(tmp_path):
    c = _cache(tmp_path)
    c.put(SHA_A, torch.rand(1, 4, 4), ["fish"], (8, 8))
    # an entry copied under another image's name, or written under other settings, has the wrong key
    c.path(SHA_B).parent.mkdir(parents=True, exist_ok=True)
    c.path(SHA_B).write_bytes(c.path(SHA_A).read_bytes())
    assert c.get(SHA_B) is None
    other = _cache(tmp_path, grid=8)
    other.path(SHA_A).parent.mkdir(parents=True, exist_ok=True)
    other.path(SHA_A).write_bytes(c.path(SHA_A).read_bytes())
    assert other.get(SHA_A) is None and c.get(SHA_A) is not None


def test_open_existing_choices(tmp_path):
    assert GuidanceCache.open_existing(tmp_path / "none") is None
    a = _cache(tmp_path)
    a.write_settings()
    b = _cache(tmp_path, grid=8)
    b.write_settings()
    with pytest.raises(ValueError, match="several settings"):
        GuidanceCache.open_existing(tmp_path / "c")
    assert GuidanceCache.open_existing(tmp_path / "c", which=b.id).settings["grid"] == 8
    with pytest.raises(FileNotFoundError, match="no guidance settings"):
        GuidanceCache.open_existing(tmp_path / "c", which="0" * 16)


def test_put_validates(tmp_path):
    with pytest.raises(ValueError, match=r"\(P, gh, gw\)"):
        _cache(tmp_path).put(SHA_A, torch.rand(4, 4), ["x"], (4, 4))
