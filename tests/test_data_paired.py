"""Image loading and PairedGuidanceDataset: layouts, pairing, cache use, on-the-fly guidance, bad input."""

import logging

import numpy as np
import pytest
import torch
from PIL import Image

from ssattn.apps.cli import main
from ssattn.apps.data import ImageLoadError, PairedGuidanceDataset, find_layout, list_images, load_image, to_image_tensor
from ssattn import images as images_mod
from ssattn.images import file_sha256, resize_image
from ssattn.guidance import GuidanceCache, SaliencyGuide, render_maps, testing


def _save(path, h, w, seed):
    rng = np.random.default_rng(seed)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(path)


def _paired(root, deg="raw", ref="reference", n=3, sizes=None):
    for i in range(n):
        h, w = (sizes or [(20 + i, 30)] * n)[i]
        _save(root / deg / f"{i}_img.png", h, w, i)
        _save(root / ref / f"{i}_img.jpg", h, w, 100 + i)  # same stem, other extension
    return root


# ------------------------------------------------------------------ images
def test_load_image_modes(tmp_path):
    rng = np.random.default_rng(0)
    gray = rng.integers(0, 256, (6, 5), dtype=np.uint8)
    Image.fromarray(gray).save(tmp_path / "g.png")
    x = load_image(tmp_path / "g.png")
    assert x.shape == (3, 6, 5) and x.dtype == torch.float32
    assert torch.equal(x[0], x[1]) and torch.equal(x[0], x[2])
    torch.testing.assert_close(x[0], torch.from_numpy(gray).float() / 255)
    rgba = rng.integers(0, 256, (4, 7, 4), dtype=np.uint8)
    Image.fromarray(rgba, "RGBA").save(tmp_path / "a.png")
    torch.testing.assert_close(load_image(tmp_path / "a.png"), torch.from_numpy(rgba[..., :3]).permute(2, 0, 1).float() / 255)
    deep = np.array([[0, 32768, 65535]], dtype=np.uint16)
    Image.fromarray(deep).save(tmp_path / "d.png")
    x = load_image(tmp_path / "d.png")
    torch.testing.assert_close(x[0, 0], torch.tensor([0.0, 32768 / 65535, 1.0]))
    Image.fromarray(rng.integers(0, 256, (3, 3, 3), dtype=np.uint8)).convert("P").save(tmp_path / "p.png")
    assert load_image(tmp_path / "p.png").shape == (3, 3, 3)
    Image.fromarray(np.zeros((1, 1), np.float32) + 0.25, "F").save(tmp_path / "f.tif")
    assert torch.allclose(load_image(tmp_path / "f.tif"), torch.full((3, 1, 1), 0.25))


def _write_png16(path, a: np.ndarray, filters) -> None:
    """A 16-bit RGB(A) PNG written from the PNG specification (PIL cannot write one): row r filtered with
    filters[r % len(filters)] (0 None, 1 Sub, 2 Up, 3 Average, 4 Paeth), the reconstruction's inverse."""
    import struct
    import zlib

    h, w, ch = a.shape
    orig = [list(a[r].astype(">u2").tobytes()) for r in range(h)]
    bpp, rows = 2 * ch, []
    for r in range(h):
        kind = filters[r % len(filters)]
        line = [kind]
        for i, x in enumerate(orig[r]):
            left = orig[r][i - bpp] if i >= bpp else 0
            up = orig[r - 1][i] if r > 0 else 0
            ul = orig[r - 1][i - bpp] if r > 0 and i >= bpp else 0
            p = left + up - ul
            paeth = left if abs(p - left) <= min(abs(p - up), abs(p - ul)) else (up if abs(p - up) <= abs(p - ul) else ul)
            pred = [0, left, up, (left + up) // 2, paeth][kind]
            line.append((x - pred) % 256)
        rows.append(bytes(line))

    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", w, h, 16, 2 if ch == 3 else 6, 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(b"".join(rows)))
                     + chunk(b"IEND", b""))


def test_16_bit_colour_images_keep_every_bit(tmp_path):
    rng = np.random.default_rng(0)
    a = rng.integers(0, 65536, size=(9, 13, 3), dtype=np.uint16)
    a[0, :4] = [[0, 1, 255], [256, 257, 65535], [32768, 32767, 1000], [65534, 2, 3]]  # low bytes matter
    exact = torch.from_numpy(a.astype(np.float64) / 65535).permute(2, 0, 1).float()
    for filters in ([0], [1], [2], [3], [4], [4, 3, 2, 1, 0, 1, 4]):
        _write_png16(tmp_path / "deep.png", a, filters)
        assert Image.open(tmp_path / "deep.png").mode == "RGB"  # what PIL makes of it: 8 bits per channel
        x = load_image(tmp_path / "deep.png")
        assert torch.equal(x, exact), filters
        assert torch.equal((x.double() * 65535).round().to(torch.int32), torch.from_numpy(a.astype(np.int32)).permute(2, 0, 1))
    rgba = np.concatenate([a, rng.integers(0, 65536, size=(9, 13, 1), dtype=np.uint16)], axis=2)
    _write_png16(tmp_path / "deep_alpha.png", rgba, [4, 1])
    assert torch.equal(load_image(tmp_path / "deep_alpha.png"), exact)  # alpha dropped, colours kept
    tifffile = pytest.importorskip("tifffile")
    tifffile.imwrite(tmp_path / "deep.tif", a, photometric="rgb")
    assert torch.equal(load_image(tmp_path / "deep.tif"), exact)


def test_load_image_errors(tmp_path, monkeypatch):
    (tmp_path / "x.png").write_bytes(b"nope")
    with pytest.raises(ImageLoadError, match="x.png"):
        load_image(tmp_path / "x.png")
    with pytest.raises(ImageLoadError, match="missing.png"):
        load_image(tmp_path / "missing.png")
    _save(tmp_path / "big.png", 40, 50, 0)
    monkeypatch.setattr(images_mod, "MAX_PIXELS", 1000)
    with pytest.raises(ImageLoadError, match="more than the limit"):
        load_image(tmp_path / "big.png")


def test_awkward_files_and_listing(tmp_path):
    expected = testing.write_awkward_images(tmp_path, huge=(900, 1400))
    (tmp_path / "readme.txt").write_text("x")
    (tmp_path / "sub").mkdir()
    _save(tmp_path / "sub" / "deep.png", 4, 4, 0)
    names = [p.name for p in list_images(tmp_path)]
    assert names == sorted(expected) and "deep.png" in [p.name for p in list_images(tmp_path, recursive=True)]
    for name, size in expected.items():
        if size is None:
            with pytest.raises(ImageLoadError, match=name):
                load_image(tmp_path / name)
        else:
            x = load_image(tmp_path / name)
            assert x.shape == (3, *size) and x.min() >= 0 and x.max() <= 1 and x.is_contiguous()
    with pytest.raises(FileNotFoundError, match="does not exist"):
        list_images(tmp_path / "nothing")


def test_to_image_tensor_and_resize():
    u8 = (torch.rand(3, 4, 5) * 255).byte()
    torch.testing.assert_close(to_image_tensor(u8), u8.float() / 255)
    assert to_image_tensor(torch.rand(1, 4, 5)).shape == (3, 4, 5)
    assert to_image_tensor(torch.rand(4, 5)).shape == (3, 4, 5)
    with pytest.raises(ValueError, match=r"\(3, H, W\)"):
        to_image_tensor(torch.rand(5, 4, 4))
    up = resize_image(torch.rand(3, 1, 1), (7, 9))
    assert up.shape == (3, 7, 9) and up.min() >= 0 and up.max() <= 1


# ------------------------------------------------------------------ dataset
def test_layouts_and_pairing(tmp_path, caplog):
    root = _paired(tmp_path / "uieb", "Raw-890", "reference-890")
    _save(root / "Raw-890" / "lonely.png", 8, 8, 0)
    with caplog.at_level(logging.WARNING, logger="ssattn.apps.data"):
        ds = PairedGuidanceDataset(root)
    assert len(ds) == 3 and "without a partner" in caplog.text
    assert [p[0].stem for p in ds.pairs] == ["0_img", "1_img", "2_img"]
    assert find_layout(_paired(tmp_path / "euvp", "trainA", "trainB", n=1))[0].name == "trainA"
    deg, ref, guide = ds[1]
    assert deg.shape == ref.shape == (3, 21, 30) and guide.shape == (1, 21, 30)
    torch.testing.assert_close(deg, load_image(ds.pairs[1][0]))
    expect = SaliencyGuide()([load_image(ds.pairs[1][0])])[0]
    torch.testing.assert_close(guide, expect)
    explicit = PairedGuidanceDataset(root, layout=("Raw-890", "reference-890"))
    assert len(explicit) == 3


def test_size_and_dataloader(tmp_path):
    root = _paired(tmp_path / "d", "input", "target", sizes=[(20, 30), (41, 17), (5, 3)])
    ds = PairedGuidanceDataset(root, size=(16, 24), gamma=3.0, delta=0.1, combine="mean")
    deg, ref, guide = ds[2]
    assert deg.shape == ref.shape == (3, 16, 24) and guide.shape == (1, 16, 24)
    grids = ds.grids(2)
    torch.testing.assert_close(guide, render_maps(grids, [(16, 24)], gamma=3.0, delta=0.1, combine="mean")[0])
    batch = next(iter(torch.utils.data.DataLoader(ds, batch_size=3)))
    assert [t.shape for t in batch] == [(3, 3, 16, 24), (3, 3, 16, 24), (3, 1, 16, 24)]
    assert all(t.dtype == torch.float32 and t.min() >= 0 and t.max() <= 1 for t in batch)
    assert PairedGuidanceDataset(root, size=8)[0][2].shape == (1, 8, 8)
    with pytest.raises(ValueError, match="size"):
        PairedGuidanceDataset(root, size=(0, 4))
    with pytest.raises(ValueError, match="combine"):
        PairedGuidanceDataset(root, combine="median")


def test_reads_the_cache_written_by_ssattn_guide(tmp_path):
    root = _paired(tmp_path / "d")
    cache_dir = tmp_path / "cache"
    assert main(["guide", str(root / "raw"), "--out", str(cache_dir), "--workers", "0", "--no-progress"]) == 0
    ds = PairedGuidanceDataset(root, cache_dir)
    cache = GuidanceCache.open_existing(cache_dir)
    # replace one entry by a known grid: the dataset must serve it, not recompute
    sha = file_sha256(ds.pairs[0][0])
    known = torch.zeros(1, 64, 64)
    known[0, 10:20, 30:40] = 1.0
    cache.put(sha, known, [], (20, 30))
    _, _, guide = ds[0]
    torch.testing.assert_close(guide, render_maps(known, [(20, 30)])[0])
    assert guide.max() > 0.5


def test_missing_entries_computed_and_stored(tmp_path):
    root = _paired(tmp_path / "d", n=2)
    cache_dir = tmp_path / "cache"
    ds = PairedGuidanceDataset(root, cache_dir)
    _, _, g0 = ds[0]
    cache = GuidanceCache(cache_dir, SaliencyGuide().settings)
    entry = cache.get(file_sha256(ds.pairs[0][0]))
    assert entry is not None and entry.image_size == (20, 30)
    torch.testing.assert_close(g0, entry.render()[0])
    assert cache.get(file_sha256(ds.pairs[1][0])) is None  # only what was asked for


def test_model_cache_without_guide_says_what_to_run(tmp_path):
    root = _paired(tmp_path / "d", n=1)
    cache_dir = tmp_path / "cache"
    GuidanceCache(cache_dir, {"method": "blip", "aligner": "x"}).write_settings()
    ds = PairedGuidanceDataset(root, cache_dir)
    with pytest.raises(RuntimeError, match="ssattn guide"):
        ds[0]


def test_dataset_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        PairedGuidanceDataset(tmp_path / "none")
    (tmp_path / "odd" / "a").mkdir(parents=True)
    with pytest.raises(FileNotFoundError, match="no known paired layout"):
        PairedGuidanceDataset(tmp_path / "odd")
    (tmp_path / "empty" / "input").mkdir(parents=True)
    (tmp_path / "empty" / "target").mkdir(parents=True)
    with pytest.raises(FileNotFoundError, match="no image pairs"):
        PairedGuidanceDataset(tmp_path / "empty")
    with pytest.raises(FileNotFoundError, match="layout folder"):
        PairedGuidanceDataset(tmp_path / "empty", layout=("input", "gt"))


def test_awkward_pairs(tmp_path):
    expected = testing.write_awkward_images(tmp_path / "d" / "input", huge=(700, 1000))
    testing.write_awkward_images(tmp_path / "d" / "target", huge=(700, 1000))
    cache_dir = tmp_path / "cache"
    ds = PairedGuidanceDataset(tmp_path / "d", cache_dir, size=32)
    for i, (deg_path, _) in enumerate(ds.pairs):
        if expected[deg_path.name] is None:
            with pytest.raises(ImageLoadError, match=deg_path.name):
                ds[i]
            continue
        deg, ref, guide = ds[i]
        assert deg.shape == (3, 32, 32) and guide.shape == (1, 32, 32) and torch.isfinite(guide).all()
    n_good = sum(s is not None for s in expected.values())
    assert len(list(GuidanceCache(cache_dir, SaliencyGuide().settings).dir.rglob("*.pt"))) == n_good
