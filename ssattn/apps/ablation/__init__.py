"""The -SS ablation: which part of -SS does what, measured on the demo's scenes with paired seeds.

variants (what each variant is and how the public API builds it), runner
(paired, resumable training and scoring of every run), report (means,
paired differences, per-class IoU, findings: table.json and table.md),
plot (the paired differences as one PNG). benchmarks/ablation_ss.py is its
command line.
"""

from .report import markdown, summarize
from .runner import AblationConfig, run_all
from .variants import GUIDANCES, VARIANTS

__all__ = ["AblationConfig", "GUIDANCES", "VARIANTS", "markdown", "run_all", "summarize"]
