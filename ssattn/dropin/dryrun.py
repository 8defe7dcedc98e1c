"""A shape-only dry run of a network: its modules' output shapes at construction, with no real compute.

The drop-in sizes its stages by measuring the paired modules' outputs, not by
reading their definitions. `shape_pass` calls the network with every
parameter and buffer swapped for a storage-less copy
(torch.func.functional_call) on a storage-less input: meta tensors first
(shape functions only, fast), and torch's FakeTensorMode when that fails
(it also fakes the tensors a network makes itself, on the model's device).
Nothing real is read or written: no parameter, buffer or norm statistic
changes, and no activation-sized memory is allocated (fake mode runs without
fallback kernels, which would compute on real zeros). The random number
generators (torch CPU and CUDA, Python's, NumPy's), every module's training
flag and attributes are restored afterwards. torch.nn's own norms,
activations and dropout pass their input through in the pass: they keep its
shape, and their shape functions (Python decompositions) were most of its
cost.

The input is inferred: batch 2 (training-mode norms refuse a batch of one),
channels from the first convolution in module order (then 3, then those of
the first convolution called), and the first spatial size the network
accepts among SIZES and the sizes its modules declare (an `img_size`
attribute, as patch embeddings keep it: some networks accept only one size,
e.g. with fixed positional embeddings). A network with several required
inputs gets the same image for each, then the image and 1-channel maps of
its size for the others; optional arguments keep their defaults.
torch.distributions' argument checks (they read values) are off during the
pass.
"""

from __future__ import annotations

import contextlib
import inspect
import logging
import os
import random
import re
import sys
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import nn
from torch.func import functional_call
from torch.nn.parameter import is_lazy

__all__ = ["SIZES", "BATCH", "DryRun", "preserved_state", "shape_pass"]

SIZES = (256, 128, 64, 512)  # square sizes tried in order: most networks' downsampling divides 256
BATCH = 2


@dataclass
class DryRun:
    """What a dry run found: the sites' channel counts, the input that worked, and each failed attempt."""

    channels: dict = field(default_factory=dict)   # site -> channel count, from the attempt that ran
    calls: dict = field(default_factory=dict)      # module name -> its calls in that attempt
    shapes: tuple | None = None                    # the input shapes of that attempt, one per input
    failures: list = field(default_factory=list)   # (inputs as text or None, error text) of attempts that failed

    @property
    def ran(self) -> bool:
        return self.shapes is not None

    @property
    def shape(self) -> tuple | None:
        """The (first) input's shape of the attempt that ran."""
        return None if self.shapes is None else self.shapes[0]

    def describe_input(self) -> str:
        """'a fake input (2, 3, 256, 256)' (the same for every input) or 'fake inputs (2, 3, 256, 256) + ...'."""
        if self.shapes is None:
            return "no input (none ran)"
        text = _inputs_text(self.shapes)
        return f"fake inputs {text}" if "+" in text else f"a fake input {text}"

    def describe_failures(self, limit: int = 2) -> str:
        """'a dry run on fake inputs (2, 3, 256, 256), ... failed: <error>', the distinct errors only."""
        shapes = ", ".join(s for s, _ in self.failures if s is not None)
        errors = list(dict.fromkeys(e for _, e in self.failures))
        more = f" (and {len(errors) - limit} other error(s))" if len(errors) > limit else ""
        what = f"a dry run on fake inputs {shapes} failed" if shapes else "no dry run could run"
        return f"{what}: {'; '.join(errors[:limit])}{more}"


def _inputs_text(shapes: tuple) -> str:
    """'(2, 3, 256, 256)' when every input has that shape, else the shapes joined by ' + '."""
    return str(shapes[0]) if len(set(shapes)) == 1 else " + ".join(str(s) for s in shapes)


def _input_shapes(channels: int, h: int, w: int, n: int) -> list[tuple]:
    """The inputs to try for a network of n inputs: the same image for each; then (n > 1) the image and 1-channel
    maps of its size for the others (an illumination or gray map beside the image)."""
    image = (BATCH, channels, h, w)
    tries = [(image,) * max(n, 1)]
    if n > 1:
        tries.append((image,) + ((BATCH, 1, h, w),) * (n - 1))
    return tries


# The error of a convolution given an input of other channels (meta tensors', fake or real ones'): the input's
# channel count is wrong, whatever its size, and fake tensors would fail the same way.
_CHANNEL_MISMATCH = re.compile(r"Invalid channel dimensions|to have \d+ channels, but got \d+ channels")


def _first_conv_channels(model: nn.Module) -> int | None:
    for m in model.modules():
        if isinstance(m, nn.modules.conv._ConvNd) and len(m.kernel_size) == 2:
            return int(m.in_channels)
    return None


_SIZE_ATTRIBUTES = ("img_size", "image_size", "input_size", "in_size")


def _sizes(model: nn.Module) -> list[tuple[int, int]]:
    """(H, W) to try: 256, then up to three sizes the modules declare (img_size=...), then the rest of SIZES."""
    declared = []
    for m in model.modules():
        for name in _SIZE_ATTRIBUTES:
            v = m.__dict__.get(name)
            if isinstance(v, int) and not isinstance(v, bool) and v > 0:
                declared.append((v, v))
            elif (isinstance(v, (tuple, list)) and len(v) == 2
                  and all(isinstance(n, int) and not isinstance(n, bool) and n > 0 for n in v)):
                declared.append((int(v[0]), int(v[1])))
    square = [(s, s) for s in SIZES]
    return list(dict.fromkeys([square[0], *declared[:3], *square[1:]]))


def _like(model: nn.Module) -> tuple[torch.dtype, torch.device]:
    for t in (*model.parameters(), *model.buffers()):
        if t.is_floating_point():
            return t.dtype, t.device
    return torch.get_default_dtype(), torch.device("cpu")


def _arity(model: nn.Module) -> tuple[int, list[str]]:
    """(required positional inputs, at least 1 where positional inputs are taken; required keyword-only names)."""
    try:
        params = list(inspect.signature(model.forward).parameters.values())
    except (TypeError, ValueError):
        return 1, []
    empty = inspect.Parameter.empty
    positional = [p for p in params if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
    required = sum(p.default is empty for p in positional)
    takes_positional = bool(positional) or any(p.kind == p.VAR_POSITIONAL for p in params)
    keywords = [p.name for p in params if p.kind == p.KEYWORD_ONLY and p.default is empty]
    return (max(required, 1) if takes_positional else 0), keywords


def _error_text(exc: BaseException) -> str:
    from torch._subclasses import fake_tensor as ft

    if isinstance(exc, ft.DataDependentOutputException):
        why = ("the network reads a tensor's values (e.g. .item(), or an `if` on a tensor), which a shape-only pass "
               "cannot")
    elif isinstance(exc, ft.DynamicOutputShapeException):
        why = "an output's shape depends on the tensor's values (e.g. nonzero or boolean indexing)"
    elif isinstance(exc, ft.UnsupportedOperatorException):
        why = f"operator {exc.func} has no shape-only implementation"
    else:
        why = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
    return f"{type(exc).__name__}: {why}"[:300] + _where(exc)


# Code that is not the network's: torch's and ssattn's, and the standard library's (its site-packages aside).
_LIBRARIES = tuple(os.path.join(os.path.realpath(d), "") for d in (
    os.path.dirname(torch.__file__), os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))
_STDLIB = os.path.join(os.path.realpath(os.path.dirname(os.__file__)), "")


def _is_network_code(path: str) -> bool:
    if path.startswith(_LIBRARIES):
        return False
    return not path.startswith(_STDLIB) or f"{os.sep}site-packages{os.sep}" in path


def _where(exc: BaseException) -> str:
    """' (at net.py:42, in forward)': the innermost frame of the traceback in the network's own code, else ''."""
    found, tb = None, exc.__traceback__
    while tb is not None:
        if _is_network_code(os.path.realpath(tb.tb_frame.f_code.co_filename)):
            found = tb
        tb = tb.tb_next
    if found is None:
        return ""
    path = os.path.realpath(found.tb_frame.f_code.co_filename)
    cwd = os.path.join(os.path.realpath(os.getcwd()), "")
    shown = os.path.relpath(path, cwd) if path.startswith(cwd) else path
    return f" (at {shown}:{found.tb_lineno}, in {found.tb_frame.f_code.co_name})"


_CONTAINERS = ("_parameters", "_buffers", "_modules")

# torch.nn layers whose output has their input's shape and dtype (matched by exact type: a subclass may differ).
_SAME_SHAPE = (
    nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d, nn.GroupNorm, nn.InstanceNorm1d, nn.InstanceNorm2d,
    nn.InstanceNorm3d, nn.LayerNorm, nn.LocalResponseNorm, nn.ReLU, nn.ReLU6, nn.LeakyReLU, nn.PReLU, nn.GELU,
    nn.SiLU, nn.ELU, nn.CELU, nn.SELU, nn.Mish, nn.Sigmoid, nn.Tanh, nn.Hardswish, nn.Hardsigmoid, nn.Hardtanh,
    nn.Softplus, nn.Softsign, nn.Tanhshrink, nn.Identity, nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.Dropout3d,
    nn.AlphaDropout,
)


def _pass_through(x, *args, **kwargs):
    return x


@contextlib.contextmanager
def preserved_state(model: nn.Module, attributes: bool = False):
    """Restore the random number generators and every module's training flag on exit.

    attributes=True also restores every module's attributes (a pass on fake
    tensors must not leave fake values behind: weight_norm's recomputed
    weight, a stored input size, a cache): attributes set in the pass are
    removed, replaced ones put back, and the parameter, buffer and submodule
    tables restored in place.
    """
    modes = [(m, m.training) for m in model.modules()]
    saved = [(m, dict(m.__dict__), {k: dict(m.__dict__[k]) for k in _CONTAINERS if k in m.__dict__})
             for m in model.modules()] if attributes else []
    cpu = torch.random.get_rng_state()
    cuda = torch.cuda.get_rng_state_all() if torch.cuda.is_available() and torch.cuda.is_initialized() else None
    py = random.getstate()
    np_random = sys.modules["numpy"].random if "numpy" in sys.modules else None
    np_state = np_random.get_state() if np_random is not None else None
    try:
        yield
    finally:
        for m, attrs, tables in saved:
            for k in [k for k in m.__dict__ if k not in attrs]:
                del m.__dict__[k]
            m.__dict__.update(attrs)
            for k, table in tables.items():
                m.__dict__[k].clear()
                m.__dict__[k].update(table)
        for m, mode in modes:
            m.training = mode
        torch.random.set_rng_state(cpu)
        if cuda is not None:
            torch.cuda.set_rng_state_all(cuda)
        random.setstate(py)
        if np_state is not None:
            np_random.set_state(np_state)


class _Meta:
    """Meta tensors: shape functions only (fast). Tensors the network makes without a device are meta too (the
    default device); one that mixes in tensors of another device fails, and the fake pass takes over."""

    def __init__(self, model: nn.Module, dtype: torch.dtype):
        self.dtype = dtype
        self.state = {name: torch.empty_like(t, device="meta") for name, t in _state(model).items()}

    def context(self):
        return torch.device("meta")

    def input(self, shape):
        return torch.empty(shape, dtype=self.dtype, device="meta")


class _Fake:
    """FakeTensorMode: every tensor made or touched in the pass is fake, on the model's own device."""

    def __init__(self, model: nn.Module, dtype: torch.dtype, device: torch.device):
        from torch._subclasses.fake_tensor import FakeTensorMode

        self.dtype, self.device = dtype, device
        # No fallback kernels: they would run the real operator on real zeros of the activations' size.
        self.mode = FakeTensorMode(allow_non_fake_inputs=True, allow_fallback_kernels=False)
        self.state = {name: self.mode.from_tensor(t) for name, t in _state(model).items()}

    @contextlib.contextmanager
    def context(self):
        # Fake mode logs every failing operator with its traceback; a failed attempt is reported by shape_pass.
        log = logging.getLogger("torch._subclasses.fake_tensor")
        level, log.level = log.level, logging.CRITICAL + 1
        try:
            with self.mode:
                yield
        finally:
            log.level = level

    def input(self, shape):
        with self.mode:
            return torch.empty(shape, dtype=self.dtype, device=self.device)


@contextlib.contextmanager
def _no_distribution_checks():
    """torch.distributions objects built in forward check their arguments' values (scale > 0): off for the pass,
    since no value can be read there and the checks never change a shape; the user's setting back after."""
    from torch.distributions import Distribution

    previous = Distribution._validate_args
    Distribution.set_default_validate_args(False)
    try:
        yield
    finally:
        Distribution.set_default_validate_args(previous)


def _state(model: nn.Module) -> dict:
    # Tied parameters appear under each of their names, so functional_call keeps them tied.
    return {**dict(model.named_parameters(remove_duplicate=False)),
            **dict(model.named_buffers(remove_duplicate=False))}


def shape_pass(model: nn.Module, run: Callable[[Callable[[], object]], tuple[dict, dict]], needed: set, *,
               fatal: tuple = ()) -> DryRun:
    """Measure on fake inputs: `run(call)` calls `call()` (one forward of `model`) and returns
    ({site: channels}, {module name: calls}).

    Each input (channel counts, then sizes; for a network of several inputs
    the same image for each, then 1-channel maps for the others) is tried on
    meta tensors and, when that fails, under FakeTensorMode (slower to start,
    but it also fakes the tensors a network makes itself). A convolution that
    refuses the input's channel count ends the tries of that count at once
    (no fake tensors, no other size): the next count is tried (3 after the
    first convolution's, which can be a deep layer when the input layers are
    custom classes). A call that runs but misses some sites
    (say, a module that runs only in training) is tried once more in the other
    mode; a call that runs ends the search. Errors of the types in `fatal` are
    raised at once (a bad site, not a failed pass).
    """
    dtype, device = _like(model)
    n_positional, keywords = _arity(model)
    channels = [c for c in dict.fromkeys((_first_conv_channels(model), 3)) if c is not None]
    first_called: list[int] = []

    def note_first_conv(module, args):
        if not first_called:
            first_called.append(int(module.in_channels))

    result = DryRun()
    lazy = [name for name, t in _state(model).items() if is_lazy(t)]
    if lazy:
        result.failures.append((None, f"the model has lazy modules not yet initialised ({lazy[0]}, ...): call it once "
                                      f"on an input first"))
        return result
    makers = (lambda: _Meta(model, dtype), lambda: _Fake(model, dtype, device))
    made: dict = {}  # each kind made when first needed: FakeTensorMode's first use is slow (it imports dynamo)
    with preserved_state(model, attributes=True), _no_distribution_checks(), torch.no_grad():
        convs = [m for m in model.modules() if isinstance(m, nn.modules.conv._ConvNd) and len(m.kernel_size) == 2]
        handles = [m.register_forward_pre_hook(note_first_conv) for m in convs]
        for m in model.modules():
            if type(m) in _SAME_SHAPE:
                m.forward = _pass_through  # an instance attribute: preserved_state removes it
        try:
            i = 0
            sizes = _sizes(model)
            while i < len(channels):
                for h, w in sizes:
                    wrong_channels = True  # every input at this size failed on a convolution's channel count
                    for shapes in _input_shapes(channels[i], h, w, n_positional + len(keywords)):
                        error = None
                        for k, make in enumerate(makers):
                            if k not in made:
                                try:
                                    made[k] = make()
                                except Exception as exc:  # noqa: BLE001 - e.g. a tensor type with no fake copy
                                    made[k] = None
                                    result.failures.append((None, _error_text(exc)))
                            kind = made[k]
                            if kind is None:
                                continue
                            first_called.clear()
                            xs = [kind.input(shape) for shape in shapes]
                            args, kwargs = tuple(xs[:n_positional]), dict(zip(keywords, xs[n_positional:]))

                            def call(kind=kind, args=args, kwargs=kwargs):
                                with kind.context():
                                    return functional_call(model, kind.state, args, kwargs, tie_weights=True,
                                                           strict=False)

                            error = _attempt(model, run, call, shapes, needed, fatal, result)
                            if error is None:
                                # Measured; or it ran in both modes and some sites did not: another input won't help.
                                return result
                            if _CHANNEL_MISMATCH.search(error):
                                break  # a shape error: fake tensors fail on it too
                        if error is not None:
                            result.failures.append((_inputs_text(shapes), error))
                            wrong_channels = wrong_channels and bool(_CHANNEL_MISMATCH.search(error))
                    if first_called and first_called[0] not in channels:
                        channels.append(first_called[0])  # the first convolution called takes other channels
                    if wrong_channels:
                        break  # other sizes won't mend the channel count: the next count (3 after the guess)
                i += 1
        finally:
            for h in handles:
                h.remove()
    return result


def _attempt(model, run, call, shapes, needed, fatal, result: DryRun) -> str | None:
    """One input, in the model's mode and then (sites missing) in the other; None when the forward ran (the
    result holds what it measured), else the error's text."""
    modes = [(m, m.training) for m in model.modules()]
    try:
        for flip in (False, True):
            if flip:
                model.train(not model.training)
            try:
                measured, calls = run(call)
            except fatal:
                raise
            except Exception as exc:  # noqa: BLE001 - a failed pass is reported with its input, not raised
                return None if flip else _error_text(exc)
            if not result.ran or len(measured) > len(result.channels):
                result.channels, result.calls, result.shapes = dict(measured), dict(calls), tuple(shapes)
            if needed <= set(measured):
                return None
        return None
    finally:
        for m, mode in modes:  # each module's own flag back for the next attempt
            m.training = mode
