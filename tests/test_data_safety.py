"""Data safety: compact cache entries, one overlay per image whatever its name, weights-only checkpoints."""

import os
import warnings
from pathlib import Path

import pytest
import torch

from ssattn.apps.cli import main
from ssattn.guidance import GuidanceCache, SaliencyGuide
from ssattn.guidance.precompute import NAME_MAX, overlay_path, precompute

warnings.filterwarnings("ignore", message=r"ssattn\..*falling back")


# --------------------------------------------------------------------------- cache entries
def test_cache_entry_size_does_not_grow_with_the_batch(tmp_path):
    cache = GuidanceCache(tmp_path, SaliencyGuide().settings)
    sizes = {}
    for batch in (1, 8, 32):
        grids = torch.rand(batch, 1, 64, 64)  # what a guide returns for a batch; entries are its rows
        cache.put(f"{batch:02x}" + "0" * 62, grids[batch - 1], ["a prompt"], (64, 64))
        sizes[batch] = os.path.getsize(cache.path(f"{batch:02x}" + "0" * 62))
    assert sizes[1] == sizes[8] == sizes[32], sizes
    assert sizes[1] < 64 * 64 * 4 + 4096  # the grid's 16 KB and a little metadata
    entry = cache.get("20" + "0" * 62)
    assert entry is not None and entry.grids.shape == (1, 64, 64)


# --------------------------------------------------------------------------- overlays
def _save(path, h=12, w=16, seed=0):
    from PIL import Image

    g = torch.Generator().manual_seed(seed)
    Image.fromarray((torch.rand(h, w, 3, generator=g) * 255).byte().numpy()).save(path)


def test_overlays_of_same_stem_images_do_not_collide(tmp_path):
    from PIL import Image

    folder = tmp_path / "imgs"
    folder.mkdir()
    for i, ext in enumerate(("png", "jpg", "bmp")):
        _save(folder / f"a.{ext}", h=10 + i, w=12 + i, seed=i)  # a different size each, to tell them apart
    stats = precompute(folder, tmp_path / "c", SaliencyGuide(), overlay_dir=tmp_path / "ov", progress=False)
    assert stats.computed == 3 and not stats.overlay_failed
    made = sorted(p.name for p in (tmp_path / "ov").iterdir())
    assert made == ["a.bmp.png", "a.jpg.png", "a.png.png"]
    for i, ext in enumerate(("png", "jpg", "bmp")):
        with Image.open(tmp_path / "ov" / f"a.{ext}.png") as ov:
            assert ov.size == (12 + i, 10 + i)


def test_overlay_path_keeps_long_names_unique_and_short(tmp_path):
    long_a, long_b = "x" * 250 + "a.png", "x" * 250 + "b.png"
    pa, pb = overlay_path(tmp_path, Path(long_a)), overlay_path(tmp_path, Path(long_b))
    assert pa != pb and len(pa.name.encode()) <= NAME_MAX and len(pb.name.encode()) <= NAME_MAX
    assert overlay_path(tmp_path, Path("sub/a.jpg")) == tmp_path / "sub" / "a.jpg.png"
    multibyte = Path("é" * 126 + ".png")  # 256 bytes: cut on a character boundary
    assert len(overlay_path(tmp_path, multibyte).name.encode()) <= NAME_MAX


def test_long_file_names_get_overlays_and_a_bad_one_does_not_stop_the_run(tmp_path, capsys, monkeypatch):
    folder = tmp_path / "imgs"
    folder.mkdir()
    names = ["n" * 240 + ".png", "m" * 251 + ".png", "ok.png"]  # 244 and 255 bytes long, and a short one
    for i, name in enumerate(names):
        _save(folder / name, seed=i)
    stats = precompute(folder, tmp_path / "c", SaliencyGuide(), overlay_dir=tmp_path / "ov", progress=False)
    assert stats.computed == 3 and not stats.overlay_failed
    assert len(list((tmp_path / "ov").iterdir())) == 3
    assert not [p for p in (tmp_path / "ov").iterdir() if ".tmp" in p.name]

    # One overlay the file system refuses: reported, the others written, guidance cached for all.
    from ssattn.guidance import precompute as pc

    real = pc.write_overlay

    def refuse_one(path, image, guidance, alpha=0.6):
        if path.name.startswith("ok"):
            raise OSError(36, "File name too long", str(path))
        return real(path, image, guidance, alpha)

    monkeypatch.setattr(pc, "write_overlay", refuse_one)
    out = tmp_path / "c2"
    assert main(["guide", str(folder), "--out", str(out), "--overlay", "--workers", "0", "--no-progress"]) == 0
    err = capsys.readouterr().err
    assert "could not write the overlays of" in err and "ok.png" in err
    assert len(list((out / "overlays").iterdir())) == 2
    cache = GuidanceCache(out, SaliencyGuide().settings)
    from ssattn.images import file_sha256

    assert all(cache.get(file_sha256(folder / n)) is not None for n in names)


# --------------------------------------------------------------------------- checkpoints
@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    from ssattn.apps.training import TrainConfig, build_model, train
    from ssattn.apps.data.synthetic import SyntheticUnderwater

    run = tmp_path_factory.mktemp("run")
    spec = {"arch": "unet", "width": 4}
    train(build_model(spec), SyntheticUnderwater(16, 4, 0, "train").tensors(),
          TrainConfig(steps=1, batch_size=2, progress=False), str(run), spec=spec)
    return run / "checkpoint.pt"


def test_checkpoints_load_weights_only(checkpoint):
    from ssattn.apps.training.trainer import load_checkpoint, load_model

    assert torch.serialization.get_unsafe_globals_in_checkpoint(str(checkpoint)) == []  # nothing to allow
    torch.load(checkpoint, weights_only=True)
    model, ckpt = load_model(str(checkpoint))
    assert ckpt["step"] == 1 and ckpt["spec"]["arch"] == "unet"
    assert load_checkpoint(str(checkpoint), unsafe=True)["step"] == 1


def test_old_checkpoints_with_numpy_rng_state_still_load(checkpoint, tmp_path):
    import numpy as np

    from ssattn.apps.training.trainer import load_checkpoint

    from ssattn.apps.data.synthetic import SyntheticUnderwater
    from ssattn.apps.training import TrainConfig, build_model, train

    ckpt = torch.load(checkpoint, weights_only=True)
    # What the trainer saved before (format 1): one RNG dict with numpy's tuple (an ndarray inside), no
    # scheduler, sampler position or world size.
    ckpt["rng"] = {**ckpt["rng"][0], "numpy": np.random.get_state()}
    for key in ("format", "scheduler", "scaler", "sampler", "world_size"):
        del ckpt[key]
    os.makedirs(tmp_path / "old")
    torch.save(ckpt, tmp_path / "old" / "checkpoint.pt")
    assert load_checkpoint(str(tmp_path / "old" / "checkpoint.pt"))["step"] == 1
    hist = train(build_model(ckpt["spec"]), SyntheticUnderwater(16, 4, 0, "train").tensors(),
                 TrainConfig(steps=2, batch_size=2, progress=False), str(tmp_path / "old"), spec=ckpt["spec"])
    assert hist["steps"] == 2 and hist["steps_run"] == 1  # and it resumes


class _RunsCode:
    def __reduce__(self):
        return (os.system, ("echo this-ran > ran.txt",))


def test_checkpoint_that_runs_code_is_refused_unless_unsafe(checkpoint, tmp_path, capsys, monkeypatch):
    from ssattn.apps.training.trainer import load_checkpoint

    ckpt = torch.load(checkpoint, weights_only=True)
    ckpt["history"]["extra"] = _RunsCode()
    bad = tmp_path / "bad.pt"
    torch.save(ckpt, bad)
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ValueError, match=r"holds objects other than tensors.*system.*unsafe"):
        load_checkpoint(str(bad))
    rc = main(["eval", "--checkpoint", str(bad), "--data", "synthetic", "--size", "16", "--n", "2", "--device", "cpu"])
    assert rc == 2 and "--unsafe-checkpoint" in capsys.readouterr().err
    assert not (tmp_path / "ran.txt").exists()
    # explicitly trusted: loaded the old way (and the code in it runs)
    load_checkpoint(str(bad), unsafe=True)
    assert (tmp_path / "ran.txt").exists()
