"""`ssattn demo --quick`: the end-to-end path runs and writes results.json in the issue's structure, the tables
and the figures."""

import math
import os
import warnings

from PIL import Image

from ssattn.apps.cli import main as cli_main
from tests.test_jsonfile import strict_load

warnings.filterwarnings("ignore", message=r"ssattn\..*falling back")

MODELS = {"baseline", "ss", "ss_oracle"}
METRICS = {"psnr", "ssim", "psnr_fg", "ssim_fg", "miou", "ms_per_step"}


def test_demo_quick_writes_results_tables_and_figures(tmp_path, capsys):
    out = str(tmp_path / "demo")
    rc = cli_main(["demo", "--quick", "--out", out, "--no-progress", "--device", "cpu", "--threads", "1"])
    assert rc == 0
    text = capsys.readouterr().out
    assert "fg PSNR" in text and "backends:" in text and "over 3 seeds: foreground PSNR" in text
    assert ("wrote figure.png, metrics.png, results.md, results.json, run.json, segmenter.torchscript.pt into "
            in text and text.count(out) == 1)
    res = strict_load(os.path.join(out, "results.json"))
    assert set(res) == {"seeds", "guidance", "models"} and res["seeds"] == 3
    assert set(res["guidance"]) == {"auc", "iou"} and 0 <= res["guidance"]["auc"] <= 1
    assert set(res["models"]) == MODELS
    for name, r in res["models"].items():
        assert set(r) == METRICS | {"std", "per_seed"}
        assert set(r["std"]) == set(r["per_seed"]) == METRICS
        for m in METRICS:
            assert len(r["per_seed"][m]) == 3 and math.isclose(r[m], sum(r["per_seed"][m]) / 3, rel_tol=1e-9)
        assert 0 < r["ssim"] <= 1 and 0 <= r["miou"] <= 1 and r["psnr"] > 0 and r["ms_per_step"] > 0
    run = strict_load(os.path.join(out, "run.json"))  # was "psnr": Infinity (the reference scored against itself)
    assert run["bounds"]["reference"]["psnr"] is None and "unbounded" in run["bounds"]["reference"]["psnr_note"]
    assert run["params"]["ss"] == run["params"]["ss_oracle"] > run["params"]["baseline"]
    assert run["ss_levels"] == ["dec3", "dec2"] and run["training_seeds"] == [0, 1, 2]
    assert run["ss_options"] == {"align_levels": []}  # attention only: what the ablation found not to cost quality
    assert "(attention only)" in text and "The -SS ablation" in text
    md = open(os.path.join(out, "results.md")).read()
    for label in ("| U-Net |", "| U-Net-SS |", "| U-Net-SS oracle |", "| reference |", "| degraded input |"):
        assert label in md
    # The segmenter, as a file the metrics command reads, and the command that scores images with it.
    seg = os.path.join(out, "segmenter.torchscript.pt")
    assert run["segmenter"]["file"] == seg and os.path.isfile(seg)
    assert f"`ssattn metrics OUTPUTS --masks LABELS --segmenter {seg} --classes 5`" in md
    fig = Image.open(os.path.join(out, "figure.png"))
    # 7 columns (input, guidance, mask, 3 models, reference) of 4 held-out scenes, 32 px crops shown at 4x.
    assert fig.size[0] > 7 * 128 and fig.size[1] > 4 * 128
    assert Image.open(os.path.join(out, "metrics.png")).size[0] > 400


def test_demo_bad_options_exit_2(tmp_path, capsys):
    for bad in (["--size", "30"], ["--seeds", "0"], ["--eta", "-1"], ["--align-weight", "-1"],
                ["--align-form", "paper"]):  # a form without an alignment loss (--align-weight 0, the default)
        assert cli_main(["demo", "--quick", "--out", str(tmp_path), *bad]) == 2
        err = capsys.readouterr().err
        assert err.startswith("ssattn demo: --") and "Traceback" not in err


def test_demo_last_line_names_the_ss_it_ran(tmp_path, capsys):
    # The closing line said "This demo's -SS is attention only." even when --align-weight added the loss back.
    out = str(tmp_path / "demo")
    rc = cli_main(["demo", "--quick", "--out", out, "--no-progress", "--device", "cpu", "--threads", "1",
                   "--align-weight", "0.1", "--align-form", "paper"])
    assert rc == 0
    last = capsys.readouterr().out.strip().splitlines()[-1]
    assert "attention only" not in last
    assert last == "This demo's -SS: attention + alignment, paper form, lambda 0.1, eta 1 (set by --align-weight)."
