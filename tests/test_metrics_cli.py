"""`ssattn metrics` end to end: two methods against one reference folder give the table the library's functions
give; unmatched, missing and unreadable files are reported; masks are used; a segmenter adds IoU; LPIPS
without weights stops with one line."""

import csv
import json
import math
import warnings

import numpy as np
import pytest
import torch
from PIL import Image

from ssattn.apps.cli import main
from ssattn.images import load_image
from ssattn.metrics import confusion_matrix, iou_per_class, masked_psnr, masked_ssim, mean_iou, psnr, ssim, uciqe, uiqm

H, W = 32, 40   # above AlexNet's smallest input (31)


def _save(path, array):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.asarray(array, dtype=np.uint8)).save(path)


@pytest.fixture
def folders(tmp_path):
    """ref/{a,b,c}; m1/{a,b,c,extra} (errors inside the mask); m2/{a,b} (errors outside it, c missing);
    masks/{a,b,c}: 0/255 boxes."""
    rng = np.random.default_rng(0)
    mask = np.zeros((H, W), np.uint8)
    mask[6:18, 8:24] = 255
    inside = mask[..., None] > 0
    for s in "abc":
        ref = rng.integers(30, 220, (H, W, 3))
        _save(tmp_path / "ref" / f"{s}.png", ref)
        _save(tmp_path / "masks" / f"{s}.png", mask)
        noise = rng.integers(-25, 26, (H, W, 3))
        _save(tmp_path / "m1" / f"{s}.png", ref + noise * inside)
        if s != "c":
            _save(tmp_path / "m2" / f"{s}.png", ref + noise * ~inside)
    _save(tmp_path / "m1" / "extra.png", rng.integers(0, 255, (H, W, 3)))
    return tmp_path


def _run(capsys, *argv):
    rc = main([str(a) for a in ["metrics", *argv, "--device", "cpu", "--no-progress"]])
    out = capsys.readouterr()
    return rc, out.out, out.err


def _csv(path):
    with open(path) as f:
        return {(r["method"], r["image"]): r for r in csv.DictReader(f)}


def _load(*paths):
    return torch.stack([load_image(p) for p in paths]).double()


def test_two_methods_one_reference_give_the_table(folders, capsys):
    out = folders / "out"
    rc, stdout, stderr = _run(capsys, folders / "m1", folders / "m2", "--ref", folders / "ref", "--masks",
                              folders / "masks", "--out", out, "--no-lpips")
    assert rc == 0, stderr
    rows = _csv(out / "metrics.csv")
    assert sorted(rows) == [("m1", "a"), ("m1", "b"), ("m1", "c"), ("m1", "extra"), ("m2", "a"), ("m2", "b")]
    summary = json.loads((out / "summary.json").read_text())
    for method, stems in (("m1", "abc"), ("m2", "ab")):
        x = _load(*[folders / method / f"{s}.png" for s in stems])
        y = _load(*[folders / "ref" / f"{s}.png" for s in stems])
        fg = _load(*[folders / "masks" / f"{s}.png" for s in stems])[:, :1]
        expected = {"psnr": psnr(x, y), "ssim": ssim(x, y), "psnr_fg": masked_psnr(x, y, fg),
                    "ssim_fg": masked_ssim(x, y, fg), "uiqm": uiqm(x), "uciqe": uciqe(x)}
        for name, values in expected.items():
            got = [float(rows[(method, s)][name]) for s in stems]
            np.testing.assert_allclose(got, values.tolist(), rtol=1e-12, err_msg=f"{method} {name}")
        stats = summary["methods"][method]["metrics"]["psnr"]
        assert stats["count"] == len(stems) and stats["nonfinite"] == 0
        assert math.isclose(stats["mean"], float(expected["psnr"].mean()), rel_tol=1e-12)
        assert math.isclose(stats["std"], float(expected["psnr"].std(correction=0)), rel_tol=1e-9)
        assert f"| {method} | {len(stems) + (method == 'm1')} | {stats['mean']:.2f} ± {stats['std']:.2f} |" \
            in (out / "summary.md").read_text()
    # The no-reference metrics cover the output without a reference too; the full-reference ones leave it empty.
    assert rows[("m1", "extra")]["psnr"] == "" and float(rows[("m1", "extra")]["uiqm"]) == pytest.approx(
        float(uiqm(_load(folders / "m1" / "extra.png"))), rel=1e-12)
    assert "| method | images | PSNR | SSIM | PSNR fg | SSIM fg | UIQM | UCIQE |" in stdout


def test_unmatched_and_missing_files_are_reported(folders, capsys):
    Image.open(folders / "m1" / "a.png").save(folders / "m1" / "twice.png")
    Image.open(folders / "m1" / "a.png").save(folders / "m1" / "twice.jpg")   # one stem, two files: ambiguous
    out = folders / "out"
    rc, _, stderr = _run(capsys, folders / "m1", folders / "m2", "--ref", folders / "ref", "--out", out, "--no-lpips")
    assert rc == 0
    summary = json.loads((out / "summary.json").read_text())
    assert ("m1", "twice") not in _csv(out / "metrics.csv")
    assert [p["problem"] for p in summary["problems"]] == ["several files named twice.* (left out)"]
    assert summary["methods"]["m1"]["no_reference"] == ["extra"] and summary["methods"]["m1"]["missing"] == []
    assert summary["methods"]["m2"]["missing"] == ["c"] and summary["methods"]["m2"]["no_reference"] == []
    assert "1 outputs without a reference: extra" in stderr and "1 references without an output: c" in stderr
    md = (out / "summary.md").read_text()
    assert "m1: 1 without a reference: extra" in md and "m2: 1 references without an output: c" in md


def test_masks_are_used(folders, capsys):
    out = folders / "out"
    assert _run(capsys, folders / "m1", folders / "m2", "--ref", folders / "ref", "--masks", folders / "masks",
                "--out", out, "--no-lpips")[0] == 0
    rows = _csv(out / "metrics.csv")
    # m1's errors are inside the mask, m2's outside: m2 is perfect inside, m1 is worse inside than overall.
    assert all(float(rows[("m2", s)]["psnr_fg"]) == math.inf for s in "ab")
    assert all(float(rows[("m1", s)]["psnr_fg"]) < float(rows[("m1", s)]["psnr"]) for s in "abc")
    summary = json.loads((out / "summary.json").read_text())
    assert summary["methods"]["m2"]["metrics"]["psnr_fg"] == {
        "mean": None, "std": None, "count": 0, "nonfinite": 2, "nonfinite_by_kind": {"+inf": 2},
        "nonfinite_note": "2 left out of the mean and std: +inf for a, b (the output equals its reference inside the "
                          "mask)"}


def test_summary_gives_each_metrics_count_and_why_values_were_left_out(folders, capsys):
    """An output identical to its reference has PSNR +inf: the summary averages the other images and says so."""
    (folders / "m3").mkdir()
    (folders / "m3" / "a.png").write_bytes((folders / "ref" / "a.png").read_bytes())   # identical: PSNR +inf
    for s in "bc":
        (folders / "m3" / f"{s}.png").write_bytes((folders / "m1" / f"{s}.png").read_bytes())
    out = folders / "out"
    rc, _, stderr = _run(capsys, folders / "m3", "--ref", folders / "ref", "--out", out, "--no-lpips")
    assert rc == 0, stderr
    summary = json.loads((out / "summary.json").read_text())   # strict JSON: json.loads takes it
    stats = summary["methods"]["m3"]["metrics"]
    want = psnr(_load(*[folders / "m3" / f"{s}.png" for s in "bc"]),
                _load(*[folders / "ref" / f"{s}.png" for s in "bc"]))
    assert stats["psnr"]["count"] == 2 and stats["psnr"]["nonfinite"] == 1
    assert stats["psnr"]["nonfinite_by_kind"] == {"+inf": 1}
    assert math.isclose(stats["psnr"]["mean"], float(want.mean()), rel_tol=1e-12)
    assert stats["psnr"]["nonfinite_note"] == ("1 left out of the mean and std: +inf for a (the output equals its "
                                               "reference)")
    assert stats["ssim"]["count"] == 3 and stats["ssim"]["nonfinite"] == 0 and "nonfinite_note" not in stats["ssim"]
    md = (out / "summary.md").read_text()
    # the table of counts: n per metric (the finite values averaged), the left-out ones in brackets
    assert "| method | images | PSNR | SSIM | UIQM | UCIQE |" in md
    assert "| m3 | 3 | 2 (+1 inf) | 3 | 3 | 3 |" in md
    assert "- m3, PSNR: 1 left out of the mean and std: +inf for a (the output equals its reference)" in md


def test_a_corrupt_image_is_skipped_and_reported(folders, capsys):
    (folders / "m1" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n truncated")
    (folders / "ref" / "b.png").write_bytes(b"not an image")          # a broken reference: no full-reference row
    out = folders / "out"
    rc, _, stderr = _run(capsys, folders / "m1", "--ref", folders / "ref", "--out", out, "--no-lpips")
    assert rc == 0
    rows = _csv(out / "metrics.csv")
    assert ("m1", "broken") not in rows and rows[("m1", "b")]["psnr"] == "" and rows[("m1", "b")]["uiqm"] != ""
    problems = json.loads((out / "summary.json").read_text())["problems"]
    files = {p["file"].rsplit("/", 1)[-1]: p["problem"] for p in problems}
    assert files["broken.png"].startswith("skipped: cannot read image") and "b.png" in files
    assert "broken.png: skipped: cannot read image" in stderr and "Traceback" not in stderr


def test_lpips_without_weights_fails_in_one_line(folders, capsys, monkeypatch, tmp_path):
    pytest.importorskip("lpips")
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path / "empty-hub"))
    rc, _, stderr = _run(capsys, folders / "m1", "--ref", folders / "ref", "--out", folders / "out")
    assert rc == 2
    lines = stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("ssattn metrics: LPIPS needs alexnet-owt-7be5be79.pth")
    assert "--lpips-weights FILE" in lines[0] and "--no-lpips" in lines[0]
    rc, _, stderr = _run(capsys, folders / "m1", "--ref", folders / "ref", "--lpips-weights", tmp_path / "no.pth")
    assert rc == 2 and "no.pth" in stderr and len(stderr.strip().splitlines()) == 1


def test_lpips_column_with_a_weight_file(folders, capsys, tmp_path):
    lpips_pkg = pytest.importorskip("lpips")
    from ssattn.metrics import LPIPS

    torch.manual_seed(0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        net = lpips_pkg.LPIPS(net="alex", pnet_rand=True, verbose=False)
    weights = tmp_path / "alex.pth"
    torch.save({f"features.{k.split('.', 1)[1]}": v for k, v in net.net.state_dict().items()}, weights)
    tiny = np.random.default_rng(1).integers(0, 255, (20, 20, 3))    # below AlexNet's 31x31: reported, not fatal
    _save(folders / "m2" / "tiny.png", tiny)
    _save(folders / "ref" / "tiny.png", tiny[::-1])
    out = folders / "out"
    rc, _, stderr = _run(capsys, folders / "m2", "--ref", folders / "ref", "--out", out, "--lpips-weights", weights)
    assert rc == 0, stderr
    rows = _csv(out / "metrics.csv")
    assert rows[("m2", "tiny")]["lpips"] == "" and rows[("m2", "tiny")]["ssim"] != ""
    assert "tiny.png: no LPIPS: 20x20 is smaller than its backbone's 31x31" in stderr
    want = LPIPS("alex", weights)(_load(*[folders / "m2" / f"{s}.png" for s in "ab"]),
                                  _load(*[folders / "ref" / f"{s}.png" for s in "ab"]))
    np.testing.assert_allclose([float(rows[("m2", s)]["lpips"]) for s in "ab"], want.tolist(), rtol=1e-6)


@pytest.mark.parametrize("kind", ["torchscript", "whole"])
def test_segmenter_adds_per_class_iou(folders, capsys, tmp_path, kind):
    from ssattn.apps.training.segmentation import train_segmenter

    # The demo's segmenter (a logit per class and pixel), briefly trained on the references and their masks.
    refs = _load(*[folders / "ref" / f"{s}.png" for s in "abc"]).float()
    labels = (_load(*[folders / "masks" / f"{s}.png" for s in "abc"])[:, 0] > 0.5).long()
    net, _ = train_segmenter(refs, labels, num_classes=2, max_steps=3, batch_size=3, width=4, seed=0)
    path = tmp_path / f"seg-{kind}.pt"
    if kind == "torchscript":
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            torch.jit.trace(net, torch.rand(1, 3, H, W)).save(str(path))
    else:
        torch.save(net, path)
    out = folders / "out"
    argv = [folders / "m1", "--masks", folders / "masks", "--segmenter", path, "--classes", 2, "--out", out]
    if kind == "whole":
        rc, _, stderr = _run(capsys, *argv)
        assert rc == 2 and "--unsafe-checkpoint" in stderr and len(stderr.strip().splitlines()) == 1
        argv.append("--unsafe-checkpoint")
    rc, stdout, stderr = _run(capsys, *argv)
    assert rc == 0, stderr
    rows = _csv(out / "metrics.csv")
    x = _load(*[folders / "m1" / f"{s}.png" for s in "abc"]).float()
    with torch.no_grad():
        pred = net(x).argmax(1)
    target = (_load(*[folders / "masks" / f"{s}.png" for s in "abc"])[:, 0] > 0.5).long()
    conf = confusion_matrix(pred, target, 2)
    for i, s in enumerate("abc"):
        assert float(rows[("m1", s)]["miou"]) == pytest.approx(float(mean_iou(conf[i])), abs=1e-12)
        got = [float(v) if v != "nan" else math.nan for v in (rows[("m1", s)]["iou_0"], rows[("m1", s)]["iou_1"])]
        np.testing.assert_allclose(got, iou_per_class(conf[i]).tolist(), atol=1e-12)
    entry = json.loads((out / "summary.json").read_text())["methods"]["m1"]
    assert entry["miou_pooled"] == pytest.approx(float(mean_iou(conf.sum(0))), abs=1e-12)
    assert "mIoU (pooled)" in stdout


def _save_scripted(module, path) -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch.jit's deprecation notice
        torch.jit.script(module).save(str(path))


class _ColourSegmenter(torch.nn.Module):
    """Three classes by dominant colour, at half resolution (the command resizes the logits)."""

    def forward(self, x):
        return torch.nn.functional.avg_pool2d(x, 2) * 10


def test_multiclass_segmenter_with_low_resolution_logits(folders, capsys, tmp_path):
    rng = np.random.default_rng(2)
    for s in "abc":
        _save(folders / "labels" / f"{s}.png", rng.integers(0, 3, (H, W)))   # label maps 0, 1, 2 (mode L)
    path = tmp_path / "colour.pt"
    _save_scripted(_ColourSegmenter(), path)
    out = folders / "out"
    rc, _, stderr = _run(capsys, folders / "m1", "--masks", folders / "labels", "--segmenter", path, "--classes", 3,
                         "--out", out)
    assert rc == 0, stderr
    x = _load(*[folders / "m1" / f"{s}.png" for s in "abc"]).float()
    logits = torch.nn.functional.interpolate(_ColourSegmenter()(x), size=(H, W), mode="bilinear",
                                             align_corners=False)
    target = torch.stack([torch.from_numpy(np.array(Image.open(folders / "labels" / f"{s}.png"))).long()
                          for s in "abc"])
    conf = confusion_matrix(logits.argmax(1), target, 3)
    rows = _csv(out / "metrics.csv")
    for i, s in enumerate("abc"):
        np.testing.assert_allclose([float(rows[("m1", s)][f"iou_{c}"]) for c in range(3)],
                                   iou_per_class(conf[i]).tolist(), atol=1e-12)
    # the masked PSNR/SSIM columns need --ref; without it there are none
    assert "psnr_fg" not in next(iter(rows.values()))


class _RedLogit(torch.nn.Module):
    """One binary logit channel (a segmenter trained with BCE): class 1 where red exceeds one half."""

    def forward(self, x):
        return x[:, :1] - 0.5


def test_a_single_logit_channel_is_binary(folders, capsys, tmp_path):
    path = tmp_path / "red.pt"
    _save_scripted(_RedLogit(), path)
    out = folders / "out"
    rc, _, stderr = _run(capsys, folders / "m1", "--masks", folders / "masks", "--segmenter", path, "--classes", 2,
                         "--out", out)
    assert rc == 0, stderr
    x = _load(*[folders / "m1" / f"{s}.png" for s in "abc"]).float()
    target = (_load(*[folders / "masks" / f"{s}.png" for s in "abc"])[:, 0] > 0.5).long()
    conf = confusion_matrix((x[:, 0] > 0.5).long(), target, 2)
    rows = _csv(out / "metrics.csv")
    for i, s in enumerate("abc"):
        assert float(rows[("m1", s)]["miou"]) == pytest.approx(float(mean_iou(conf[i])), abs=1e-12)
    # the same logit with --classes 3 is refused: one channel means two classes
    rc, _, stderr = _run(capsys, folders / "m1", "--masks", folders / "masks", "--segmenter", path, "--classes", 3,
                         "--out", out)
    assert rc == 2 and "for --classes 3" in stderr


def test_argument_errors_are_one_line(folders, capsys, tmp_path):
    for argv, needle in (
        ([tmp_path / "nope"], "OUTPUTS"),
        ([folders / "m1", "--ref", tmp_path / "nope"], "--ref"),
        ([folders / "m1", "--segmenter", tmp_path / "x.pt", "--classes", 2], "--segmenter needs --masks"),
        ([folders / "m1", "--classes", 3], "--classes"),
        ([folders / "m1", "--masks", folders / "masks", "--segmenter", tmp_path / "x.pt", "--classes", 2],
         "does not exist"),
    ):
        rc, _, stderr = _run(capsys, *argv)
        assert rc == 2 and needle in stderr and len(stderr.strip().splitlines()) == 1, stderr


def test_empty_weight_and_segmenter_files_are_named(folders, capsys, tmp_path):
    pytest.importorskip("lpips")
    empty = tmp_path / "empty.pt"
    empty.write_bytes(b"")
    for argv, flag in (([folders / "m1", "--ref", folders / "ref", "--lpips-weights", empty], "LPIPS backbone weights"),
                       ([folders / "m1", "--masks", folders / "masks", "--segmenter", empty, "--classes", 2],
                        "--segmenter")):
        rc, _, stderr = _run(capsys, *argv, "--out", folders / "out")
        lines = stderr.strip().splitlines()
        assert rc == 2 and len(lines) == 1, stderr
        assert flag in lines[0] and lines[0].endswith(f"{str(empty)!r} is empty (0 bytes)"), lines[0]


def _demo_segmenter(folders, tmp_path):
    """A tiny segmenter trained and saved the demo's way (5 classes, TorchScript), with 5-class label maps."""
    from ssattn.apps.training.segmentation import TORCHSCRIPT_FILE, save_torchscript, train_segmenter

    rng = np.random.default_rng(3)
    for s in "abc":
        labels = np.zeros((H, W), np.uint8)
        for c in range(1, 5):   # a box per class
            y, x = rng.integers(0, H - 8), rng.integers(0, W - 8)
            labels[y:y + 8, x:x + 8] = c
        _save(folders / "labels" / f"{s}.png", labels)
    refs = _load(*[folders / "ref" / f"{s}.png" for s in "abc"]).float()
    target = torch.stack([torch.from_numpy(np.array(Image.open(folders / "labels" / f"{s}.png"))).long()
                          for s in "abc"])
    net, _ = train_segmenter(refs, target, num_classes=5, max_steps=3, batch_size=3, width=4, seed=0)
    path = tmp_path / "demo" / TORCHSCRIPT_FILE
    save_torchscript(net, path)
    return net, path


def test_the_demos_segmenter_file_gives_the_modules_miou(folders, capsys, tmp_path):
    net, path = _demo_segmenter(folders, tmp_path)
    # An image whose sides are not multiples of 8 (the U-Net's): the file pads it (edge pixels repeated) and crops.
    rng = np.random.default_rng(4)
    _save(folders / "m1" / "odd.png", rng.integers(0, 255, (H + 4, W + 4, 3)))
    _save(folders / "labels" / "odd.png", rng.integers(0, 5, (H + 4, W + 4)))
    out = folders / "out"
    rc, _, stderr = _run(capsys, folders / "m1", "--masks", folders / "labels", "--segmenter", path, "--classes", 5,
                         "--out", out)
    assert rc == 0, stderr
    rows = _csv(out / "metrics.csv")
    stems = ["a", "b", "c", "odd"]
    labels = {s: torch.from_numpy(np.array(Image.open(folders / "labels" / f"{s}.png"))).long() for s in stems}
    x = _load(*[folders / "m1" / f"{s}.png" for s in "abc"]).float()
    odd = _load(folders / "m1" / "odd.png").float()
    with torch.no_grad():
        pred = list(net(x).argmax(1))
        padded = torch.nn.functional.pad(odd, (0, 4, 0, 4), mode="replicate")
        pred.append(net(padded)[..., :H + 4, :W + 4].argmax(1)[0])
    conf = torch.stack([confusion_matrix(p[None], labels[s][None], 5)[0] for p, s in zip(pred, stems)])
    for i, s in enumerate(stems):
        assert float(rows[("m1", s)]["miou"]) == pytest.approx(float(mean_iou(conf[i])), abs=1e-12), s
    entry = json.loads((out / "summary.json").read_text())["methods"]["m1"]
    assert entry["miou_pooled"] == pytest.approx(float(mean_iou(conf.sum(0))), abs=1e-12)


@pytest.mark.slow   # a second interpreter importing torch: a few seconds, more on a loaded machine
def test_the_demos_segmenter_file_loads_without_ssattn(folders, tmp_path):
    import subprocess
    import sys

    net, path = _demo_segmenter(folders, tmp_path)
    x = torch.rand(2, 3, 24, 16)
    torch.save(x, tmp_path / "x.pt")
    code = ("import sys; sys.modules['ssattn'] = None\n"   # importing ssattn fails in this interpreter
            "import torch\n"
            f"net = torch.jit.load({str(path)!r})\n"
            f"torch.save(net(torch.load({str(tmp_path / 'x.pt')!r})), {str(tmp_path / 'y.pt')!r})\n")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=tmp_path,
                          env={**__import__("os").environ, "OMP_NUM_THREADS": "1"})
    assert done.returncode == 0, done.stderr
    with torch.no_grad():
        want = net(x)
    torch.testing.assert_close(torch.load(tmp_path / "y.pt"), want)   # float32 tolerances: thread counts may differ


def test_a_state_dict_points_to_the_torchscript_copy_beside_it(folders, capsys, tmp_path):
    """The ablation's segmenter.pt holds a state dict (for resuming); the error names the copy the command reads."""
    from ssattn.apps.training.segmentation import TORCHSCRIPT_FILE

    net, path = _demo_segmenter(folders, tmp_path)
    state = path.parent / "segmenter.pt"
    torch.save({"hash": "x", "state": net.state_dict()}, state)
    rc, _, stderr = _run(capsys, folders / "m1", "--masks", folders / "labels", "--segmenter", state, "--classes", 5)
    lines = stderr.strip().splitlines()
    assert rc == 2 and len(lines) == 1 and "holds a state dict, not a network" in lines[0]
    assert lines[0].endswith(f"a TorchScript copy is beside it: --segmenter {str(path.parent / TORCHSCRIPT_FILE)!r}")
