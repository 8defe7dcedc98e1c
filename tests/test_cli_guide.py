"""`ssattn guide`: awkward inputs, resuming, overlays, errors, BLIP options, and two ranks on gloo."""

import os
import socket

import pytest
import torch

from ssattn.apps.cli import main
from ssattn.images import file_sha256, list_images
from ssattn.guidance import GuidanceCache, SaliencyGuide, testing
from ssattn.guidance.precompute import precompute, shard


def _args(images, out, *extra):
    return ["guide", str(images), "--out", str(out), "--workers", "0", "--no-progress", *extra]


@pytest.fixture(scope="module")
def awkward(tmp_path_factory):
    folder = tmp_path_factory.mktemp("awkward")
    return folder, testing.write_awkward_images(folder, huge=(1200, 1800))


def _cache_for(out, guide=None):
    return GuidanceCache(out, (guide or SaliencyGuide()).settings)


def test_awkward_folder_with_overlays(awkward, tmp_path, capsys):
    folder, expected = awkward
    out = tmp_path / "cache"
    assert main(_args(folder, out, "--overlay", "--batch-size", "3")) == 0
    good = {n: s for n, s in expected.items() if s is not None}
    text = capsys.readouterr()
    assert f"{len(good)} computed, 0 already cached, 2 unreadable" in text.out
    assert "broken.png" in text.err and "truncated.jpg" in text.err
    cache = _cache_for(out)
    from PIL import Image

    for name, (h, w) in good.items():
        e = cache.get(file_sha256(folder / name))
        assert e is not None and e.image_size == (h, w) and e.grids.shape == (1, 64, 64)
        assert torch.isfinite(e.grids).all() and e.grids.min() >= 0 and e.grids.max() <= 1
        with Image.open(out / "overlays" / (name + ".png")) as ov:  # the whole name: a.png and a.jpg differ
            assert ov.size == (w, h) and ov.mode == "RGB"
    assert not list(out.rglob("*.tmp*"))
    assert main(_args(folder, out)) == 0  # second run: everything cached
    assert f"0 computed, {len(good)} already cached, 2 unreadable" in capsys.readouterr().out


def test_big_images_are_shrunk_for_overlays_only(tmp_path, monkeypatch):
    from PIL import Image

    from ssattn.guidance import precompute as pc

    monkeypatch.setattr(pc, "KEEP_MAX_SIDE", 16)
    folder = tmp_path / "imgs"
    folder.mkdir()
    Image.fromarray((torch.rand(30, 40, 3) * 255).byte().numpy()).save(folder / "a.png")
    stats = precompute(folder, tmp_path / "c", SaliencyGuide(), overlay_dir=tmp_path / "ov", progress=False)
    assert stats.computed == 1
    assert _cache_for(tmp_path / "c").get(file_sha256(folder / "a.png")).image_size == (30, 40)
    with Image.open(tmp_path / "ov" / "a.png.png") as ov:
        assert ov.size == (16, 12)


class _Interrupt(Exception):
    pass


class _FailingGuide(SaliencyGuide):
    """Saliency that dies on its second batch (an interrupted run)."""

    calls = 0

    def grids(self, *a, **k):
        type(self).calls += 1
        if type(self).calls == 2:
            raise _Interrupt()
        return super().grids(*a, **k)


def test_resume_after_interruption_and_damage(tmp_path, capsys):
    folder = tmp_path / "imgs"
    folder.mkdir()
    for i in range(7):
        torch.manual_seed(i)
        from PIL import Image

        Image.fromarray((torch.rand(20 + i, 30, 3) * 255).byte().numpy()).save(folder / f"{i}.png")
    out = tmp_path / "cache"
    with pytest.raises(_Interrupt):
        precompute(folder, out, _FailingGuide(), batch_size=3, progress=False)
    cache = _cache_for(out)
    files = list_images(folder)
    done = [f for f in files if cache.get(file_sha256(f)) is not None]
    assert len(done) == 3 and not list(out.rglob("*.tmp*"))
    before = {f.name: cache.path(file_sha256(f)).read_bytes() for f in done}
    stats = precompute(folder, out, SaliencyGuide(), batch_size=3, progress=False)
    assert (stats.computed, stats.cached, stats.failed) == (4, 3, [])
    assert {f.name: cache.path(file_sha256(f)).read_bytes() for f in done} == before  # nothing rewritten
    # damage two entries: one deleted, one truncated; only those are recomputed
    cache.path(file_sha256(files[0])).unlink()
    p = cache.path(file_sha256(files[5]))
    p.write_bytes(p.read_bytes()[:40])
    assert main(_args(folder, out, "--batch-size", "4")) == 0
    assert "2 computed, 5 already cached" in capsys.readouterr().out
    assert all(cache.get(file_sha256(f)) is not None for f in files)


def test_empty_and_missing_folders(tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "notes.txt").write_text("no images here")
    assert main(_args(tmp_path / "empty", tmp_path / "c")) == 2
    assert "no images in" in capsys.readouterr().err
    assert main(_args(tmp_path / "nope", tmp_path / "c")) == 2
    assert "is not a folder" in capsys.readouterr().err
    assert main(_args(tmp_path / "empty", tmp_path / "c", "--method", "saliency", "--prompt", "fish")) == 2
    assert "need --method blip" in capsys.readouterr().err
    assert main(_args(tmp_path / "empty", tmp_path / "c", "--gamma", "0.5")) == 2
    assert "--gamma >= 1" in capsys.readouterr().err


def test_blip_options(tmp_path, capsys):
    pytest.importorskip("transformers")
    hub = tmp_path / "hub"
    testing.hub_snapshot(hub, "Salesforce/blip-itm-base-coco", testing.save_blip)
    folder = tmp_path / "imgs"
    testing.write_awkward_images(folder, huge=(300, 500))
    out = tmp_path / "cache"
    with testing.offline_hub_cache(hub):
        assert main(_args(folder, out, "--classes", "fish, diver", "--device", "cpu", "--overlay")) == 0
        assert "8 computed" in capsys.readouterr().out
        from ssattn.guidance.factory import make_guide

        guide = make_guide("blip", classes="fish, diver", device="cpu")
        cache = _cache_for(out, guide)
        e = cache.get(file_sha256(folder / "rgb.png"))
        assert e.prompts == ["fish", "diver"] and e.grids.shape == (2, 24, 24)
        # the same folder under another prompt is another cache entry set, not a hit
        assert main(_args(folder, out, "--prompt", "a sea turtle", "--device", "cpu")) == 0
        assert "8 computed, 0 already cached" in capsys.readouterr().out
        assert main(_args(folder, out, "--aligner", "Salesforce/not-downloaded", "--prompt", "fish")) == 2
        err = capsys.readouterr().err
        assert "Salesforce/not-downloaded" in err and "HF_HUB_OFFLINE" in err


def test_two_ranks_destroy_their_group_when_guide_refuses(tmp_path):
    # A refusal after the process group exists (here a model that is not downloaded) still destroys it: a group
    # left to the interpreter's exit keeps its backend's threads running into shutdown.
    pytest.importorskip("transformers")
    folder = tmp_path / "imgs"
    testing.write_awkward_images(folder)
    with testing.offline_hub_cache(tmp_path / "hub"):
        _two_ranks(folder, tmp_path / "cache", tmp_path / "results", "--aligner", "Salesforce/not-downloaded",
                   "--prompt", "fish")
    results = tmp_path / "results"
    assert [(results / f"rank{r}").read_text().split("\n")[0] for r in range(2)] == ["2", "2"]
    assert [(results / f"group-left.rank{r}").read_text() for r in range(2)] == ["False", "False"]


def test_shard_covers_each_file_once():
    files = list(range(11))
    parts = [shard(files, r, 3) for r in range(3)]
    assert sorted(sum(parts, [])) == files and all(len(p) in (3, 4) for p in parts)


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _rank_main(rank, world, port, images, out, results, extra=()):
    torch.set_num_threads(1)
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port))
    import contextlib
    import io

    import torch.distributed as dist

    from ssattn.apps.cli import main as cli_main

    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        rc = cli_main(["guide", images, "--out", out, "--workers", "0", "--no-progress", "--device", "cpu",
                       "--batch-size", "2", *extra])
    with open(os.path.join(results, f"rank{rank}"), "w") as f:
        f.write(f"{rc}\n{buf.getvalue()}")
    with open(os.path.join(results, f"group-left.rank{rank}"), "w") as f:
        f.write(str(dist.is_initialized()))


def _two_ranks(folder, out, results, *extra):
    import torch.multiprocessing as mp

    results.mkdir()
    # fork (where there is one) reuses the imported torch: a spawned child spends ~8 s CPU importing it again
    method = "fork" if "fork" in mp.get_all_start_methods() else "spawn"
    mp.start_processes(_rank_main, args=(2, _free_port(), str(folder), str(out), str(results), extra), nprocs=2,
                       join=True, start_method=method)


def test_two_ranks_on_gloo(tmp_path):
    from PIL import Image

    folder = tmp_path / "imgs"
    folder.mkdir()
    for i in range(9):
        Image.fromarray((torch.rand(16, 24 + i, 3) * 255).byte().numpy()).save(folder / f"{i:02d}.png")
    out, results = tmp_path / "cache", tmp_path / "results"
    _two_ranks(folder, out, results)
    assert [(results / f"group-left.rank{r}").read_text() for r in range(2)] == ["False", "False"]
    reports = [(results / f"rank{r}").read_text() for r in range(2)]
    assert [r.split("\n")[0] for r in reports] == ["0", "0"]
    assert "9 computed, 0 already cached" in reports[0]  # counts summed over ranks: each file done once
    assert "computed" not in reports[1]  # only rank 0 prints the summary
    cache = _cache_for(out)
    files = list_images(folder)
    assert all(cache.get(file_sha256(f)) is not None for f in files)
    assert len(list(cache.dir.rglob("*.pt"))) == len(files)
