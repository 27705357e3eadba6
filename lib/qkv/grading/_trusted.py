"""Trusted references for the checkers, captured when ``qkv.grading`` is imported.

A learner's code runs in the same kernel as the tests, after the locked setup cell that imports
``qkv.grading``. It can rebind anything: ``np.allclose = lambda *a, **k: True``,
``builtins.isinstance = ...``, ``qkv.np.softmax = my_softmax``, ``np.exp = ...``. Two defences,
both set up here at import time:

1. Everything the checkers *decide* with (the reference functions from ``qkv.np``, the ufuncs
   that compare, ``type``, ``isinstance``, the torch conversions) is captured as a module global
   of this file, so rebinding the public name afterwards changes nothing for the checkers.
2. ``pristine()`` puts every function, class and module that the numpy, qkv, builtins (and, once
   loaded, torch) namespaces held at import time back in place while a checker runs, and hands
   the learner's own bindings back when it ends. So ``qkv.np.softmax``, which looks ``np.exp`` up
   when it runs, computes the true reference even if the learner rebound ``np.exp``.

What this cannot stop (no in-process check can): a learner rebinding the name ``check_softmax``
in their own notebook, or editing these objects' code. The submission integrity scan looks
for that.

torch is captured only if it is already imported when ``qkv.grading`` is (the torch exercises'
setup cells import it first); the NumPy exercises do not pay torch's import time.
"""

import builtins
import contextlib
import io
import math
import sys
import types
import warnings

import numpy as np

import qkv.np as _qnp
from qkv._checks import dtype_kind
from qkv.tolerances import TOL

# --- builtins ---------------------------------------------------------------------------------
type_ = type
isinstance_ = isinstance
callable_ = callable
len_ = len
bool_ = bool
tuple_ = tuple
setattr_ = setattr
delattr_ = delattr
vars_ = vars
print_ = print  # the line a passing visible test prints
module_type = types.ModuleType

# --- numpy ------------------------------------------------------------------------------------
ndarray = np.ndarray
float64 = np.float64
float32 = np.float32
asarray = np.asarray
array2string = np.array2string
argwhere = np.argwhere
default_rng = np.random.default_rng
errstate = np.errstate
# ufuncs are C objects: nothing a learner does to the numpy namespace changes these.
absolute = np.absolute
subtract = np.subtract
multiply = np.multiply
add = np.add
less_equal = np.less_equal
equal = np.equal
not_equal = np.not_equal
logical_and = np.logical_and
logical_or = np.logical_or
logical_not = np.logical_not
isfinite = np.isfinite
isnan = np.isnan

# --- stdlib -----------------------------------------------------------------------------------
catch_warnings = warnings.catch_warnings
simplefilter = warnings.simplefilter
redirect_stdout = contextlib.redirect_stdout
redirect_stderr = contextlib.redirect_stderr
StringIO = io.StringIO
sqrt = math.sqrt
erf = math.erf

# --- the reference implementations (qkv.np), as they were at import --------------------------
ref_softmax = _qnp.softmax
ref_causal_mask = _qnp.causal_mask
ref_attention = _qnp.scaled_dot_product_attention
ref_multi_head_attention = _qnp.multi_head_attention
ref_layer_norm = _qnp.layer_norm
ref_gelu = _qnp.gelu
ref_mlp = _qnp.mlp
ref_decoder_block = _qnp.decoder_block
ref_cross_entropy = _qnp.cross_entropy
ref_split_heads = _qnp.split_heads
ref_merge_heads = _qnp.merge_heads
ref_embed = _qnp.embed
ref_positional_encoding = _qnp.sinusoidal_positional_encoding
ref_linear = _qnp.linear
# chapters 8 and 9: the whole model and the forward/backward pairs
ref_gpt_forward = _qnp.gpt_forward
ref_linear_forward, ref_linear_backward = _qnp.linear_forward, _qnp.linear_backward
ref_softmax_forward, ref_softmax_backward = _qnp.softmax_forward, _qnp.softmax_backward
ref_cross_entropy_forward = _qnp.cross_entropy_forward
ref_cross_entropy_backward = _qnp.cross_entropy_backward
ref_layer_norm_forward = _qnp.layer_norm_forward
ref_layer_norm_backward = _qnp.layer_norm_backward
ref_attention_forward, ref_attention_backward = _qnp.attention_forward, _qnp.attention_backward
kind_of = dtype_kind
tolerances = {key: dict(value) for key, value in TOL.items()}


# --- comparisons (C-level ufuncs and ndarray methods only) -------------------------------------
def close_where(actual, expected, rtol: float, atol: float):
    """Elementwise |actual - expected| <= atol + rtol * |expected| (arrays of the same shape).

    nan matches nan and inf matches an inf of the same sign (so a wrong answer's nan pattern can
    be matched against a known mistake's). Both arguments are plain float/bool/int ndarrays.
    """
    a = asarray(actual, dtype=float64)
    e = asarray(expected, dtype=float64)
    with errstate(all="ignore"):
        ok = less_equal(absolute(subtract(a, e)), add(atol, multiply(rtol, absolute(e))))
        # Where the expected value is infinite, rtol * inf would accept anything: demand equality.
        ok = logical_and(ok, isfinite(e))
        ok = logical_or(ok, equal(a, e))  # equal infinities
        return logical_or(ok, logical_and(isnan(a), isnan(e)))


def close(actual, expected, rtol: float, atol: float) -> bool:
    """Same shape and ``close_where`` everywhere."""
    if actual.shape != expected.shape:
        return False
    return bool_(close_where(actual, expected, rtol, atol).all())


def identical(actual, expected) -> bool:
    """Same shape and exactly the same values (nan equal to nan): masks, token ids, inputs."""
    if actual.shape != expected.shape:
        return False
    same = equal(actual, expected)
    if kind_of(actual) in "fc" and kind_of(expected) in "fc":
        same = logical_or(same, logical_and(isnan(actual), isnan(expected)))
    return bool_(same.all())


# --- torch, captured when available ---------------------------------------------------------
class _Torch:
    """The torch references, captured once (at import if torch was loaded, else on first need)."""

    def __init__(self, torch):
        self.module = torch
        self.Tensor = torch.Tensor
        self.from_numpy = torch.from_numpy
        self.detach = torch.Tensor.detach
        self.cpu = torch.Tensor.cpu
        self.numpy = torch.Tensor.numpy
        self.bool = torch.bool


_torch: _Torch | None = None


def torch_refs() -> _Torch | None:
    """Captured torch references; None when torch has not been imported by anyone."""
    global _torch
    if _torch is None and "torch" in sys.modules:
        _torch = _Torch(sys.modules["torch"])
        _watch_torch(_torch.module)
    return _torch


def load_torch() -> _Torch:
    """Import torch if needed (a checker asked for the torch backend explicitly)."""
    import torch  # noqa: F401

    return torch_refs()


# --- pristine(): the import-time namespaces back in place while a checker runs ---------------
_MISSING = object()
_watched: list = []  # (namespace object, is_class, {name: import-time value})


def _restorable(value) -> bool:
    # Functions, ufuncs, classes and modules; never plain data (counters, caches, flags).
    return callable_(value) or isinstance_(value, module_type)


def _watch(obj, is_class: bool = False) -> None:
    snapshot = {k: v for k, v in vars_(obj).items() if _restorable(v)}
    _watched.append((obj, is_class, snapshot))


def _watch_modules(*roots: str) -> None:
    seen = {id(obj) for obj, _, _ in _watched}
    for name, module in list(sys.modules.items()):
        if module is None or id(module) in seen:
            continue
        if any(name == r or name.startswith(r + ".") for r in roots):
            _watch(module)
            seen.add(id(module))


def _watch_torch(torch) -> None:
    _watch_modules("torch.nn.functional", "torch.functional", "torch.linalg", "torch.special",
                   "torch._tensor")
    _watch(torch)
    _watch(torch.Tensor, is_class=True)


def seal() -> None:
    """Snapshot the namespaces; called at the end of ``qkv.grading/__init__.py``."""
    _watched.clear()
    _watch(builtins)
    for module in (math, warnings, contextlib, io):
        _watch(module)
    _watch_modules("numpy", "qkv")
    if "torch" in sys.modules:
        torch_refs()
        if _torch is not None and not any(obj is _torch.module for obj, _, _ in _watched):
            _watch_torch(_torch.module)


def _put(obj, is_class: bool, name: str, value) -> None:
    if is_class:
        if value is _MISSING:
            delattr_(obj, name)
        else:
            setattr_(obj, name, value)
    elif value is _MISSING:
        del vars_(obj)[name]
    else:
        vars_(obj)[name] = value


def _reset() -> list:
    """Put every watched name back to its import-time value; return what was there instead."""
    changed = []
    for obj, is_class, snapshot in _watched:
        current = vars_(obj)
        for name, value in snapshot.items():
            now = current.get(name, _MISSING)
            if now is not value:
                changed.append((obj, is_class, name, now))
                _put(obj, is_class, name, value)
    return changed


def resanitize() -> None:
    """Undo whatever learner code rebound while it ran inside ``pristine()``."""
    _reset()


@contextlib.contextmanager
def pristine():
    """Run a checker with the import-time numpy/qkv/builtins/torch; restore the learner's after."""
    changed = _reset()
    try:
        yield
    finally:
        _reset()
        for obj, is_class, name, value in reversed(changed):
            _put(obj, is_class, name, value)
