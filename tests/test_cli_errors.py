"""The `ssattn` command on bad input: a message on stderr and exit code 2, never a traceback.

Also the reports and help texts a new user reads (train --help defaults,
`ssattn info`'s compiled vs usable, train with nothing left to do).
"""

import os
import subprocess
import sys
import warnings

import pytest
import torch

from ssattn.apps.cli import main
from ssattn.apps.cli.common import CLIError
from ssattn.guidance import GuidanceCache, SaliencyGuide

warnings.filterwarnings("ignore", message=r"ssattn\..*falling back")

TRAIN = ["--size", "16", "--n", "4", "--batch-size", "2", "--width", "4", "--levels", "dec3", "--no-progress",
         "--device", "cpu"]


def _fails(capsys, argv, *needles):
    """main(argv) returns 2 (no exception escapes) and stderr holds one message with every needle."""
    rc = main([str(a) for a in argv])
    err = capsys.readouterr().err
    assert rc == 2, err
    assert "Traceback" not in err
    for needle in needles:
        assert needle in err, err
    return err


def _images(folder, n=3):
    from PIL import Image

    folder.mkdir(parents=True, exist_ok=True)
    g = torch.Generator().manual_seed(0)
    for i in range(n):
        Image.fromarray((torch.rand(20, 24, 3, generator=g) * 255).byte().numpy()).save(folder / f"{i}.png")
    return folder


def _guide(images, out, *extra):
    return [str(a) for a in ["guide", images, "--out", out, "--workers", "0", "--no-progress", *extra]]


# --------------------------------------------------------------------------- guide
def test_guide_out_naming_a_file(tmp_path, capsys):
    images = _images(tmp_path / "imgs")
    (tmp_path / "taken").write_text("a file")
    _fails(capsys, _guide(images, tmp_path / "taken"), "--out", "is a file")
    _fails(capsys, _guide(images, tmp_path / "c", "--overlay", tmp_path / "taken"), "--overlay", "is a file")


def _refuse_writes(monkeypatch):
    from ssattn.guidance import cache as cache_mod

    def refuse(path, data):
        raise PermissionError(13, "Permission denied", str(path))

    monkeypatch.setattr(cache_mod, "atomic_write_bytes", refuse)


def test_guide_read_only_cache(tmp_path, capsys, monkeypatch):
    images = _images(tmp_path / "imgs", n=4)
    # partly filled: two entries (and settings.json) written, then the folder turns read-only
    assert main(_guide(images, tmp_path / "c", "--limit", "2")) == 0
    capsys.readouterr()
    _refuse_writes(monkeypatch)
    _fails(capsys, _guide(images, tmp_path / "c"), "cannot write to CACHE_DIR", "Permission denied")
    # empty and read-only: settings.json cannot be written either
    _fails(capsys, _guide(images, tmp_path / "fresh"), "cannot write to CACHE_DIR")


@pytest.mark.skipif(not hasattr(os, "geteuid") or os.geteuid() == 0, reason="root ignores permission bits")
def test_guide_read_only_cache_folder(tmp_path, capsys):
    images = _images(tmp_path / "imgs", n=2)
    (tmp_path / "c").mkdir()
    os.chmod(tmp_path / "c", 0o555)
    try:
        _fails(capsys, _guide(images, tmp_path / "c"), "cannot write to CACHE_DIR")
    finally:
        os.chmod(tmp_path / "c", 0o755)


def test_guide_limit(tmp_path, capsys):
    images = _images(tmp_path / "imgs", n=3)
    with pytest.raises(SystemExit) as exc:
        main(_guide(images, tmp_path / "c", "--limit", "0"))
    assert exc.value.code == 2 and "--limit: must be >= 1" in capsys.readouterr().err
    from ssattn.guidance.precompute import precompute

    stats = precompute(images, tmp_path / "c", SaliencyGuide(), limit=0, progress=False)
    assert stats.total == 0  # limit=0 is none, not all
    assert precompute(images, tmp_path / "c", SaliencyGuide(), limit=2, progress=False).total == 2


# --------------------------------------------------------------------------- train / eval
def test_eval_checkpoint_that_is_not_one(tmp_path, capsys):
    junk = tmp_path / "junk.pt"
    junk.write_bytes(b"these bytes are no checkpoint at all")
    _fails(capsys, ["eval", "--checkpoint", junk, "--data", "synthetic", "--size", "16", "--n", "2", "--device", "cpu"],
           "not a checkpoint written by ssattn train")
    torch.save({"weights": torch.zeros(2)}, tmp_path / "other.pt")  # a torch file, but not ours
    _fails(capsys, ["eval", "--checkpoint", tmp_path / "other.pt", "--data", "synthetic", "--device", "cpu"],
           "not a checkpoint written by ssattn train")
    _fails(capsys, ["eval", "--checkpoint", tmp_path / "nosuch.pt", "--data", "synthetic", "--device", "cpu"],
           "no file at", "nosuch.pt")


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without a usable GPU")
def test_train_device_cuda_without_gpu(tmp_path, capsys):
    argv = ["train", "--data", "synthetic", "--out", tmp_path / "run", "--steps", "1", *TRAIN]
    argv[argv.index("--device") + 1] = "cuda"
    _fails(capsys, argv, "--device cuda", "no CUDA device")
    argv[argv.index("--device") + 1] = "tpu9"
    _fails(capsys, argv, "--device must be")


def test_train_errors_are_one_message(tmp_path, capsys):
    run = tmp_path / "run"
    (tmp_path / "flat").mkdir()
    _images(tmp_path / "flat" / "just_images")  # a folder without a paired layout
    _fails(capsys, ["train", "--data", tmp_path / "flat", "--out", run, "--steps", "1", *TRAIN], str(tmp_path / "flat"))
    argv = ["train", "--data", "synthetic", "--out", run, "--steps", "1", *TRAIN]
    argv[argv.index("--levels") + 1] = "dec9"
    _fails(capsys, argv, "dec9")
    _fails(capsys, ["train", "--data", "synthetic", "--out", run, "--steps", "1", "--vgg-weights",
                    tmp_path / "nosuch.pth", *TRAIN], "nosuch.pth")


def test_train_level_flags_are_one_message(tmp_path, capsys):
    argv = ["train", "--data", "synthetic", "--out", tmp_path / "run", "--steps", "1", *TRAIN]
    _fails(capsys, argv + ["--attention-levels", "dec9"], "--attention-levels: dec9 is not a decoder stage",
           "dec3,dec2,dec1", "'none'")
    _fails(capsys, argv + ["--align-levels", ","], "--align-levels")
    _fails(capsys, argv + ["--model", "unet", "--align-levels", "dec3"], "need --model unet-ss")
    _fails(capsys, argv + ["--attention-levels", "none", "--align-levels", "none"], "no -SS stage is left",
           "--model unet")
    assert not (tmp_path / "run").exists()


def test_train_with_an_unreadable_cache_settings_file(tmp_path, capsys):
    for sub in ("input", "target"):
        _images(tmp_path / "data" / sub, n=2)
    bad = tmp_path / "cache" / "0123456789abcdef"
    bad.mkdir(parents=True)
    (bad / "settings.json").write_text('{"format": 1, "settin')  # cut off mid-write
    with pytest.raises(ValueError, match="settings.json.*unreadable"):
        GuidanceCache.open_existing(tmp_path / "cache")
    _fails(capsys, ["train", "--data", tmp_path / "data", "--cache-dir", tmp_path / "cache", "--out", tmp_path / "run",
                    "--steps", "1", *TRAIN], "settings.json", "unreadable")


def test_train_steps_zero_and_nothing_left_to_do(tmp_path, capsys):
    run = tmp_path / "run"
    with pytest.raises(SystemExit) as exc:
        main(["train", "--data", "synthetic", "--out", str(run), "--steps", "0", *TRAIN])
    assert exc.value.code == 2 and "--steps: must be >= 1" in capsys.readouterr().err
    argv = ["train", "--data", "synthetic", "--out", str(run), "--steps", "1", *TRAIN]
    assert main(argv) == 0
    assert "ms/step" in capsys.readouterr().out
    assert main(argv) == 0  # resumed at step 1 of 1: no step runs, so no step time to report
    out = capsys.readouterr().out
    assert "nan" not in out and "no new steps" in out


def test_train_help_shows_defaults(capsys):
    with pytest.raises(SystemExit) as exc:
        main(["train", "--help"])
    assert exc.value.code == 0
    text = " ".join(capsys.readouterr().out.split())
    for flag, default in (("--steps", "1000"), ("--batch-size", "8"), ("--lr", "0.002"), ("--model", "unet-ss")):
        start = text.index(flag + " ", text.index("options:"))
        assert f"(default {default})" in text[start:start + 300], (flag, text[start:start + 300])


def test_info_says_compiled_and_usable(capsys):
    assert main(["info"]) == 0
    out = capsys.readouterr().out
    assert "usable" in out
    assert "CUDA available" not in out  # the old line, which read as a contradiction beside "CUDA kernels: True"
    from ssattn import _backends

    native = _backends.native_module()
    if native is not None and hasattr(native, "has_cuda"):
        assert "CUDA kernels compiled:" in out and "usable:" in out


def test_info_names_the_backend_auto_uses_for_each_op(capsys, monkeypatch):
    import ssattn.ops  # noqa: F401  (registers the backends)
    from ssattn import _backends

    assert main(["info"]) == 0
    out = capsys.readouterr().out
    for op in ("masked_cross_attention", "guidance_pyramid", "alignment_loss", "caption_feature_loss"):
        for dtype in (torch.float32, torch.bfloat16):
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                chosen = _backends.resolve(op, "auto", "cpu", dtype)
            name = str(dtype).replace("torch.", "")
            line = next((ln for ln in out.splitlines() if ln.startswith(f"  {op} on cpu (") and name in ln), None)
            assert line is not None and (f"): {chosen}" in line or f", {chosen} above" in line), (op, name, out)
    if not torch.cuda.is_available():  # the Triton kernels import here but cannot run: info must not say "ok"
        kernels = [ln for ln in out.splitlines() if ln.strip().startswith("kernels.")]
        assert kernels and all("ok" not in ln.split(":", 1)[1] for ln in kernels), kernels
        assert all("needs a CUDA GPU to run" in ln or "not importable" in ln for ln in kernels), kernels
    monkeypatch.setattr(_backends, "native_module", lambda: None)  # as without a C++ compiler at install
    assert main(["info"]) == 0
    out = capsys.readouterr().out
    assert "  alignment_loss on cpu (float32, float64, float16, bfloat16): reference (native not available: the " \
           "extension ssattn._C is not built" in out


def test_no_traceback_from_the_installed_command(tmp_path):
    # The real entry point (a fresh interpreter), for one library error that used to surface as a traceback.
    proc = subprocess.run([sys.executable, "-m", "ssattn", "eval", "--checkpoint", str(tmp_path / "nosuch.pt"),
                           "--data", "synthetic", "--device", "cpu"], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2, proc.stderr
    assert "Traceback" not in proc.stderr and "nosuch.pt" in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1, proc.stderr


# --------------------------------------------------------------------------- argument parser
@pytest.mark.parametrize("argv", [
    [],  # no command
    ["fly"],  # no such command
    ["demo", "--steps", "many"],
    ["guide", "imgs"],  # --out missing
    ["route", "imgs", "--out", "o", "--batch-size", "0"],
    ["train", "--data", "synthetic", "--out", "run", "--threads", "0"],
    ["eval", "--data", "synthetic"],  # --checkpoint missing
    ["metrics", "outs", "--classes", "1"],
    ["info", "--bogus"],  # an option the command does not have
    ["train", "--data", "synthetic", "--out", "run", "--model", "resnet"],
])
def test_argument_errors_are_one_line(argv, capsys):
    # The usage block is 8-20 lines; the user needs the one that says what is wrong, and where to look.
    with pytest.raises(SystemExit) as exc:
        main(argv)
    assert exc.value.code == 2
    err = capsys.readouterr().err
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    command = "ssattn" if not argv or argv[0] == "fly" else f"ssattn {argv[0]}"
    assert lines[0].startswith(f"{command}: error: ") and lines[0].endswith(f" (see {command} --help)"), err
    assert "usage:" not in err


# --------------------------------------------------------------------------- checked before any work
def _each_command(tmp_path):
    """(name, argv without --device, a path that appears only once the command has started work)."""
    images = _images(tmp_path / "imgs", n=2)
    return [("demo", ["demo", "--quick", "--out", tmp_path / "demo", "--no-progress"], tmp_path / "demo"),
            ("guide", _guide(images, tmp_path / "cache"), tmp_path / "cache"),
            ("route", ["route", images, "--out", tmp_path / "route", "--no-progress"], tmp_path / "route")]


def test_device_is_checked_up_front(tmp_path, capsys):
    # demo, guide and route took --device as torch's string: torch's list of device types, or (demo) a CUDA
    # error after the scenes and guidance were built. Now the message train, eval and metrics give, before any work.
    for name, argv, started in _each_command(tmp_path):
        _fails(capsys, argv + ["--device", "tpu9"], f"ssattn {name}: --device must be auto, cpu, cuda or cuda:N")
        if not torch.cuda.is_available():
            _fails(capsys, argv + ["--device", "cuda"], f"ssattn {name}: --device cuda: no CUDA device")
        assert not started.exists(), name


def _no_work(monkeypatch):
    """Make the work each command does fail loudly, so a test sees that a check came before it."""
    from ssattn.apps import scoring, training
    from ssattn.apps.demo import experiment

    def work(*a, **k):
        raise AssertionError("the command started its work before checking its arguments")

    monkeypatch.setattr(training, "train", work)
    monkeypatch.setattr(experiment, "make_scenes", work)
    monkeypatch.setattr(scoring.Scorer, "score", work)


def test_output_folders_are_checked_before_any_work(tmp_path, capsys, monkeypatch):
    # train --out FILE trained, then failed with "[Errno 17] File exists"; train --cache-dir FILE failed with
    # "[Errno 20] Not a directory: FILE/<hash>"; metrics --out in an impossible place scored everything, then failed.
    _no_work(monkeypatch)
    afile = tmp_path / "afile"
    afile.write_text("x")
    for sub in ("input", "target"):
        _images(tmp_path / "data" / sub, n=2)
    train = ["train", "--data", "synthetic", "--steps", "1", *TRAIN]
    _fails(capsys, train + ["--out", afile], "ssattn train: --out", "is a file")
    _fails(capsys, train + ["--out", afile / "run"], "ssattn train: --out", "is a file")
    _fails(capsys, ["train", "--data", tmp_path / "data", "--cache-dir", afile, "--out", tmp_path / "run",
                    "--steps", "1", *TRAIN], "ssattn train: --cache-dir", "is a file")
    assert not (tmp_path / "run").exists()
    _fails(capsys, ["eval", "--checkpoint", afile, "--data", tmp_path / "data", "--cache-dir", afile / "c",
                    "--device", "cpu"], "ssattn eval: --cache-dir", "is a file")
    _fails(capsys, ["demo", "--quick", "--out", afile, "--device", "cpu"], "ssattn demo: --out", "is a file")
    outs = _images(tmp_path / "m1", n=2)
    _fails(capsys, ["metrics", outs, "--out", afile / "m", "--device", "cpu", "--no-progress"],
           "ssattn metrics: --out", "is a file")
    images = _images(tmp_path / "imgs", n=2)
    _fails(capsys, ["route", images, "--out", afile / "r", "--device", "cpu"], "ssattn route: --out", "is a file")
    _fails(capsys, _guide(images, afile / "c"), "ssattn guide: --out", "is a file")
    _fails(capsys, _guide(images, tmp_path / "c", "--overlay", afile / "o"), "ssattn guide: --overlay", "is a file")


def test_demo_levels_are_checked_before_any_work(tmp_path, capsys, monkeypatch):
    # demo --levels dec9 failed after the segmenter and the first model had trained
    _no_work(monkeypatch)
    demo = ["demo", "--quick", "--out", tmp_path / "demo", "--device", "cpu", "--no-progress"]
    _fails(capsys, demo + ["--levels", "dec9"], "ssattn demo: --levels: dec9 is not a decoder stage", "dec3,dec2,dec1")
    _fails(capsys, demo + ["--levels", "none"], "ssattn demo: --levels")
    _fails(capsys, demo + ["--levels", ","], "ssattn demo: --levels")
    assert not (tmp_path / "demo").exists()


# --------------------------------------------------------------------------- values accepted silently
def test_negative_weights_are_refused_naming_the_flag(tmp_path, capsys, monkeypatch):
    # train --align-weight -1 trained, with a loss of -1.35; --perceptual-weight -1 was taken as given
    _no_work(monkeypatch)
    train = ["train", "--data", "synthetic", "--out", tmp_path / "run", "--steps", "1", *TRAIN]
    for flag in ("--align-weight", "--perceptual-weight", "--eta"):
        err = _fails(capsys, train + [flag, "-1"], f"ssattn train: {flag} must be >= 0 and finite, got -1")
        assert len(err.strip().splitlines()) == 1, err
    _fails(capsys, train + ["--align-weight", "nan"], "--align-weight must be >= 0 and finite, got nan")
    _fails(capsys, train + ["--perceptual-weight", "inf"], "--perceptual-weight must be >= 0 and finite, got inf")
    _fails(capsys, train + ["--caption-loss", "-1", "--captioner", "x"], "--caption-loss must be a finite number >= 0")
    # the learning rate names the flag, not torch's "Invalid learning rate: -1.0"
    _fails(capsys, train + ["--lr", "-1"], "ssattn train: --lr must be > 0 and finite, got -1")
    _fails(capsys, train + ["--lr", "0"], "--lr must be > 0")


def test_empty_text_is_refused(tmp_path, capsys, monkeypatch):
    # --text "" was read as the folder "." -> "captions '.' have no entry for 6 of 6 image(s)"
    _no_work(monkeypatch)
    for argv in (["train", "--data", "synthetic", "--out", tmp_path / "run", "--steps", "1", *TRAIN],
                 ["eval", "--checkpoint", tmp_path / "run" / "checkpoint.pt", "--data", "synthetic", "--device", "cpu"]):
        for empty in ("", "  "):
            with pytest.raises(SystemExit) as exc:
                main([str(a) for a in argv + ["--text", empty]])
            assert exc.value.code == 2
            assert "argument --text: empty" in capsys.readouterr().err


def test_threads_above_the_cores_warn_once(tmp_path, capsys):
    cores = os.cpu_count()
    before = torch.get_num_threads()
    try:
        argv = ["train", "--data", "synthetic", "--out", tmp_path / "run", "--steps", "1", *TRAIN]
        assert main([str(a) for a in argv + ["--threads", cores + 1]]) == 0
        err = capsys.readouterr().err
        warned = [ln for ln in err.splitlines() if "--threads" in ln]
        assert len(warned) == 1 and f"--threads {cores + 1}" in warned[0] and f"{cores} core" in warned[0], err
        assert main([str(a) for a in argv + ["--no-resume", "--threads", cores]]) == 0
        assert "--threads" not in capsys.readouterr().err
    finally:
        torch.set_num_threads(before)


# --------------------------------------------------------------------------- the user's names
def _not_a_weights_file(path):
    """A pickle torch.load(weights_only=True) refuses: torch's message then advises weights_only=False."""
    import collections
    import pickle

    with open(path, "wb") as f:
        pickle.dump(collections.Counter("ab"), f, protocol=2)  # torch.load warns about newer protocols
    return path


def test_messages_name_the_flag(tmp_path, capsys, monkeypatch):
    # The library's names leaked out: "vgg_weights: no file", "text_stages: ... close matches: [...]",
    # torch's "num_workers option should be non-negative", a paired-data hint "or pass layout=(deg, ref)".
    train = ["train", "--data", "synthetic", "--out", tmp_path / "run", "--steps", "1", *TRAIN]
    _no_work(monkeypatch)
    _fails(capsys, train + ["--vgg-weights", tmp_path / "nosuch.pth"], "ssattn train: --vgg-weights", "nosuch.pth")
    for text_levels in ("dec7", "dec3,dec3.5"):
        err = _fails(capsys, train + ["--text", "a fish", "--text-levels", text_levels],
                     "ssattn train: --text-levels:", "is not a stage of the U-Net", "dec3,dec2,dec1")
        assert "[" not in err and "text_stages" not in err, err
    _fails(capsys, train + ["--text", "a fish", "--text-levels", "dec2,dec2"], "--text-levels: dec2 is given twice")
    (tmp_path / "flat" / "a").mkdir(parents=True)
    err = _fails(capsys, ["train", "--data", tmp_path / "flat", "--out", tmp_path / "run", "--steps", "1", *TRAIN],
                 "ssattn train: --data", "no known paired layout", "input/ + target/")
    assert "layout=" not in err and "[" not in err, err
    with pytest.raises(SystemExit):
        main(_guide(_images(tmp_path / "imgs", n=1), tmp_path / "c", "--workers", "-1"))
    assert "argument --workers: must be >= 0, got -1" in capsys.readouterr().err


def test_a_file_of_the_wrong_kind_never_suggests_unsafe_loading(tmp_path, capsys):
    # torch's own text, "Re-running torch.load with weights_only set to False will likely succeed", points the user
    # at loading an untrusted file unsafely; the message says the file is not of the kind expected instead.
    bad = _not_a_weights_file(tmp_path / "bad.pt")
    err = _fails(capsys, ["eval", "--checkpoint", bad, "--data", "synthetic", "--device", "cpu"],
                 "ssattn eval:", "is not a checkpoint written by ssattn train")
    assert "weights_only" not in err and "Re-running" not in err, err
    err = _fails(capsys, ["train", "--data", "synthetic", "--out", tmp_path / "run", "--steps", "1",
                          "--vgg-weights", bad, *TRAIN], "ssattn train: --vgg-weights", "not a VGG-19")
    assert "weights_only" not in err and "Re-running" not in err, err
    pytest.importorskip("lpips")
    images = _images(tmp_path / "imgs", n=1)
    err = _fails(capsys, ["metrics", images, "--ref", images, "--lpips-weights", bad, "--out", tmp_path / "m",
                          "--device", "cpu", "--no-progress"], "ssattn metrics:", "bad.pt")
    assert "weights_only" not in err and "Re-running" not in err, err


# --------------------------------------------------------------------------- smaller things
def test_under_torchrun_only_rank_0_prints_the_error(tmp_path, capsys, monkeypatch):
    # Every rank got the same bad arguments; two ranks printing at once ran their messages together on one line.
    bad = [["train", "--data", "synthetic", "--out", tmp_path / "run", "--threads", "0"],  # argparse's error
           ["train", "--data", "synthetic", "--out", tmp_path / "run", *TRAIN[:-2], "--device", "tpu9"]]  # the CLI's
    for rank, speaks in (("1", False), ("0", True)):
        monkeypatch.setenv("RANK", rank)
        for argv in bad:
            try:
                rc = main([str(a) for a in argv])
            except SystemExit as exc:
                rc = exc.code
            err = capsys.readouterr().err
            assert rc == 2
            assert len(err.strip().splitlines()) == (1 if speaks else 0), (rank, err)


@pytest.mark.parametrize("ending", ["refusal", "crash", "success"])
def test_main_ends_the_process_group_a_command_made(tmp_path, monkeypatch, ending):
    # However a command ends, a process group it made (under torchrun) does not outlive it: left to the
    # interpreter's exit, the backend's threads run into shutdown, where they can kill the process.
    import torch.distributed as dist

    from ssattn.apps.cli import guide

    def command(args):
        dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
        if ending == "refusal":
            raise CLIError("refused once the group existed")
        if ending == "crash":
            raise RuntimeError("failed once the group existed")
        return 0

    monkeypatch.setattr(guide, "run", command)
    assert main(["guide", str(tmp_path), "--out", str(tmp_path / "c")]) == (0 if ending == "success" else 2)
    assert not dist.is_initialized()


def test_progress_labels_and_skip_warnings_read_well(tmp_path, capsys, caplog):
    images = _images(tmp_path / "imgs", n=3)
    (images / "broken.png").write_bytes(b"not an image")
    for argv, word in ((["guide", images, "--out", tmp_path / "c", "--workers", "0"], "guide"),
                       (["route", images, "--out", tmp_path / "r", "--device", "cpu"], "route")):
        caplog.clear()
        assert main([str(a) for a in argv]) == 0
        err = capsys.readouterr().err
        # the progress lines (stderr is no terminal here) are labelled by the command, not by a cache hash
        progress = [ln for ln in err.splitlines() if " img (" in ln]
        assert progress and all(ln.startswith(f"{word}: ") for ln in progress), err
        # one warning per unreadable file, with the reason, in words: not "skipping cannot read image ..."
        warned = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
        assert warned == [f"cannot read image {str(images / 'broken.png')!r} (not an image file); skipped"], warned


@pytest.mark.parametrize("command", ["demo", "guide", "route", "train"])
def test_no_progress_has_help(command, capsys):
    with pytest.raises(SystemExit):
        main([command, "--help"])
    text = " ".join(capsys.readouterr().out.split())
    start = text.index("--no-progress", text.index("options:"))
    assert not text[start:].startswith("--no-progress --"), text[start:start + 120]  # a help text follows the flag
    assert "progress" in text[start + len("--no-progress"):start + 120]


def test_under_torchrun_an_error_of_one_rank_is_printed_by_that_rank(capsys, monkeypatch):
    # Arguments are the same on every rank (rank 0 speaks for all); a failure at run time can be one rank's alone
    # (its shard of the data, its device), so that rank says it, on a line of its own that names the rank.
    import ssattn.apps.cli.info as info

    def boom(args):
        raise OSError("cannot read shard 3")

    monkeypatch.setattr(info, "run", boom)
    monkeypatch.setenv("RANK", "1")
    assert main(["info"]) == 2
    assert capsys.readouterr().err == "ssattn info [rank 1]: cannot read shard 3\n"
