"""Fit the embedded degradation classifier and write ssattn/routing/_embedded_weights.py.

    python benchmarks/fit_embedded_classifier.py             # about 4 minutes on one CPU thread
    python benchmarks/fit_embedded_classifier.py --check     # refit and compare with the shipped weights

What it does, deterministically (one thread, float64 training, every draw seeded):

1. Draws the training set: ssattn.apps.data.routing_data.training_set(n, seed, ALL_CLASSES): randomised
   degradations (wide parameter ranges, several pipelines per class) of crops of the training photographs
   and of procedural images; each group of six consecutive images comes from one of four parts of the
   photographs (FOLDS). The held-out photographs (TEST_PHOTOS) are never drawn.
2. Measures ssattn.routing.features on each image (as the classifier does: prepare() crops).
3. For each fit (the four paper classes; all six): an ensemble of `members` MLPs (two GELU layers of
   `hidden` units) on the standardised features, AdamW with a one-cycle schedule, Gaussian noise on the
   inputs; members differ in their seed.
4. Calibration: for each part of the photographs, an ensemble fitted on the other three predicts it
   (leave-photos-out); the temperature that minimises the negative log-likelihood of these out-of-fold
   logits is the shipped one.
5. Writes the final ensembles (fitted on all four parts), their standardisation and temperatures as
   base64 float32 arrays with their sha256.

The library reads only the written numbers; it never imports the generator (ssattn.apps) at run time.
Reproduction: the same torch version on one thread gives the same bytes (`--check` says whether it does;
benchmarks/RESULTS.md records the check). Another CPU, BLAS or thread count may round differently and
give other bytes; how far the answers then move has not been measured (the tests check accuracy floors,
not bytes).
"""

from __future__ import annotations

import argparse
import base64
import hashlib
import pathlib
import sys
import time

import torch
import torch.nn.functional as F
from torch import nn

from ssattn._progress import progress_bar
from ssattn.apps.data.routing_data import FOLDS, training_set
from ssattn.routing.classes import ALL_CLASSES, PAPER_CLASSES
from ssattn.routing.embedded import Z_CLIP, prepare
from ssattn.routing.features import FEATURES, features

OUT = pathlib.Path(__file__).resolve().parents[1] / "ssattn" / "routing" / "_embedded_weights.py"


def measure(images) -> torch.Tensor:
    bar = progress_bar(len(images), unit="img", desc="features")
    rows = []
    for x in images:
        rows.append(features(prepare(x[None])))
        bar.update(1)
    bar.close()
    return torch.cat(rows).double()


class Mlp(nn.Module):
    def __init__(self, n_in: int, hidden: int, n_out: int):
        super().__init__()
        self.l1, self.l2, self.l3 = nn.Linear(n_in, hidden), nn.Linear(hidden, hidden), nn.Linear(hidden, n_out)

    def forward(self, z):
        return self.l3(F.gelu(self.l2(F.gelu(self.l1(z)))))


def standardise(feats: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    return feats.mean(0), feats.std(0).clamp_min(1e-6)


def train_member(z, y, n_classes: int, args, seed: int) -> Mlp:
    torch.manual_seed(seed)
    model = Mlp(z.shape[1], args.hidden, n_classes).double()
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=args.weight_decay)
    gen = torch.Generator().manual_seed(seed)
    steps_per_epoch = -(-len(z) // args.batch)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=args.lr, total_steps=args.epochs * steps_per_epoch)
    for _ in range(args.epochs):
        order = torch.randperm(len(z), generator=gen)
        for i in range(0, len(z), args.batch):
            idx = order[i:i + args.batch]
            noisy = z[idx] + args.input_noise * torch.randn(len(idx), z.shape[1], generator=gen, dtype=z.dtype)
            loss = F.cross_entropy(model(noisy), y[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()
    return model.eval()


def train_ensemble(feats, y, n_classes: int, args, seed: int) -> dict:
    mean, std = standardise(feats)
    z = ((feats - mean) / std).clamp(-Z_CLIP, Z_CLIP)
    members = [train_member(z, y, n_classes, args, seed * 1000 + m) for m in range(args.members)]
    return {"mean": mean, "std": std, "members": members}


@torch.no_grad()
def ensemble_logits(ens: dict, feats) -> torch.Tensor:
    z = ((feats - ens["mean"]) / ens["std"]).clamp(-Z_CLIP, Z_CLIP)
    return torch.stack([m(z) for m in ens["members"]]).mean(0)


def fit_temperature(logits, y) -> float:
    """The T > 0 minimising the mean negative log-likelihood of softmax(logits / T)."""
    log_t = torch.zeros((), dtype=torch.float64, requires_grad=True)
    opt = torch.optim.LBFGS([log_t], max_iter=200, tolerance_grad=1e-12, line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        loss = F.cross_entropy(logits / log_t.exp(), y)
        loss.backward()
        return loss

    opt.step(closure)
    return float(log_t.detach().exp())


def encode(t: torch.Tensor) -> dict:
    arr = t.detach().to(torch.float32).contiguous().numpy().astype("<f4")
    return {"shape": list(arr.shape), "data": base64.b64encode(arr.tobytes()).decode("ascii")}


def arrays_of(ens: dict) -> dict:
    ms = ens["members"]
    stack = lambda f: torch.stack([f(m) for m in ms])  # noqa: E731
    return {"mean": ens["mean"], "std": ens["std"],
            "w1": stack(lambda m: m.l1.weight.T), "b1": stack(lambda m: m.l1.bias),
            "w2": stack(lambda m: m.l2.weight.T), "b2": stack(lambda m: m.l2.bias),
            "w3": stack(lambda m: m.l3.weight.T), "b3": stack(lambda m: m.l3.bias)}


def fit(name: str, classes, feats, y, folds, args, log) -> dict:
    n_classes = len(classes)
    oof = torch.zeros(len(y), n_classes, dtype=torch.float64)
    for k in range(len(FOLDS)):
        t0 = time.monotonic()
        held = folds == k
        ens = train_ensemble(feats[~held], y[~held], n_classes, args, seed=args.seed * 10 + k + 1)
        oof[held] = ensemble_logits(ens, feats[held])
        acc = (oof[held].argmax(1) == y[held]).double().mean().item()
        log(f"{name}: part {k} ({', '.join(FOLDS[k])}) predicted by the other parts: accuracy {acc:.3f} "
            f"({time.monotonic() - t0:.0f} s)")
    temperature = fit_temperature(oof, y)
    oof_acc = (oof.argmax(1) == y).double().mean().item()
    nll = F.cross_entropy(oof / temperature, y).item()
    log(f"{name}: leave-photos-out accuracy {oof_acc:.3f}, temperature {temperature:.4f}, NLL {nll:.4f}")
    final = train_ensemble(feats, y, n_classes, args, seed=args.seed * 10)
    train_acc = (ensemble_logits(final, feats).argmax(1) == y).double().mean().item()
    log(f"{name}: final ensemble, training accuracy {train_acc:.3f}")
    arrays = {k: encode(v) for k, v in arrays_of(final).items()}
    digest = hashlib.sha256("".join(a["data"] for a in arrays.values()).encode()).hexdigest()
    return {"name": name, "classes": list(classes), "features": list(FEATURES), "temperature": round(temperature, 6),
            "hidden": args.hidden, "members": args.members, "leave_photos_out_accuracy": round(oof_acc, 4),
            "training_accuracy": round(train_acc, 4),
            "trained_on": f"routing_data.training_set(n={args.n}, seed={args.seed}, kinds=ALL_CLASSES)",
            "sha256": digest, "arrays": arrays}


def render(fits: list[dict], args) -> str:
    lines = ['"""Weights of the embedded degradation classifier, written by benchmarks/fit_embedded_classifier.py.',
             "",
             "Do not edit: rerun the script. Arrays are float32, little-endian, base64 (embedded.decode reads them);",
             "sha256 is over their base64 text, in order.",
             f"Command: python benchmarks/fit_embedded_classifier.py --n {args.n} --seed {args.seed} "
             f"--members {args.members} --hidden {args.hidden} --epochs {args.epochs}",
             '"""', "", "FITS = ["]
    for f in fits:
        lines.append("    {")
        for k, v in f.items():
            if k == "arrays":
                lines.append("        'arrays': {")
                for name, a in v.items():
                    lines.append(f"            {name!r}: {{'shape': {a['shape']!r}, 'data': (")
                    data = a["data"]
                    for i in range(0, len(data), 100):
                        lines.append(f"                {data[i:i + 100]!r}")
                    lines.append("            )},")
                lines.append("        },")
            else:
                lines.append(f"        {k!r}: {v!r},")
        lines.append("    },")
    lines.append("]")
    return "\n".join(lines) + "\n"


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=6000, help="training images, all six classes in turn (6000)")
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--members", type=int, default=5, help="MLPs per ensemble (5)")
    ap.add_argument("--hidden", type=int, default=32, help="units per hidden layer (32)")
    ap.add_argument("--epochs", type=int, default=60)
    ap.add_argument("--batch", type=int, default=256)
    ap.add_argument("--lr", type=float, default=3e-3)
    ap.add_argument("--weight-decay", type=float, default=1e-2)
    ap.add_argument("--input-noise", type=float, default=0.3, help="std of the noise on standardised inputs")
    ap.add_argument("--out", type=pathlib.Path, default=OUT)
    ap.add_argument("--features-cache", type=pathlib.Path, default=None,
                    help="reuse (or write) the measured training features in this .pt file")
    ap.add_argument("--check", action="store_true", help="write nothing; say whether the refit equals --out")
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    log = lambda msg: print(msg, flush=True)  # noqa: E731
    t0 = time.monotonic()
    if args.features_cache is not None and args.features_cache.exists():
        cached = torch.load(args.features_cache, weights_only=True)
        feats, y, folds = cached["features"], cached["labels"], cached["folds"]
        log(f"features of {len(y)} images read from {args.features_cache}")
    else:
        images, y, _, folds = training_set(args.n, args.seed, ALL_CLASSES)
        log(f"drew {len(images)} training images in {time.monotonic() - t0:.0f} s")
        feats = measure(images)
        del images
        if args.features_cache is not None:
            torch.save({"features": feats, "labels": y, "folds": folds}, args.features_cache)
    if not torch.isfinite(feats).all():
        raise SystemExit("fit_embedded_classifier: a training image gave a non-finite feature")
    paper = y < len(PAPER_CLASSES)  # ALL_CLASSES starts with the paper's four
    fits = [fit("paper4", PAPER_CLASSES, feats[paper], y[paper], folds[paper], args, log),
            fit("all6", ALL_CLASSES, feats, y, folds, args, log)]
    text = render(fits, args)
    log(f"done in {time.monotonic() - t0:.0f} s")
    if args.check:
        same = args.out.exists() and args.out.read_text() == text
        log(f"{args.out}: {'identical' if same else 'DIFFERENT'} to the refit")
        return 0 if same else 1
    args.out.write_text(text)
    log(f"wrote {args.out} ({len(text.encode()) / 1024:.0f} KiB)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
