"""`ssattn train --text` / `ssattn eval --text` and the trainer with text stages, on a tiny CLIP built from a config."""

import json
import os
import warnings

import numpy as np
import pytest
import torch

from ssattn.apps.cli import main as cli_main
from ssattn.apps.data.synthetic import SyntheticUnderwater
from ssattn.apps.training import TrainConfig, build_model, train
from ssattn.apps.training.text import ItemText, item_names
from ssattn.apps.training.trainer import load_model
from ssattn.routing.testing import save_clip
from ssattn.text import TextEncoder

warnings.filterwarnings("ignore", message=r"ssattn\..*falling back")


@pytest.fixture(scope="module")
def clip_dir(tmp_path_factory):
    return str(save_clip(tmp_path_factory.mktemp("clip") / "tiny-clip", hidden=32))


def test_item_text_batches_each_items_caption(clip_dir):
    captions = ["a fish", "a reef", "a fish", "a diver near a reef"]
    text = ItemText.from_captions(captions, TextEncoder(clip_dir))
    assert text.table.words.shape[0] == 3 and len(text) == 4 and text.channels == 32
    b = text.batch([2, 1])
    alone = TextEncoder(clip_dir)(["a fish", "a reef"])
    n = alone.words.shape[1]
    torch.testing.assert_close(b.words[:, :n], alone.words)
    assert b.mask[:, n:].all()
    assert item_names(SyntheticUnderwater(16, 3, 0, "train")) == ["0", "1", "2"]


def test_trainer_with_text_stages_moves_them(clip_dir):
    data = SyntheticUnderwater(16, 4, 0, "train")
    text = ItemText.from_captions(["a fish", "a reef", "two fish", "coral"], TextEncoder(clip_dir))
    spec = {"arch": "unet-ss", "width": 4, "levels": ["dec3"], "text": {"channels": 32, "stages": ["dec2"]}}
    model = build_model(spec)
    assert model.takes_map and model.takes_text
    start = {n: p.detach().clone() for n, p in model.text_blocks.named_parameters()}
    hist = train(model, data, TrainConfig(steps=3, batch_size=2, lr=1e-2, progress=False), text=text)
    assert len(hist["loss"]) == 3 and all(np.isfinite(hist["loss"]))
    moved = [n for n, p in model.text_blocks.named_parameters() if not torch.equal(p, start[n])]
    assert moved
    with pytest.raises(ValueError, match="text must give the word features of each of the 4 items"):
        train(build_model(spec), data, TrainConfig(steps=1, batch_size=2, progress=False))


def test_train_and_eval_cli_with_text(tmp_path, clip_dir, capsys):
    captions = tmp_path / "captions.tsv"
    captions.write_text("".join(f"{i}\ta {w} in blue water\n" for i, w in enumerate(["fish", "diver", "reef", "crab"])))
    run_dir = str(tmp_path / "run")
    rc = cli_main(["train", "--data", "synthetic", "--out", run_dir, "--size", "16", "--n", "4", "--steps", "2",
                   "--batch-size", "2", "--width", "4", "--levels", "dec3", "--no-progress", "--device", "cpu",
                   "--text", str(captions), "--text-encoder", clip_dir, "--text-levels", "dec3,dec2",
                   "--cache-dir", str(tmp_path / "cache")])
    assert rc == 0, capsys.readouterr().err
    assert "text stages dec3,dec2" in capsys.readouterr().out
    model, ckpt = load_model(os.path.join(run_dir, "checkpoint.pt"))
    assert model.text_stages == ["dec3", "dec2"] and ckpt["spec"]["text"]["encoder"] == clip_dir
    assert os.path.isdir(tmp_path / "cache" / "text")  # the word features were cached
    ck = os.path.join(run_dir, "checkpoint.pt")
    out_json = str(tmp_path / "eval.json")
    rc = cli_main(["eval", "--checkpoint", ck, "--data", "synthetic", "--size", "16", "--n", "4", "--device", "cpu",
                   "--text", str(captions), "--json", out_json])
    assert rc == 0 and json.load(open(out_json))["n"] == 4
    assert cli_main(["eval", "--checkpoint", ck, "--data", "synthetic", "--size", "16", "--n", "4",
                     "--device", "cpu"]) == 2
    assert "trained with text stages" in capsys.readouterr().err


def test_train_cli_text_errors(tmp_path, clip_dir, capsys):
    run_dir = str(tmp_path / "run")
    base = ["train", "--data", "synthetic", "--out", run_dir, "--size", "16", "--n", "4", "--steps", "1",
            "--batch-size", "2", "--width", "4", "--no-progress", "--device", "cpu"]
    (tmp_path / "t.json").write_text(json.dumps({"0": "a fish"}))
    assert cli_main(base + ["--text", str(tmp_path / "t.json"), "--text-encoder", clip_dir]) == 2
    err = capsys.readouterr().err
    assert "--text: captions" in err and "no entry for 3 of 4" in err
    assert cli_main(base + ["--text", str(tmp_path / "t.json"), "--text-encoder", str(tmp_path / "nope")]) == 2
    assert "cannot load the CLIP tokenizer" in capsys.readouterr().err
    assert cli_main(base + ["--text-levels", "dec2"]) == 2
    assert "need --text" in capsys.readouterr().err
    (tmp_path / "one.txt").write_text("a fish")
    assert cli_main(base + ["--text", str(tmp_path / "one.txt"), "--text-encoder", clip_dir,
                            "--text-levels", "dec9"]) == 2
    assert "dec9" in capsys.readouterr().err


def test_train_cli_with_one_caption_given_as_text(tmp_path, clip_dir, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    base = ["train", "--data", "synthetic", "--out", "run", "--size", "16", "--n", "4", "--steps", "1",
            "--batch-size", "2", "--width", "4", "--no-progress", "--device", "cpu", "--text-encoder", clip_dir]
    assert cli_main(base + ["--text", "a fish over sand"]) == 0, capsys.readouterr().err
    model, ckpt = load_model(os.path.join("run", "checkpoint.pt"))
    assert model.takes_text
    assert cli_main(base + ["--out", "run2", "--text", "captions.txt"]) == 2  # a mistyped file is not a caption
    assert "--text: captions 'captions.txt': no such file or folder" in capsys.readouterr().err


def test_train_cli_captions_from_a_vlm(tmp_path, clip_dir, capsys):
    from ssattn.guidance.testing import save_llava

    llava = str(save_llava(tmp_path / "tiny-llava"))
    run_dir = str(tmp_path / "run")
    args = ["train", "--data", "synthetic", "--out", run_dir, "--size", "16", "--n", "2", "--steps", "1",
            "--batch-size", "2", "--width", "4", "--model", "unet", "--no-progress", "--device", "cpu",
            "--text", "vlm", "--text-captioner", llava, "--text-encoder", clip_dir, "--text-levels", "dec1",
            "--cache-dir", str(tmp_path / "cache")]
    assert cli_main(args) == 0, capsys.readouterr().err
    assert list((tmp_path / "cache" / "captions").glob("*/settings.json"))  # the answers were cached
    model, _ = load_model(os.path.join(run_dir, "checkpoint.pt"))
    assert model.text_stages == ["dec1"] and not model.takes_map
    assert cli_main(args[:-6] + ["--text", "x.txt", "--text-captioner", llava, "--text-encoder", clip_dir]) == 2
    assert "--text-captioner is for --text vlm" in capsys.readouterr().err
