"""Progress of long jobs: a bar on a terminal, a few plain lines in a log (never one line per update)."""

import io

from ssattn._progress import progress_bar


class _Terminal(io.StringIO):
    def isatty(self):
        return True


def _run(total, steps, stream, **kw):
    bar = progress_bar(total, desc="job", unit="img", stream=stream, **kw)
    for _ in range(steps):
        bar.update(1)
        bar.set_postfix(loss="0.5")
    bar.close()
    return stream.getvalue()


def test_a_log_gets_a_line_per_tenth_not_per_update():
    out = _run(1000, 1000, io.StringIO())
    lines = out.splitlines()
    assert len(lines) == 10, lines
    assert "\r" not in out
    assert lines[0].startswith("job: 100/1000 img (10%)")
    assert lines[-1].startswith("job: 1000/1000 img (100%)") and lines[-1].endswith("loss=0.5")


def test_a_short_or_resumed_job_reports_its_end_once():
    assert len(_run(3, 3, io.StringIO()).splitlines()) == 3
    out = _run(100, 5, io.StringIO(), initial=95).splitlines()
    assert out == [out[0]] and out[0].startswith("job: 100/100 img (100%)")
    # an interrupted job (closed early) still says where it stopped
    out = _run(100, 5, io.StringIO()).splitlines()
    assert len(out) == 1 and out[0].startswith("job: 5/100 img (5%)")


def test_a_terminal_gets_a_live_bar():
    out = _run(50, 50, _Terminal())
    assert "\r" in out and "50/50" in out


def test_disabled_is_silent():
    assert _run(10, 10, io.StringIO(), disable=True) == ""


def test_train_writes_a_few_progress_lines_to_a_log_not_one_per_step(tmp_path):
    # stderr is a pipe here, as in a CI log or `2> train.log`: 200 steps give a line per tenth, not 200
    # redraws (the trainer's tqdm bar wrote one per step before).
    import os
    import re
    import subprocess
    import sys

    steps = 200
    cmd = [sys.executable, "-m", "ssattn", "train", "--data", "synthetic", "--out", str(tmp_path / "run"),
           "--size", "16", "--n", "4", "--batch-size", "2", "--width", "4", "--levels", "dec3", "--device", "cpu",
           "--threads", "1", "--steps", str(steps), "--log-every", "0", "--checkpoint-every", "0"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env={**os.environ, "PYTHONWARNINGS": "ignore"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    records = [r for r in re.split(r"[\r\n]", proc.stderr) if re.search(rf"\b\d+/{steps}\b", r)]
    assert 1 <= len(records) <= 12, records[:20]
    assert f"{steps}/{steps}" in records[-1]
