"""DegradationRouter: classify each image of a batch, run each expert once on its sub-batch, restore the order.

    router = DegradationRouter(EmbeddedClassifier(), experts={"noise_blur_jpeg": m1, "reflection": m2,
                               "motion_blur": m3}, passthrough=("none",))
    out = router(images)          # Routed(images, labels, routes, scores, confidence)

Contract:
- classification runs without gradient (its decision is discrete); the
  experts run with autograd, so a loss on out.images trains them through
  the router, and passthrough images carry the identity gradient;
- each expert runs at most once per call, on the images routed to it in
  their input order; an expert with no image is not called;
- images whose top probability is below `threshold` go to `fallback`
  (an expert's name, a passthrough class, or an nn.Module);
- keyword inputs of forward (e.g. guidance=) are sliced to each sub-batch
  when they are tensors with the batch's first dimension, and passed to
  the experts whose forward accepts them (a -SS model takes guidance=).
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass

import torch
from torch import Tensor, nn

FALLBACK = "fallback"


@dataclass
class Routed:
    """What the router returns: restored images in input order and how each was routed."""

    images: Tensor            # (B, 3, H, W): expert outputs, or the input for passthrough
    labels: list[str]         # the classifier's class per image
    routes: list[str]         # the expert (or passthrough class, or "fallback") that produced each image
    scores: Tensor            # (B, C) classifier probabilities, columns in classifier.classes order
    confidence: Tensor        # (B,) the top probability


def _accepts(module: nn.Module) -> tuple[set[str], bool]:
    """Keyword names module.forward accepts, and whether it takes **kwargs."""
    try:
        params = inspect.signature(module.forward).parameters.values()
    except (TypeError, ValueError):
        return set(), True
    names = {p.name for p in params if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)}
    return names, any(p.kind == p.VAR_KEYWORD for p in params)


class DegradationRouter(nn.Module):
    """Routes each image to the expert of its degradation class (see the module docstring)."""

    def __init__(self, classifier, experts: dict, passthrough=("none",), *, threshold: float | None = None,
                 fallback=None):
        super().__init__()
        classes = tuple(getattr(classifier, "classes", ()) or ())
        if not classes or not callable(classifier):
            raise TypeError("classifier must be callable (images -> (B, C) probabilities) and have .classes")
        if not isinstance(experts, dict) or not all(isinstance(m, nn.Module) for m in experts.values()):
            raise TypeError(f"experts must be a dict of class name -> nn.Module, got {type(experts).__name__}")
        passthrough = (passthrough,) if isinstance(passthrough, str) else tuple(passthrough)
        unknown = [c for c in (*experts, *passthrough) if c not in classes]
        if unknown:
            raise ValueError(f"experts/passthrough name classes {unknown} that the classifier does not have "
                             f"(its classes: {classes})")
        both = sorted(set(experts) & set(passthrough))
        if both:
            raise ValueError(f"classes {both} are both experts and passthrough")
        if threshold is not None and not 0 <= float(threshold) <= 1:
            raise ValueError(f"threshold must be a probability in [0, 1] or None, got {threshold!r}")
        if threshold is not None and fallback is None:
            raise ValueError("threshold needs a fallback (an expert's name, a passthrough class or an nn.Module)")
        if isinstance(fallback, str) and fallback not in experts and fallback not in passthrough:
            raise ValueError(f"fallback {fallback!r} is neither an expert nor a passthrough class "
                             f"(experts: {sorted(experts)}, passthrough: {passthrough})")
        if fallback is not None and not isinstance(fallback, (str, nn.Module)):
            raise TypeError(f"fallback must be an expert's name or an nn.Module, got {type(fallback).__name__}")
        uncovered = [c for c in classes if c not in experts and c not in passthrough]
        if uncovered and fallback is None:
            raise ValueError(f"classes {uncovered} have no expert and are not passthrough; add them to experts or "
                             "passthrough, or give a fallback")
        self.classifier = classifier
        self.classes = classes
        self.experts = nn.ModuleDict(experts)
        self.passthrough = passthrough
        self.threshold = None if threshold is None else float(threshold)
        self.fallback = fallback if isinstance(fallback, nn.Module) else None
        self._fallback_name = fallback if isinstance(fallback, str) else (FALLBACK if fallback is not None else None)
        # The route of each class (fallback for classes without an expert).
        self._class_route = [c if (c in experts or c in passthrough) else self._fallback_name for c in classes]

    def _module(self, route: str) -> nn.Module | None:
        if route == FALLBACK and self.fallback is not None:
            return self.fallback
        return self.experts[route] if route in self.experts else None

    def routes_for(self, scores: Tensor) -> tuple[list[str], list[str], Tensor]:
        """(labels, routes, confidence) of (B, C) scores."""
        conf, idx = scores.max(1)
        labels = [self.classes[i] for i in idx.tolist()]
        routes = [self._class_route[i] for i in idx.tolist()]
        if self.threshold is not None:
            routes = [self._fallback_name if c < self.threshold else r for r, c in zip(routes, conf.tolist())]
        return labels, routes, conf

    def forward(self, images: Tensor, *, scores: Tensor | None = None, **inputs) -> Routed:
        """Route a batch (B, 3, H, W); `scores` (B, C) skips the classifier (e.g. cached labels)."""
        if not isinstance(images, Tensor) or images.dim() != 4:
            raise ValueError(f"images must be a batch (B, C, H, W), got {getattr(images, 'shape', type(images))}")
        b = images.shape[0]
        if b == 0:
            raise ValueError("images is an empty batch")
        if scores is None:
            with torch.no_grad():
                scores = self.classifier(images.detach())
        scores = scores.detach().to(images.device)
        if scores.shape != (b, len(self.classes)):
            raise ValueError(f"scores must have shape (B, C) = {(b, len(self.classes))}, got {tuple(scores.shape)}")
        labels, routes, conf = self.routes_for(scores)
        pieces, order = [], []
        for route in dict.fromkeys(routes):  # each route once, in order of first appearance
            idx = torch.tensor([i for i, r in enumerate(routes) if r == route], device=images.device)
            module = self._module(route)
            if module is None:  # passthrough: the input itself
                pieces.append(images.index_select(0, idx))
            else:
                out = module(images.index_select(0, idx), **self._inputs_for(module, inputs, idx, b))
                if not isinstance(out, Tensor) or out.shape != (len(idx), *images.shape[1:]):
                    raise ValueError(f"expert {route!r} must return a tensor of its input's shape "
                                     f"{(len(idx), *images.shape[1:])}, got {getattr(out, 'shape', type(out))}")
                pieces.append(out)
            order.append(idx)
        order = torch.cat(order)
        inverse = torch.empty_like(order)
        inverse[order] = torch.arange(b, device=order.device)
        restored = torch.cat(pieces).index_select(0, inverse)
        return Routed(restored, labels, routes, scores, conf)

    @staticmethod
    def _inputs_for(module: nn.Module, inputs: dict, idx: Tensor, b: int) -> dict:
        if not inputs:
            return {}
        names, any_kw = _accepts(module)
        out = {}
        for k, v in inputs.items():
            if any_kw or k in names:
                out[k] = v.index_select(0, idx.to(v.device)) if isinstance(v, Tensor) and v.dim() and v.shape[0] == b else v
        return out
