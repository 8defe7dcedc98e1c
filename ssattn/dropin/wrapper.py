"""The drop-in wrapper: -SS and text stages for an existing network (SPEC Public API: semantic_sensitive).

    ss = ssattn.semantic_sensitive(unet, {"dec2": "enc2", "dec1": "enc1"})
    y = ss(x, guidance=m)                 # m: (B, 1, H, W) map of the image size
    loss = l1(y, ref) + ss.alignment_loss()
    with ss.guidance(m):                  # or: existing training code, unchanged
        y = unet(x)
    tg = ssattn.text_guided(unet, ["dec2"], text_channels=512)
    y = tg(x, text=(words, mask))         # words (B, L, 512), mask (B, L) bool, True = padded

One wrapper class (GuidedModel) holds every kind of stage: -SS stages (a
decoder site paired with an encoder site, reading the guidance map) and text
stages (one site, reading word features; ssattn.text.TextConditioning).
Everything below holds for both kinds; a text stage has no encoder, and the
alignment loss covers the -SS stages only.

The model's source is not touched. Forward hooks capture each named encoder
output e_l and replace each named decoder output d_l by
SemanticCrossAttention(d_l, e_l, m) (keys and values from the map-weighted
encoder output, the map area-averaged to e_l's size). Every attention stage
starts as the identity (zero output projection), so a new wrapper gives the
model's outputs bit for bit. The bare model called outside `ss(...)` or
`with ss.guidance(m)` runs as the plain model.

Sites (pairs' keys and values; see ssattn.dropin.sites): "name" as
model.get_submodule reads it (a module registered under several names
answers to each, and is one site), optionally "name[0]" / "name[key]" (one
element of a tuple, list or dict output; for a decoder only that element is
replaced) and "name#k" (only the k-th call of the module in a forward pass,
from 0).

Which encoder call feeds which decoder call: a decoder call takes the most
recent call of its encoder site that ran before it in the same forward pass
(with "enc#k": that call). An unpinned decoder refines every call with its
one stage, and the alignment loss averages that pair's term over the calls.
A paired module that runs more than once per forward without "#k" gets a
warning (once), since the rule is then right only if the network means it.

Stages exist at construction, so an optimizer, DDP or a state_dict load sees
them. Their channel counts are measured there, in this order:
1. `channels={decoder site: (dec_channels, enc_channels)}` (text site:
   channels), when given;
2. a forward pass through the same hooks: on `example_inputs` when given (a
   tensor, a tuple of positional inputs, a dict of keyword inputs, or
   (args_tuple, kwargs_dict); eval mode), else an automatic shape-only dry
   run on meta or fake tensors (ssattn.dropin.dryrun: the input inferred, no
   real compute or memory, the model and the random generators left as they
   were);
3. the modules' definitions (sites.declared_channels), only for sites no
   dry run could measure, with one warning naming them.
Where none gives a count, construction raises an error that says what the
dry run tried and names both ways out. Every call checks the counts against
the real tensors (an error names the site).

Ablations: `align_sites` names the decoder sites whose outputs feed the
alignment loss (default: the decoders of pairs). A site not in pairs is
alignment-only (its output is captured for the loss, no attention stage);
`align_sites=()` leaves attention only (the loss is zero).

Features are used as the modules returned them. A module's output that the
network later changes in place (e.g. ReLU(inplace=True) after it) is found by
the tensor's version counter: the first forward keeps a copy of each captured
tensor and drops it when the version did not change; only sites whose output
changed keep copying.

Activation checkpointing (torch.utils.checkpoint, use_reentrant=False, inside
the network's forward) works: the recompute in backward refines with the
guidance and encoder features of the wrapper's most recent forward, so run
each backward before the next forward of the same wrapper (the usual step).
A decoder that runs more than once per forward is recomputed as the call
whose raw output the recompute reproduces (a few stored values per call tell
them apart).

copy.deepcopy(ss) is an independent -SS model (EMA and teacher copies);
wrapping a wrapped model raises. Works with torch.compile (the hooks are
traced), autocast, state_dict, .to() and DistributedDataParallel (wrap the
SemanticSensitive module). nn.DataParallel is not supported (its replicas
would share the wrapper's per-call state); use DDP. One wrapper must not run
forwards from several threads at once.
"""

from __future__ import annotations

import contextlib
import dataclasses
import difflib
import os
import sys
import warnings
from collections.abc import Mapping

import torch
from torch import Tensor, nn

from .. import _checks
from ..reference.area import area_resize
from ..semantic import SemanticAlignmentLoss, SemanticCrossAttention
from ..text.features import TextFeatures, as_text_features
from ..text.modules import TextConditioning, check_words
from .dryrun import DryRun, preserved_state, shape_pass
from .sites import Site, SiteOutputError, declared_channels, parse_site, replace, select

__all__ = ["GuidedModel", "SemanticSensitive", "semantic_sensitive", "text_guided", "remove_semantic_sensitive"]


def _block_key(spec: str) -> str:
    # ModuleDict keys cannot contain dots.
    return spec.replace(".", "__")


def _fingerprint(t: Tensor) -> Tensor:
    """A few values of a (B, C, H, W) output (its top-left 2x2 pixels): enough to tell calls apart."""
    return t.detach()[..., :2, :2].clone()


_INTERNAL = tuple(os.path.join(d, "") for d in (os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                                                 os.path.dirname(torch.__file__)))  # "ssattn/", "torch/"


def _warn(message: str) -> None:
    # Point at the user's line (the construction or the call), past ssattn's and torch's own frames.
    frame, level = sys._getframe(1), 2  # stacklevel 2: the caller of _warn
    while frame is not None and frame.f_code.co_filename.startswith(_INTERNAL):
        frame, level = frame.f_back, level + 1
    warnings.warn(f"semantic_sensitive: {message}", UserWarning, stacklevel=level)


class _SiteNames:
    """Sites' module names checked against the model, each mapped to the module's first name.

    A module registered under several names (the same block appended to a
    ModuleList several times) answers to each, as model.get_submodule does;
    the wrapper hooks it once, under the first name model.named_modules()
    lists, so that two of its names are one site (one hook, one call count).
    """

    def __init__(self, model: nn.Module, modules: dict):
        self.every = dict(model.named_modules(remove_duplicate=False))  # every name get_submodule resolves
        self.first = {id(m): name for name, m in modules.items()}

    def __call__(self, site: Site, role: str, where: str) -> Site:
        if site.module not in self.every or site.module == "":
            names = [n for n in self.every if n]
            close = difflib.get_close_matches(site.module, names, n=5, cutoff=0.5)
            hint = f"; close matches: {close}" if close else f"; module names: {names[:20]}"
            raise ValueError(f"{where}: {role} module {site.module!r} is not in the model{hint}")
        first = self.first[id(self.every[site.module])]
        return site if first == site.module else dataclasses.replace(site, module=first, alias=site.module)

    def names_of(self, name: str) -> list[str]:
        module = self.every[name]
        return [n for n, m in self.every.items() if m is module]

    def check_distinct(self, sites: list[Site], where: str, what: str) -> None:
        """Two names of one module with the same call and element would refine (or count) one output twice."""
        seen: dict[tuple, Site] = {}
        for s in sites:
            key = (s.module, s.call, s.path)
            if key in seen:
                names = ", ".join(repr(n) for n in self.names_of(s.module))
                base = s.spec.split("#")[0]
                raise ValueError(
                    f"{where}: {what} {seen[key].spec!r} and {s.spec!r} are one module, registered under several "
                    f"names ({names}), so they are one site; name it once, and pick one of its calls with "
                    f"'{base}#k' (k from 0) where the network runs it several times"
                )
            seen[key] = s


class _Hook:
    """A forward hook of the wrapper: an object, not a closure, so copy.deepcopy rebinds it to the copy."""

    def __init__(self, owner: "GuidedModel", kind: str, name: str = ""):
        self.owner, self.kind, self.name = owner, kind, name

    def __call__(self, module, args, out_or_kwargs):
        if self.kind == "site":
            return self.owner._on_site_output(self.name, out_or_kwargs)
        if self.kind == "enter":
            return self.owner._on_model_enter(args, out_or_kwargs)
        return self.owner._on_model_exit()


class _Captured:
    """A captured tensor, its version when captured, and a copy while in-place changes are being looked for."""

    def __init__(self, tensor: Tensor, backup: bool):
        self.tensor = tensor
        self.version = None if torch.compiler.is_compiling() else tensor._version
        self.backup = tensor.clone() if backup else None

    def changed(self) -> bool:
        return self.version is not None and self.tensor._version != self.version

    def value(self) -> Tensor:
        return self.backup if (self.backup is not None and self.changed()) else self.tensor


class _Call:
    """The state of one forward pass: guidance map and text, call counts, encoder captures, refined features."""

    def __init__(self, guidance: Tensor | None, text: TextFeatures | None = None, probing: bool = False):
        self.guidance = guidance
        self.text = text
        self.probing = probing
        self.counts: dict[str, int] = {}             # module name -> calls so far
        self.encoded: dict[str, _Captured] = {}      # encoder site -> latest (or pinned) capture
        self.features: dict[str, list[_Captured]] = {}   # decoder site -> one capture per refined call
        self.text_refined: set[str] = set()          # text stage sites that refined a call
        self.used: dict[tuple, Tensor | None] = {}   # (role, site, call) -> the encoder feature it used (text: None)
        self.prints: dict[str, list[Tensor]] = {}     # decoder module -> a few raw output values per call
        self.channels: dict[str, int] = {}           # probing: site -> measured channel count


class GuidedModel(nn.Module):
    """A model wrapped with guided stages (-SS and/or text); see `semantic_sensitive` and `text_guided`."""

    def __init__(self, model: nn.Module, pairs: Mapping[str, str] | None = None, *, text_stages=None,
                 text_channels: int | None = None, intra_text: bool = True, intra_image: bool = False,
                 heads: int = 1, head_dim: int | None = None, backend: str = "auto", scale: float | None = None,
                 eta: float = 1.0, weight: float = 0.1, level_weights=None, reduction: str = "mean",
                 form: str = "paper", channels: Mapping | None = None, example_inputs=None, align_sites=None):
        super().__init__()
        if isinstance(model, GuidedModel):
            raise ValueError("model is already a semantic_sensitive wrapper (or text_guided); wrap the plain model once "
                             "with all its stages (ss.model is the plain model, ss.remove() takes the hooks off)")
        if not isinstance(model, nn.Module):
            raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
        for name, m in model.named_modules():
            if any(isinstance(h, _Hook) for h in (*m._forward_hooks.values(), *m._forward_pre_hooks.values())):
                raise ValueError(
                    f"model is already wrapped by semantic_sensitive (module {name or '<root>'!r} has its hooks); "
                    "wrap a model once: call the existing wrapper, or ss.remove() it first"
                )
        pairs = {} if pairs is None else pairs
        if not isinstance(pairs, Mapping):
            raise ValueError("pairs must be a mapping {decoder module name: encoder module name}")
        if isinstance(text_stages, str):
            text_stages = [text_stages]
        text_stages = list(text_stages or [])
        align_sites = self._read_align_sites(align_sites, pairs)
        if not pairs and not align_sites and not text_stages:
            raise ValueError("pairs must be a non-empty mapping {decoder module name: encoder module name}"
                             " (or give align_sites for the alignment loss alone, or text_stages for text guidance)")
        if len(set(text_stages)) != len(text_stages):
            raise ValueError(f"text_stages must not repeat a site, got {text_stages}")
        if text_stages and (not isinstance(text_channels, int) or isinstance(text_channels, bool)
                            or text_channels < 1):
            raise ValueError(f"text_channels must be the word features' size Ct (a positive integer) when "
                             f"text_stages are given, got {text_channels!r}")
        if text_channels is not None and not text_stages:
            raise ValueError("text_channels was given but no text_stages: name the modules whose outputs the text "
                             "refines, e.g. text_stages=['dec2', 'dec1']")
        modules = dict(model.named_modules())  # each module once, under its first name: the hooks' names
        resolve = _SiteNames(model, modules)
        self._dec_sites = [resolve(parse_site("decoder", d), "decoder", "pairs") for d in pairs]
        self._enc_of = {d.spec: resolve(parse_site("encoder", e), "encoder", "pairs")
                        for d, e in zip(self._dec_sites, pairs.values())}
        self._text_sites = [resolve(parse_site("text stage", t, "text_stages"), "text stage", "text_stages")
                            for t in text_stages]
        # Alignment-only sites: decoder outputs that feed the alignment loss with no attention stage.
        self._align_only = [resolve(parse_site("decoder", a, "align_sites"), "decoder", "align_sites")
                            for a in align_sites if a not in pairs]
        for where, what, sites in (("pairs", "decoders", self._dec_sites), ("text_stages", "text stages",
                                                                             self._text_sites),
                                   ("align_sites", "sites", self._align_only)):
            resolve.check_distinct(sites, where, what)
        if level_weights is not None and len(level_weights) != len(align_sites):
            raise ValueError(f"level_weights must have one value per alignment site ({len(align_sites)}: "
                             f"{align_sites}), got {len(level_weights)}")
        self.model = model
        self.pairs = dict(pairs)
        self.align_sites = list(align_sites)
        self.text_stages = [t.spec for t in self._text_sites]
        self.text_channels = text_channels
        self.blocks = nn.ModuleDict()       # -SS stages, by decoder site
        self.text_blocks = nn.ModuleDict()  # text stages, by site
        # The guidance is range-checked once per forward (_check_map); the stages' and the loss's maps are
        # area averages of it, so their own checks (a host sync each) are off.
        self.align = SemanticAlignmentLoss(eta=eta, weight=weight, level_weights=level_weights or None,
                                           reduction=reduction, form=form, backend=backend, check_values=False)
        self._attn_options = dict(heads=heads, head_dim=head_dim, backend=backend, scale=scale, check_values=False)
        self._text_options = dict(intra_text=bool(intra_text), intra_image=bool(intra_image))
        self._sites_at: dict[str, list[tuple[str, Site]]] = {}
        for d in self._dec_sites:
            self._sites_at.setdefault(d.module, []).append(("decoder", d))
        for a in self._align_only:  # the module's output as it returned it (after any -SS stage of another element)
            self._sites_at.setdefault(a.module, []).append(("align", a))
        for t in self._text_sites:
            self._sites_at.setdefault(t.module, []).append(("text", t))
        for e in {e.spec: e for e in self._enc_of.values()}.values():
            self._sites_at.setdefault(e.module, []).append(("encoder", e))
        # Per-call state (dropped by copies and pickles, see __getstate__).
        self._call: _Call | None = None      # the forward in progress
        self._last: _Call | None = None      # the last finished forward (alignment loss, checkpoint recompute)
        self._direct = False                 # inside ss.forward (else the model was called directly)
        self._ambient: Tensor | None = None  # the map of `with ss.guidance(m)`
        self._ambient_text: TextFeatures | None = None  # the text of `with ss.guidance(text=...)`
        self._removed = False
        # Which sites keep a copy of their output (found by the version counter), and which were looked at.
        self._copying: set[str] = set()
        self._calibrated: set[str] = set()
        self._warned: set[str] = set()
        self._align_variants: dict[tuple, SemanticAlignmentLoss] = {}

        self._channel_source: dict[str, str] = {}
        self._make_blocks(modules, channels, example_inputs)
        self._handles = [modules[name].register_forward_hook(_Hook(self, "site", name)) for name in self._sites_at]
        self._handles.append(model.register_forward_pre_hook(_Hook(self, "enter"), with_kwargs=True))
        self._handles.append(model.register_forward_hook(_Hook(self, "exit")))

    @property
    def takes_map(self) -> bool:
        """Whether a forward needs a guidance map (the wrapper has -SS attention stages or alignment sites)."""
        return bool(self.pairs) or bool(self.align_sites)

    @property
    def takes_text(self) -> bool:
        """Whether a forward needs text (the wrapper has text stages)."""
        return bool(self.text_stages)

    # ------------------------------------------------------------------ stages
    @staticmethod
    def _read_align_sites(align_sites, pairs) -> list[str]:
        """align_sites checked: None -> the decoder sites of pairs; else the given decoder sites, in order."""
        if align_sites is None:
            return list(pairs)
        if isinstance(align_sites, str):
            align_sites = [align_sites]
        try:
            align_sites = list(align_sites)
        except TypeError:
            raise ValueError(f"align_sites must be a list of decoder sites (e.g. ['dec2', 'dec1']), () for none, or "
                             f"None for the decoders of pairs; got {align_sites!r}") from None
        bad = [a for a in align_sites if not isinstance(a, str)]
        if bad:
            raise ValueError(f"align_sites must name decoder sites as strings (e.g. 'dec2'), got {bad}")
        if len(set(align_sites)) != len(align_sites):
            raise ValueError(f"align_sites must not repeat a site, got {align_sites}")
        return align_sites

    def _read_channels(self, channels) -> dict[str, tuple]:
        """channels= checked: {-SS decoder site: (dec_channels, enc_channels), text site: channels}."""
        channels = dict(channels or {})
        unknown = [k for k in channels if k not in self.pairs and k not in self.text_stages]
        if unknown:
            raise ValueError(f"channels: {unknown} are not decoder sites of pairs or text stages; use keys from "
                             f"{list(self.pairs) + self.text_stages}")
        for site, value in channels.items():
            if site in self.pairs:
                ok = (isinstance(value, (tuple, list)) and len(value) == 2
                      and all(isinstance(c, int) and c > 0 for c in value))
                if not ok:
                    raise ValueError(f"channels[{site!r}] must be (dec_channels, enc_channels), two positive "
                                     f"integers, got {value!r}")
            elif not (isinstance(value, int) and not isinstance(value, bool) and value > 0):
                raise ValueError(f"channels[{site!r}] (a text stage) must be its output's channel count, a positive "
                                 f"integer, got {value!r}")
        return channels

    def _make_blocks(self, modules, channels, example_inputs) -> None:
        """One stage per -SS pair and text site, sized by channels=, else measured, else read from definitions."""
        channels = self._read_channels(channels)
        # Each stage's sites: a -SS stage reads its decoder's and encoder's channels, a text stage its site's.
        stages = {("ss", d.spec): (d, self._enc_of[d.spec]) for d in self._dec_sites}
        stages.update({("text", t.spec): (t,) for t in self._text_sites})
        known: dict[tuple, tuple] = {}
        for (kind, spec), sites in stages.items():
            if spec in channels:
                value = channels[spec]
                known[(kind, spec)] = tuple(value) if kind == "ss" else (value[0] if isinstance(value, (tuple, list))
                                                                         else value,)
                self._channel_source[spec] = "from channels="
        missing = [key for key in stages if key not in known]
        if missing:
            needed = {s.spec for key in missing for s in stages[key]}
            try:
                if example_inputs is not None:
                    measured, how, run = self._probe(example_inputs)[0], "measured on example_inputs", None
                else:
                    run = self._dry_run(needed)
                    measured, how = run.channels, f"measured by a dry run on {run.describe_input()}"
            except SiteOutputError as exc:
                if not exc.tokens:
                    raise
                raise SiteOutputError(f"{exc}{self._maps_near(exc.site, example_inputs)}", exc.site,
                                      tokens=True) from None
            for key in missing:
                if all(s.spec in measured for s in stages[key]):
                    known[key] = tuple(measured[s.spec] for s in stages[key])
                    self._channel_source[key[1]] = how
            missing = [key for key in missing if key not in known]
            if missing and run is None:
                names = sorted({s.spec for key in missing for s in stages[key] if s.spec not in measured})
                raise RuntimeError(f"semantic_sensitive: site(s) {names} did not run in the example_inputs forward "
                                   f"pass (a direct .forward() call bypasses hooks; call the module instead)")
            if missing:
                self._from_definitions(modules, stages, missing, measured, run, known)
        like = self._param_like()
        for (kind, spec) in stages:  # in pairs' order: the order of the parameters (and an optimizer's state)
            counts = known[(kind, spec)]
            if kind == "ss":
                block = SemanticCrossAttention(int(counts[0]), int(counts[1]), **self._attn_options)
            else:
                block = TextConditioning(int(counts[0]), self.text_channels, **self._attn_options,
                                         **self._text_options)
            if like is not None:
                block = block.to(device=like.device, dtype=like.dtype)
            (self.blocks if kind == "ss" else self.text_blocks)[_block_key(spec)] = block

    def _from_definitions(self, modules, stages, missing, measured, run: DryRun, known) -> None:
        """The last resort for sites the dry run could not measure: their definitions, with one warning."""
        read, unknown = [], []
        for key in missing:
            counts = []
            for s in stages[key]:
                if s.spec in measured:
                    counts.append(measured[s.spec])
                    continue
                count = None if s.path else declared_channels(modules[s.module])
                (unknown if count is None else read).append(s)
                counts.append(count)
            if None not in counts:
                known[key] = tuple(counts)
                self._channel_source[key[1]] = "read from the module definitions"

        def why(sites) -> str:
            if not run.ran:
                return run.describe_failures()
            ran = {s.module: run.calls.get(s.module, 0) for s in sites}
            each = [f"module {m!r} ran {n} time(s)" + "".join(f", so it has no call #{s.call}" for s in sites
                                                             if s.module == m and s.call is not None)
                    if n else f"module {m!r} did not run" for m, n in ran.items()]
            hint = "; a module called as .forward(...) bypasses hooks" if 0 in ran.values() else ""
            return f"{'; '.join(each)} in a dry run on {run.describe_input()} (in training and eval mode){hint}"

        if unknown:
            key = next(k for k in missing if k not in known)
            kind, spec = key
            site = unknown[0]
            shape = "(dec_channels, enc_channels)" if kind == "ss" else "channels"
            raise ValueError(
                f"semantic_sensitive: the output channels of {site.describe()} "
                f"({type(modules[site.module]).__name__}) could not be measured: {why([site])}; and they cannot be "
                f"read from its definition{' (an element of a structured output)' if site.path else ''}. Pass "
                f"example_inputs=(x,) (inputs the network accepts, for a forward pass that measures them), or "
                f"channels={{{spec!r}: {shape}}}"
            )
        names = list(dict.fromkeys(s.spec for s in read))
        _warn(f"the output channels of {names} were read from the module definitions, which can be wrong (a gate "
              f"or a concatenation after the last layer): {why(read)}. Pass example_inputs=(x,) or channels={{...}} "
              f"to be sure; a wrong count raises at the first call")

    def _param_like(self) -> Tensor | None:
        for p in self.model.parameters():
            if p.is_floating_point():
                return p
        return None

    def _measuring(self, call) -> tuple[dict[str, int], dict[str, int]]:
        """Run `call()` (a forward of the model) with probing hooks on the sites.

        Returns ({site: channels}, {module name: calls}).
        """
        self._call = _Call(None, probing=True)
        handles = [self.model.get_submodule(name).register_forward_hook(_Hook(self, "site", name))
                   for name in self._sites_at]
        try:
            call()
            return self._call.channels, self._call.counts
        finally:
            for h in handles:
                h.remove()
            self._call = None

    def _dry_run(self, needed: set) -> DryRun:
        """Channel counts from a shape-only forward pass on fake inputs (ssattn.dropin.dryrun)."""
        return shape_pass(self.model, self._measuring, needed, fatal=(SiteOutputError,))

    def _maps_near(self, site: Site, example_inputs, limit: int = 5) -> str:
        """'; the nearest modules that output a map ...: 'a.conv' (2, 16, 128, 128), ...': modules under the
        site's parent (its siblings' and its own submodules) whose outputs were (B, C, H, W) in a dry run (or on
        example_inputs), nearest in the module tree first, then in call order. '' when that pass fails."""
        parent = site.module.rpartition(".")[0]
        names = [n for n in dict(self.model.named_modules()) if n and (not parent or n.startswith(parent + "."))]

        def survey(call):
            shapes, order = {}, {}

            def recorder(name):
                def record(module, args, out):
                    order.setdefault(name, len(order))
                    if isinstance(out, Tensor) and out.dim() == 4:
                        shapes.setdefault(name, tuple(out.shape))
                return record

            handles = [self.model.get_submodule(n).register_forward_hook(recorder(n)) for n in names]
            try:
                call()
            finally:
                for h in handles:
                    h.remove()
            return shapes, order

        try:
            if example_inputs is not None:
                shapes, order = self._probe(example_inputs, survey)
            else:
                run = shape_pass(self.model, survey, set())
                shapes, order = run.channels, run.calls
        except Exception:  # noqa: BLE001 - a hint only: the error it would add to says what is wrong
            return ""
        here = site.module.split(".")
        at = order.get(site.module, 0)

        def distance(name):
            there = name.split(".")
            common = next((i for i, (a, b) in enumerate(zip(here, there)) if a != b), min(len(here), len(there)))
            return len(here) + len(there) - 2 * common, abs(order.get(name, at) - at)

        listed: list[str] = []
        for name in sorted((n for n in shapes if n != site.module), key=distance):
            if not any(name.startswith(m + ".") and shapes[m] == shapes[name] for m in listed):  # its container's
                listed.append(name)
        where = "in a dry run" if example_inputs is None else "on example_inputs"
        if not listed:
            return f"; no module near it outputs a map {where}"
        return (f"; the nearest modules that output a map {where}: "
                + ", ".join(f"{n!r} {shapes[n]}" for n in listed[:limit]))

    @torch.no_grad()
    def _probe(self, example_inputs, run=None):
        """run(call) (default: self._measuring, giving ({site: channels}, {module: calls})) on one forward pass on
        example_inputs in eval mode (no BatchNorm update)."""
        if isinstance(example_inputs, Mapping):
            args, kwargs = (), dict(example_inputs)
        elif (isinstance(example_inputs, tuple) and len(example_inputs) == 2 and isinstance(example_inputs[0], tuple)
              and isinstance(example_inputs[1], Mapping)):
            args, kwargs = example_inputs[0], dict(example_inputs[1])
        elif isinstance(example_inputs, (tuple, list)):
            args, kwargs = tuple(example_inputs), {}
        else:
            args, kwargs = (example_inputs,), {}
        with preserved_state(self.model):
            self.model.eval()
            return (run or self._measuring)(lambda: self.model(*args, **kwargs))

    @property
    def channel_sources(self) -> dict[str, str]:
        """How each stage's channel counts were found, by site: "from channels=", "measured by a dry run on a
        fake input (2, 3, 256, 256)" (several inputs of other shapes: "on fake inputs (2, 3, 256, 256) +
        (2, 1, 256, 256)"), "measured on example_inputs" or "read from the module definitions"."""
        return dict(self._channel_source)

    @property
    def materialized(self) -> bool:
        """True: every attention stage exists from construction on."""
        return (all(_block_key(d) in self.blocks for d in self.pairs)
                and all(_block_key(t) in self.text_blocks for t in self.text_stages))

    # ------------------------------------------------------------------ hooks
    def _check_live(self):
        if self._removed:
            raise RuntimeError("this semantic_sensitive wrapper was removed; wrap the model again")

    def _on_model_enter(self, args, kwargs):
        if self._direct:
            return None  # ss.forward started this call
        guidance, text = self._ambient, self._ambient_text
        if guidance is not None or text is not None:
            self._check_matches_input(args, kwargs, guidance, text)
            self._begin(guidance, text)
        else:
            self._call = None  # a plain call of the bare model (or one after a failed call)
        return None

    def _on_model_exit(self):
        if not self._direct and self._call is not None:
            self._finish()
        return None

    def _on_site_output(self, name: str, out):
        call = self._call
        if call is None:
            return self._on_recompute(name, out) if self._recomputing() else None
        k = call.counts.get(name, 0)  # this call's index
        call.counts[name] = k + 1
        refined = [site for role, site in self._sites_at[name] if role in ("decoder", "text")]
        if refined and not call.probing and torch.is_grad_enabled():
            call.prints.setdefault(name, []).append(_fingerprint(select(refined[0], "decoder", out)))
        new = out
        for role, site in self._sites_at[name]:
            if site.call is not None and site.call != k:
                continue
            if role == "decoder":
                new = self._refine(call, site, new, k)
            elif role == "text":
                new = self._refine_text(call, site, new, k)
            elif role == "align":
                if not call.probing:  # alignment only: the feature as the module returned it, for the loss
                    feat = select(site, "decoder", new)
                    call.features.setdefault(site.spec, []).append(_Captured(feat, self._keeps_copy(site.spec)))
            else:
                feat = select(site, "encoder", new)
                if call.probing:
                    call.channels[site.spec] = feat.shape[1]
                else:
                    call.encoded[site.spec] = _Captured(feat, backup=self._keeps_copy(site.spec))
        return None if new is out else new

    def _keeps_copy(self, spec: str) -> bool:
        if torch.compiler.is_compiling():
            return spec in self._copying
        return spec in self._copying or spec not in self._calibrated

    def _encoder_feature(self, call: _Call, dec: Site) -> Tensor:
        enc = self._enc_of[dec.spec]
        captured = call.encoded.get(enc.spec)
        if captured is None:
            ran = call.counts.get(enc.module, 0)
            if ran and enc.call is not None:
                why = f"its call #{enc.call} was asked for but it ran {ran} time(s) before"
            elif ran:
                why = "it ran, but its output has no such element"
            else:
                why = ("it did not run before; if the network calls it as .forward(...) directly, hooks cannot see "
                       "the call (call the module itself), or it runs after the decoder")
            raise RuntimeError(f"encoder {enc.describe()} gives no skip feature to decoder {dec.describe()} in this "
                               f"forward pass: {why}")
        if captured.changed():
            self._found_in_place(enc.spec, captured)
        return captured.value()

    def _found_in_place(self, spec: str, captured: _Captured) -> None:
        self._copying.add(spec)
        if captured.backup is None and spec not in self._warned:
            self._warned.add(spec)
            _warn(f"the output of {spec!r} was changed in place after it was captured (e.g. a ReLU(inplace=True) "
                  f"after the module), which the first forward did not show; this call used the changed values, "
                  f"later calls keep a copy")

    def _refine(self, call: _Call, dec: Site, out, k: int):
        d = select(dec, "decoder", out)
        if call.probing:
            call.channels[dec.spec] = d.shape[1]
            return out
        e = self._encoder_feature(call, dec)
        block = self.blocks[_block_key(dec.spec)]
        self._check_channels(dec, block, d, e)
        refined = block(d, e, call.guidance.to(d.device))
        call.features.setdefault(dec.spec, []).append(_Captured(refined, backup=self._keeps_copy(dec.spec)))
        if torch.is_grad_enabled():
            call.used[("decoder", dec.spec, k)] = e
        return replace(out, dec.path, refined)

    def _refine_text(self, call: _Call, site: Site, out, k: int):
        d = select(site, "decoder", out)
        if call.probing:
            call.channels[site.spec] = d.shape[1]
            return out
        block = self.text_blocks[_block_key(site.spec)]
        if d.shape[1] != block.img_channels:
            raise ValueError(
                f"text_guided: {site.describe()} gives {d.shape[1]} channels, but its text stage was built for "
                f"{block.img_channels} ({self._channel_source.get(site.spec, '')}); pass "
                f"channels={{{site.spec!r}: {d.shape[1]}}}"
            )
        refined = self._text_stage(block, d, call.text)
        call.text_refined.add(site.spec)
        if torch.is_grad_enabled():
            call.used[("text", site.spec, k)] = None  # its inputs are the call's text
        return replace(out, site.path, refined)

    @staticmethod
    def _text_stage(block: TextConditioning, d: Tensor, text: TextFeatures) -> Tensor:
        words, mask, weight = text.to(d.device)
        return block(d, words, mask, weight)

    def _check_channels(self, dec: Site, block: SemanticCrossAttention, d: Tensor, e: Tensor) -> None:
        if d.shape[1] != block.dec_channels or e.shape[1] != block.enc_channels:
            enc = self._enc_of[dec.spec]
            raise ValueError(
                f"semantic_sensitive: decoder {dec.describe()} gives {d.shape[1]} channels and encoder "
                f"{enc.describe()} {e.shape[1]}, but their stage was built for ({block.dec_channels}, "
                f"{block.enc_channels}) channels ({self._channel_source.get(dec.spec, '')}); pass "
                f"channels={{{dec.spec!r}: ({d.shape[1]}, {e.shape[1]})}}"
            )

    @staticmethod
    def _recomputing() -> bool:
        # A hook that fires in backward, outside any forward: torch.utils.checkpoint recomputing a region.
        return torch._C._current_graph_task_id() != -1

    def _on_recompute(self, name: str, out):
        last = self._last
        n = 0 if last is None else len(last.prints.get(name, ()))
        if n == 0:
            return None  # not a refined module of the last forward with grad: plain
        refined_sites = [(role, site) for role, site in self._sites_at[name] if role in ("decoder", "text")]
        k = 0 if n == 1 else self._which_call(last, name, select(refined_sites[0][1], "decoder", out))
        new = out
        for role, site in refined_sites:
            if (role, site.spec, k) not in last.used:
                continue  # a call this site does not refine (e.g. "dec#1" and this is call 0)
            e = last.used[(role, site.spec, k)]
            d = select(site, "decoder", new)
            if role == "text":
                refined = self._text_stage(self.text_blocks[_block_key(site.spec)], d, last.text)
            else:
                refined = self.blocks[_block_key(site.spec)](d, e, last.guidance.to(d.device))
            new = replace(new, site.path, refined)
        return None if new is out else new

    @staticmethod
    def _which_call(last: _Call, name: str, d: Tensor) -> int:
        """Which forward call of module `name` a checkpoint recompute is redoing: the one whose raw output
        it reproduces (recomputes are deterministic up to rounding; a few values tell the calls apart)."""
        now = _fingerprint(d)
        gaps = [float((now - p).abs().max()) if p.shape == now.shape else float("inf") for p in last.prints[name]]
        best = min(range(len(gaps)), key=gaps.__getitem__)
        if sum(g <= gaps[best] for g in gaps) > 1 or gaps[best] == float("inf"):
            raise RuntimeError(
                f"semantic_sensitive: module {name!r} ran {len(gaps)} times in the forward and is recomputed by "
                f"activation checkpointing, but the recompute matches none or several of its calls; checkpoint a "
                f"region that calls it once, or pin one call with '{name}#k'"
            )
        return best

    # ------------------------------------------------------------------ forward
    def _check_map(self, guidance) -> Tensor:
        _checks.tensor("guidance", guidance)
        if guidance.dim() != 4 or guidance.shape[1] != 1:
            raise ValueError(f"guidance must be a map of shape (B, 1, H, W), got {tuple(guidance.shape)}")
        _checks.unit_interval("guidance", guidance)
        return guidance

    def _check_text(self, text) -> TextFeatures:
        text = as_text_features(text)
        check_words(text.words, text.mask, text.weight, batch=None, channels=self.text_channels)
        return text

    def _needs(self, guidance, text) -> None:
        """Errors for guidance the stages do not take, or stages left without their guidance."""
        if guidance is not None and not self.takes_map:
            raise ValueError("this wrapper has no -SS stages (pairs), so it takes no guidance map; call it with "
                             "text=(words, mask)")
        if text is not None and not self.takes_text:
            raise ValueError("this wrapper has no text stages, so it takes no text; build it with "
                             "text_stages=[...] and text_channels=Ct to add them")

    @staticmethod
    def _check_matches_input(args, kwargs, guidance: Tensor | None, text: TextFeatures | None = None) -> None:
        x = next((t for t in (*args, *kwargs.values()) if isinstance(t, Tensor)), None)
        if isinstance(x, Tensor) and x.dim() == 4:
            expected = (x.shape[0], 1, x.shape[-2], x.shape[-1])
            if guidance is not None and tuple(guidance.shape) != expected:
                raise ValueError(
                    f"guidance must have the input image's batch and size {expected}, got {tuple(guidance.shape)}"
                )
            if text is not None and text.words.shape[0] != x.shape[0]:
                raise ValueError(f"text has batch {text.words.shape[0]} but the input image has batch {x.shape[0]}")

    def _begin(self, guidance: Tensor | None, text: TextFeatures | None = None) -> None:
        self._call = _Call(guidance, text)

    def _finish(self) -> None:
        call, self._call = self._call, None
        for spec, captures in call.features.items():
            for c in captures:
                if c.changed():
                    self._found_in_place(spec, c)
        if not torch.compiler.is_compiling():
            # An encoder output changed in place after its decoder read it: keep a copy from now on (a
            # checkpoint recompute reads it again in backward).
            self._copying.update(s for s, c in call.encoded.items() if c.changed())
            self._calibrated.update(call.features)
            self._calibrated.update(s for s, c in call.encoded.items() if not c.changed())
            self._warn_reuse(call)
        self._last = call

    def _warn_reuse(self, call: _Call) -> None:
        kinds = ([("ss", d) for d in self._dec_sites] + [("text", t) for t in self._text_sites]
                 + [("align", a) for a in self._align_only])
        for kind, dec in kinds:
            refined = call.text_refined if kind == "text" else call.features
            if dec.spec not in refined and ("missing", dec.spec) not in self._warned:
                self._warned.add(("missing", dec.spec))
                ran = call.counts.get(dec.module, 0)
                what = "captured for the alignment loss" if kind == "align" else "refined"
                _warn(f"decoder {dec.describe()} was not {what} in this forward pass ("
                      + (f"it ran {ran} time(s), not call #{dec.call})" if ran else
                         "it did not run: if the network calls it as .forward(...) directly, hooks cannot see the "
                         "call; call the module itself)"))
            enc = self._enc_of.get(dec.spec) if kind == "ss" else None
            roles = (("decoder", dec), ("encoder", enc)) if kind == "ss" else (
                (("decoder", dec),) if kind == "align" else (("text stage", dec),))
            for role, site in roles:
                n = call.counts.get(site.module, 0)
                if n > 1 and site.call is None and ("reused", site.spec) not in self._warned:
                    self._warned.add(("reused", site.spec))
                    rule = {("ss", "decoder"): f"each of its calls is refined by the one stage of {dec.spec!r} and "
                                               f"the alignment loss averages over them",
                            ("ss", "encoder"): f"each call of decoder {dec.spec!r} takes the most recent call of it "
                                               f"before that call",
                            ("align", "decoder"): "the alignment loss averages over its calls",
                            ("text", "text stage"): "each of its calls is refined by the one text stage"}[(kind, role)]
                    what = site.describe() if site.alias else f"module {site.module!r}"
                    _warn(f"{role} {what} ran {n} times in one forward pass: {rule}. Pick one call with "
                          f"'{site.alias or site.module}#k' (k from 0) if that is not what the network means")

    def forward(self, *inputs, guidance: Tensor | None = None, text=None, **kwargs):
        """The model's output with every stage refined: guidance (B, 1, H, W) for -SS stages, text for text stages.

        text: word features (B, L, Ct), a tuple (words, mask[, weight]) or ssattn.text.TextFeatures.
        """
        self._check_live()
        self._needs(guidance, text)
        guidance = self._ambient if guidance is None else self._check_map(guidance)
        text = self._ambient_text if text is None else self._check_text(text)
        if self.takes_map and guidance is None:
            raise TypeError("semantic_sensitive model needs a guidance map: call ss(*inputs, guidance=map "
                            "(B, 1, H, W)), or call it inside `with ss.guidance(map):`")
        if self.takes_text and text is None:
            raise TypeError("text_guided model needs text: call ss(*inputs, text=(words, mask)) with word features "
                            "(B, L, Ct) and their padding mask (B, L), or call it inside `with ss.guidance(text=...):`")
        self._check_matches_input(inputs, kwargs, guidance, text)
        self._begin(guidance, text)
        self._direct = True
        try:
            out = self.model(*inputs, **kwargs)
            self._finish()
            return out
        finally:
            self._direct = False
            self._call = None

    @contextlib.contextmanager
    def guidance(self, guidance: Tensor | None = None, *, text=None):
        """`with ss.guidance(m, text=(words, mask)): ...`: every call of ss or of the bare model inside uses them.

        Give what the stages take: the map m for -SS stages, the text for text stages.
        """
        self._check_live()
        self._needs(guidance, text)
        if (self.takes_map and guidance is None) or (self.takes_text and text is None):
            need = " and ".join(n for n, t in (("a map", self.takes_map), ("text=...", self.takes_text)) if t)
            raise TypeError(f"ss.guidance(...) needs {need} for this wrapper's stages")
        new_map = None if guidance is None else self._check_map(guidance)
        new_text = None if text is None else self._check_text(text)
        previous = self._ambient, self._ambient_text
        self._ambient, self._ambient_text = new_map, new_text
        try:
            yield self
        finally:
            self._ambient, self._ambient_text = previous

    def alignment_loss(self) -> Tensor:
        """lambda_align * SPEC-3 loss over the decoder outputs of align_sites in the last call (their order).

        The features are the refined outputs at sites with an attention stage and the module's own outputs at
        alignment-only sites. With align_sites=() (attention only) the loss is a zero scalar.
        """
        self._check_live()
        if not self.takes_map:
            raise RuntimeError("alignment_loss() is the -SS term: this wrapper has no -SS stages (pairs)")
        last = self._last
        if last is None:
            raise RuntimeError("alignment_loss() needs a forward call first: ss(*inputs, guidance=map)")
        if not self.align_sites:  # attention only: no alignment term
            return torch.zeros((), device=last.guidance.device)
        missing = [d for d in self.align_sites if d not in last.features]
        if missing:
            raise RuntimeError(
                f"alignment_loss(): decoder site(s) {missing} were not refined in the last forward pass (model in "
                f"{'training' if self.model.training else 'eval'} mode); a network that skips them in this mode "
                f"has no alignment term, and a direct .forward() call of a module bypasses its hooks"
            )
        feats, weights = [], []
        levels = self.align.level_weights or [1.0] * len(self.align_sites)
        for d, w in zip(self.align_sites, levels):
            captures = last.features[d]
            feats += [c.value() for c in captures]
            weights += [w / len(captures)] * len(captures)  # a decoder called n times: the mean of its n terms
        align = self.align if len(feats) == len(self.align_sites) else self._align_with(weights)
        g = last.guidance
        maps = [area_resize(g.to(f.device, torch.float32), f.shape[-2:]) for f in feats]
        return align(feats, maps)

    def _align_with(self, level_weights) -> SemanticAlignmentLoss:
        """self.align with other level weights (decoders called several times), one per set of weights."""
        key = tuple(level_weights)
        if key not in self._align_variants:
            a = self.align
            self._align_variants[key] = SemanticAlignmentLoss(
                eta=a.eta, weight=a.weight, level_weights=level_weights, reduction=a.reduction, form=a.form,
                backend=a.backend, check_values=False, guard_every=a.guard_every, guard_factor=a.guard_factor)
        return self._align_variants[key]

    def decoder_features(self) -> dict[str, Tensor]:
        """Each decoder site's feature from its last call in the last forward, by site: the refined output at a
        site with an attention stage, the module's own output at an alignment-only site."""
        last = self._last
        return {} if last is None else {d: c[-1].value() for d, c in last.features.items()}

    def remove(self) -> nn.Module:
        """Remove the hooks and return the original model (its own outputs again)."""
        for h in self._handles:
            h.remove()
        self._handles = []
        self._removed = True
        self._last = None
        return self.model

    def __getstate__(self):
        # Copies (EMA, teacher) and pickles start with no per-call state: it holds non-leaf tensors.
        state = super().__getstate__()
        state.update(_call=None, _last=None, _direct=False, _ambient=None, _ambient_text=None)
        return state

    def extra_repr(self) -> str:
        text = f", text_stages={self.text_stages}, text_channels={self.text_channels}" if self.text_stages else ""
        align = f", align_sites={self.align_sites}" if self.align_sites != list(self.pairs) else ""
        return f"pairs={self.pairs}{align}{text}"


SemanticSensitive = GuidedModel  # the name of the -SS wrapper since before text stages existed


def semantic_sensitive(model: nn.Module, pairs: Mapping[str, str], *, align_sites=None, **options) -> GuidedModel:
    """Wrap `model` with -SS attention stages; see the module docstring.

    pairs: {decoder site: encoder site}, sites as model.get_submodule names them,
    optionally "name[0]" (an output element) and "name#k" (the k-th call).
    align_sites: the decoder sites whose outputs feed ss.alignment_loss():
    None (default) for the decoders of pairs; a site not in pairs is
    alignment-only (no attention stage); () for attention only (the loss is
    then zero). pairs may be {} when align_sites names sites.
    options: heads (1), head_dim, backend ("auto"), scale (attention stages);
    eta (1.0), weight (lambda_align, 0.1), level_weights (one per alignment
    site), reduction ("mean"), form ("paper" or "normalized") (alignment
    loss); channels {decoder site: (dec_channels, enc_channels)} and
    example_inputs (how the stages are sized when the automatic dry run
    cannot measure them); text_stages, text_channels, intra_text, intra_image
    (text stages in the same wrapper, see text_guided).
    """
    if not isinstance(pairs, Mapping):
        raise ValueError("pairs must be a mapping {decoder module name: encoder module name}")
    align_sites = GuidedModel._read_align_sites(align_sites, pairs)
    if not pairs and not align_sites:
        raise ValueError("pairs must be a non-empty mapping {decoder module name: encoder module name}, or name "
                         "align_sites=[...] for alignment-only stages (pairs and align_sites are both empty)")
    return GuidedModel(model, pairs, align_sites=align_sites, **options)


def text_guided(model: nn.Module, stages, text_channels: int, **options) -> GuidedModel:
    """Wrap `model` with text stages (NaLSuper's TCM, ssattn.text.TextConditioning) at `stages`.

    stages: sites as for semantic_sensitive ("name", "name[0]", "name#k"):
    each one's output y becomes TextConditioning(y, words, mask, weight).
    Call ss(x, text=(words, mask)) with word features (B, L, text_channels)
    (e.g. ssattn.text.TextEncoder) and their padding mask (True = padded).
    options: heads (1), head_dim, backend, scale, intra_text (True: word
    self-attention first), intra_image (False: image self-attention first,
    quadratic in H*W), channels {site: channels} and example_inputs (when
    the automatic dry run cannot measure the sites); and pairs (and
    align_sites) to add -SS stages to the same wrapper.
    """
    pairs = options.pop("pairs", None)
    if isinstance(stages, str):
        stages = [stages]
    if not stages:
        raise ValueError("stages must name at least one module whose output the text refines")
    return GuidedModel(model, pairs, text_stages=stages, text_channels=text_channels, **options)


def remove_semantic_sensitive(ss: GuidedModel) -> nn.Module:
    """Remove the hooks of `ss` and return the original model."""
    if not isinstance(ss, GuidedModel):
        raise TypeError(f"ss must be a semantic_sensitive / text_guided wrapper, got {type(ss).__name__}")
    return ss.remove()
