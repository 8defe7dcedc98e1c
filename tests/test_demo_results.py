"""ssattn.apps.demo.results: aggregation over seeds into results.json's structure, and the verdict's wording."""

import math

import pytest

from ssattn.apps.demo import results as res


def _runs(fg, base=20.0):
    return [{"psnr": base, "ssim": 0.8, "psnr_fg": v, "ssim_fg": 0.7, "miou": 0.5, "ms_per_step": 10.0} for v in fg]


def test_aggregate_means_std_and_structure():
    per_seed = {"baseline": _runs([20.0, 21.0, 22.0]), "ss": _runs([21.0, 22.0, 23.5]), "ss_oracle": _runs([20, 21, 22])}
    r = res.aggregate(per_seed, {"auc": 0.9, "iou": 0.6, "auc_per_image": [0.9]})
    assert set(r) == {"seeds", "guidance", "models"} and r["seeds"] == 3 and r["guidance"] == {"auc": 0.9, "iou": 0.6}
    b = r["models"]["baseline"]
    assert b["psnr_fg"] == 21.0 and math.isclose(b["std"]["psnr_fg"], 1.0) and b["per_seed"]["psnr_fg"] == [20, 21, 22]
    # Paired: ss - baseline = 1, 1, 1.5 -> mean 7/6, sample std sqrt(1/12).
    mean, std = res.paired_delta(r, "ss", "psnr_fg")
    assert math.isclose(mean, 7 / 6) and math.isclose(std, math.sqrt(1 / 12))
    assert res.helped(r, "ss") and not res.helped(r, "ss_oracle")
    lines = res.verdict(r)
    assert "+1.17 dB (seed spread 0.29): better" in lines[0]
    assert "+0.00 dB (seed spread 0.00): no effect (one must exceed twice the seed spread and 0.3 dB)" in lines[1]
    with pytest.raises(ValueError, match="models"):
        res.aggregate({"baseline": per_seed["baseline"]}, {"auc": 0.5, "iou": 0.5})


def test_one_seed_gives_no_verdict():
    r = res.aggregate({n: _runs([20.0 + (n == "ss")]) for n in ("baseline", "ss", "ss_oracle")}, {"auc": 1, "iou": 1})
    assert r["models"]["ss"]["std"]["psnr_fg"] == 0.0 and not res.helped(r)
    assert "one seed: no spread, no verdict" in res.verdict(r)[0]


def test_an_effect_must_exceed_twice_the_spread_and_a_minimum():
    # --quick's case: +0.06 dB with a spread of 0.02 is three spreads, but below the smallest effect the
    # ablation could tell from the seed noise: no verdict of "better".
    base = [20.0, 21.0, 22.0]
    r = res.aggregate({"baseline": _runs(base), "ss": _runs([b + d for b, d in zip(base, (0.04, 0.06, 0.08))]),
                       "ss_oracle": _runs([b + d for b, d in zip(base, (0.5, 1.5, 2.5))])}, {"auc": 1, "iou": 1})
    lines = res.verdict(r)
    assert "+0.06 dB (seed spread 0.02): no effect" in lines[0] and not res.helped(r, "ss")
    # +1.5 dB with a spread of 1.0: above the minimum, but not twice the spread.
    assert "+1.50 dB (seed spread 1.00): no effect" in lines[1] and not res.helped(r, "ss_oracle")
    assert res.MIN_EFFECT["psnr_fg"] > 0.06


def test_the_demo_cites_the_recorded_ablation():
    # The demo's last line quotes benchmarks/ablation_ss/table.json and steps1600/table.json (the runs in
    # benchmarks/RESULTS.md); its minimum effect is the doubling check's change, rounded down.
    import json
    import pathlib

    from ssattn.apps.cli.demo import ABLATION_NOTE

    here = pathlib.Path(__file__).resolve().parents[1] / "benchmarks" / "ablation_ss"
    tables = [json.loads((here / name).read_text()) for name in ("table.json", "steps1600/table.json")]
    rows = [{(r["variant"], r["guidance"]): r for r in t["rows"]} for t in tables]
    steps = " / ".join(str(t["config"]["steps"]) for t in tables)
    assert f"{len(tables[0]['config']['seeds'])} paired seeds" in ABLATION_NOTE and f"at {steps} steps" in ABLATION_NOTE
    for variant in ("attention", "both_paper", "both_normalized"):
        cited = " / ".join("{mean:+.2f} ± {std:.2f}".format(**r[(variant, "oracle")]["paired"]["psnr_fg"])
                           for r in rows)
        assert cited in ABLATION_NOTE, (variant, cited)
    for r in rows:  # "lower in every seed"
        for variant in ("both_paper", "both_normalized"):
            assert all(d < 0 for d in r[(variant, "oracle")]["paired"]["psnr_fg"]["per_seed"])
    doubled = rows[0][("baseline_2x", None)]["paired"]
    assert res.MIN_EFFECT["psnr_fg"] == math.floor(10 * doubled["psnr_fg"]["mean"]) / 10
    assert res.MIN_EFFECT["miou"] == round(100 * doubled["miou"]["mean"])
