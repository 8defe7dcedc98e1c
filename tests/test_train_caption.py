"""Training with the caption-model regulariser: the end-to-end steps, the trainer hook and `ssattn train --caption-loss`.

A tiny captioner (ssattn.caption.testing) saved to a temporary folder and
loaded through the real path; an enhancement U-Net; a fixed batch.
"""

from __future__ import annotations

import json
import os
import warnings

import numpy as np
import pytest
import torch

pytest.importorskip("transformers")

from ssattn.apps.cli import main as cli_main  # noqa: E402
from ssattn.apps.data.synthetic import SyntheticUnderwater  # noqa: E402
from ssattn.apps.training import TrainConfig, build_model, train  # noqa: E402
from ssattn.apps.training.caption import caption_term  # noqa: E402
from ssattn.caption import CaptionFeatureLoss, load_captioner  # noqa: E402
from ssattn.caption.testing import save_tiny_captioner  # noqa: E402
from ssattn.models import UNet  # noqa: E402

warnings.filterwarnings("ignore", message=r"ssattn\..*falling back")


@pytest.fixture(scope="module")
def captioner_dir(tmp_path_factory):
    return str(save_tiny_captioner(tmp_path_factory.mktemp("cap") / "tiny-captioner"))


def test_two_optimiser_steps_end_to_end(captioner_dir):
    torch.manual_seed(0)
    model = UNet(3, 3, 8)
    captioner = load_captioner(captioner_dir)
    loss_fn = CaptionFeatureLoss(captioner, distance="l2")
    opt = torch.optim.Adam(list(model.parameters()) + list(loss_fn.parameters()), lr=1e-3)
    assert sum(p.numel() for g in opt.param_groups for p in g["params"]) == sum(p.numel() for p in model.parameters())
    g = torch.Generator().manual_seed(1)
    x, ref = torch.rand(2, 3, 32, 32, generator=g), torch.rand(2, 3, 32, 32, generator=g)
    losses = []
    for step in range(2):
        opt.zero_grad()
        loss = loss_fn(model(x), ref)
        loss.backward()
        assert all(p.grad is not None for p in model.parameters())
        assert any(bool(p.grad.abs().sum() > 0) for p in model.parameters())
        assert all(p.grad is None for p in captioner.parameters())  # gradients reach the enhancement model only
        opt.step()
        losses.append(loss.item())
        hits_expected = 0 if step == 0 else 2
        assert loss_fn.cache.hits == hits_expected and loss_fn.cache.misses == 2
    with torch.no_grad():
        after = loss_fn(model(x), ref).item()
    assert after < losses[0]  # the loss decreased on the fixed batch
    assert loss_fn.cache.hits == 4  # the reference ran through the captioner once


def test_trainer_adds_the_caption_term_and_works_with_ss(captioner_dir):
    data = SyntheticUnderwater(16, 4, 0, "train")
    torch.manual_seed(0)
    spec = {"arch": "unet-ss", "width": 4, "levels": ["dec3"]}
    model = build_model(spec)
    term = caption_term(weight=0.5, captioner=captioner_dir, distance="cosine")
    hist = train(model, data, TrainConfig(steps=2, batch_size=2, lr=1e-3, progress=False), caption=term)
    assert len(hist["loss"]) == 2 and all(np.isfinite(hist["loss"]))
    assert "0.5*caption(cosine: visual+prefix+language)" in hist["loss_description"]
    assert "alignment" in hist["loss_description"]
    assert term.loss.cache.misses == 4  # four distinct reference images, each through the captioner once
    # the caption term changes the loss the trainer optimises
    torch.manual_seed(0)
    plain = train(build_model(spec), data, TrainConfig(steps=1, batch_size=2, lr=1e-3, progress=False))
    assert plain["loss"][0] != pytest.approx(hist["loss"][0])


def test_train_cli_with_the_caption_loss(tmp_path, captioner_dir, capsys):
    run_dir = str(tmp_path / "run")
    rc = cli_main(["train", "--data", "synthetic", "--out", run_dir, "--size", "16", "--n", "4", "--steps", "2",
                   "--batch-size", "2", "--width", "4", "--levels", "dec3", "--no-progress", "--device", "cpu",
                   "--caption-loss", "0.1", "--captioner", captioner_dir, "--cache-dir", str(tmp_path / "cache"),
                   "--caption-tokens", "2"])
    assert rc == 0, capsys.readouterr().err
    hist = json.load(open(os.path.join(run_dir, "history.json")))
    assert "0.1*caption(l1: visual+prefix+language, 2 caption tokens)" in hist["loss"]
    assert len(hist["loss_per_step"]) == 2
    assert len(list((tmp_path / "cache" / "caption").glob("*/*/*.pt"))) == 4  # reference features on disk
    # The caption term is part of the run: resuming it without (or with another) is a clear error, not a silent change.
    rc = cli_main(["train", "--data", "synthetic", "--out", run_dir, "--size", "16", "--n", "4", "--steps", "3",
                   "--batch-size", "2", "--width", "4", "--levels", "dec3", "--no-progress", "--device", "cpu"])
    assert rc == 2 and "another model or objective" in capsys.readouterr().err


def test_train_cli_caption_errors(tmp_path, captioner_dir, capsys):
    base = ["train", "--data", "synthetic", "--out", str(tmp_path / "run"), "--size", "16", "--n", "4",
            "--steps", "1", "--batch-size", "2", "--width", "4", "--no-progress", "--device", "cpu"]
    assert cli_main(base + ["--caption-loss", "0.1"]) == 2
    assert "--caption-loss needs --captioner" in capsys.readouterr().err
    assert cli_main(base + ["--captioner", captioner_dir]) == 2
    assert "--captioner and --caption-tokens need --caption-loss" in capsys.readouterr().err
    assert cli_main(base + ["--caption-loss", "-1", "--captioner", captioner_dir]) == 2
    assert "must be a finite number >= 0" in capsys.readouterr().err
    (tmp_path / "empty").mkdir()
    assert cli_main(base + ["--caption-loss", "0.1", "--captioner", str(tmp_path / "empty")]) == 2
    err = capsys.readouterr().err
    assert "--captioner: cannot load the captioner" in err and "Traceback" not in err
