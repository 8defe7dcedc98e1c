"""`ssattn route` end to end on a folder: labels.csv, restored images, resuming, unreadable files, errors."""

import csv

import numpy as np
import pytest
import torch
from PIL import Image

from ssattn.apps.cli import main
from ssattn.guidance import testing

pytest.importorskip("skimage")


def _args(images, out, *extra):
    return ["route", str(images), "--out", str(out), "--no-progress", "--device", "cpu", *extra]


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    from ssattn.apps.data.degradations import DegradationSet

    root = tmp_path_factory.mktemp("route")
    x, y, _ = DegradationSet(n=8, size=64, seed=3).tensors()
    for i, img in enumerate(x):
        arr = (img.permute(1, 2, 0).numpy() * 255 + 0.5).astype(np.uint8)
        Image.fromarray(arr).save(root / f"{i:02d}.png")
    (root / "broken.png").write_bytes(b"not a png at all")
    Image.fromarray(np.full((3, 5, 3), 90, np.uint8)).save(root / "tiny.png")
    return root


def _labels(out):
    with open(out / "labels.csv") as f:
        return list(csv.DictReader(f))


def test_labels_resume_and_unreadable(folder, tmp_path, capsys):
    out = tmp_path / "out"
    assert main(_args(folder, out, "--batch-size", "3")) == 0
    text = capsys.readouterr()
    assert "9 classified, 0 already cached, 1 unreadable" in text.out and "broken.png" in text.err
    rows = _labels(out)
    assert [r["file"] for r in rows] == [f"{i:02d}.png" for i in range(8)] + ["tiny.png"]
    assert all(r["class"] in ("noise_blur_jpeg", "reflection", "motion_blur", "none") for r in rows)
    assert all(0.25 <= float(r["confidence"]) <= 1 for r in rows) and all(r["route"] == r["class"] for r in rows)
    assert main(_args(folder, out)) == 0
    assert "0 classified, 9 already cached, 1 unreadable" in capsys.readouterr().out
    assert _labels(out) == rows
    # the answers are the classifier's
    from ssattn.images import load_image
    from ssattn.routing import PAPER_CLASSES, EmbeddedClassifier

    p = EmbeddedClassifier()([load_image(folder / r["file"]) for r in rows])
    assert [r["class"] for r in rows] == [PAPER_CLASSES[i] for i in p.argmax(1).tolist()]


def test_experts_write_restored_images(folder, tmp_path, capsys):
    from ssattn.apps.training import TrainConfig, build_model
    from ssattn.apps.training.trainer import save_checkpoint

    ckpts = {}
    for name, arch in (("noise_blur_jpeg", "unet"), ("reflection", "unet-ss"), ("motion_blur", "unet")):
        spec = {"arch": arch, "width": 8}
        model = build_model(spec)
        path = tmp_path / f"{name}.pt"
        save_checkpoint(str(path), model, torch.optim.SGD(model.parameters(), lr=0.1), 0, TrainConfig(), spec, {})
        ckpts[name] = path
    spec = ",".join(f"{k}={v}" for k, v in ckpts.items())
    out = tmp_path / "out"
    assert main(_args(folder, out, "--experts", spec)) == 0
    capsys.readouterr()
    rows = _labels(out)
    restored = {p.name for p in (out / "restored").glob("*.png")}
    assert restored == {r["file"] for r in rows if r["route"] != "none"}
    for r in rows:
        if r["route"] != "none":
            with Image.open(out / "restored" / r["file"]) as im, Image.open(folder / r["file"]) as src:
                assert im.size == src.size
    assert main(_args(folder, out, "--experts", spec)) == 0
    assert "0 classified, 9 already cached" in capsys.readouterr().out


def test_errors_are_messages_and_exit_2(folder, tmp_path, capsys):
    cases = [
        (_args(tmp_path / "nope", tmp_path / "o"), "is not a folder"),
        (_args(folder, tmp_path / "o", "--classes", "none,fog"), "ssattn route: --classes: fog is unknown here; give "
                                                                 "some of noise_blur_jpeg,reflection,"),
        (_args(folder, tmp_path / "o", "--classes", "none,none"), "--classes: none is given twice"),
        (_args(folder, tmp_path / "o", "--experts", "reflection"), "CLASS=CHECKPOINT"),
        (_args(folder, tmp_path / "o", "--experts", "reflection=missing.pt"), "is not a file"),
        (_args(folder, tmp_path / "o", "--threshold", "0.5"), "go together"),
        (_args(folder, tmp_path / "o", "--classifier", "clip", "--model", "openai/not-downloaded"), "not-downloaded"),
    ]
    (tmp_path / "empty").mkdir()
    (tmp_path / "afile").write_text("x")
    cases.append((_args(folder, tmp_path / "afile"), "is a file"))
    cases.append((_args(tmp_path / "empty", tmp_path / "o"), "no images in"))
    with testing.offline_hub_cache(tmp_path / "hub"):
        for argv, msg in cases:
            assert main(argv) == 2, argv
            assert msg in capsys.readouterr().err, argv


def test_vlm_classifier_from_the_command_line(folder, tmp_path, capsys):
    pytest.importorskip("transformers")
    from ssattn.guidance import DEFAULT_CAPTIONER

    hub = tmp_path / "hub"
    testing.hub_snapshot(hub, DEFAULT_CAPTIONER, lambda d: testing.save_llava(d, extra_chars="ABCD"))
    out = tmp_path / "out"
    with testing.offline_hub_cache(hub):
        assert main(_args(folder, out, "--classifier", "vlm", "--classes", "motion_blur,none", "--batch-size", "4")) == 0
        assert "9 classified" in capsys.readouterr().out
        rows = _labels(out)
        assert len(rows) == 9 and {r["class"] for r in rows} <= {"motion_blur", "none"}
        # another classifier is another set of cache entries, not a hit
        assert main(_args(folder, out, "--classes", "motion_blur,none")) == 0
        assert "9 classified, 0 already cached" in capsys.readouterr().out


def test_images_of_one_size_go_through_the_router_as_one_batch(tmp_path, capsys, monkeypatch):
    from ssattn.apps.training import TrainConfig, build_model
    from ssattn.apps.training.trainer import save_checkpoint
    from ssattn.routing import router as router_module

    images = tmp_path / "mixed"
    images.mkdir()
    rng = np.random.default_rng(0)
    for i, (h, w) in enumerate([(64, 64), (48, 80), (64, 64), (48, 80), (64, 64)]):
        Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(images / f"{i}.png")
    spec = {"arch": "unet", "width": 8}
    model = build_model(spec)
    ckpt = tmp_path / "expert.pt"
    save_checkpoint(str(ckpt), model, torch.optim.SGD(model.parameters(), lr=0.1), 0, TrainConfig(), spec, {})
    batches = []
    forward = router_module.DegradationRouter.forward

    def counting(self, x, **kw):
        batches.append(tuple(x.shape))
        return forward(self, x, **kw)

    monkeypatch.setattr(router_module.DegradationRouter, "forward", counting)
    experts = ",".join(f"{c}={ckpt}" for c in ("noise_blur_jpeg", "reflection", "motion_blur", "none"))
    assert main(_args(images, tmp_path / "out", "--experts", experts, "--batch-size", "8")) == 0
    assert "5 classified" in capsys.readouterr().out
    assert sorted(batches) == [(2, 3, 48, 80), (3, 3, 64, 64)]
    assert len(list((tmp_path / "out" / "restored").glob("*.png"))) == 5


def test_restored_images_whose_names_differ_only_by_extension_are_both_kept(tmp_path, capsys):
    # a.jpg and a.png would both be restored/a.png: each is named by its full file name instead (as guide's
    # overlays are), while an image whose stem is unique keeps its stem.
    from ssattn.apps.training import TrainConfig, build_model
    from ssattn.apps.training.trainer import save_checkpoint

    images = tmp_path / "dup"
    (images / "sub").mkdir(parents=True)
    rng = np.random.default_rng(1)
    for name in ("a.jpg", "a.png", "b.png", "sub/a.png", "a.jpg.png"):
        Image.fromarray(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)).save(images / name)
    spec = {"arch": "unet", "width": 8}
    model = build_model(spec)
    ckpt = tmp_path / "expert.pt"
    save_checkpoint(str(ckpt), model, torch.optim.SGD(model.parameters(), lr=0.1), 0, TrainConfig(), spec, {})
    experts = ",".join(f"{c}={ckpt}" for c in ("noise_blur_jpeg", "reflection", "motion_blur", "none"))
    out = tmp_path / "out"
    assert main(_args(images, out, "--experts", experts, "--recursive")) == 0
    capsys.readouterr()
    restored = sorted(p.relative_to(out / "restored").as_posix() for p in (out / "restored").rglob("*.png"))
    # a.jpg.png's own stem is a.jpg, which a.jpg's full name would take: it too gets its full name
    assert restored == ["a.jpg.png", "a.jpg.png.png", "a.png.png", "b.png", "sub/a.png"]
    assert len(_labels(out)) == 5


def test_the_embedded_classifier_says_how_far_to_trust_it(folder, tmp_path, capsys):
    # Its labels are right on about 83-87% of unseen photographs: the command says so, and how to do better,
    # unless a threshold already keeps the uncertain images out.
    from ssattn.routing import EmbeddedClassifier

    assert main(_args(folder, tmp_path / "a")) == 0
    out = capsys.readouterr().out
    accuracy = EmbeddedClassifier().held_out_accuracy
    assert 0.5 < accuracy < 1
    assert f"right on {accuracy:.0%} of photographs it never saw" in out and "--threshold 0.7" in out
    assert main(_args(folder, tmp_path / "b", "--threshold", "0.7", "--fallback", "none")) == 0
    assert "photographs it never saw" not in capsys.readouterr().out
