"""The JSON files ssattn writes are strict JSON: no Infinity or NaN, which strict parsers reject."""

import json
import math

import pytest

from ssattn.apps.jsonfile import strict, write_json


def strict_load(path):
    """json.load that refuses Infinity, -Infinity and NaN, as strict parsers (JavaScript, jq) do."""
    def refuse(name):
        raise ValueError(f"{path}: {name} is not JSON")

    with open(path) as f:
        return json.loads(f.read(), parse_constant=refuse)


def test_non_finite_numbers_become_null_with_a_note(tmp_path):
    data = {"psnr": math.inf, "ssim": 0.5, "nested": {"loss": math.nan, "ok": [1.0, 2.0]},
            "per_image": [1.0, -math.inf, math.nan], "rows": [{"x": math.inf}], "label": "inf"}
    path = tmp_path / "out.json"
    write_json(path, data, reasons={"psnr": "the images equal their references"})
    back = strict_load(path)
    assert back["psnr"] is None and back["psnr_note"] == "+Infinity, written as null: the images equal their references"
    assert back["ssim"] == 0.5 and back["label"] == "inf" and back["nested"]["ok"] == [1.0, 2.0]
    assert back["nested"]["loss"] is None and back["nested"]["loss_note"] == "NaN, written as null"
    assert back["per_image"] == [1.0, None, None] and back["per_image_note"] == "[1] -Infinity, [2] NaN, written as null"
    assert back["rows"] == [{"x": None, "x_note": "+Infinity, written as null"}]
    assert strict([math.inf, 1]) == [None, 1] and strict(math.nan) is None
    (tmp_path / "plain.json").write_text(json.dumps(data))  # what the files held before
    with pytest.raises(ValueError, match="Infinity is not JSON"):
        strict_load(tmp_path / "plain.json")
