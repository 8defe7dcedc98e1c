"""Training throughput of `ssattn train` on 1 and N processes (torchrun, DDP; gloo on CPU, NCCL on CUDA).

    python benchmarks/bench_train_ddp.py --procs 1 2 --device cpu --size 64 --batch-size 4 --steps 12

Each run trains the reference -SS U-Net (`--model unet-ss`, width 16, all three
stages) on synthetic data in a fresh run folder and reads images/s (all ranks,
after 2 warm-up steps; the slowest rank's step time) from history.json.
Prints a markdown table for benchmarks/RESULTS.md.
"""

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile


def ssattn_command() -> str:
    beside = os.path.join(os.path.dirname(sys.executable), "ssattn")
    return beside if os.path.isfile(beside) else (shutil.which("ssattn") or "ssattn")


def run(procs: int, args, folder: str) -> dict:
    out = os.path.join(folder, f"run{procs}")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nnodes", "1", "--nproc_per_node",
           str(procs), "--no-python", ssattn_command(), "train", "--data", "synthetic", "--out", out, "--size",
           str(args.size), "--items", str(args.items), "--steps", str(args.steps), "--batch-size", str(args.batch_size),
           "--width", str(args.width), "--model", "unet-ss", "--device", args.device, "--no-progress", "--no-resume",
           "--log-every", "0", "--checkpoint-every", "0"]
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads)}
    subprocess.run(cmd, check=True, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    with open(os.path.join(out, "history.json")) as f:
        return json.load(f)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--procs", type=int, nargs="+", default=[1, 2])
    p.add_argument("--device", default="cpu")
    p.add_argument("--size", type=int, default=64)
    p.add_argument("--width", type=int, default=16)
    p.add_argument("--batch-size", type=int, default=4, help="per process")
    p.add_argument("--steps", type=int, default=12)
    p.add_argument("--items", type=int, default=64)
    p.add_argument("--threads", type=int, default=1, help="OMP_NUM_THREADS per process (default 1)")
    args = p.parse_args()
    with tempfile.TemporaryDirectory() as folder:
        rows = [(n, run(n, args, folder)) for n in args.procs]
    base = rows[0][1]["images_per_s"]
    print(f"| processes | images/step | ms/step | images/s | vs {rows[0][0]} |")
    print("|---|---|---|---|---|")
    for n, h in rows:
        print(f"| {n} | {n * args.batch_size} | {1000 * h['step_time_s']:.0f} | {h['images_per_s']:.1f} | "
              f"{h['images_per_s'] / base:.2f}x |")


if __name__ == "__main__":
    main()
