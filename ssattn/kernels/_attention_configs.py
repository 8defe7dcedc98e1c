"""Block-size configurations of the attention kernels, per kernel and shape class.

A shape class is (precision class, head-dim class):
  precision: "half" (fp16 / bf16), "tf32" (fp32 with tf32 or tf32x3 dots,
             on the tensor cores), "ieee" (fp32 with IEEE dots: FMA loops,
             no tensor-core instruction exists for them);
  head dim:  the padded head dim (max of q/k and v) as 32 (16 and 32), 64,
             128 or 256.

The lists come from the static sm_90 compile reports (Triton 3.6 and 3.8,
benchmarks/compile_reports/: triton36.md, triton38.md, sweeps.md, and the
reports of the previous lists): configs that spill registers or need more than
227 KB of shared memory were left out. Where every config spills, the
least-spilling ones stay, marked "spills". The first entry is the
default heuristic (for half d<=64 forward, the H100 calibration in
KERNEL-NOTES). Which of the rest is fastest is for autotuning on the GPU:
no GPU timing has informed these lists yet.

Entries are (BLOCK_M, BLOCK_N, warps, stages). fwd: BLOCK_M queries per
program, BLOCK_N keys per step. dkdv: BLOCK_N keys per program, BLOCK_M
queries per step (also the single-pass "fused" kernel). dq: BLOCK_M queries
per program, BLOCK_N keys per step. Autotuning (opt-in, SSATTN_AUTOTUNE=1)
times the rest of a class's list.
"""

from __future__ import annotations

Config = tuple[int, int, int, int]

TABLE: dict[str, dict[tuple[str, int], list[Config]]] = {
    "fwd": {
        ("half", 32): [(64, 128, 4, 3), (64, 128, 4, 4), (128, 64, 4, 3), (128, 64, 8, 3),
                       (128, 128, 8, 3), (128, 128, 8, 2), (64, 64, 4, 3), (64, 64, 4, 2)],
        ("half", 64): [(128, 64, 4, 3), (64, 128, 4, 3), (128, 64, 8, 3), (128, 128, 8, 3),
                       (128, 128, 8, 2), (64, 64, 4, 3), (64, 64, 4, 2)],
        ("half", 128): [(128, 64, 8, 3), (64, 64, 4, 3), (64, 64, 4, 2)],
        ("half", 256): [(64, 64, 8, 2), (64, 32, 4, 2)],  # 64x32: 120 B of spills
        ("tf32", 32): [(64, 64, 4, 3), (64, 64, 4, 2), (128, 64, 4, 3), (128, 64, 8, 3), (64, 128, 4, 3)],
        ("tf32", 64): [(64, 64, 4, 2), (64, 64, 4, 3), (128, 64, 8, 3)],
        ("tf32", 128): [(64, 32, 4, 2), (64, 64, 8, 2)],
        ("tf32", 256): [(64, 32, 4, 2)],  # spills
        ("ieee", 32): [(64, 32, 4, 2), (32, 64, 4, 2), (32, 32, 4, 2), (16, 64, 4, 2)],
        ("ieee", 64): [(32, 32, 8, 2), (16, 64, 8, 2), (16, 32, 4, 2)],
        ("ieee", 128): [(16, 32, 8, 2), (16, 16, 4, 2)],  # spills (352-508 B)
        ("ieee", 256): [(16, 32, 8, 2)],  # spills
    },
    "dkdv": {
        ("half", 32): [(64, 64, 4, 3), (32, 64, 4, 2), (32, 64, 4, 3), (64, 128, 8, 3)],
        ("half", 64): [(32, 64, 4, 2), (32, 64, 4, 3), (32, 64, 8, 2), (32, 64, 8, 3), (32, 128, 8, 2)],
        ("half", 128): [(32, 64, 8, 2), (32, 64, 8, 3), (32, 32, 4, 2)],
        ("half", 256): [(32, 32, 4, 2)],  # spills
        ("tf32", 32): [(32, 64, 4, 2), (32, 64, 4, 3)],
        # 32x64 runs on wgmma with 48-64 B of spills; the two others are clean but use mma.sync.
        ("tf32", 64): [(32, 64, 4, 2), (64, 32, 4, 2), (32, 32, 4, 2)],
        ("tf32", 128): [(32, 32, 4, 2), (64, 32, 4, 2)],  # spills (112-560 B)
        ("tf32", 256): [(32, 32, 4, 2)],  # spills
        ("ieee", 32): [(16, 64, 4, 2), (32, 16, 4, 2), (16, 32, 4, 2)],  # 32x16: 4 B of spills on 3.6
        ("ieee", 64): [(16, 64, 8, 2), (32, 32, 8, 2), (16, 32, 8, 2)],
        ("ieee", 128): [(16, 16, 4, 2), (16, 32, 8, 2)],  # spills 0-12 B / 0-40 B (3.6 / 3.8)
        ("ieee", 256): [(16, 16, 4, 2)],  # not compiled at 256 yet
    },
    "dq": {
        ("half", 32): [(64, 64, 4, 3), (64, 32, 4, 2), (64, 64, 4, 2), (128, 32, 4, 3), (128, 64, 8, 3),
                       (128, 64, 4, 2)],
        ("half", 64): [(64, 64, 4, 3), (64, 32, 4, 2), (64, 64, 4, 2), (128, 32, 4, 3), (128, 64, 8, 3)],
        ("half", 128): [(64, 32, 4, 2), (64, 64, 4, 2), (64, 64, 4, 3), (128, 64, 8, 2), (128, 64, 8, 3)],
        ("half", 256): [(32, 32, 4, 2), (64, 32, 8, 2)],  # 64x32: 444 B of spills
        ("tf32", 32): [(64, 32, 4, 2), (64, 64, 4, 2), (64, 64, 4, 3), (128, 32, 4, 3), (128, 64, 8, 3)],
        ("tf32", 64): [(64, 32, 4, 2), (64, 64, 4, 2), (64, 64, 4, 3), (128, 64, 8, 3)],
        ("tf32", 128): [(64, 32, 8, 2), (32, 32, 4, 2), (64, 32, 4, 2)],  # spills (124-332 B)
        ("tf32", 256): [(32, 32, 4, 2)],  # spills
        ("ieee", 32): [(64, 32, 4, 2), (32, 32, 4, 2), (32, 64, 4, 2)],
        ("ieee", 64): [(32, 32, 8, 2), (16, 64, 8, 2), (16, 32, 4, 2)],
        ("ieee", 128): [(16, 32, 8, 2), (16, 16, 4, 2)],  # spills (368-476 B)
        ("ieee", 256): [(16, 32, 8, 2)],  # spills
    },
}


# The single-pass backward (dkdv with dq by atomics) walks dkdv's loop, but its dq product has
# BLOCK_M rows: 64 keeps it on wgmma (32 falls back to mma.sync). From the sm_90 compile report of
# 2026-12-01 (Triton 3.8): half d=32 64x64 w4 s2 237 regs, d=64 64x64 w8 s2 235 regs, tf32 d=32
# 64x64 w8 s2, all without spills; tf32 d=64 spills in every config tried (64x64 w8: 172 B, wgmma;
# 64x32 w4: 64 B, mma.sync). Under Triton 3.6 (the GPU image's) half d=64 64x64 w8 s2 spills 36 B,
# and its clean configs (BLOCK_N 16/32) put the dk/dv products on mma.sync: kept as is until a GPU
# run compares them. The other classes keep dkdv's lists until reports of their own.
TABLE["fused"] = {
    **TABLE["dkdv"],
    ("half", 32): [(64, 64, 4, 2), (64, 64, 8, 2), (64, 64, 4, 3)],
    ("half", 64): [(64, 64, 8, 2), (32, 64, 4, 2)],
    ("tf32", 32): [(64, 64, 8, 2), (32, 64, 4, 2)],
    ("tf32", 64): [(64, 64, 8, 2), (64, 32, 4, 2)],  # spills
}


def shape_class(fp32: bool, precision: str, block_d: int) -> tuple[str, int]:
    """The TABLE key of a launch: precision class and padded head-dim class."""
    if not fp32:
        prec = "half"
    else:
        prec = "ieee" if precision == "ieee" else "tf32"
    for dim in (32, 64, 128):
        if block_d <= dim:
            return prec, dim
    return prec, 256


def choices(kind: str) -> list[Config]:
    """Every config of one kernel over all classes (the autotune list; _prune keeps the class's own)."""
    seen: list[Config] = []
    for configs in TABLE[kind].values():
        seen.extend(c for c in configs if c not in seen)
    return seen
