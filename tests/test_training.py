"""ssattn.apps.training: metrics, losses, the resumable loop, and the train / eval commands."""

import json
import math
import os
import re
import warnings

import pytest
import torch

from ssattn.apps.cli import main as cli_main
from ssattn.apps.data.synthetic import SyntheticUnderwater
from ssattn.models import UNet, unet_ss
from ssattn.apps.training import ReconstructionLoss, TrainConfig, VGGPerceptualLoss, psnr, ssim, train, vgg19_features
from ssattn.apps.data.sampler import ResumableDistributedSampler
from ssattn.apps.training.trainer import load_model

warnings.filterwarnings("ignore", message=r"ssattn\..*falling back")


def test_psnr_and_ssim_against_skimage():
    metrics = pytest.importorskip("skimage.metrics")
    x = torch.rand(2, 3, 23, 30)
    y = (x + 0.1 * torch.randn_like(x)).clamp(0, 1)
    for i in range(2):
        xi, yi = x[i].permute(1, 2, 0).double().numpy(), y[i].permute(1, 2, 0).double().numpy()
        exp_s = metrics.structural_similarity(xi, yi, gaussian_weights=True, sigma=1.5, use_sample_covariance=False,
                                              data_range=1.0, channel_axis=2)
        exp_p = metrics.peak_signal_noise_ratio(xi, yi, data_range=1.0)
        assert abs(float(ssim(x, y)[i]) - exp_s) < 1e-5
        assert abs(float(psnr(x, y)[i]) - exp_p) < 1e-4


def test_metric_properties():
    x = torch.rand(3, 3, 16, 16)
    assert torch.all(torch.isinf(psnr(x, x)))
    torch.testing.assert_close(ssim(x, x), torch.ones(3))
    y = torch.rand(3, 3, 16, 16)
    torch.testing.assert_close(ssim(x, y), ssim(y, x))
    assert torch.all(ssim(x, y) < 0.5)
    torch.testing.assert_close(psnr(x, x + 0.1), torch.full((3,), 20.0), rtol=1e-4, atol=1e-4)
    with pytest.raises(ValueError, match="at least 11x11"):
        ssim(x[..., :8, :8], y[..., :8, :8])
    with pytest.raises(ValueError, match="same shape"):
        psnr(x, y[:1])


def test_vgg_perceptual_loss_loads_torchvision_layout(tmp_path):
    with torch.device("meta"):  # structure only: no 20M-parameter initialisation
        feats = vgg19_features()
    assert len(feats) == 36 and isinstance(feats[34], torch.nn.Conv2d) and feats[34].out_channels == 512
    path = os.path.join(tmp_path, "vgg19.pth")
    torch.save({f"features.{k}": v for k, v in vgg19_features(9).state_dict().items()}, path)
    loss = VGGPerceptualLoss(path, layers=(3, 8))
    x = torch.rand(1, 3, 16, 16, requires_grad=True)
    y = torch.rand(1, 3, 16, 16)
    assert float(loss(y, y)) == 0.0
    value = loss(x, y)
    value.backward()
    assert value > 0 and x.grad.abs().sum() > 0
    assert not any(p.requires_grad for p in loss.features.parameters())
    torch.save({"0.weight": torch.zeros(64, 3, 3, 3)}, path)
    with pytest.raises(ValueError, match="lacks VGG-19 feature weights"):
        VGGPerceptualLoss(path, layers=(3, 8))
    with pytest.raises(FileNotFoundError, match="vgg_weights"):
        VGGPerceptualLoss(os.path.join(tmp_path, "missing.pth"))


def test_reconstruction_loss_without_weights_is_l1_and_says_so():
    crit = ReconstructionLoss(None)
    assert "disabled" in crit.describe()
    x, y = torch.rand(2, 3, 8, 8), torch.rand(2, 3, 8, 8)
    torch.testing.assert_close(crit(x, y), (x - y).abs().mean())


def test_sampler_is_distributed_samplers_order_and_starts_mid_epoch():
    from torch.utils.data import DistributedSampler

    for world in (1, 2, 3):
        for rank in range(world):
            ours = ResumableDistributedSampler(range(10), num_replicas=world, rank=rank, seed=3)
            theirs = DistributedSampler(range(10), num_replicas=world, rank=rank, shuffle=True, seed=3, drop_last=True)
            for epoch in (0, 1):
                ours.set_epoch(epoch)
                theirs.set_epoch(epoch)
                assert list(ours) == list(theirs) and len(ours) == len(theirs)
    s = ResumableDistributedSampler(range(10), num_replicas=2, rank=1, seed=3)
    s.set_epoch(1)
    whole = list(s)
    s.set_epoch(1, start=4)  # two steps of 2 ranks x 1 sample done: the same world size continues in place
    assert list(s) == whole[2:]
    order = s.epoch_order().tolist()
    parts = []
    for rank in range(3):  # another world size takes the rest of the same order, nothing twice
        t = ResumableDistributedSampler(range(10), num_replicas=3, rank=rank, seed=3)
        t.set_epoch(1, start=4)
        parts += list(t)
    assert sorted(parts) == sorted(order[4:])
    s.set_epoch(2)
    assert list(s) != whole
    with pytest.raises(ValueError, match="start must lie in"):
        s.set_epoch(0, start=11)


@pytest.fixture(scope="module")
def tiny_data():
    return SyntheticUnderwater(size=16, n=6, seed=0).tensors()


def test_training_reduces_the_loss(tiny_data):
    torch.manual_seed(0)
    model = unet_ss(width=4, levels=("dec3", "dec2"))
    hist = train(model, tiny_data, TrainConfig(steps=12, batch_size=3, lr=3e-3, progress=False))
    assert hist["steps"] == 12 and len(hist["loss"]) == 12 and hist["step_time_s"] > 0
    assert sum(hist["loss"][-3:]) < sum(hist["loss"][:3])
    assert "alignment" in hist["loss_description"]


def test_resume_continues_exactly(tiny_data, tmp_path):
    def fresh():
        torch.manual_seed(0)
        return unet_ss(width=4, levels=("dec3",))

    cfg = TrainConfig(steps=4, batch_size=2, lr=1e-2, progress=False)
    straight = fresh()
    straight_hist = train(straight, tiny_data, cfg)
    run_dir = str(tmp_path / "run")
    first = fresh()
    train(first, tiny_data, cfg, run_dir, stop_at=2)  # interrupted after 2 of 4 steps
    # A new process would rebuild the model and optimizer; only the checkpoint carries state.
    resumed = fresh()
    torch.manual_seed(123)  # the checkpoint's RNG state must win over this
    hist = train(resumed, tiny_data, cfg, run_dir)
    assert hist["steps"] == 4 and hist["loss"] == straight_hist["loss"]
    for (n, a), (_, b) in zip(straight.state_dict().items(), resumed.state_dict().items()):
        assert torch.equal(a, b), n  # bit for bit


def test_accumulation_matches_twice_the_batch(tiny_data):
    # Compared through plain SGD in float64, where the two runs differ by rounding only. (Adam divides each
    # gradient component by its own magnitude, so a rounding difference in a near-zero component moves a
    # weight by up to the learning rate: no tolerance separates that from a wrong gradient.)
    data = tuple(t.double() for t in tiny_data)

    def run(**kw):
        torch.manual_seed(0)
        model = unet_ss(width=4, levels=("dec3",)).double()
        start = {n: t.clone() for n, t in model.state_dict().items()}
        hist = train(model, data, TrainConfig(steps=3, lr=1e-2, optimizer="sgd", progress=False, **kw))
        return {n: t - start[n] for n, t in model.state_dict().items()}, hist  # the weights' total updates

    accumulated, h1 = run(batch_size=1, accum=2)
    whole, h2 = run(batch_size=2)
    alone, _ = run(batch_size=1)  # what a lost micro-batch would give
    # The L1 term is a float32 mean (the trainer's, for mixed precision) over n = 2 images x 3 x 16 x 16
    # values of at most 1, summed in another order: |error| <= n * 2**-24 * mean < 1e-4 * loss.
    torch.testing.assert_close(torch.tensor(h1["loss"]), torch.tensor(h2["loss"]), rtol=1e-4, atol=0.0)
    # The updates are lr * (gradient). Everything upstream of the loss is float64; the float32 parts (L1's
    # sign / n, the guidance maps' resize) hold the same values per image in both runs. So the updates
    # differ by float64 rounding (~1e-16 of their size, times the depth of the network) and at most
    # float32 rounding of the maps (6e-8 relative): 1e-6 of the largest update bounds both. A wrong
    # accumulation (a lost micro-batch, a missing 1/accum) changes updates by a sizeable fraction of it.
    scale = max(float(u.abs().max()) for u in whole.values())
    for n in whole:
        torch.testing.assert_close(accumulated[n], whole[n], rtol=0.0, atol=1e-6 * scale, msg=n)
    assert max(float((alone[n] - whole[n]).abs().max()) for n in whole) > 1e-2 * scale  # the check can fail


@pytest.mark.parametrize("amp", ["fp16", "bf16"])
def test_mixed_precision_trains_and_resumes(tiny_data, tmp_path, amp):
    torch.manual_seed(0)
    model = unet_ss(width=4, levels=("dec3",))
    cfg = TrainConfig(steps=2, batch_size=2, accum=2, amp=amp, lr=1e-2, progress=False)
    hist = train(model, tiny_data, cfg, str(tmp_path), stop_at=1)
    ckpt = torch.load(tmp_path / "checkpoint.pt", weights_only=True)  # tensors and plain values only
    assert (ckpt["scaler"] is not None) == (amp == "fp16") and ckpt["step"] == 1
    hist = train(model, tiny_data, cfg, str(tmp_path))
    assert hist["steps"] == 2 and all(map(math.isfinite, hist["loss"]))


def test_bad_training_settings_are_clear_errors(tiny_data):
    model = unet_ss(width=4, levels=("dec3",))
    with pytest.raises(ValueError, match=r"6 items, fewer than one step takes: batch size 4 x accum 2 x 1 rank\(s\) = 8"):
        train(model, tiny_data, TrainConfig(steps=1, batch_size=4, accum=2, progress=False))
    with pytest.raises(ValueError, match="accum must be a positive integer, got 0"):
        train(model, tiny_data, TrainConfig(steps=1, accum=0, progress=False))
    with pytest.raises(ValueError, match="amp must be one of"):
        train(model, tiny_data, TrainConfig(steps=1, amp="fp8", progress=False))
    with pytest.raises(ValueError, match=r"optimizer must be one of \('adam', 'sgd'\), got 'lamb'"):
        train(model, tiny_data, TrainConfig(steps=1, optimizer="lamb", progress=False))


def test_train_and_eval_cli_on_synthetic(tmp_path, capsys):
    run_dir = str(tmp_path / "run")
    rc = cli_main(["train", "--data", "synthetic", "--out", run_dir, "--size", "16", "--n", "4", "--steps", "2",
                   "--batch-size", "2", "--width", "4", "--levels", "dec3,dec2", "--no-progress", "--device", "cpu"])
    assert rc == 0 and os.path.isfile(os.path.join(run_dir, "checkpoint.pt"))
    hist = json.load(open(os.path.join(run_dir, "history.json")))
    assert hist["steps"] == 2 and len(hist["loss_per_step"]) == 2
    model, ckpt = load_model(os.path.join(run_dir, "checkpoint.pt"))
    assert list(model.pairs) == ["dec3", "dec2"] and ckpt["step"] == 2
    out_json = str(tmp_path / "eval.json")
    rc = cli_main(["eval", "--checkpoint", os.path.join(run_dir, "checkpoint.pt"), "--data", "synthetic",
                   "--size", "16", "--n", "3", "--json", out_json, "--device", "cpu"])
    assert rc == 0
    res = json.load(open(out_json))
    assert res["n"] == 3 and res["step"] == 2 and 0 < res["ssim"] <= 1 and res["psnr"] > 0
    assert "PSNR" in capsys.readouterr().out
    assert cli_main(["train", "--data", "synthetic", "--out", run_dir, "--size", "12"]) == 2
    assert "divisible by 8" in capsys.readouterr().err
    assert cli_main(["train", "--data", str(tmp_path / "nope"), "--out", run_dir]) == 2
    assert "neither a folder" in capsys.readouterr().err


def test_train_threads(tmp_path, capsys, monkeypatch):
    from ssattn.apps.cli.common import use_threads

    argv = ["train", "--data", "synthetic", "--out", str(tmp_path / "run"), "--size", "16", "--n", "4", "--steps", "1",
            "--batch-size", "2", "--width", "4", "--levels", "dec3", "--no-progress", "--device", "cpu"]
    assert cli_main(argv + ["--threads", "2"]) == 0
    assert "device cpu (2 thread(s))" in capsys.readouterr().out and torch.get_num_threads() == 2
    with pytest.raises(SystemExit) as exc:
        cli_main(argv + ["--threads", "0"])
    assert exc.value.code == 2 and "--threads: must be >= 1, got 0" in capsys.readouterr().err
    # The default: OMP_NUM_THREADS when set (torchrun sets it per process), else the idle cores shared
    # by this machine's processes.
    monkeypatch.setattr(os, "cpu_count", lambda: 8)
    monkeypatch.setattr(os, "getloadavg", lambda: (2.6, 0.0, 0.0))
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    monkeypatch.delenv("LOCAL_WORLD_SIZE", raising=False)
    cpu = torch.device("cpu")
    assert use_threads(None, cpu) == 5 and use_threads(3, cpu) == 3
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")
    assert use_threads(None, cpu) == 2
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    torch.set_num_threads(1)
    assert use_threads(None, cpu) == 1


def test_resume_with_another_model_is_a_clear_error(tiny_data, tmp_path, capsys):
    run_dir = str(tmp_path / "run")
    common = ["train", "--data", "synthetic", "--out", run_dir, "--size", "16", "--n", "4", "--steps", "1",
              "--batch-size", "2", "--width", "4", "--no-progress", "--device", "cpu"]
    assert cli_main(common + ["--model", "unet"]) == 0
    capsys.readouterr()
    rc = cli_main(common + ["--model", "unet-ss", "--levels", "dec3"])
    err = capsys.readouterr().err
    assert rc == 2
    assert re.search(r"checkpoint\.pt holds a run of another model or objective \(\{'arch': 'unet'.*--no-resume", err)
    assert "Traceback" not in err and "state_dict" not in err
    # Through the API without a spec: the tensors that do not fit are summarised, not listed by the hundred.
    train(UNet(width=4), tiny_data, TrainConfig(steps=1, batch_size=2, progress=False), str(tmp_path / "api"))
    with pytest.raises(ValueError, match=r"saved from a different model: \d+ of this model's tensors are missing "
                                         r"\(model\.enc1\..*, \.\.\.\), \d+ are unknown to it \(enc1\."):
        train(unet_ss(width=4, levels=("dec3",)), tiny_data, TrainConfig(steps=2, batch_size=2, progress=False),
              str(tmp_path / "api"))


def test_train_cli_attention_and_align_levels_are_recorded_and_rebuilt(tmp_path, capsys):
    run_dir = str(tmp_path / "run")
    common = ["train", "--data", "synthetic", "--out", run_dir, "--size", "16", "--n", "4", "--batch-size", "2",
              "--width", "4", "--no-progress", "--device", "cpu"]
    levels = ["--attention-levels", "dec3", "--align-levels", "dec1,dec2"]
    assert cli_main(common + ["--steps", "1"] + levels) == 0
    assert "attention at dec3, alignment at dec2,dec1" in capsys.readouterr().out
    path = os.path.join(run_dir, "checkpoint.pt")
    model, ckpt = load_model(path)
    assert ckpt["spec"]["attention_levels"] == ["dec3"] and ckpt["spec"]["align_levels"] == ["dec2", "dec1"]
    assert list(model.pairs) == ["dec3"] and model.align_sites == ["dec2", "dec1"]
    assert cli_main(common + ["--steps", "2"] + levels) == 0  # resumed: the same model and objective
    assert torch.load(path, weights_only=True)["step"] == 2
    capsys.readouterr()
    assert cli_main(common + ["--steps", "3", "--attention-levels", "dec3", "--align-levels", "none"]) == 2
    assert "holds a run of another model or objective" in capsys.readouterr().err
    assert cli_main(["eval", "--checkpoint", path, "--data", "synthetic", "--size", "16", "--n", "2",
                     "--device", "cpu"]) == 0
    attention_only = str(tmp_path / "attention_only")
    assert cli_main(common[:4] + [attention_only] + common[5:] + ["--steps", "1", "--align-levels", "none"]) == 0
    model, _ = load_model(os.path.join(attention_only, "checkpoint.pt"))
    assert len(model.blocks) == 3 and model.align_sites == []
    assert "alignment" not in json.load(open(os.path.join(attention_only, "history.json")))["loss"]


@pytest.mark.parametrize("old_spec", [{"levels": ["dec3", "dec2"]}, {}])
def test_a_checkpoint_with_the_older_levels_spec_loads_and_resumes(tmp_path, old_spec, capsys):
    """Checkpoints written before attention_levels / align_levels (only "levels", or none: every stage)."""
    run_dir = tmp_path / "run"
    spec = {"arch": "unet-ss", "width": 4, "align_weight": 0.1, **old_spec}
    data = SyntheticUnderwater(16, 4, 0, "train")
    from ssattn.apps.training import build_model

    train(build_model(spec), data, TrainConfig(steps=1, batch_size=2, progress=False), str(run_dir), spec=spec)
    model, ckpt = load_model(str(run_dir / "checkpoint.pt"))
    expected = old_spec.get("levels", ["dec3", "dec2", "dec1"])
    assert list(model.pairs) == expected and model.align_sites == expected and ckpt["spec"] == spec
    flags = ["--levels", ",".join(old_spec["levels"])] if old_spec else []
    rc = cli_main(["train", "--data", "synthetic", "--out", str(run_dir), "--size", "16", "--n", "4", "--steps", "2",
                   "--batch-size", "2", "--width", "4", "--no-progress", "--device", "cpu", *flags])
    assert rc == 0, capsys.readouterr().err
    assert torch.load(run_dir / "checkpoint.pt", weights_only=True)["step"] == 2


def test_train_cli_align_form_and_eta(tmp_path, capsys):
    run_dir = str(tmp_path / "run")
    common = ["train", "--data", "synthetic", "--out", run_dir, "--size", "16", "--n", "4", "--steps", "1",
              "--batch-size", "2", "--width", "4", "--levels", "dec3", "--no-progress", "--device", "cpu"]
    assert cli_main(common + ["--align-form", "normalized", "--eta", "0"]) == 0
    model, ckpt = load_model(os.path.join(run_dir, "checkpoint.pt"))
    assert model.align.form == "normalized" and model.align.eta == 0.0
    assert ckpt["spec"]["align_form"] == "normalized" and ckpt["spec"]["eta"] == 0.0
    capsys.readouterr()
    assert cli_main(common + ["--steps", "2"]) == 2  # the paper form is another objective: not resumed into
    assert "another model or objective" in capsys.readouterr().err
    # The defaults leave the spec as runs written before these options had it, so those resume.
    default_dir = str(tmp_path / "default")
    assert cli_main(common[:4] + [default_dir] + common[5:]) == 0
    assert load_model(os.path.join(default_dir, "checkpoint.pt"))[1]["spec"] == {
        "arch": "unet-ss", "width": 4, "align_weight": 0.1, "attention_levels": ["dec3"], "align_levels": ["dec3"]}
    assert cli_main(common + ["--eta", "-1", "--out", str(tmp_path / "bad")]) == 2
    assert "--eta must be >= 0" in capsys.readouterr().err


def test_baseline_and_ss_start_identical():
    torch.manual_seed(0)
    base = UNet(width=4)
    torch.manual_seed(0)
    ss = unet_ss(width=4)
    for (n, a), (_, b) in zip(base.state_dict().items(), ss.model.state_dict().items()):
        assert torch.equal(a, b), n


def test_train_cli_on_a_paired_folder(tmp_path):
    pytest.importorskip("ssattn.apps.data.paired")
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(0)
    for sub in ("input", "target"):
        os.makedirs(tmp_path / "data" / sub)
    for i in range(3):
        ref = rng.integers(0, 256, size=(20, 24, 3), dtype=np.uint8)
        deg = (ref * np.array([0.3, 0.8, 0.9])).astype(np.uint8)
        Image.fromarray(ref).save(tmp_path / "data" / "target" / f"{i}.png")
        Image.fromarray(deg).save(tmp_path / "data" / "input" / f"{i}.png")
    run_dir = str(tmp_path / "run")
    rc = cli_main(["train", "--data", str(tmp_path / "data"), "--out", run_dir, "--size", "16", "--steps", "1",
                   "--batch-size", "2", "--width", "4", "--levels", "dec3", "--no-progress", "--device", "cpu",
                   "--cache-dir", str(tmp_path / "cache")])
    assert rc == 0 and os.path.isfile(os.path.join(run_dir, "checkpoint.pt"))
    rc = cli_main(["eval", "--checkpoint", os.path.join(run_dir, "checkpoint.pt"), "--data", str(tmp_path / "data"),
                   "--size", "16", "--device", "cpu", "--json", str(tmp_path / "e.json")])
    assert rc == 0 and json.load(open(tmp_path / "e.json"))["n"] == 3
