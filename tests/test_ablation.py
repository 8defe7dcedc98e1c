"""The -SS ablation runner (ssattn.apps.ablation, benchmarks/ablation_ss.py) at a tiny budget: 2 seeds, 2
variants. Pairing holds (the same initial U-Net weights and the same batches for every variant of a seed),
finished runs are not redone, a changed setting is, and the table, its findings and the plot are written."""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import os
import pathlib
import warnings

import pytest
import torch
from PIL import Image

from ssattn.apps.ablation import VARIANTS, AblationConfig, run_all, summarize
from ssattn.apps.ablation.runner import read_run, state_digest
from ssattn.models import UNet

warnings.filterwarnings("ignore", message=r"ssattn\..*falling back")

SCRIPT = pathlib.Path(__file__).resolve().parents[1] / "benchmarks" / "ablation_ss.py"
TINY = dict(size=16, n_train=16, n_test=8, width=4, steps=3, batch_size=4, seeds=(0, 1),
            variants=("baseline", "both_paper"), guidances=("oracle",), seg_max_steps=10, seg_eval_every=5,
            seg_width=4, seg_batch=4, feature_images=4)


def _script():
    spec = importlib.util.spec_from_file_location("ablation_ss", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _mtimes(folder) -> dict:
    runs = pathlib.Path(folder) / "runs"
    return {p.name: p.stat().st_mtime_ns for p in runs.glob("*.json")}


def test_runner_pairs_every_variant_of_a_seed_and_resumes(tmp_path):
    config = AblationConfig(**TINY)
    out = str(tmp_path / "ablation")
    said = []
    first = run_all(config, out, log=said.append, progress=False)
    assert first["ran"] == 4 and first["done"] == 0 and not first["skipped"]
    runs = {(v, s): read_run(out, config, v, g, s) for v, g in (("baseline", None), ("both_paper", "oracle"))
            for s in (0, 1)}
    assert all(r is not None for r in runs.values())
    for seed in (0, 1):
        base, ss = runs[("baseline", seed)], runs[("both_paper", seed)]
        # The same initial weights of the plain U-Net, and the same items read in the same order.
        assert base["init_digest"] == ss["init_digest"]
        assert base["batch_digest"] == ss["batch_digest"] and base["items_read"] == ss["items_read"] == 3 * 4
        torch.manual_seed(seed)
        assert state_digest(UNet(3, 3, 4)) == base["init_digest"]  # what the digest says: the seed's U-Net
        assert ss["params"] > base["params"] and len(ss["guard_history"]) == 1  # one guard check in 3 steps
        for r in (base, ss):
            assert set(r["scores"]) >= {"psnr", "ssim", "psnr_fg", "ssim_fg", "psnr_bg", "ssim_bg", "miou", "iou"}
            assert len(r["scores"]["iou"]) == 5 and 0 <= r["scores"]["miou"] <= 1
    # Another seed: other weights and another batch order.
    assert runs[("baseline", 0)]["init_digest"] != runs[("baseline", 1)]["init_digest"]
    assert runs[("baseline", 0)]["batch_digest"] != runs[("baseline", 1)]["batch_digest"]

    before = _mtimes(out)
    again = run_all(config, out, log=said.append, progress=False)
    assert again["ran"] == 0 and again["done"] == 4 and _mtimes(out) == before  # nothing redone
    assert any("4 run(s) already finished, 0 to run" in line for line in said)

    longer = dataclasses.replace(config, steps=4)  # another budget: another hash, so every run is redone
    assert run_all(longer, out, log=said.append, progress=False)["ran"] == 4
    assert read_run(out, config, "baseline", None, 0) is None and read_run(out, longer, "baseline", None, 0)


def test_parallel_runs_give_the_same_results(tmp_path):
    config = dataclasses.replace(AblationConfig(**TINY), seeds=(0,))
    one, two = str(tmp_path / "one"), str(tmp_path / "two")
    run_all(config, one, log=lambda s: None, progress=False)
    assert run_all(config, two, jobs=2, log=lambda s: None, progress=False)["ran"] == 2
    for v, g in (("baseline", None), ("both_paper", "oracle")):
        a, b = read_run(one, config, v, g, 0), read_run(two, config, v, g, 0)
        assert a["scores"] == b["scores"] and a["batch_digest"] == b["batch_digest"]


def test_script_writes_table_findings_and_plot(tmp_path, capsys):
    out = tmp_path / "abl"
    args = ["--out", str(out), "--steps", "3", "--seeds", "2", "--size", "16", "--n-train", "16", "--n-test", "8",
            "--width", "4", "--batch-size", "4", "--variants", "baseline,attention", "--guidance", "oracle",
            "--seg-max-steps", "10", "--no-progress"]
    assert _script().main(args) == 0
    text = capsys.readouterr().out
    assert "Pairing held in every run" in text and "wrote table.json, table.md, paired.png" in text
    table = json.load(open(out / "table.json"))  # strict JSON: the reference's infinite PSNR is null
    assert table["bounds"]["reference"]["psnr"] is None and table["classes"][3] == "robot"
    rows = {(r["variant"], r["guidance"]): r for r in table["rows"]}
    assert set(rows) == {("baseline", None), ("attention", "oracle")}
    att = rows[("attention", "oracle")]
    base = rows[("baseline", None)]
    # A paired difference is the per-seed difference of the two runs' scores.
    want = [a - b for a, b in zip(att["metrics"]["psnr_fg"]["per_seed"], base["metrics"]["psnr_fg"]["per_seed"])]
    assert att["paired"]["psnr_fg"]["per_seed"] == pytest.approx(want, abs=1e-12)
    assert att["train_flags"] == "--levels dec3,dec2 --align-form paper --eta 1 --align-weight 0"
    md = (out / "table.md").read_text()
    assert "| attention only (lambda 0) | oracle | 2 |" in md and "robot" in md
    assert ("No variant shows a foreground gain larger than twice its paired spread." in md
            or "Foreground gains larger than twice their paired spread" in md)
    assert Image.open(out / "paired.png").size[0] > 600
    # --report-only writes the table again from the finished runs; in an empty folder it says what to do.
    assert _script().main(args + ["--report-only"]) == 0
    capsys.readouterr()
    assert _script().main(["--out", str(tmp_path / "empty"), "--report-only"]) == 2
    assert "no ablation yet" in capsys.readouterr().err


def test_config_errors_name_the_setting():
    with pytest.raises(ValueError, match="variants: \\['nope'\\]"):
        AblationConfig(variants=("baseline", "nope"))
    with pytest.raises(ValueError, match="must include 'baseline'"):
        AblationConfig(variants=("attention",))
    with pytest.raises(ValueError, match="guidances"):
        AblationConfig(guidances=("masks",))
    with pytest.raises(ValueError, match="size must be a multiple of 8"):
        AblationConfig(size=20)


def test_variants_are_the_public_api_and_train_options():
    levels = ("dec3", "dec2")
    assert VARIANTS["both_normalized"].model_options(levels) == {"levels": levels, "form": "normalized", "eta": 1.0,
                                                                 "weight": 0.1}
    assert VARIANTS["alignment"].model_options(levels)["attention_levels"] == ()
    assert VARIANTS["alignment"].train_flags(levels).startswith("--attention-levels none --align-levels dec3,dec2")
    assert VARIANTS["eta0"].train_flags(levels) == "--levels dec3,dec2 --align-form paper --eta 0 --align-weight 0.1"
    assert not VARIANTS["baseline_2x"].guided and VARIANTS["baseline_2x"].steps_factor == 2
    from ssattn.apps.ablation.variants import build

    align_only = build(VARIANTS["alignment"], 4, levels)  # unet_ss(attention_levels=(), align_levels=levels)
    assert len(align_only.blocks) == 0 and align_only.align_sites == list(levels) and align_only.takes_map
    attention = build(VARIANTS["attention"], 4, levels)
    assert set(attention.pairs) == set(levels) and attention.align.weight == 0.0


def test_summary_counts_guard_warnings_and_flags_broken_pairing(tmp_path):
    config = dataclasses.replace(AblationConfig(**TINY), seeds=(0,))
    out = str(tmp_path / "abl")
    run_all(config, out, log=lambda s: None, progress=False)
    path = os.path.join(out, "runs", "both_paper-oracle-s0.json")
    r = json.load(open(path))
    # checks of a run whose features grew 4x inside the map and 1.5x over the level: the paper form's guard warns
    r["guard_history"] = [{"call": 1, "rms": [1.0, 1.0], "rms_in_map": [1.0, 1.0]},
                          {"call": 51, "rms": [1.0, 1.2], "rms_in_map": [1.0, 2.0]},
                          {"call": 101, "rms": [1.0, 1.5], "rms_in_map": [1.0, 4.0]}]
    r["batch_digest"] = "something else"
    json.dump(r, open(path, "w"))
    bounds = json.load(open(os.path.join(out, "bounds.json")))
    table = summarize(config, out, bounds)
    row = next(x for x in table["rows"] if x["variant"] == "both_paper")
    assert row["guard"]["fired"] == 1 and not row["pairing"]
    assert row["guard"]["per_seed"] == [{"rms_growth": 1.5, "rms_in_map_growth": 4.0, "warns_at": 101}]
    assert any(line.startswith("PAIRING BROKEN in: both_paper oracle") for line in table["findings"])


def test_alignment_only_runs_through_the_public_stages(tmp_path):
    # unet_ss(attention_levels=(), align_levels=...): no attention block, so no parameter beyond the U-Net's,
    # and the loss's guard still watches the decoder features.
    config = dataclasses.replace(AblationConfig(**TINY), seeds=(0,), variants=("baseline", "alignment"))
    out = str(tmp_path / "abl")
    assert run_all(config, out, log=lambda s: None, progress=False)["ran"] == 2
    base, align = read_run(out, config, "baseline", None, 0), read_run(out, config, "alignment", "oracle", 0)
    assert align["params"] == base["params"] and align["init_digest"] == base["init_digest"]
    assert align["guard_history"] and align["scores"] != base["scores"]


def test_the_segmenter_is_also_written_as_torchscript(tmp_path):
    """Beside segmenter.pt (the state dict resuming reads), a TorchScript copy for `ssattn metrics --segmenter`;
    a folder written before it existed gets it on the next run, from the saved weights (nothing retrained)."""
    from ssattn.apps.ablation.runner import SEGMENTER_FILE, load_scenes, segmenter
    from ssattn.apps.training.segmentation import TORCHSCRIPT_FILE

    config = AblationConfig(**TINY)
    data = load_scenes(config)
    out = tmp_path / "abl"
    net = segmenter(config, data, str(out), log=lambda s: None)
    x = data["test"]["reference"][:2]
    with torch.no_grad():
        want = net(x)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)   # torch.jit's deprecation notice
        torch.testing.assert_close(torch.jit.load(str(out / TORCHSCRIPT_FILE))(x), want)
    (out / TORCHSCRIPT_FILE).unlink()
    state_written = (out / SEGMENTER_FILE).stat().st_mtime_ns
    said = []
    segmenter(config, data, str(out), log=said.append)
    assert not said and (out / SEGMENTER_FILE).stat().st_mtime_ns == state_written   # loaded, not retrained
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        torch.testing.assert_close(torch.jit.load(str(out / TORCHSCRIPT_FILE))(x), want)
