"""`ssattn demo --quick`: the end-to-end path runs and writes its figure and tables."""

import json
import os
import warnings

from PIL import Image

from ssattn.apps.cli import main as cli_main

warnings.filterwarnings("ignore", message=r"ssattn\..*falling back")


def test_demo_quick_writes_figure_and_tables(tmp_path, capsys):
    out = str(tmp_path / "demo")
    rc = cli_main(["demo", "--quick", "--out", out, "--no-progress", "--device", "cpu", "--threads", "1"])
    assert rc == 0
    text = capsys.readouterr().out
    assert "PSNR" in text and "backends:" in text
    last = text.strip().splitlines()[-1]
    assert last.startswith("wrote figure.png, results.md and results.json into ") and last.count(out) == 1, last
    res = json.load(open(os.path.join(out, "results.json")))
    for name in ("baseline", "-SS", "input"):
        assert 0 < res["results"][name]["ssim"] <= 1 and res["results"][name]["psnr"] > 0
    assert res["results"]["-SS"]["params"] > res["results"]["baseline"]["params"]
    assert res["results"]["baseline"]["step_time_ms"] > 0
    assert res["backends"]["masked_cross_attention"] and res["ss_levels"] == ["dec3", "dec2"]
    md = open(os.path.join(out, "results.md")).read()
    assert "| U-Net -SS |" in md and "| U-Net baseline |" in md
    fig = Image.open(os.path.join(out, "figure.png"))
    # 5 columns (input, guidance, baseline, -SS, reference) of 4 test images, 32 px crops shown at 4x.
    assert fig.size[0] > 5 * 128 and fig.size[1] > 4 * 128
