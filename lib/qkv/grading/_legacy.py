"""Old names for the checks_*.py modules while chapters move to ``exercises/`` (deleted after)."""
# ruff: noqa: F401

from . import _trusted as _t
from .engine import *  # noqa: F403
from .engine import (
    Case,
    Learner,
    Mistake,
    Spec,
    _arrays,
    _as_array,
    _attempt,
    _call,
    _describe,
    _float64,
    _kind_of_object,
    _matches,
    _mismatch,
    _normal,
    _raised,
    _shape,
    _with_note,
    run_array,
)
from .values import Shown as _Shown
from .values import run_value
from .variants import attention_variant as _attention_variant
from .variants import block_variant as _block_variant
from .variants import layer_norm_variant as _layer_norm_variant
from .variants import mha_variant as _mha_variant
from .variants import plain_softmax as _plain_softmax
from .variants import qk as _scores

_Learner = Learner


def _check_fn(name, fn):
    if not _t.callable_(fn):
        raise AssertionError(f"{name} should be a function, but it is a "
                             f"{_t.type_(fn).__name__}. Define it with `def {name}(...):`.")


def _run(spec, fn, cases, backend="auto"):
    _check_fn(spec.name, fn)
    if backend not in ("auto", "numpy", "torch"):
        raise ValueError(f"backend must be 'auto', 'numpy' or 'torch'; got {backend!r}")
    if backend == "torch":
        _t.load_torch()
    run_array(spec, Learner(fn, backend, spec.name), cases)


def _run_value(spec, fn, cases, whole_run=False):
    _check_fn(spec.name, fn)
    run_value(spec, Learner(fn, "numpy", spec.name), cases, whole_run)
