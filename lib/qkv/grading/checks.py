"""Checkers for the exercises: run a learner's function, compare with ``qkv.np``, name the mistake.

Every checker has the same signature, ``check_xxx(fn, hidden=False, backend="auto")``, and the
same steps, each written once below:

1. ``_call``      call the learner's function on a copy of one seeded input: an exception becomes
                  an AssertionError that names it and the input shapes ("softmax is not implemented
                  yet" for an untouched exercise); warnings and prints are swallowed so a correct
                  answer stays silent; the inputs must come back unchanged.
2. ``_validate``  the output must be a plain ``np.ndarray`` or ``torch.Tensor`` (exact type: a
                  subclass, or an object whose ``__eq__`` always says yes, fails) of the expected
                  kind of dtype.
3. ``_mismatch``  shape, finiteness and values against the reference, with the tolerances of
                  ``qkv.tolerances`` (float64 results: "float64"; float32: the checker's entry).
4. ``_diagnose``  on a mismatch, compute the known-wrong variants on the same input; when the
                  learner's output matches one, say that mistake in plain words.

``hidden=True`` runs other seeds, sizes and edge cases (the hidden tests call it).
``backend``: "auto" calls the function with NumPy arrays and, if that raises while torch is
imported, with torch tensors; "numpy" or "torch" forces one. Either may return an ndarray or a
tensor; references and diagnoses always run in NumPy float64.

Everything that decides pass or fail goes through ``_trusted`` (captured at import) and runs
inside ``_trusted.pristine()``, so a learner who rebinds ``np.allclose`` (or ``np.exp``, or
``qkv.np.softmax``) after the setup cell cannot turn a wrong answer into a pass.
"""

import math
from dataclasses import dataclass
from functools import partial
from itertools import permutations

import numpy as np

from . import _trusted as _t

# ==============================================================================================
# The engine: one helper per step
# ==============================================================================================


@dataclass(frozen=True)
class Case:
    """One input: the learner's positional arguments (NumPy), their names, and what is special."""

    args: tuple
    names: tuple
    note: str = ""  # said after a generic failure message on this input


@dataclass(frozen=True)
class Mistake:
    """A known-wrong computation; ``says`` may use {name} (the function) and {case} (the input)."""

    says: str
    fn: object  # called with the case's arguments (NumPy float64); returns the wrong output


@dataclass(frozen=True)
class Spec:
    """What one checker checks."""

    name: str  # the exercise's function name, used in every message
    reference: object  # trusted qkv.np function (or a tiny formula) with the learner's arguments
    mistakes: object  # callable(*args) -> iterable of Mistake
    out: str = "float"  # "float" | "bool" | "scalar" | "int_pair"
    tol32: str = "float32_op"  # TOL entry when the result or an input is float32


class _Learner:
    """The learner's function and the backend chosen for it (decided on the first call)."""

    def __init__(self, fn, backend: str):
        self.fn = fn
        self.backend = backend


def _run(spec: Spec, fn, cases, backend: str = "auto") -> None:
    """The body of every checker."""
    if not _t.callable_(fn):
        raise AssertionError(f"{spec.name} should be a function, but it is a "
                             f"{_t.type_(fn).__name__}. Define it with `def {spec.name}(...):`.")
    if backend not in ("auto", "numpy", "torch"):
        raise ValueError(f"backend must be 'auto', 'numpy' or 'torch'; got {backend!r}")
    if backend == "torch":
        _t.load_torch()
    learner = _Learner(fn, backend)
    with _t.pristine():
        for case in cases:
            args = _float64(case.args)
            with _t.catch_warnings(), _t.errstate(all="ignore"):
                _t.simplefilter("ignore")
                expected = _parts(spec, spec.reference(*args))  # before any learner code runs
            out = _call(spec, learner, case)
            got = _validate(spec, out, case, expected)
            tol = _tolerance(spec, got, case)
            problem = _mismatch(spec, got, expected, case, tol)
            if problem is not None:
                said = _diagnose(spec, got, expected, args, case, tol)
                raise AssertionError(said if said is not None else _with_note(problem, case))


# --- step 1: call the learner safely ------------------------------------------------------------


def _call(spec: Spec, learner: _Learner, case: Case):
    """The learner's output on ``case``; AssertionError if it raised or changed its inputs."""
    if learner.backend == "auto":
        out, exc, copies = _attempt(learner.fn, case, "numpy")
        if exc is None:
            learner.backend = "numpy"
        elif _t.torch_refs() is not None and not _t.isinstance_(exc, NotImplementedError):
            out2, exc2, copies2 = _attempt(learner.fn, case, "torch")
            if exc2 is None:
                learner.backend, out, exc, copies = "torch", out2, None, copies2
            elif _t.isinstance_(exc, (TypeError, AttributeError)):
                exc = exc2  # NumPy input rejected outright: the torch error says more
    else:
        out, exc, copies = _attempt(learner.fn, case, learner.backend)
    if exc is not None:
        raise AssertionError(_raised(spec.name, exc, case, learner.fn)) from exc
    for label, original, passed in copies:
        if not _t.identical(passed, original):
            raise AssertionError(
                f"{spec.name} changed its input {label} in place (for example with "
                f"`{label} -= ...` or `{label}[...] = ...`) when called with {_describe(case)}. "
                f"Leave the inputs alone and build new arrays instead: `x = x - ...`.")
    return out


def _attempt(fn, case: Case, backend: str):
    """(output, exception, copies): ``fn`` called quietly on fresh copies of the inputs."""
    torch = _t.torch_refs() if backend == "torch" else None
    copies = []
    args = tuple(_to_backend(v, n, torch, copies) for v, n in zip(case.args, case.names,
                                                                   strict=True))
    sink = _t.StringIO()
    try:
        with _t.catch_warnings(), _t.errstate(all="ignore"), _t.redirect_stdout(sink), \
                _t.redirect_stderr(sink):
            _t.simplefilter("ignore")
            return fn(*args), None, copies
    except (Exception, SystemExit) as exc:  # never KeyboardInterrupt: the grader must stop
        return None, exc, copies
    finally:
        _t.resanitize()  # undo anything the learner rebound while running


def _to_backend(value, label: str, torch, copies: list):
    """A fresh copy of one argument (a tensor for the torch backend); remembers array copies."""
    if _t.type_(value) is _t.ndarray:
        copy = value.copy()
        copies.append((label, value, copy))
        return copy if torch is None else torch.from_numpy(copy)
    if _t.type_(value) is dict:
        return {k: _to_backend(v, f"{label}[{k!r}]", torch, copies) for k, v in value.items()}
    return value


def _raised(name: str, exc: BaseException, case: Case, fn) -> str:
    kind = _t.type_(exc).__name__
    try:
        text = str(exc)
    except Exception:  # an exception whose __str__ itself fails
        text = ""
    if _t.isinstance_(exc, NotImplementedError) and not text:  # the release's stub, bare
        # (one with a message, e.g. from torch for an unsupported dtype, is reported as is)
        inner = _raising_function(exc)
        if inner is not None and inner != getattr(getattr(fn, "__code__", None), "co_name", None):
            return (f"{name} is not implemented yet: it calls {inner}, which raised "
                    f"NotImplementedError. Write {inner} first.")
        return (f"{name} is not implemented yet (it raised NotImplementedError): replace "
                f"`raise NotImplementedError()` with your code.")
    if _t.isinstance_(exc, SystemExit):
        return f"{name} tried to exit Python (SystemExit) when called with {_describe(case)}."
    message = f"{name} raised {kind}" + (f": {text}" if text else "")
    return _with_note(f"{message} — when called with {_describe(case)}.", case)


def _raising_function(exc: BaseException):
    """The innermost named function in the exception's traceback below ``_attempt``, if any."""
    tb, name = exc.__traceback__, None
    tb = tb.tb_next if tb is not None else None  # the first frame is _attempt's own
    while tb is not None:
        code_name = tb.tb_frame.f_code.co_name
        if not code_name.startswith("<"):
            name = code_name
        tb = tb.tb_next
    return name


# --- step 2: validate the output ----------------------------------------------------------------


def _validate(spec: Spec, out, case: Case, expected: tuple) -> tuple:
    """The output as a tuple of plain ndarrays, after checking its type and dtype kind."""
    if spec.out == "int_pair":
        if not (_t.type_(out) is tuple or _t.type_(out) is list) or _t.len_(out) != 2:
            raise AssertionError(f"{spec.name} should return two arrays, (inputs, targets); it "
                                 f"returned {_kind_of_object(out)} for {_describe(case)}.")
        return (_as_array(spec, out[0], "inputs", "int", case),
                _as_array(spec, out[1], "targets", "int", case))
    got = _as_array(spec, out, "", spec.out, case)
    if spec.out == "bool" and _t.kind_of(got) != "b":
        same = (_t.kind_of(got) in "iuf" and got.shape == expected[0].shape
                and _t.identical(got != 0, expected[0]))
        raise AssertionError(
            f"{spec.name} returned numbers of dtype {got.dtype} for {_describe(case)}; a mask must "
            f"be boolean (dtype bool, True = may attend) so it can be used in np.where"
            + (" — your True/False pattern is right, only the dtype is not: build it with "
               "dtype=bool (e.g. np.ones((seq, seq), dtype=bool))." if same else "."))
    return (got,)


def _as_array(spec: Spec, out, label: str, kind: str, case: Case):
    """One returned value as a plain ndarray: exact np.ndarray or torch.Tensor (or a float)."""
    what = f"{spec.name} returned" + (f" {label} as" if label else "")
    torch = _t.torch_refs()
    if _t.type_(out) is _t.ndarray:
        arr = out
    elif torch is not None and _t.type_(out) is torch.Tensor:
        if out.dtype.is_floating_point and out.dtype.itemsize < 4:
            raise AssertionError(f"{what} a {out.dtype} tensor for {_describe(case)}; keep the "
                                 f"input's precision (float32 or float64).")
        arr = torch.numpy(torch.cpu(torch.detach(out)))
    elif kind == "scalar" and any(_t.type_(out) is s for s in (float, _t.float64, _t.float32)):
        arr = _t.asarray(out)
    else:
        wanted = "a single number" if kind == "scalar" else "a NumPy array (or a torch tensor)"
        raise AssertionError(f"{what} {_kind_of_object(out)} for {_describe(case)}; it should "
                             f"return {wanted}.")
    k = _t.kind_of(arr)
    if kind in ("float", "scalar") and (k != "f" or arr.dtype.itemsize < 4):
        raise AssertionError(f"{what} values of dtype {arr.dtype} for {_describe(case)}; expected "
                             f"floating-point numbers ({_input_dtype(case)}, like the input).")
    if kind == "int" and k not in "iu":
        raise AssertionError(f"{what} values of dtype {arr.dtype} for {_describe(case)}; token "
                             f"ids must stay integers (slice the ids array, do not convert it).")
    return arr


def _kind_of_object(out) -> str:
    cls = _t.type_(out)
    torch = _t.torch_refs()
    if cls is _t.ndarray or (torch is not None and cls is torch.Tensor):
        return f"one {'array' if cls is _t.ndarray else 'tensor'} of shape {_shape(out)}"
    if _t.isinstance_(out, _t.ndarray):
        return (f"a {cls.__name__} (a subclass of np.ndarray); return a plain np.ndarray, "
                f"e.g. np.asarray(result)")
    if torch is not None and _t.isinstance_(out, torch.Tensor):
        return f"a {cls.__name__} (a subclass of torch.Tensor); return a plain tensor"
    if out is None:
        return "None (did you forget `return`?)"
    name = cls.__name__
    return f"{'an' if name[:1].lower() in 'aeiou' else 'a'} {name}"


# --- step 3: compare with the reference ---------------------------------------------------------


def _tolerance(spec: Spec, got: tuple, case: Case) -> dict:
    """float64 everywhere -> TOL["float64"]; any float32 result or input -> TOL[spec.tol32]."""
    single = any(_t.kind_of(g) == "f" and g.dtype.itemsize < 8 for g in got)
    single = single or any(a.dtype == np.float32 for a in _arrays(case.args))
    return _t.tolerances[spec.tol32 if single else "float64"]


def _mismatch(spec: Spec, got: tuple, expected: tuple, case: Case, tol: dict):
    """None when ``got`` matches ``expected``; otherwise what is wrong, in words."""
    labels = ("inputs", "targets") if spec.out == "int_pair" else ("",)
    for label, g, e in zip(labels, got, expected, strict=True):
        what = f"{spec.name} returned" + (f" {label} with" if label else "")
        if g.shape != e.shape:
            wanted = "a single number, shape ()" if e.shape == () else f"shape {_shape(e)}"
            return f"{what} shape {_shape(g)} for {_describe(case)}; expected {wanted}."
        if _t.kind_of(e) != "f":
            if not _t.identical(g, e):
                idx = _index(_t.not_equal(g, e))
                legend = " (1 = True)" if e.dtype == bool else ""
                return (f"{what} wrong values for {_describe(case)}: at {_at(idx)} expected "
                        f"{e[idx].item()!r} but got {g[idx].item()!r}.\n"
                        f"Expected{legend}:\n{_grid(e)}\nGot:\n{_grid(g)}")
            continue
        bad = _t.logical_and(_t.logical_not(_t.isfinite(g)), _t.isfinite(e))
        if bad.any():
            idx = _index(bad)
            return (f"{what} {float(g[idx])} at {_at(idx)} for {_describe(case)}, where the "
                    f"expected value is {float(e[idx]):.6g}.")
        wrong = _t.logical_not(_t.close_where(g, e, **tol))
        if wrong.any():
            with np.errstate(all="ignore"):
                diff = np.where(wrong, np.abs(g.astype(np.float64) - e), -1.0)
            diff = np.where(np.isnan(diff), np.inf, diff)
            idx = _index(diff == diff.max())
            message = (f"{what} wrong values for {_describe(case)}: at {_at(idx)} expected "
                       f"{float(e[idx]):.10g} but got {float(g[idx]):.10g} (largest difference "
                       f"{diff.max():.3g}).")
            if _t.close(g, e, **_t.tolerances["float32_op"]):
                message += (f" That is close, but not within the tolerance for float64 "
                            f"(rtol={tol['rtol']:g}, atol={tol['atol']:g}): did part of the "
                            f"computation run in float32? Keep the input's dtype.")
            return message
    return None


# --- step 4: name the mistake -------------------------------------------------------------------


def _diagnose(spec: Spec, got: tuple, expected: tuple, args: tuple, case: Case, tol: dict):
    """The message of the first known mistake whose output ``got`` matches, else None."""
    for mistake in spec.mistakes(*args):
        try:
            with _t.catch_warnings(), _t.errstate(all="ignore"):
                _t.simplefilter("ignore")
                wrong = _parts(spec, mistake.fn(*args))
        except Exception:  # a variant that cannot run on this input (shapes) says nothing
            continue
        if _matches(wrong, expected, tol) or not _matches(got, wrong, tol):
            continue  # indistinguishable from the right answer here, or not what they did
        return mistake.says.replace("{name}", spec.name).replace("{case}", _describe(case))
    return None


def _matches(a: tuple, b: tuple, tol: dict) -> bool:
    if _t.len_(a) != _t.len_(b):
        return False
    for x, y in zip(a, b, strict=True):
        if _t.kind_of(y) == "f" or _t.kind_of(x) == "f":
            if not _t.close(x, y, **tol):
                return False
        elif not _t.identical(x, y):
            return False
    return True


# --- small helpers ------------------------------------------------------------------------------


def _parts(spec: Spec, value) -> tuple:
    """A reference or variant output as a tuple of ndarrays."""
    if spec.out == "int_pair":
        return tuple(_t.asarray(v) for v in value)
    return (_t.asarray(value),)


def _arrays(args):
    for a in args:
        if _t.type_(a) is _t.ndarray:
            yield a
        elif _t.type_(a) is dict:
            yield from _arrays(a.values())


def _float64(args: tuple) -> tuple:
    """The case's arguments with float arrays in float64, for references and variants."""
    def up(a):
        if _t.type_(a) is _t.ndarray and a.dtype.kind == "f":
            return _t.asarray(a, dtype=_t.float64)
        if _t.type_(a) is dict:
            return {k: up(v) for k, v in a.items()}
        return a
    return tuple(up(a) for a in args)


def _input_dtype(case: Case) -> str:
    dtypes = [str(a.dtype) for a in _arrays(case.args) if a.dtype.kind == "f"]
    return dtypes[0] if dtypes else "float64"


def _describe(case: Case) -> str:
    """'x of shape (4, 7)', or the values themselves for tiny inputs."""
    parts = []
    for name, value in zip(case.names, case.args, strict=True):
        if _t.type_(value) is _t.ndarray:
            if value.size <= 8 and value.ndim <= 2:
                parts.append(f"{name} = {_show(value)}")
            else:
                parts.append(f"{name} of shape {_shape(value)}")
        elif _t.type_(value) is dict:
            parts.append(f"{name} (a dict of weights)")
        else:
            parts.append(f"{name} = {value!r}")
    return parts[0] if len(parts) == 1 else ", ".join(parts[:-1]) + " and " + parts[-1]


def _show(a) -> str:
    text = _t.array2string(a, separator=", ", threshold=64,
                           formatter={"float_kind": lambda v: f"{v:.6g}"})
    return " ".join(text.split()).replace("[ ", "[")


def _grid(a) -> str:
    """An integer or boolean array as rows of numbers (True = 1), for masks and token ids."""
    return _t.array2string(a.astype(np.int64), threshold=400, max_line_width=100)


def _shape(a) -> tuple:
    return tuple(int(n) for n in a.shape)


def _index(flags) -> tuple:
    hits = _t.argwhere(flags)
    return tuple(int(i) for i in hits[0]) if len(hits) else ()


def _at(idx: tuple) -> str:
    return f"index {idx}" if idx else "the result"


def _with_note(message: str, case: Case) -> str:
    return f"{message} {case.note}" if case.note else message


def _normal(rng, *shape, scale=1.0, dtype=np.float64):
    return (rng.normal(size=shape) * scale).astype(dtype)


# ==============================================================================================
# NumPy building blocks for the wrong variants (they only ever shape a message)
# ==============================================================================================


def _plain_softmax(x, axis=-1, stable=True):
    """Softmax without the all -inf row guard (so such rows give nan, as most learners' do)."""
    if stable:
        x = x - np.max(x, axis=axis, keepdims=True)
    e = np.exp(x)
    return e / np.sum(e, axis=axis, keepdims=True)


def _scores(q, k, divide_by):
    return q @ np.swapaxes(k, -1, -2) / divide_by


def _attention_variant(q, k, v, mask=None, *, divide_by=None, masking="-inf", guard=True,
                       stable=True, axis=-1, transpose_scores=False):
    """Scaled dot-product attention with one knob turned to a known mistake."""
    scale = math.sqrt(q.shape[-1]) if divide_by is None else divide_by
    scores = _scores(q, k, scale)
    if transpose_scores:
        scores = _scores(k, q, scale)  # (..., seq_k, seq_q): rows are keys
    if mask is not None and masking in ("-inf", "zero", "-1e9", "inverted", "transposed"):
        keep = {"inverted": ~mask, "transposed": np.swapaxes(mask, -1, -2)}.get(masking, mask)
        fill = {"zero": 0.0, "-1e9": -1e9}.get(masking, -np.inf)
        scores = np.where(keep, scores, fill)
    if guard and stable and axis == -1:
        weights = _t.ref_softmax(scores)
    else:
        weights = _plain_softmax(scores, axis=axis, stable=stable)
    if mask is not None and masking == "after":
        weights = np.where(mask, weights, 0.0)
    if mask is not None and masking == "after -inf":
        weights = np.where(mask, weights, -np.inf)
    return weights @ v


def _layer_norm_variant(x, gamma, beta, *, ddof=0, eps=1e-5, eps_outside=False, center=True,
                        raw_second_moment=False, axis=-1, use_gamma=True, use_beta=True,
                        swap=False):
    mean = np.mean(x, axis=axis, keepdims=True)
    if raw_second_moment:
        var = np.mean(x**2, axis=axis, keepdims=True)
    else:
        var = np.var(x, axis=axis, keepdims=True, ddof=ddof)
    centered = x - mean if center else x
    x_hat = centered / (np.sqrt(var) + eps) if eps_outside else centered / np.sqrt(var + eps)
    if swap:
        gamma, beta = beta, gamma
    return x_hat * (gamma if use_gamma else 1.0) + (beta if use_beta else 0.0)


def _mha_variant(x, w_qkv, b_qkv, w_out, b_out, n_head, *, scale="d_head", causal="causal",
                 order=(0, 1, 2), split_ok=True, merge_ok=True, out_proj=True, qkv_bias=True,
                 out_bias=True):
    *lead, seq, d_model = x.shape
    d_head = d_model // n_head
    qkv = x @ w_qkv + (b_qkv if qkv_bias else 0.0)  # (..., seq, 3*d_model)
    chunks = np.split(qkv, 3, axis=-1)
    q, k, v = (chunks[i] for i in order)

    def split(t):  # (..., seq, d_model) -> (..., n_head, seq, d_head)
        if split_ok:
            return np.swapaxes(t.reshape(*lead, seq, n_head, d_head), -3, -2)
        return t.reshape(*lead, n_head, seq, d_head)  # wrong: no transpose

    q, k, v = split(q), split(k), split(v)
    divide_by = {"d_head": math.sqrt(d_head), "d_model": math.sqrt(d_model), "none": 1.0}[scale]
    scores = _scores(q, k, divide_by)  # (..., n_head, seq, seq)
    if causal != "none":
        mask = _t.ref_causal_mask(seq)
        scores = np.where(mask if causal == "causal" else mask.T, scores, -np.inf)
    out = _t.ref_softmax(scores) @ v  # (..., n_head, seq, d_head)
    if merge_ok:
        out = np.swapaxes(out, -3, -2).reshape(*lead, seq, d_model)
    else:
        out = out.reshape(*lead, seq, d_model)  # wrong: no transpose
    if out_proj:
        out = out @ w_out + (b_out if out_bias else 0.0)
    return out


def _block_variant(x, p, n_head, *, attn_residual=True, mlp_residual=True, norm="pre",
                   causal=True, swap_norms=False, mlp_first=False):
    ln1 = (p["ln1_gamma"], p["ln1_beta"])
    ln2 = (p["ln2_gamma"], p["ln2_beta"])
    if swap_norms:
        ln1, ln2 = ln2, ln1

    def attn(h):
        return _t.ref_multi_head_attention(h, p["w_qkv"], p["b_qkv"], p["w_out"], p["b_out"],
                                           n_head, causal=causal)

    def mlp(h):
        return _t.ref_mlp(h, p["w_fc"], p["b_fc"], p["w_proj"], p["b_proj"])

    def sublayer(x, f, ln, residual):
        if norm == "pre":
            y = f(_t.ref_layer_norm(x, *ln))
            return x + y if residual else y
        if norm == "post":
            return _t.ref_layer_norm(x + f(x), *ln)
        if norm == "stream":  # normalizes the residual stream itself
            x = _t.ref_layer_norm(x, *ln)
            return x + f(x)
        return x + f(x)  # "none"

    steps = [(attn, ln1, attn_residual), (mlp, ln2, mlp_residual)]
    if mlp_first:
        steps.reverse()
    for f, ln, residual in steps:
        x = sublayer(x, f, ln, residual)
    return x


# ==============================================================================================
# The checkers
# ==============================================================================================

_STABLE_FIX = ("Subtract each row's maximum before exponentiating: "
               "e = np.exp(x - np.max(x, axis=-1, keepdims=True)). The result does not change "
               "(the factor exp(-max) cancels), but exp never sees a huge number.")


# --- softmax ------------------------------------------------------------------------------------


def _softmax_mistakes(x):
    yield Mistake(
        "{name} is not numerically stable: for {case} it overflows (exp(1000) is inf in float64, "
        "and inf / inf is nan). " + _STABLE_FIX,
        partial(_plain_softmax, stable=False))
    yield Mistake(
        "{name} subtracts the maximum of the whole array instead of each row's maximum: for "
        "{case}, rows far below the overall maximum underflow to 0 / 0 = nan. Use "
        "np.max(x, axis=-1, keepdims=True).",
        lambda x: np.exp(x - np.max(x)) / np.sum(np.exp(x - np.max(x)), axis=-1, keepdims=True))
    for axis in range(-x.ndim, -1):
        yield Mistake(
            f"{{name}} normalizes along axis {axis} (axis {axis + x.ndim}) instead of the last "
            "axis: for {case}, each slice x[..., :] along the LAST axis must sum to 1. Use "
            "axis=-1 with keepdims=True in both the max and the sum.",
            partial(_plain_softmax, axis=axis))
    yield Mistake(
        "{name} divides by the sum over the whole array (np.sum without axis=...): for {case}, "
        "every row along the last axis must sum to 1 on its own. Use "
        "np.sum(e, axis=-1, keepdims=True).",
        lambda x: np.exp(x - np.max(x)) / np.sum(np.exp(x - np.max(x))))
    yield Mistake(
        "{name} sums without keepdims=True: for {case} the row sums, of shape x.shape[:-1], "
        "broadcast against the wrong axis, so entries are divided by another row's sum. Use "
        "np.sum(e, axis=-1, keepdims=True).",
        lambda x: np.exp(x - np.max(x, -1, keepdims=True))
        / np.sum(np.exp(x - np.max(x, -1, keepdims=True)), axis=-1))
    yield Mistake(
        "{name} forgot the exponential: it divides x by its row sum. Softmax is "
        "exp(x) / sum(exp(x)).",
        lambda x: x / np.sum(x, axis=-1, keepdims=True))
    yield Mistake(
        "{name} returns log-probabilities (log softmax); return the probabilities themselves, "
        "which lie in [0, 1] and sum to 1 along the last axis.",
        lambda x: np.log(_t.ref_softmax(x)))


def _softmax_cases(hidden: bool):
    if not hidden:
        rng = _t.default_rng(0)
        return [
            Case((_normal(rng, 4, 7),), ("x",)),
            Case((np.array([[1000.0, 1001.0, 1002.0], [-1000.0, -999.0, -1001.0]]),), ("x",),
                 "These inputs are large: exp(1000) is inf in float64."),
            Case((_normal(rng, 2, 3, 5, scale=3.0),), ("x",),
                 "x is a batch here, (2, 3, 5): normalize along the last axis only."),
        ]
    rng = _t.default_rng(101)
    return [
        Case((_normal(rng, 1, 9, scale=2.0),), ("x",)),
        Case((_normal(rng, 6),), ("x",), "x is 1-D here: the whole vector sums to 1."),
        Case((_normal(rng, 3, 4, 6, scale=5.0),), ("x",)),
        Case((_normal(rng, 5, 1),), ("x",), "Each row has one entry, so every output is 1."),
        Case((rng.uniform(-1e4, 1e4, size=(3, 5)),), ("x",),
             "These inputs are huge (up to 1e4): exp overflows unless the row max is subtracted."),
        Case((np.array([[0.0, -np.inf, 1.0, 2.0], [-np.inf, 3.0, -np.inf, 3.0]]),), ("x",),
             "Entries equal to -inf must get probability exactly 0."),
        Case((_normal(rng, 4, 6, dtype=np.float32),), ("x",), "x is float32 here."),
        Case((np.full((2, 4), 7.0),), ("x",), "Equal entries share the probability equally."),
        Case((_normal(rng, 2, 2, 3, 4, scale=10.0),), ("x",)),
    ]


def check_softmax(softmax, hidden: bool = False, backend: str = "auto") -> None:
    """softmax(x) over the last axis, stable for large inputs; x (..., n) -> (..., n)."""
    spec = Spec("softmax", _t.ref_softmax, _softmax_mistakes)
    _run(spec, softmax, _softmax_cases(hidden), backend)


# --- attention scores ---------------------------------------------------------------------------


_BATCHED_NOTE = ("q and k are batched here, (..., seq, d_head): transpose only the last two axes "
                 "of k, with np.swapaxes(k, -1, -2) (k.T reverses every axis).")


def _reference_scores(q, k):
    # No qkv.np function computes the scores on their own; this is the book's formula.
    return q @ np.swapaxes(k, -1, -2) / _t.sqrt(q.shape[-1])


def _scores_mistakes(q, k):
    d_head = q.shape[-1]
    yield Mistake(
        f"{{name}} does not scale the scores: for {{case}}, divide q @ k^T by sqrt(d_head) = "
        f"sqrt({d_head}), where d_head = q.shape[-1].",
        lambda q, k: _scores(q, k, 1.0))
    yield Mistake(
        f"{{name}} divides by d_head = {d_head} instead of by its square root, sqrt({d_head}).",
        lambda q, k: _scores(q, k, d_head))
    yield Mistake(
        f"{{name}} multiplies by sqrt(d_head) instead of dividing by it: scores = "
        f"q @ k^T / sqrt({d_head}).",
        lambda q, k: _scores(q, k, 1.0 / math.sqrt(d_head)))
    if q.ndim == 4:
        n_head = q.shape[-3]
        yield Mistake(
            f"{{name}} divides by sqrt(d_model) = sqrt(n_head * d_head) = sqrt({n_head * d_head}) "
            f"for {{case}}; each head's scores are divided by sqrt(d_head) = sqrt({d_head}), the "
            "size of q's LAST axis.",
            lambda q, k: _scores(q, k, math.sqrt(n_head * d_head)))
    for axis in range(-q.ndim, -1):
        size = q.shape[axis]
        if size != d_head:
            yield Mistake(
                f"{{name}} divides by sqrt(q.shape[{axis + q.ndim}]) = sqrt({size}) for {{case}}, "
                f"but d_head is the size of the LAST axis: use sqrt(q.shape[-1]) = "
                f"sqrt({d_head}). (len(q) is the first axis, not d_head.)",
                partial(lambda q, k, size: _scores(q, k, math.sqrt(size)), size=size))
    yield Mistake(
        "{name} computes k q^T, so rows belong to keys: scores[..., i, j] must be q_i · k_j, "
        "i.e. q @ np.swapaxes(k, -1, -2) (queries along the rows).",
        lambda q, k: _scores(k, q, math.sqrt(d_head)))


def _scores_cases(hidden: bool):
    if not hidden:
        rng = _t.default_rng(1)
        return [
            Case((_normal(rng, 5, 8), _normal(rng, 5, 8)), ("q", "k")),
            Case((_normal(rng, 3, 4), _normal(rng, 6, 4)), ("q", "k"),
                 "Here seq_q = 3 and seq_k = 6: the scores are (seq_q, seq_k) = (3, 6)."),
            Case((_normal(rng, 2, 3, 5, 4), _normal(rng, 2, 3, 6, 4)), ("q", "k"),
                 _BATCHED_NOTE),
        ]
    rng = _t.default_rng(102)
    return [
        Case((_normal(rng, 1, 3), _normal(rng, 2, 3)), ("q", "k")),
        Case((_normal(rng, 7, 16), _normal(rng, 7, 16)), ("q", "k")),
        Case((_normal(rng, 4, 9, 2), _normal(rng, 4, 3, 2)), ("q", "k"), _BATCHED_NOTE),
        Case((_normal(rng, 6, 8, dtype=np.float32), _normal(rng, 6, 8, dtype=np.float32)),
             ("q", "k"), "q and k are float32 here."),
        Case((_normal(rng, 1, 2, 4, 8, scale=3.0), _normal(rng, 1, 2, 4, 8)), ("q", "k"),
             _BATCHED_NOTE),
    ]


def check_attention_scores(attention_scores, hidden: bool = False, backend: str = "auto") -> None:
    """attention_scores(q, k) = q k^T / sqrt(d_head); (..., seq_q, d_head) x (..., seq_k, d_head)
    -> (..., seq_q, seq_k)."""
    spec = Spec("attention_scores", _reference_scores, _scores_mistakes)
    _run(spec, attention_scores, _scores_cases(hidden), backend)


# --- softmax with temperature -------------------------------------------------------------------


def _reference_temperature(x, temperature):
    return _t.ref_softmax(x / temperature)


def _temperature_mistakes(x, temperature):
    yield Mistake(
        "{name} multiplies the logits by the temperature instead of dividing: softmax(x / T). "
        "A temperature above 1 must flatten the distribution, one below 1 must sharpen it.",
        lambda x, t: _t.ref_softmax(x * t))
    yield Mistake(
        "{name} ignores the temperature: for {case} it returned plain softmax(x). Divide the "
        "logits by the temperature first: softmax(x / temperature).",
        lambda x, t: _t.ref_softmax(x))
    yield Mistake(
        "{name} divides the probabilities by the temperature after the softmax, so they no longer "
        "sum to 1; divide the logits before it: softmax(x / temperature).",
        lambda x, t: _t.ref_softmax(x) / t)
    yield Mistake(
        "{name} divides by the temperature squared; divide by the temperature itself.",
        lambda x, t: _t.ref_softmax(x / t**2))
    yield Mistake(
        "{name} is not numerically stable: for {case}, x / temperature is large and exp "
        "overflows to inf (giving nan). Compute z = x / temperature, then subtract each row's "
        "maximum before exponentiating: np.exp(z - np.max(z, axis=-1, keepdims=True)).",
        lambda x, t: _plain_softmax(x / t, stable=False))


def _temperature_cases(hidden: bool):
    if not hidden:
        rng = _t.default_rng(2)
        return [
            Case((_normal(rng, 3, 6), 0.5), ("x", "temperature")),
            Case((_normal(rng, 2, 5), 2.0), ("x", "temperature")),
            Case((np.array([[10.0, 9.5, 3.0], [-2.0, 8.0, 8.1]]), 0.01), ("x", "temperature"),
                 "A low temperature makes x / temperature large (here up to 1000)."),
        ]
    rng = _t.default_rng(103)
    return [
        Case((_normal(rng, 4), 1.0), ("x", "temperature"),
             "With temperature 1 the result is plain softmax(x)."),
        Case((_normal(rng, 2, 7, scale=5.0) + 12.0, 0.01), ("x", "temperature"),
             "A low temperature makes x / temperature large (about 1000)."),
        Case((_normal(rng, 2, 3, 4), 10.0), ("x", "temperature")),
        Case((_normal(rng, 3, 5, dtype=np.float32), 0.7), ("x", "temperature"),
             "x is float32 here."),
        Case((_normal(rng, 6), 100.0), ("x", "temperature"),
             "A high temperature makes the distribution nearly uniform."),
    ]


def check_softmax_temperature(softmax_with_temperature, hidden: bool = False,
                              backend: str = "auto") -> None:
    """softmax_with_temperature(x, temperature) = softmax(x / temperature) over the last axis."""
    spec = Spec("softmax_with_temperature", _reference_temperature, _temperature_mistakes)
    _run(spec, softmax_with_temperature, _temperature_cases(hidden), backend)


# --- causal mask --------------------------------------------------------------------------------


def _tri(seq, keep):
    i = np.arange(seq)[:, None]
    j = np.arange(seq)[None, :]
    return keep(i, j)


def _mask_mistakes(seq):
    yield Mistake(
        "{name} is transposed: it lets each position see the future (for {case}, the True "
        "entries sit above the diagonal). Row i is query i and may attend keys j <= i, so the "
        "True entries belong on and below the diagonal: np.tril(np.ones((seq, seq), dtype=bool)).",
        lambda s: _tri(s, lambda i, j: j >= i))
    yield Mistake(
        "{name} is off by one: it lets each position see one step into the future (key i + 1). "
        "Query i may attend keys j <= i only: np.tril(..., k=0), not k=1.",
        lambda s: _tri(s, lambda i, j: j <= i + 1))
    yield Mistake(
        "{name} marks the blocked positions with True; in this course True means 'may attend'. "
        "Flip it: query i may attend keys j <= i.",
        lambda s: _tri(s, lambda i, j: j > i))
    yield Mistake(
        "{name} blocks the diagonal: a position may attend to itself (j <= i, not j < i). Use "
        "np.tril(..., k=0), not k=-1.",
        lambda s: _tri(s, lambda i, j: j < i))
    yield Mistake(
        "{name} allows everything: it must block the future, keys j > i of query i.",
        lambda s: np.ones((s, s), dtype=bool))


def _mask_cases(hidden: bool):
    seqs = (2, 9, 17, 3) if hidden else (4, 1, 6)
    return [Case((s,), ("seq",)) for s in seqs]


def check_causal_mask(causal_mask, hidden: bool = False, backend: str = "auto") -> None:
    """causal_mask(seq) -> bool (seq, seq), True where query i may attend key j (j <= i)."""
    spec = Spec("causal_mask", _t.ref_causal_mask, _mask_mistakes, out="bool")
    _run(spec, causal_mask, _mask_cases(hidden), backend)


# --- masked scaled dot-product attention --------------------------------------------------------


def _reference_attention(q, k, v, mask=None):
    return _t.ref_attention(q, k, v, mask=mask)


def _attention_mistakes(q, k, v, mask=None):
    d_head = q.shape[-1]
    variant = partial(partial, _attention_variant)  # variant(**knobs) -> fn(q, k, v, mask)
    yield Mistake(
        f"{{name}} does not scale the scores: divide q @ k^T by sqrt(d_head) = sqrt({d_head}) "
        "before the softmax.",
        variant(divide_by=1.0))
    yield Mistake(
        f"{{name}} divides the scores by d_head = {d_head} instead of sqrt(d_head).",
        variant(divide_by=d_head))
    if q.shape[0] != d_head:
        yield Mistake(
            f"{{name}} divides by sqrt(q.shape[0]) = sqrt({q.shape[0]}) (len(q)) instead of "
            f"sqrt(d_head) = sqrt(q.shape[-1]) = sqrt({d_head}).",
            variant(divide_by=math.sqrt(q.shape[0])))
    if mask is not None:
        yield Mistake(
            "{name} sets the blocked scores to 0 instead of -inf: exp(0) = 1, so blocked keys "
            "still get weight. Use np.where(mask, scores, -np.inf) before the softmax.",
            variant(masking="zero"))
        yield Mistake(
            "{name} masks after the softmax instead of before: zeroing blocked weights leaves "
            "rows that no longer sum to 1. Set blocked scores to -inf BEFORE the softmax, "
            "so exp(-inf) = 0 and the allowed weights share the whole probability.",
            variant(masking="after"))
        yield Mistake(
            "{name} applies the mask after the softmax (putting -inf into the weights), which "
            "turns the output into inf/nan. Set blocked SCORES to -inf before the softmax.",
            variant(masking="after -inf"))
        yield Mistake(
            "{name} ignores the mask: blocked keys still get weight. Set scores to -inf where "
            "mask is False: np.where(mask, scores, -np.inf).",
            variant(masking="none"))
        yield Mistake(
            "{name} treats True in the mask as 'blocked'; in this course True means 'may "
            "attend'. Keep the scores where mask is True: np.where(mask, scores, -np.inf).",
            variant(masking="inverted"))
        yield Mistake(
            "{name} uses the mask transposed (mask[j, i] for query i and key j), which lets a "
            "position see the future under a causal mask. Row i of the mask belongs to query i: "
            "np.where(mask, scores, -np.inf) with scores of shape (..., seq_q, seq_k).",
            variant(masking="transposed"))
        yield Mistake(
            "{name} gives nan for a query whose mask row is all False (a fully masked row: it may "
            "attend to nothing). Every score in that row is -inf, so the softmax computes "
            "0 / 0. Such a row's weights, and so its output, must be all zeros: e.g. replace the "
            "row max by 0 where it is -inf, and divide by 1 where the row sum is 0.",
            variant(guard=False))
        yield Mistake(
            "{name} returns the average of all values for a query whose mask row is all False "
            "(a fully masked row): that is what a large negative number like -1e9 instead of "
            "-inf gives. A query that may attend to nothing must get all-zero weights and an "
            "all-zero output; use -inf and handle the empty row.",
            variant(masking="-1e9"))
    yield Mistake(
        "{name} uses a softmax that is not numerically stable: for {case} the scores are large, "
        "exp overflows to inf and the output becomes nan. Subtract each row's maximum score "
        "before exponentiating.",
        variant(stable=False))
    yield Mistake(
        "{name} normalizes the weights over the queries (axis -2) instead of over the keys (the "
        "last axis): each query's weights must sum to 1. Use axis=-1 in the softmax.",
        variant(axis=-2))
    yield Mistake(
        "{name} computes the scores as k q^T, so rows belong to keys; they must be "
        "q @ np.swapaxes(k, -1, -2), of shape (..., seq_q, seq_k).",
        variant(transpose_scores=True))


def _empty_row_mask(rng, batch, seq_q, seq_k):
    mask = rng.random((batch, seq_q, seq_k)) < 0.6
    mask[..., 0] = True  # every row may attend to something ...
    mask[0, 1, :] = False  # ... except query 1 of the first sequence
    return mask


def _attention_cases(hidden: bool):
    causal_note = "mask is the causal mask here: query i may attend keys 0..i."
    if not hidden:
        rng = _t.default_rng(3)
        return [
            Case((_normal(rng, 4, 8), _normal(rng, 4, 8), _normal(rng, 4, 6)), ("q", "k", "v")),
            Case((_normal(rng, 5, 8), _normal(rng, 5, 8), _normal(rng, 5, 8),
                  _t.ref_causal_mask(5)), ("q", "k", "v", "mask"), causal_note),
            Case((_normal(rng, 2, 4, 8), _normal(rng, 2, 4, 8), _normal(rng, 2, 4, 8),
                  _empty_row_mask(rng, 2, 4, 4)), ("q", "k", "v", "mask"),
                 "mask[0, 1] is all False: that query may attend to nothing, so its output row "
                 "must be all zeros (not nan)."),
        ]
    rng = _t.default_rng(104)
    padding = np.ones((2, 1, 1, 5), dtype=bool)
    padding[1, ..., 3:] = False  # the second sequence is 3 tokens long plus 2 of padding
    return [
        Case((_normal(rng, 3, 8), _normal(rng, 6, 8), _normal(rng, 6, 5), _t.ref_causal_mask(3, 6)),
             ("q", "k", "v", "mask"),
             "seq_q = 3 < seq_k = 6 here, as with a KV cache; the mask is given to you."),
        Case((_normal(rng, 2, 3, 5, 4), _normal(rng, 2, 3, 5, 4), _normal(rng, 2, 3, 5, 4),
              padding), ("q", "k", "v", "mask"),
             "mask has shape (2, 1, 1, 5) and must broadcast over heads and queries."),
        Case((_normal(rng, 2, 5, 8, dtype=np.float32), _normal(rng, 2, 5, 8, dtype=np.float32),
              _normal(rng, 2, 5, 8, dtype=np.float32), _t.ref_causal_mask(5)),
             ("q", "k", "v", "mask"), "q, k and v are float32 here."),
        Case((_normal(rng, 6, 8, scale=30.0), _normal(rng, 6, 8, scale=30.0), _normal(rng, 6, 8),
              _t.ref_causal_mask(6)), ("q", "k", "v", "mask"),
             "The scores here are large (hundreds): subtract each row's max before exp."),
        Case((_normal(rng, 3, 4), _normal(rng, 3, 4), _normal(rng, 3, 4),
              np.zeros((3, 3), dtype=bool)), ("q", "k", "v", "mask"),
             "Every entry of mask is False: every output row must be all zeros."),
        Case((_normal(rng, 1, 4), _normal(rng, 1, 4), _normal(rng, 1, 4),
              np.ones((1, 1), dtype=bool)), ("q", "k", "v", "mask")),
        Case((_normal(rng, 3, 6, 8), _normal(rng, 3, 6, 8), _normal(rng, 3, 6, 2),
              _empty_row_mask(rng, 3, 6, 6)), ("q", "k", "v", "mask"),
             "mask[0, 1] is all False: that query's output row must be all zeros."),
    ]


def check_attention(attention, hidden: bool = False, backend: str = "auto") -> None:
    """attention(q, k, v, mask=None): masked scaled dot-product attention.

    q (..., seq_q, d_head), k (..., seq_k, d_head), v (..., seq_k, d_v), mask bool broadcastable
    to (..., seq_q, seq_k) (True = may attend) -> (..., seq_q, d_v); fully masked rows give zeros.
    Called as attention(q, k, v) without a mask and attention(q, k, v, mask) with one.
    NumPy or torch functions are both accepted.
    """
    spec = Spec("attention", _reference_attention, _attention_mistakes)
    _run(spec, attention, _attention_cases(hidden), backend)


# --- layer norm ---------------------------------------------------------------------------------


def _layer_norm_mistakes(x, gamma, beta):
    variant = partial(partial, _layer_norm_variant)
    yield Mistake(
        "{name} uses the unbiased variance (dividing by d_model - 1, like np.var(..., ddof=1) or "
        "torch.var's default). Layer norm divides by d_model: np.var(x, axis=-1, keepdims=True) "
        "(torch: unbiased=False).",
        variant(ddof=1))
    yield Mistake(
        "{name} puts eps outside the square root: (x - mean) / (sqrt(var) + eps). It belongs "
        "inside: (x - mean) / sqrt(var + eps).",
        variant(eps_outside=True))
    for eps in (0.0, 1e-12, 1e-8, 1e-6, 1e-3):
        yield Mistake(
            f"{{name}} uses eps = {eps:g}; use the eps argument, 1e-5 by default, inside the "
            "square root: sqrt(var + eps).",
            variant(eps=eps))
    yield Mistake(
        "{name} does not subtract the mean: x_hat = (x - mean) / sqrt(var + eps).",
        variant(center=False))
    yield Mistake(
        "{name} uses the mean of x**2 as the variance; the variance is the mean of "
        "(x - mean)**2.",
        variant(raw_second_moment=True))
    for axis in range(-x.ndim, -1):
        yield Mistake(
            f"{{name}} normalizes along axis {axis} instead of the last axis: each vector "
            "x[..., :] (one position's d_model features) gets its own mean and variance. Use "
            "axis=-1, keepdims=True.",
            variant(axis=axis))
    yield Mistake(
        "{name} forgets to scale by gamma: return x_hat * gamma + beta.",
        variant(use_gamma=False))
    yield Mistake(
        "{name} forgets to add beta: return x_hat * gamma + beta.",
        variant(use_beta=False))
    yield Mistake(
        "{name} swaps gamma and beta: gamma scales, beta shifts (x_hat * gamma + beta).",
        variant(swap=True))


def _ln_args(rng, *shape, scale=2.0, shift=1.0, dtype=np.float64):
    d = shape[-1]
    x = _normal(rng, *shape, scale=scale, dtype=dtype) + shift
    gamma = (1.0 + 0.3 * rng.normal(size=d)).astype(dtype)
    beta = (0.5 * rng.normal(size=d)).astype(dtype)
    return x, gamma, beta


def _layer_norm_cases(hidden: bool):
    names = ("x", "gamma", "beta")
    if not hidden:
        rng = _t.default_rng(4)
        return [
            Case(_ln_args(rng, 4, 8), names),
            Case(_ln_args(rng, 2, 3, 6), names, "x is (batch, seq, d_model) = (2, 3, 6) here."),
            Case(_ln_args(rng, 3, 8, scale=1e-3, shift=0.0), names,
                 "The rows here have a tiny variance (about 1e-6), so where eps goes matters."),
        ]
    rng = _t.default_rng(105)
    constant = _ln_args(rng, 2, 5)
    constant[0][0] = 3.0  # first row constant: variance 0
    return [
        Case(constant, names, "x[0] is constant: its variance is 0 and eps keeps it finite."),
        Case(_ln_args(rng, 5, 16, dtype=np.float32), names, "x is float32 here."),
        Case(_ln_args(rng, 3, 2), names),
        Case(_ln_args(rng, 4, 10, scale=1e3, shift=-50.0), names),
        Case(_ln_args(rng, 2, 2, 3, 8), names),
    ]


def check_layer_norm(layer_norm, hidden: bool = False, backend: str = "auto") -> None:
    """layer_norm(x, gamma, beta) over the last axis, biased variance, eps=1e-5 inside the sqrt;
    x (..., d_model), gamma and beta (d_model,)."""
    spec = Spec("layer_norm", _t.ref_layer_norm, _layer_norm_mistakes)
    _run(spec, layer_norm, _layer_norm_cases(hidden), backend)


# --- GELU ---------------------------------------------------------------------------------------


_SQRT_2_OVER_PI = math.sqrt(2.0 / math.pi)


def _gelu_tanh(x, c=0.044715, k=_SQRT_2_OVER_PI, half=0.5, power=3):
    return half * x * (1.0 + np.tanh(k * (x + c * x**power)))


def _gelu_mistakes(x):
    exact = np.frompyfunc(lambda z: 0.5 * z * (1.0 + _t.erf(z / math.sqrt(2.0))), 1, 1)
    yield Mistake(
        "{name} computes the exact GELU, x * Phi(x) with erf; the course (like GPT-2) uses the "
        "tanh approximation 0.5 x (1 + tanh(sqrt(2/pi) (x + 0.044715 x^3))).",
        lambda x: exact(x).astype(np.float64))
    yield Mistake(
        "{name} computes a ReLU, max(x, 0); GELU is 0.5 x (1 + tanh(sqrt(2/pi) (x + 0.044715 "
        "x^3))), smooth and slightly negative for small negative x.",
        lambda x: np.maximum(x, 0.0))
    yield Mistake(
        "{name} uses the sigmoid approximation x * sigmoid(1.702 x); use the tanh form "
        "0.5 x (1 + tanh(sqrt(2/pi) (x + 0.044715 x^3))).",
        lambda x: x / (1.0 + np.exp(-1.702 * x)))
    yield Mistake("{name} is missing the factor 0.5 in front: 0.5 x (1 + tanh(...)).",
                  partial(_gelu_tanh, half=1.0))
    yield Mistake("{name} uses sqrt(2 pi); the constant is sqrt(2 / pi) (about 0.7979).",
                  partial(_gelu_tanh, k=math.sqrt(2.0 * math.pi)))
    yield Mistake("{name} leaves out the cubic term: tanh(sqrt(2/pi) (x + 0.044715 x^3)).",
                  partial(_gelu_tanh, c=0.0))
    yield Mistake("{name} uses x^2 in the cubic term; it is 0.044715 x^3.",
                  partial(_gelu_tanh, power=2))
    for c in (0.44715, 0.0044715):
        yield Mistake(f"{{name}} uses the coefficient {c}; it is 0.044715.",
                      partial(_gelu_tanh, c=c))


def _gelu_cases(hidden: bool):
    if not hidden:
        rng = _t.default_rng(5)
        return [Case((np.linspace(-5.0, 5.0, 21),), ("x",)),
                Case((_normal(rng, 3, 7, scale=2.0),), ("x",))]
    rng = _t.default_rng(106)
    return [Case((_normal(rng, 4, 5, scale=3.0, dtype=np.float32),), ("x",), "x is float32 here."),
            Case((np.linspace(-30.0, 30.0, 13),), ("x",), "Large |x|: GELU(x) is about x or 0."),
            Case((_normal(rng, 2, 3, 4),), ("x",))]


def check_gelu(gelu, hidden: bool = False, backend: str = "auto") -> None:
    """gelu(x) = 0.5 x (1 + tanh(sqrt(2/pi) (x + 0.044715 x^3))), elementwise."""
    spec = Spec("gelu", _t.ref_gelu, _gelu_mistakes)
    _run(spec, gelu, _gelu_cases(hidden), backend)


# --- multi-head attention -----------------------------------------------------------------------


def _mha_mistakes(x, w_qkv, b_qkv, w_out, b_out, n_head):
    d_model = x.shape[-1]
    d_head = d_model // n_head
    variant = partial(partial, _mha_variant)
    yield Mistake(
        f"{{name}} divides the scores by sqrt(d_model) = sqrt({d_model}) instead of sqrt(d_head) "
        f"= sqrt({d_head}): each head works in d_head = d_model / n_head dimensions.",
        variant(scale="d_model"))
    yield Mistake(
        f"{{name}} does not scale the scores: divide each head's q @ k^T by sqrt(d_head) = "
        f"sqrt({d_head}).",
        variant(scale="none"))
    yield Mistake(
        "{name} is not causal: it lets a position see the future. A decoder's self-attention "
        "masks keys j > i for query i (causal mask, -inf before the softmax).",
        variant(causal="none"))
    yield Mistake(
        "{name} uses the causal mask transposed, so each position sees the future instead of the "
        "past: query i may attend keys j <= i.",
        variant(causal="transposed"))
    for order in permutations(range(3)):
        if order != (0, 1, 2):
            used = ", ".join("QKV"[i] for i in order)
            yield Mistake(
                f"{{name}} takes q, k, v from the wrong columns of w_qkv (it used [{used}]): the "
                "columns are [Q | K | V], so q = qkv[..., :d_model], k = qkv[..., d_model:"
                "2*d_model], v = qkv[..., 2*d_model:].",
                variant(order=order))
    yield Mistake(
        "{name} splits the heads with a plain reshape to (..., n_head, seq, d_head), which mixes "
        "positions and features. Reshape to (..., seq, n_head, d_head), then swap the seq and "
        "n_head axes.",
        variant(split_ok=False))
    yield Mistake(
        "{name} merges the heads with a plain reshape from (..., n_head, seq, d_head), which mixes "
        "positions. Swap the n_head and seq axes first, then reshape to (..., seq, d_model).",
        variant(merge_ok=False))
    yield Mistake("{name} leaves out the output projection: end with out @ w_out + b_out.",
                  variant(out_proj=False))
    yield Mistake("{name} leaves out the bias b_qkv: qkv = x @ w_qkv + b_qkv.",
                  variant(qkv_bias=False))
    yield Mistake("{name} leaves out the bias b_out: out @ w_out + b_out.",
                  variant(out_bias=False))


def _mha_args(rng, shape, n_head, dtype=np.float64):
    d = shape[-1]
    return (_normal(rng, *shape, dtype=dtype), _normal(rng, d, 3 * d, scale=0.4, dtype=dtype),
            _normal(rng, 3 * d, scale=0.1, dtype=dtype), _normal(rng, d, d, scale=0.3, dtype=dtype),
            _normal(rng, d, scale=0.1, dtype=dtype), n_head)


def _mha_cases(hidden: bool):
    names = ("x", "w_qkv", "b_qkv", "w_out", "b_out", "n_head")
    if not hidden:
        rng = _t.default_rng(6)
        return [Case(_mha_args(rng, (5, 12), 3), names),
                Case(_mha_args(rng, (2, 6, 8), 2), names, "x is (batch, seq, d_model) here.")]
    rng = _t.default_rng(107)
    return [Case(_mha_args(rng, (4, 16), 4), names),
            Case(_mha_args(rng, (3, 8), 1), names, "n_head = 1: one head of size d_model."),
            Case(_mha_args(rng, (2, 5, 12), 3, dtype=np.float32), names, "x is float32 here."),
            Case(_mha_args(rng, (1, 8), 2), names, "seq = 1 here.")]


def check_multi_head_attention(multi_head_attention, hidden: bool = False,
                               backend: str = "auto") -> None:
    """multi_head_attention(x, w_qkv, b_qkv, w_out, b_out, n_head): causal self-attention.

    x (..., seq, d_model); w_qkv (d_model, 3*d_model) with columns [Q | K | V]; b_qkv
    (3*d_model,); w_out (d_model, d_model); b_out (d_model,) -> (..., seq, d_model).
    """
    spec = Spec("multi_head_attention", _t.ref_multi_head_attention, _mha_mistakes,
                tol32="float32_model")
    _run(spec, multi_head_attention, _mha_cases(hidden), backend)


# --- decoder block ------------------------------------------------------------------------------


def _block_mistakes(x, params, n_head):
    variant = partial(partial, _block_variant)
    yield Mistake(
        "{name} is missing the residual connection around the attention: the first half of the "
        "block is x = x + attention(ln_1(x)), adding to x rather than replacing it.",
        variant(attn_residual=False))
    yield Mistake(
        "{name} is missing the residual connection around the MLP: the second half of the block "
        "is x = x + mlp(ln_2(x)), adding to x rather than replacing it.",
        variant(mlp_residual=False))
    yield Mistake(
        "{name} is missing both residual connections: x = x + attention(ln_1(x)), then "
        "x = x + mlp(ln_2(x)).",
        variant(attn_residual=False, mlp_residual=False))
    yield Mistake(
        "{name} is a post-LN block (layer norm after the residual add); this course uses pre-LN, "
        "like GPT-2: x = x + attention(ln_1(x)), then x = x + mlp(ln_2(x)).",
        variant(norm="post"))
    yield Mistake(
        "{name} normalizes the residual stream itself (x = ln_1(x), then x = x + attention(x)). "
        "Only the sublayer's input is normalized: x = x + attention(ln_1(x)).",
        variant(norm="stream"))
    yield Mistake(
        "{name} leaves out the layer norms: x = x + attention(ln_1(x)), then "
        "x = x + mlp(ln_2(x)).",
        variant(norm="none"))
    yield Mistake(
        "{name} swaps the two layer norms: ln_1 (ln1_gamma, ln1_beta) goes before the attention, "
        "ln_2 before the MLP.",
        variant(swap_norms=True))
    yield Mistake(
        "{name} runs the MLP before the attention; the attention comes first.",
        variant(mlp_first=True))
    yield Mistake(
        "{name} does not use a causal mask in the attention, so a position sees the future.",
        variant(causal=False))


def _block_args(rng, shape, n_head, dtype=np.float64):
    d = shape[-1]

    def w(*s, scale=0.2):
        return _normal(rng, *s, scale=scale, dtype=dtype)

    params = dict(ln1_gamma=1.0 + w(d, scale=0.1), ln1_beta=w(d, scale=0.1),
                  w_qkv=w(d, 3 * d, scale=0.3), b_qkv=w(3 * d, scale=0.05),
                  w_out=w(d, d), b_out=w(d, scale=0.05),
                  ln2_gamma=1.0 + w(d, scale=0.1), ln2_beta=w(d, scale=0.1),
                  w_fc=w(d, 4 * d), b_fc=w(4 * d, scale=0.05),
                  w_proj=w(4 * d, d), b_proj=w(d, scale=0.05))
    return (_normal(rng, *shape, dtype=dtype), params, n_head)


def _block_cases(hidden: bool):
    names = ("x", "params", "n_head")
    if not hidden:
        rng = _t.default_rng(7)
        return [Case(_block_args(rng, (5, 8), 2), names),
                Case(_block_args(rng, (2, 4, 12), 3), names, "x is (batch, seq, d_model) here.")]
    rng = _t.default_rng(108)
    return [Case(_block_args(rng, (6, 16), 4, dtype=np.float32), names, "x is float32 here."),
            Case(_block_args(rng, (1, 8), 1), names, "seq = 1 and n_head = 1 here."),
            Case(_block_args(rng, (3, 6, 8), 4), names)]


def check_decoder_block(decoder_block, hidden: bool = False, backend: str = "auto") -> None:
    """decoder_block(x, params, n_head): pre-LN block, x + attn(ln_1(x)) then x + mlp(ln_2(x)).

    params holds ln1_gamma ln1_beta w_qkv b_qkv w_out b_out ln2_gamma ln2_beta w_fc b_fc w_proj
    b_proj (the qkv.np layout); x (..., seq, d_model) -> (..., seq, d_model).
    """
    spec = Spec("decoder_block", _t.ref_decoder_block, _block_mistakes, tol32="float32_model")
    _run(spec, decoder_block, _block_cases(hidden), backend)


# --- next-token targets -------------------------------------------------------------------------


def _reference_shift(ids):
    return ids[:-1], ids[1:]


def _shift_mistakes(ids):
    not_shifted = ("{name}'s targets are not shifted by one: the target at position t is the "
                   "NEXT token, ids[t + 1]. Return inputs = ids[:-1] and targets = ids[1:].")
    yield Mistake(not_shifted, lambda ids: (ids, ids))
    yield Mistake(not_shifted, lambda ids: (ids[:-1], ids[:-1]))
    yield Mistake(not_shifted, lambda ids: (ids[1:], ids[1:]))
    yield Mistake(
        "{name} shifted the wrong way: it predicts the PREVIOUS token. The target at position t "
        "is the next token, ids[t + 1]: inputs = ids[:-1], targets = ids[1:].",
        lambda ids: (ids[1:], ids[:-1]))
    yield Mistake(
        "{name} shifted by two; the targets are shifted by one: inputs = ids[:-1], "
        "targets = ids[1:].",
        lambda ids: (ids[:-2], ids[2:]))
    yield Mistake(
        "{name} uses np.roll, which wraps the first token around to the end as the last target. "
        "Drop the last position instead: inputs = ids[:-1], targets = ids[1:].",
        lambda ids: (ids, np.roll(ids, -1)))
    yield Mistake(
        "{name} is not shifted by one correctly: the inputs are ids[:-1] (every token but the "
        "last), the targets ids[1:] (every token but the first).",
        lambda ids: (ids, ids[1:]))


def _shift_cases(hidden: bool):
    if not hidden:
        rng = _t.default_rng(8)
        return [Case((np.array([5, 2, 7, 1, 9, 3]),), ("ids",)),
                Case((rng.integers(0, 50, size=10),), ("ids",))]
    rng = _t.default_rng(109)
    return [Case((np.array([4, 8]),), ("ids",), "With two tokens there is one (input, target)."),
            Case((rng.integers(0, 65, size=33),), ("ids",)),
            Case((rng.integers(0, 1000, size=12).astype(np.int32),), ("ids",),
                 "ids are int32 here.")]


def check_shift_targets(make_targets, hidden: bool = False, backend: str = "auto") -> None:
    """make_targets(ids) -> (inputs, targets) = (ids[:-1], ids[1:]); ids (seq,) integers."""
    spec = Spec("make_targets", _reference_shift, _shift_mistakes, out="int_pair")
    _run(spec, make_targets, _shift_cases(hidden), backend)


# --- cross-entropy ------------------------------------------------------------------------------


def _log_probs(logits):
    m = np.max(logits, axis=-1, keepdims=True)
    return logits - m - np.log(np.sum(np.exp(logits - m), axis=-1, keepdims=True))


def _picked(logp, targets):
    return np.take_along_axis(logp, targets[..., None], axis=-1)[..., 0]


def _ce_mistakes(logits, targets):
    yield Mistake(
        "{name} sums the losses instead of averaging them: return the mean of -log p(target) "
        "over all positions.",
        lambda l, t: -np.sum(_picked(_log_probs(l), t)))
    yield Mistake(
        "{name} is missing the minus sign: the loss is -log p(target), which is >= 0.",
        lambda l, t: np.mean(_picked(_log_probs(l), t)))
    yield Mistake(
        "{name} uses log base 2; cross-entropy here uses the natural log (np.log).",
        lambda l, t: -np.mean(_picked(_log_probs(l), t)) / math.log(2.0))
    yield Mistake(
        "{name} uses log base 10; cross-entropy here uses the natural log (np.log).",
        lambda l, t: -np.mean(_picked(_log_probs(l), t)) / math.log(10.0))
    yield Mistake(
        "{name} is not numerically stable: for {case} the logits are large, exp overflows and the "
        "loss becomes nan or inf. Use log-sum-exp: -log p[t] = logsumexp(logits) - logits[t], "
        "with the row maximum subtracted inside the exp.",
        lambda l, t: -np.mean(np.log(_picked(_plain_softmax(l, stable=False), t))))
    yield Mistake(
        "{name} takes the log of the softmax: for {case} the logits are large, the target's "
        "probability underflows to 0 and log(0) = -inf. Compute the log-probabilities directly "
        "with log-sum-exp: logits - m - log(sum(exp(logits - m))), m the row maximum.",
        lambda l, t: -np.mean(np.log(_picked(_plain_softmax(l), t))))
    yield Mistake(
        "{name} averages -log p over every vocabulary entry; it should pick only the target's: "
        "-log p[i, targets[i]] for each position i, then the mean.",
        lambda l, t: -np.mean(_log_probs(l)))
    yield Mistake(
        "{name} indexes the log-probabilities with [:, targets], which takes every row's entries "
        "for every target (an (n, n) block). Pick one entry per row: "
        "logp[np.arange(n), targets].",
        lambda l, t: -np.mean(_log_probs(l.reshape(-1, l.shape[-1]))[:, t.reshape(-1)]))
    yield Mistake(
        "{name} uses the raw logit of the target instead of its log-probability: apply "
        "log-softmax first (subtract the log-sum-exp of the row).",
        lambda l, t: -np.mean(_picked(l, t)))
    if logits.ndim == 2:
        yield Mistake(
            "{name} applies the softmax over the wrong axis (the positions); normalize over the "
            "vocabulary, the last axis.",
            lambda l, t: -np.mean(_picked(_log_probs(l.T).T, t)))
    if logits.ndim == 3:
        yield Mistake(
            "{name} sums over the sequence and averages over the batch; average over every "
            "position of every sequence.",
            lambda l, t: -np.mean(np.sum(_picked(_log_probs(l), t), axis=-1)))


def _ce_args(rng, shape, scale=2.0, dtype=np.float64):
    return (_normal(rng, *shape, scale=scale, dtype=dtype),
            rng.integers(0, shape[-1], size=shape[:-1]))


def _ce_cases(hidden: bool):
    names = ("logits", "targets")
    if not hidden:
        rng = _t.default_rng(9)
        return [Case(_ce_args(rng, (6, 10)), names),
                Case(_ce_args(rng, (2, 4, 7)), names,
                     "logits are (batch, seq, vocab) here: average over every position."),
                Case(_ce_args(rng, (3, 5), scale=1000.0), names,
                     "The logits here are large (hundreds to thousands).")]
    rng = _t.default_rng(110)
    return [Case(_ce_args(rng, (8, 12), dtype=np.float32), names, "logits are float32 here."),
            Case(_ce_args(rng, (5, 2)), names, "vocab = 2 here."),
            Case(_ce_args(rng, (1, 4)), names, "A single position here."),
            Case(_ce_args(rng, (3, 5, 11), scale=300.0), names,
                 "Large logits, (batch, seq, vocab)."),
            Case(_ce_args(rng, (4, 9)), names)]


def check_cross_entropy(cross_entropy, hidden: bool = False, backend: str = "auto") -> None:
    """cross_entropy(logits, targets): mean of -log softmax(logits)[target], stable.

    logits (..., vocab) floats; targets (...) integers -> a single number.
    """
    spec = Spec("cross_entropy", _t.ref_cross_entropy, _ce_mistakes, out="scalar")
    _run(spec, cross_entropy, _ce_cases(hidden), backend)


# ==============================================================================================
# Chapters 1, 2, 3 and 6: tokens, positions, projections, heads, parameter counts, torch
# ==============================================================================================
#
# Most of these checkers use ``_run`` as it is. A few exercises return a Python value rather
# than an array (text, a list of token ids, True/False, a count): ``_run_value`` takes those
# through the same steps (``_call``; a check of what kind of value came back; the comparison
# with the reference; the known mistakes), on exact builtin values instead of arrays.


def _run_value(spec: Spec, fn, cases, whole_run: bool = False) -> None:
    """The body of a checker whose exercise returns a value: ``spec.out`` is a ``_VALUE_KINDS`` key.

    The learner's output is read into an exact builtin (str, tuple of int, bool, int) before it is
    compared, so no learner code (a lying ``__eq__``) runs in the comparison. ``whole_run``: take
    the learner's answers on every case first and name a mistake only if it gives those answers
    on every case (one True/False on one input says little about what was done).
    """
    if not _t.callable_(fn):
        raise AssertionError(f"{spec.name} should be a function, but it is a "
                             f"{_t.type_(fn).__name__}. Define it with `def {spec.name}(...):`.")
    read, norm = _VALUE_KINDS[spec.out]
    learner = _Learner(fn, "numpy")
    with _t.pristine():
        with _t.catch_warnings(), _t.errstate(all="ignore"):
            _t.simplefilter("ignore")
            expected = [norm(spec.reference(*case.args)) for case in cases]
        got = []
        for case, want in zip(cases, expected, strict=True):
            lists = [(n, list(a)) for n, a in zip(case.names, case.args, strict=True)
                     if _t.type_(a) is list]
            out = _call(spec, learner, case)
            for label, before in lists:
                if case.args[case.names.index(label)] != before:
                    raise AssertionError(
                        f"{spec.name} changed its input {label} (a list) when called with "
                        f"{_describe(_Case_before(case, label, before))}. Leave the inputs alone "
                        f"and build a new list instead.")
            got.append(read(spec, out, case))
            if not whole_run and got[-1] != want:
                break
        for i, (case, want, value) in enumerate(zip(cases, expected, got, strict=False)):
            if value != want:
                said = _diagnose_value(spec, cases, expected, got, i, norm, whole_run)
                raise AssertionError(said if said is not None else _with_note(
                    _value_mismatch(spec, value, want, case), case))


def _Case_before(case: Case, label: str, before: list) -> Case:
    """``case`` with one list argument as it was before the learner's function changed it."""
    args = tuple(before if n == label else a for n, a in zip(case.names, case.args, strict=True))
    return Case(args, case.names, case.note)


def _diagnose_value(spec: Spec, cases, expected, got, i: int, norm, whole_run: bool):
    """The first mistake that gives the learner's answer on case ``i`` (on every case if
    ``whole_run``) where the right answer differs."""
    def wrong_value(mistake, args):
        with _t.catch_warnings(), _t.errstate(all="ignore"):
            _t.simplefilter("ignore")
            return norm(mistake.fn(*args))

    case = cases[i]
    for mistake in spec.mistakes(*case.args):
        try:
            wrong = wrong_value(mistake, case.args)
        except Exception:  # a variant that cannot run on this input says nothing
            continue
        if wrong == expected[i] or wrong != got[i]:
            continue
        if whole_run:
            try:
                if any(wrong_value(mistake, c.args) != g for c, g in zip(cases, got, strict=True)):
                    continue
            except Exception:
                continue
        return mistake.says.replace("{name}", spec.name).replace("{case}", _describe(case))
    return None


def _value_mismatch(spec: Spec, got, want, case: Case) -> str:
    """What is wrong with a value answer, in words (the case's note is added by the caller)."""
    where = _describe(case)
    if spec.out == "ids":
        g, w = list(got), list(want)
        text = f"{spec.name} returned {g} for {where}; expected {w}."
        if len(g) != len(w):
            return text + f" That is {len(g)} ids instead of {len(w)}."
        first = next(k for k in range(len(w)) if g[k] != w[k])
        return text + f" The first difference is at position {first}."
    if spec.out == "count":
        return (f"{spec.name} returned {got:,} for {where}, which is not the number of "
                f"parameters. Count every weight matrix and bias vector of the layer.")
    return f"{spec.name} returned {got!r} for {where}; expected {want!r}."


# --- reading a value answer (each raises the AssertionError that says what was expected) --------


def _read_text(spec: Spec, out, case: Case) -> str:
    if _t.type_(out) is str:
        return out
    if (_t.type_(out) is list or _t.type_(out) is tuple) and all(_t.type_(s) is str for s in out):
        raise AssertionError(
            f"{spec.name} returned a {_t.type_(out).__name__} of strings for {_describe(case)}; "
            f"return one string: join the pieces with ''.join(...).")
    raise AssertionError(f"{spec.name} returned {_kind_of_object(out)} for {_describe(case)}; "
                         f"it should return a string (str).")


def _is_integer(v) -> bool:
    return _t.type_(v) is int or _t.isinstance_(v, np.integer)


def _read_ids(spec: Spec, out, case: Case) -> tuple:
    torch = _t.torch_refs()
    if _t.type_(out) is _t.ndarray or (torch is not None and _t.type_(out) is torch.Tensor):
        arr = out if _t.type_(out) is _t.ndarray else torch.numpy(torch.cpu(torch.detach(out)))
        if _t.kind_of(arr) in "iu" and arr.ndim == 1:
            return _t.tuple_(int(v) for v in arr.tolist())
        raise AssertionError(
            f"{spec.name} returned an array of dtype {arr.dtype} and shape {_shape(arr)} for "
            f"{_describe(case)}; it should return the token ids, one integer per token, e.g. "
            f"a list like [4, 3, 5].")
    if _t.type_(out) is list or _t.type_(out) is tuple:
        for v in out:
            if not _is_integer(v):
                shown = repr(v) if _t.type_(v) is str else _kind_of_object(v)
                raise AssertionError(
                    f"{spec.name} returned a {_t.type_(out).__name__} containing {shown} for "
                    f"{_describe(case)}; every entry must be a token id, an integer "
                    f"(the position of the character in itos).")
        return _t.tuple_(int(v) for v in out)
    raise AssertionError(f"{spec.name} returned {_kind_of_object(out)} for {_describe(case)}; it "
                         f"should return a list of token ids (integers).")


def _read_flag(spec: Spec, out, case: Case) -> bool:
    if _t.type_(out) is bool or _t.type_(out) is np.bool_:
        return bool(out)
    torch = _t.torch_refs()
    if _t.type_(out) is _t.ndarray or (torch is not None and _t.type_(out) is torch.Tensor):
        if out.shape == () and out.dtype in (np.bool_, getattr(torch, "bool", None)):
            return bool(out.item())
        raise AssertionError(
            f"{spec.name} returned an array of shape {_shape(out)} for {_describe(case)}; return "
            f"a single True or False for the whole comparison: np.allclose(a, b) (a == b compares "
            f"entry by entry).")
    raise AssertionError(f"{spec.name} returned {_kind_of_object(out)} for {_describe(case)}; it "
                         f"should return True or False.")


def _read_count(spec: Spec, out, case: Case) -> int:
    if _is_integer(out):
        return int(out)
    if _t.type_(out) in (float, _t.float64, _t.float32):
        if math.isfinite(out) and float(out).is_integer():
            return int(out)
        raise AssertionError(f"{spec.name} returned {float(out)!r} for {_describe(case)}, which is "
                             f"not a whole number; a count of parameters is an integer (use // "
                             f"rather than / to divide).")
    raise AssertionError(f"{spec.name} returned {_kind_of_object(out)} for {_describe(case)}; it "
                         f"should return a whole number (an int).")


_VALUE_KINDS = {
    # spec.out: (read the learner's output, normalize a trusted reference or variant output)
    "text": (_read_text, str),
    "ids": (_read_ids, lambda v: _t.tuple_(int(i) for i in v)),
    "flag": (_read_flag, bool),
    "count": (_read_count, int),
}


class _Shown:
    """A function handed to the learner's code that reads as a description in messages."""

    def __init__(self, text: str, fn):
        self.text = text
        self.fn = fn

    def __call__(self, *args):
        return self.fn(*args)

    def __repr__(self):
        return self.text


# --- chapter 1: encode ---------------------------------------------------------------------------

_END = "<end>"


def _vocab(text: str) -> list:
    return [_END] + sorted(set(text))


def _reference_encode(text, itos, add_end=False):
    stoi = {s: i for i, s in enumerate(itos)}
    return [stoi[ch] for ch in text] + ([stoi[_END]] if add_end else [])


def _encode_variant(text, itos, add_end, *, shift=0, end="append", end_id=None, vocab=None,
                    use_ord=False):
    table = vocab if vocab is not None else itos
    stoi = {s: i for i, s in enumerate(table)}
    ids = [ord(ch) if use_ord else stoi[ch] + shift for ch in text]
    eid = stoi[_END] + shift if end_id is None else end_id
    if end == "append" and add_end or end == "always":
        ids = ids + [eid]
    if end == "prepend" and add_end:
        ids = [eid] + ids
    return ids


def _encode_mistakes(text, itos, add_end):
    variant = partial(partial, _encode_variant)
    for shift, word in ((-1, "small"), (1, "large")):
        says = (f"{{name}}'s ids are one too {word}: the id of a character is its position in "
                "itos, and itos[0] is '<end>', so the first character has id 1. Build "
                "stoi = {s: i for i, s in enumerate(itos)} and use stoi[ch].")
        for end_id in (None, 0, len(itos) - 1, len(itos), -1):
            yield Mistake(says, variant(shift=shift, end_id=end_id))
    yield Mistake(
        "{name} does not append the end token when add_end=True: end the list with the id of "
        "'<end>', which is 0.", variant(end="never"))
    yield Mistake(
        "{name} appends the end token even when add_end=False; only add it when add_end is True.",
        variant(end="always"))
    yield Mistake(
        "{name} puts the end token first; it marks the END of the text, so append it.",
        variant(end="prepend"))
    for end_id in (len(itos) - 1, len(itos), -1, 1):
        yield Mistake(
            f"{{name}} gives the end token the id {end_id}; its id is its position in itos, 0.",
            variant(end_id=end_id))
    yield Mistake(
        "{name} builds its own vocabulary from the text it encodes ([<end>] + sorted(set(text))). "
        "Use the itos it is given: ids must mean the same token whatever the text.",
        variant(vocab=_vocab(text)))
    yield Mistake(
        "{name} uses ord(ch), the character's Unicode number; a token id is the character's "
        "position in itos.", variant(use_ord=True))


_HELLO = "hello world"
_BOOK_CORPUS = "the sun is warm.\nthe sea is cold.\nwe swim in the sea at noon.\n"


def _encode_cases(hidden: bool):
    names = ("text", "itos", "add_end")
    if not hidden:
        return [Case(("hello", _vocab(_HELLO), False), names),
                Case(("world", _vocab(_HELLO), True), names,
                     "add_end is True here: the ids end with the end token's id."),
                Case(("we swim.", _vocab(_BOOK_CORPUS), True), names)]
    rng = _t.default_rng(111)
    corpus = "a quick brown fox jumps over the lazy dog!\n"
    shuffled = [_END] + [str(c) for c in rng.permutation(sorted(set(corpus)))]
    return [Case(("", _vocab(_HELLO), True), names, "The text is empty here."),
            Case(("", _vocab(_HELLO), False), names, "The text is empty here."),
            Case(("the lazy fox!\n", shuffled, True), names,
                 "itos is not sorted here: use it as it is given."),
            Case(("dog", shuffled, False), names),
            Case(("sea at noon.\nwe swim", _vocab(_BOOK_CORPUS), False), names)]


def check_encode(encode, hidden: bool = False, backend: str = "auto") -> None:
    """encode(text, itos, add_end=False) -> list of ids, itos[id] == the character.

    itos: the vocabulary, a list with itos[0] == '<end>'; add_end appends the end token's id (0).
    """
    spec = Spec("encode", _reference_encode, _encode_mistakes, out="ids")
    _run_value(spec, encode, _encode_cases(hidden))


# --- chapter 1: decode ---------------------------------------------------------------------------


def _reference_decode(ids, itos):
    return "".join(itos[i] for i in ids)


def _decode_mistakes(ids, itos):
    yield Mistake("{name} puts a space between the tokens: join them with ''.join(...), since "
                  "the spaces are tokens of their own.",
                  lambda ids, itos: " ".join(itos[int(i)] for i in ids))
    yield Mistake("{name} drops the end token; show it as '<end>' (itos[0]) like any other token.",
                  lambda ids, itos: "".join(itos[int(i)] for i in ids if int(i) != 0))
    yield Mistake("{name} stops at the first end token; decode every id, the end token "
                  "included (as '<end>').",
                  lambda ids, itos: "".join(itos[int(i)] for i in ids[:_first_end(ids)]))
    for shift in (-1, 1):
        yield Mistake(f"{{name}} is off by one: it uses itos[id {'-' if shift < 0 else '+'} 1]. "
                      "The string of token id is itos[id].",
                      partial(lambda ids, itos, s: "".join(itos[int(i) + s] for i in ids),
                              s=shift))


def _first_end(ids) -> int:
    ids = [int(i) for i in ids]
    return ids.index(0) if 0 in ids else len(ids)


def _decode_cases(hidden: bool):
    names = ("ids", "itos")
    hw, book = _vocab(_HELLO), _vocab(_BOOK_CORPUS)
    if not hidden:
        return [Case(([4, 3, 5, 5, 6], hw), names),
                Case((_reference_encode("lord hello", hw, True), hw), names,
                     "The last id is the end token."),
                Case((_reference_encode("the sea is cold.\n", book), book), names)]
    rng = _t.default_rng(112)
    middle = _reference_encode("we swim", book, True) + _reference_encode("at noon", book, True)
    return [Case(([], hw), names, "ids is empty here: the text is ''."),
            Case((middle, book), names, "There is an end token in the middle here."),
            Case((rng.integers(1, len(book), size=12), book), names,
                 "ids is a NumPy array here."),
            Case(([0], hw), names)]


def check_decode(decode, hidden: bool = False, backend: str = "auto") -> None:
    """decode(ids, itos) -> text: ''.join(itos[i] for i in ids), the end token shown as <end>."""
    spec = Spec("decode", _reference_decode, _decode_mistakes, out="text")
    _run_value(spec, decode, _decode_cases(hidden))


# --- chapter 1: one-hot ---------------------------------------------------------------------------


def _reference_one_hot(ids, vocab_size):
    return np.eye(vocab_size)[ids]


def _one_hot_mistakes(ids, vocab_size):
    eye = partial(np.eye, vocab_size)
    yield Mistake(
        "{name} is transposed: it should have one ROW per token, shape (..., seq, vocab_size), "
        "with the 1 of token t in column t.",
        lambda ids, v: np.swapaxes(np.eye(v)[ids], -1, -2))
    for shift in (-1, 1):
        yield Mistake(
            f"{{name}} puts the 1 one column too far {'left' if shift < 0 else 'right'}: the row "
            "of token id t has its 1 in column t (counting from 0).",
            partial(lambda ids, v, s: eye()[(ids + s) % v], s=shift))
    yield Mistake("{name} sets every entry to 1; only column ids[i] of row i is 1.",
                  lambda ids, v: np.ones(ids.shape + (v,)))


def _one_hot_cases(hidden: bool):
    names = ("ids", "vocab_size")
    if not hidden:
        rng = _t.default_rng(13)
        return [Case((np.array([4, 3, 5, 5, 6]), 9), names,
                     "vocab_size = 9 is larger than the largest id here: the result has "
                     "vocab_size columns."),
                Case((rng.integers(0, 6, size=6), 6), names),
                Case((rng.integers(0, 7, size=(2, 4)), 7), names,
                     "ids is a batch here, (batch, seq) = (2, 4): the result is "
                     "(batch, seq, vocab_size). np.eye(vocab_size)[ids] works for any shape.")]
    rng = _t.default_rng(113)
    return [Case((np.array([0]), 1), names, "A vocabulary of one token."),
            Case((rng.integers(0, 5, size=(3, 2, 4)).astype(np.int32), 5), names,
                 "ids has shape (3, 2, 4) here (and dtype int32)."),
            Case((np.array([2, 2, 2, 0]), 3), names),
            Case((rng.integers(0, 65, size=20), 65), names)]


def check_one_hot(one_hot, hidden: bool = False, backend: str = "auto") -> None:
    """one_hot(ids, vocab_size) -> float (..., seq, vocab_size) with a single 1 per row."""
    spec = Spec("one_hot", _reference_one_hot, _one_hot_mistakes)
    _run(spec, one_hot, _one_hot_cases(hidden), backend)


# --- chapter 1: embed -----------------------------------------------------------------------------


def _embed_mistakes(token_ids, table):
    yield Mistake(
        "{name} picks COLUMNS of the table (table[:, ids] or table.T[ids]): in this course the "
        "table is (vocab, d_model) and token t is ROW t, table[t].",
        lambda ids, t: t.T[ids])
    yield Mistake("{name} returns the result transposed: (seq, d_model), one row per token.",
                  lambda ids, t: np.swapaxes(t[ids], -1, -2))
    for shift in (-1, 1):
        yield Mistake(f"{{name}} is off by one: it uses row id {'-' if shift < 0 else '+'} 1; "
                      "token t is row t of the table.",
                      partial(lambda ids, t, s: t[(ids + s) % t.shape[0]], s=shift))


def _embed_cases(hidden: bool):
    names = ("token_ids", "table")
    if not hidden:
        rng = _t.default_rng(14)
        return [Case((rng.integers(0, 6, size=4), _normal(rng, 6, 6)), names,
                     "vocab = d_model = 6 here, so a transposed table gives no shape error."),
                Case((np.array([4, 3, 5, 5, 6]), _normal(rng, 9, 4)), names,
                     "The table is (vocab, d_model) = (9, 4): token t is row t."),
                Case((rng.integers(0, 7, size=(2, 3)), _normal(rng, 7, 5)), names,
                     "token_ids is a batch here, (batch, seq) = (2, 3): the result is "
                     "(batch, seq, d_model).")]
    rng = _t.default_rng(114)
    return [Case((np.array([0]), _normal(rng, 3, 2)), names),
            Case((rng.integers(0, 11, size=(2, 2, 3)).astype(np.int32),
                  _normal(rng, 11, 4, dtype=np.float32)), names,
                 "The table is float32 and token_ids int32, of shape (2, 2, 3), here."),
            Case((rng.integers(0, 8, size=8), _normal(rng, 8, 8)), names),
            Case((np.array([2, 2, 1, 2]), _normal(rng, 3, 5)), names)]


def check_embed(embed, hidden: bool = False, backend: str = "auto") -> None:
    """embed(token_ids, table) -> table[token_ids]: (..., seq) ids, (vocab, d_model) table."""
    spec = Spec("embed", _t.ref_embed, _embed_mistakes)
    _run(spec, embed, _embed_cases(hidden), backend)


# --- chapter 1: similarity matrix -----------------------------------------------------------------


def _row_norms(t):
    return np.sqrt(np.sum(t * t, axis=-1))


def _reference_similarity(table):
    n = _row_norms(table)
    return (table @ table.T) / (n[:, None] * n[None, :])


def _similarity_mistakes(table):
    yield Mistake(
        "{name} returns the dot products table @ table.T without dividing by the lengths: the "
        "cosine similarity is a . b / (|a| |b|), so divide entry (u, v) by |E[u]| |E[v]|.",
        lambda t: t @ t.T)
    yield Mistake(
        "{name} divides each row of the dot products by one length only; entry (u, v) is "
        "divided by BOTH lengths, |E[u]| |E[v]| (np.outer(norms, norms)).",
        lambda t: (t @ t.T) / _row_norms(t)[:, None])
    yield Mistake(
        "{name} divides each column of the dot products by one length only; entry (u, v) is "
        "divided by BOTH lengths, |E[u]| |E[v]| (np.outer(norms, norms)).",
        lambda t: (t @ t.T) / _row_norms(t)[None, :])
    yield Mistake(
        "{name} divides by the squared lengths; the length is |a| = sqrt(a . a), e.g. "
        "np.linalg.norm(table, axis=1).",
        lambda t: (t @ t.T) / np.outer(_row_norms(t) ** 2, _row_norms(t) ** 2))
    yield Mistake(
        "{name} uses the lengths of the COLUMNS (axis=0); each token is a row, so take the norm "
        "of every row: np.linalg.norm(table, axis=1).",
        lambda t: (t @ t.T) / np.outer(_row_norms(t.T), _row_norms(t.T)))
    yield Mistake(
        "{name} subtracts each row's mean first (that is the correlation, np.corrcoef); the "
        "cosine similarity uses the vectors as they are.",
        lambda t: _reference_similarity(t - np.mean(t, axis=-1, keepdims=True)))


_TOY_TABLE = np.array([[0.9, 0.0, 0.0, 0.1], [0.9, 0.6, 0.0, 0.1], [1.0, 0.0, 0.1, 0.0],
                       [1.0, 0.6, 0.1, 0.0], [0.0, 0.0, 1.0, 0.0], [0.0, 0.6, 1.0, 0.0],
                       [0.1, 0.0, 0.0, 1.0]])


def _similarity_cases(hidden: bool):
    names = ("table",)
    if not hidden:
        rng = _t.default_rng(15)
        return [Case((_TOY_TABLE.copy(),), names,
                     "This is the chapter's hand-made table (cat, cats, dog, dogs, car, cars, "
                     "pear)."),
                Case((_normal(rng, 5, 8),), names),
                Case((_normal(rng, 4, 4, scale=3.0),), names)]
    rng = _t.default_rng(115)
    scaled = _normal(rng, 6, 3) * np.array([[1.0], [10.0], [0.1], [2.0], [5.0], [1.0]])
    return [Case((_normal(rng, 1, 3),), names, "A vocabulary of one token."),
            Case((scaled,), names, "The rows here have very different lengths."),
            Case((_normal(rng, 6, 6, dtype=np.float32),), names, "The table is float32 here."),
            Case((_normal(rng, 10, 16),), names)]


def check_similarity_matrix(similarity_matrix, hidden: bool = False,
                            backend: str = "auto") -> None:
    """similarity_matrix(table) -> (vocab, vocab) cosine similarities of the table's rows."""
    spec = Spec("similarity_matrix", _reference_similarity, _similarity_mistakes)
    _run(spec, similarity_matrix, _similarity_cases(hidden), backend)


# --- chapter 2: sinusoidal positional encoding ----------------------------------------------------


def _pe_table(angle_sin, angle_cos, *, swap=False, halves=False):
    s, c = np.sin(angle_sin), np.cos(angle_cos)
    if swap:
        s, c = c, s
    if halves:
        return np.concatenate([s, c], axis=-1)
    pe = np.empty((s.shape[0], 2 * s.shape[1]))
    pe[:, 0::2], pe[:, 1::2] = s, c
    return pe


def _pe_variant(seq_len, d_model, base, *, exponent="2i", start=0, base_used=None,
                multiply=False, precedence=None, swap=False, halves=False, transpose=False):
    """The sinusoidal table with one knob turned to a known mistake."""
    p = np.arange(seq_len, dtype=np.float64)[:, None] + start  # (seq_len, 1)
    i = np.arange(d_model // 2, dtype=np.float64)[None, :]  # (1, d_model/2): the pair index
    b = base if base_used is None else base_used
    e_sin = {"2i": 2 * i / d_model, "i": i / d_model, "2j": 4 * i / d_model}.get(exponent)
    e_cos = e_sin
    if exponent == "j+1":  # column index for each column: 2i for the sine, 2i+1 for the cosine
        e_sin, e_cos = 2 * i / d_model, (2 * i + 1) / d_model
    if precedence == "base ** 2*i":
        a_sin = a_cos = p / b**2 * i / d_model
    elif precedence == "base ** two_i":
        a_sin = a_cos = p / b ** (2 * i) / d_model
    elif multiply:
        a_sin, a_cos = p * b**e_sin, p * b**e_cos
    else:
        a_sin, a_cos = p / b**e_sin, p / b**e_cos
    pe = _pe_table(a_sin, a_cos, swap=swap, halves=halves)
    return pe.T if transpose else pe


def _pe_mistakes(seq_len, d_model, base):
    variant = partial(partial, _pe_variant)
    yield Mistake(
        "{name} puts the cosine in the even columns and the sine in the odd ones: "
        "PE[p, 2i] = sin(p / base^(2i/d_model)) and PE[p, 2i+1] = cos(the same angle). "
        "(Row 0 must read 0, 1, 0, 1, ...)",
        variant(swap=True))
    yield Mistake(
        "{name} uses the exponent i/d_model with i the pair index; it is 2i/d_model, so the "
        "frequencies run from 1 (i = 0) down to about 1/base (the last pair).",
        variant(exponent="i"))
    yield Mistake(
        "{name} gives each cosine column 2i+1 the exponent (2i+1)/d_model; a sine and its cosine "
        "share one frequency: both columns 2i and 2i+1 use base^(2i/d_model).",
        variant(exponent="j+1"))
    yield Mistake(
        "{name} uses 2j/d_model with j the column index (0, 2, 4, ...). In 2i/d_model, i counts "
        "column PAIRS (0, 1, 2, ...), so column 2i has the exponent 2i/d_model, not 4i/d_model.",
        variant(exponent="2j"))
    yield Mistake(
        "{name} multiplies the position by base^(2i/d_model); divide it: the angle is "
        "p / base^(2i/d_model), so later column pairs turn more slowly.",
        variant(multiply=True))
    yield Mistake(
        "{name} has an operator-precedence slip: base ** 2*i / d_model means "
        "(base ** 2) * i / d_model. Put the exponent in parentheses: base ** (2*i / d_model).",
        variant(precedence="base ** 2*i"))
    yield Mistake(
        "{name} has an operator-precedence slip: base ** two_i / d_model means "
        "(base ** two_i) / d_model. Put the exponent in parentheses: base ** (two_i / d_model).",
        variant(precedence="base ** two_i"))
    if base != 10000.0:
        yield Mistake(
            f"{{name}} ignores its base argument (here base = {base:g}) and uses 10000; "
            "10000.0 is only the default, use base.",
            variant(base_used=10000.0))
    yield Mistake(
        "{name} puts all the sines in the first half of the columns and all the cosines in the "
        "second half; they alternate: even columns sin, odd columns cos "
        "(pe[:, 0::2] = sin(...), pe[:, 1::2] = cos(...)).",
        variant(halves=True))
    yield Mistake(
        "{name} numbers the positions from 1; the first position is p = 0 (row 0 is "
        "0, 1, 0, 1, ...).",
        variant(start=1))
    yield Mistake(
        "{name} returns the table transposed: the shape is (seq_len, d_model), one row per "
        "position.",
        variant(transpose=True))


def _pe_cases(hidden: bool):
    names = ("seq_len", "d_model", "base")
    if not hidden:
        return [Case((6, 8, 10000.0), names),
                Case((50, 16, 10000.0), names),
                Case((5, 4, 500.0), names, "base = 500 here, not 10000.")]
    return [Case((1, 2, 10000.0), names, "One position and one column pair: [[0, 1]]."),
            Case((128, 64, 10000.0), names),
            Case((8, 8, 10000.0), names),
            Case((10, 6, 10.0), names, "base = 10 here.")]


def check_positional_encoding(sinusoidal_positional_encoding, hidden: bool = False,
                              backend: str = "auto") -> None:
    """sinusoidal_positional_encoding(seq_len, d_model, base) -> (seq_len, d_model), float.

    PE[p, 2i] = sin(p / base^(2i/d_model)), PE[p, 2i+1] = cos(p / base^(2i/d_model)).
    """
    spec = Spec("sinusoidal_positional_encoding", _t.ref_positional_encoding, _pe_mistakes)
    _run(spec, sinusoidal_positional_encoding, _pe_cases(hidden), backend)


# --- chapter 2: token vectors plus position vectors -----------------------------------------------


def _reference_add_positions(token_ids, table, positions):
    return _t.ref_embed(token_ids, table) + positions[:token_ids.shape[-1]]


def _add_positions_mistakes(token_ids, table, positions):
    seq = token_ids.shape[-1]
    yield Mistake(
        "{name} looks the position vectors up by token id (positions[token_ids]); they belong "
        "to the positions 0, 1, ..., seq-1: add positions[:seq] (row p to the token at "
        "position p).",
        lambda ids, t, pos: t[ids] + pos[ids])
    yield Mistake("{name} does not add the position vectors: return table[token_ids] + "
                  "positions[:seq].",
                  lambda ids, t, pos: t[ids])
    yield Mistake("{name} starts the positions at 1 (positions[1:seq+1]); the first token is at "
                  "position 0: positions[:seq].",
                  lambda ids, t, pos: t[ids] + pos[1:seq + 1])
    if token_ids.ndim > 1:
        yield Mistake(
            "{name} takes len(token_ids) positions, which for a batch (batch, seq) is the batch "
            "size; the number of positions is seq = token_ids.shape[-1].",
            lambda ids, t, pos: t[ids] + pos[:len(ids)])
    yield Mistake("{name} subtracts the position vectors; add them: table[token_ids] + "
                  "positions[:seq].",
                  lambda ids, t, pos: t[ids] - pos[:seq])


def _add_positions_cases(hidden: bool):
    names = ("token_ids", "table", "positions")
    note = ("positions has one row per position up to the context length (here {n}), more "
            "than this sequence needs: use its first seq rows.")
    if not hidden:
        rng = _t.default_rng(21)
        return [Case((np.array([2, 0, 1, 2]), _normal(rng, 3, 4),
                      _t.ref_positional_encoding(16, 4)), names, note.format(n=16)),
                Case((rng.integers(0, 7, size=(2, 5)), _normal(rng, 7, 8), _normal(rng, 10, 8)),
                     names, "token_ids is a batch here, (batch, seq) = (2, 5), and positions "
                     "a learned table: every sequence gets positions[:seq], with "
                     "seq = token_ids.shape[-1] (len(token_ids) is the batch size).")]
    rng = _t.default_rng(121)
    return [Case((rng.integers(0, 5, size=6), _normal(rng, 5, 6), _normal(rng, 6, 6)), names,
                 "Here seq equals the context length."),
            Case((rng.integers(0, 9, size=(3, 1)).astype(np.int32),
                  _normal(rng, 9, 4, dtype=np.float32),
                  _t.ref_positional_encoding(8, 4).astype(np.float32)), names,
                 "float32 tables and int32 ids of shape (3, 1) here."),
            Case((rng.integers(0, 4, size=(4, 3)), _normal(rng, 4, 2), _normal(rng, 12, 2)),
                 names, "A batch of 4 sequences of 3 tokens.")]


def check_add_positions(add_positions, hidden: bool = False, backend: str = "auto") -> None:
    """add_positions(token_ids, table, positions) = table[token_ids] + positions[:seq].

    token_ids (..., seq); table (vocab, d_model); positions (context, d_model) -> (..., seq,
    d_model).
    """
    spec = Spec("add_positions", _reference_add_positions, _add_positions_mistakes)
    _run(spec, add_positions, _add_positions_cases(hidden), backend)


# --- chapter 2: permutation equivariance ----------------------------------------------------------


def _reference_equivariant(f, x, perm):
    return _t.close(_t.asarray(f(x[perm])), _t.asarray(f(x)[perm]), rtol=1e-5, atol=1e-8)


def _equivariance_mistakes(f, x, perm):
    def close(a, b):
        return _t.close(_t.asarray(a), _t.asarray(b), rtol=1e-5, atol=1e-8)

    yield Mistake(
        "{name} compares f(x[perm]) with f(x) itself. Shuffling the input of an equivariant f "
        "shuffles its output the same way, so compare with the shuffled output: "
        "np.allclose(f(x[perm]), f(x)[perm]).",
        lambda f, x, perm: close(f(x[perm]), f(x)))
    wrong_way = (
        "{name} shuffles the wrong way (it compares f(x[perm]) with f(x)[np.argsort(perm)], or "
        "f(x[perm])[perm] with f(x)): that only works when perm undoes itself, as a swap of two "
        "rows does. Row i of x[perm] is row perm[i] of x, so row i of f(x[perm]) must be row "
        "perm[i] of f(x): compare f(x[perm]) with f(x)[perm].")
    yield Mistake(wrong_way, lambda f, x, perm: close(f(x[perm]), f(x)[np.argsort(perm)]))
    yield Mistake(wrong_way, lambda f, x, perm: close(f(x[perm])[perm], f(x)))
    yield Mistake(
        "{name} compares the floats exactly (== or np.array_equal). Reordering the rows changes "
        "the order of the additions inside f, so equal results can differ in the last digits: "
        "use np.allclose(f(x[perm]), f(x)[perm]).",
        lambda f, x, perm: bool(_t.identical(_t.asarray(f(x[perm])), _t.asarray(f(x)[perm]))))


def _equivariance_functions(rng, d_model: int, seq: int):
    """Functions of x (seq, d_model) built from trusted pieces, each with a plain description."""
    w = _normal(rng, d_model, d_model, scale=1.0 / math.sqrt(d_model))
    w1 = _normal(rng, d_model, 2 * d_model, scale=1.0 / math.sqrt(d_model))
    w2 = _normal(rng, 2 * d_model, d_model, scale=1.0 / math.sqrt(2 * d_model))
    learned = _normal(rng, seq, d_model)
    sinusoid = _t.ref_positional_encoding(seq, d_model)

    def attend(x, causal=False):
        h = x @ w
        return _t.ref_attention(h, h, h, causal=causal)

    ones = np.ones(d_model)
    return {
        "plain": _Shown("attention without positions (queries = keys = values = x @ W)", attend),
        "sinusoid": _Shown("attention with sinusoidal positions added (attention(x + PE))",
                           lambda x: attend(x + sinusoid[:x.shape[0]])),
        "learned": _Shown("attention with learned positions added (attention(x + P))",
                          lambda x: attend(x + learned[:x.shape[0]])),
        "causal": _Shown("causal attention without positions", partial(attend, causal=True)),
        "mlp": _Shown("a feed-forward layer applied to each row (gelu(x @ W1) @ W2)",
                      lambda x: _t.ref_gelu(x @ w1) @ w2),
        "layer_norm": _Shown("layer norm of each row",
                             lambda x: _t.ref_layer_norm(x, ones, 0.0 * ones)),
        "running_mean": _Shown("a running mean over the rows (row i = mean of rows 0..i)",
                               lambda x: np.cumsum(x, axis=0)
                               / np.arange(1, x.shape[0] + 1)[:, None]),
        "reverse": _Shown("reversing the order of the rows", lambda x: x[::-1]),
    }


def _equivariance_cases(hidden: bool):
    names = ("f", "x", "perm")
    if not hidden:
        rng = _t.default_rng(22)
        fs = _equivariance_functions(rng, 8, 6)
        x = _normal(rng, 6, 8)
        perm = np.array([2, 0, 5, 1, 3, 4])
        return [Case((fs["plain"], x, np.arange(6)[::-1].copy()), names,
                     "perm reverses the rows here (like \"dog bites man\" -> \"man bites dog\"); "
                     "attention with no positions and no mask is permutation-equivariant."),
                Case((fs["plain"], x, perm), names,
                     "Attention with no positions and no mask is permutation-equivariant."),
                Case((fs["sinusoid"], x, perm), names,
                     "Once positions are added, shuffling the tokens changes what each one "
                     "sees: the symmetry is broken."),
                Case((fs["mlp"], x, perm), names,
                     "A function that treats every row on its own is equivariant."),
                Case((fs["causal"], x, perm), names,
                     "The causal mask depends on the row numbers, so it breaks the symmetry.")]
    rng = _t.default_rng(122)
    fs = _equivariance_functions(rng, 6, 7)
    x = _normal(rng, 7, 6)
    cycle = np.array([1, 2, 3, 4, 5, 6, 0])
    other = np.array([3, 6, 0, 5, 2, 1, 4])
    return [Case((fs["running_mean"], x, other), names),
            Case((fs["layer_norm"], x, cycle), names),
            Case((fs["learned"], x, other), names),
            Case((fs["plain"], x, cycle), names),
            Case((fs["reverse"], x, other), names),
            Case((fs["plain"], x, other), names),
            Case((fs["sinusoid"], x, cycle), names)]


def check_permutation_equivariance(is_permutation_equivariant, hidden: bool = False,
                                   backend: str = "auto") -> None:
    """is_permutation_equivariant(f, x, perm) -> np.allclose(f(x[perm]), f(x)[perm]).

    f maps (seq, d_model) to (seq, d_model); perm is a permutation of range(seq).
    """
    spec = Spec("is_permutation_equivariant", _reference_equivariant, _equivariance_mistakes,
                out="flag")
    _run_value(spec, is_permutation_equivariant, _equivariance_cases(hidden), whole_run=True)


# --- chapter 3: linear ----------------------------------------------------------------------------


def _linear_mistakes(x, w, b):
    bias = 0.0 if b is None else b
    yield Mistake(
        "{name} applies w transposed (x @ w.T). The weight is stored (d_in, d_out), as in the "
        "math X W, so the product is x @ w.",
        lambda x, w, b: x @ w.T + bias)
    yield Mistake("{name} multiplies in the wrong order (w @ x); the input comes first: x @ w.",
                  lambda x, w, b: w @ x + bias)
    if b is not None:
        yield Mistake("{name} leaves out the bias: return x @ w + b.", lambda x, w, b: x @ w)
        yield Mistake("{name} adds the bias before multiplying ((x + b) @ w); add it to the "
                      "product: x @ w + b.", lambda x, w, b: (x + b) @ w)
        yield Mistake("{name} subtracts the bias; add it: x @ w + b.", lambda x, w, b: x @ w - b)


def _linear_cases(hidden: bool):
    names = ("x", "w", "b")
    if not hidden:
        rng = _t.default_rng(31)
        return [Case((_normal(rng, 4, 4), _normal(rng, 4, 4), _normal(rng, 4)), names),
                Case((_normal(rng, 5, 6), _normal(rng, 6, 3), _normal(rng, 3)), names,
                     "w is stored (d_in, d_out) = (6, 3): the product is x @ w."),
                Case((_normal(rng, 2, 3, 6), _normal(rng, 6, 2), None), names,
                     "b is None here: no bias. x is (batch, seq, d_in) = (2, 3, 6).")]
    rng = _t.default_rng(131)
    return [Case((_normal(rng, 6), _normal(rng, 6, 4), _normal(rng, 4)), names,
                 "x is a single vector of shape (d_in,) = (6,) here."),
            Case((_normal(rng, 3, 5, dtype=np.float32), _normal(rng, 5, 5, dtype=np.float32),
                  None), names, "x and w are float32 and b is None here."),
            Case((_normal(rng, 1, 1), _normal(rng, 1, 1), _normal(rng, 1)), names),
            Case((_normal(rng, 2, 2, 3, 8), _normal(rng, 8, 8), _normal(rng, 8)), names)]


def check_linear(linear, hidden: bool = False, backend: str = "auto") -> None:
    """linear(x, w, b=None) = x @ w + b: x (..., d_in), w (d_in, d_out), b (d_out,) or None."""
    spec = Spec("linear", _t.ref_linear, _linear_mistakes)
    _run(spec, linear, _linear_cases(hidden), backend)


# --- chapter 3: the score table Q K^T -------------------------------------------------------------


def _reference_score_table(x, w_q, w_k):
    return (x @ w_q) @ np.swapaxes(x @ w_k, -1, -2)


def _score_table_mistakes(x, w_q, w_k):
    d_head = w_q.shape[-1]

    def table(a, b):
        return a @ np.swapaxes(b, -1, -2)

    yield Mistake(
        f"{{name}} divides by sqrt(d_head) = sqrt({d_head}). In this chapter the score is the "
        "plain dot product q_i . k_j; chapter 4 adds the scaling.",
        lambda x, wq, wk: table(x @ wq, x @ wk) / math.sqrt(d_head))
    yield Mistake(
        "{name} is transposed (K Q^T, or w_q and w_k swapped): row i belongs to query i, "
        "scores[i, j] = q_i . k_j, so compute Q @ K^T with Q = x @ w_q and K = x @ w_k.",
        lambda x, wq, wk: table(x @ wk, x @ wq))
    yield Mistake(
        "{name} compares the rows of x directly (x @ x^T); project them first: Q = x @ w_q, "
        "K = x @ w_k, then Q @ K^T.",
        lambda x, wq, wk: table(x, x))
    yield Mistake("{name} uses w_q for the keys too (Q @ Q^T); the keys are K = x @ w_k.",
                  lambda x, wq, wk: table(x @ wq, x @ wq))
    yield Mistake("{name} uses w_k for the queries too (K @ K^T); the queries are Q = x @ w_q.",
                  lambda x, wq, wk: table(x @ wk, x @ wk))


def _score_table_cases(hidden: bool):
    names = ("x", "w_q", "w_k")
    batched = ("x is a batch here, (batch, seq, d_model): transpose only the last two axes of K, "
               "with np.swapaxes(K, -1, -2) (K.T reverses every axis).")
    if not hidden:
        rng = _t.default_rng(32)
        return [Case((_normal(rng, 5, 6), _normal(rng, 6, 3), _normal(rng, 6, 3)), names),
                Case((_normal(rng, 2, 4, 6), _normal(rng, 6, 2), _normal(rng, 6, 2)), names,
                     batched)]
    rng = _t.default_rng(132)
    return [Case((_normal(rng, 1, 3), _normal(rng, 3, 1), _normal(rng, 3, 1)), names),
            Case((_normal(rng, 6, 8, dtype=np.float32), _normal(rng, 8, 4, dtype=np.float32),
                  _normal(rng, 8, 4, dtype=np.float32)), names, "Everything is float32 here."),
            Case((_normal(rng, 3, 5, 4), _normal(rng, 4, 4), _normal(rng, 4, 4)), names, batched),
            Case((_normal(rng, 7, 8), _normal(rng, 8, 8), _normal(rng, 8, 8)), names)]


def check_score_table(score_table, hidden: bool = False, backend: str = "auto") -> None:
    """score_table(x, w_q, w_k) = (x @ w_q) @ (x @ w_k)^T, unscaled: (..., seq, seq)."""
    spec = Spec("score_table", _reference_score_table, _score_table_mistakes)
    _run(spec, score_table, _score_table_cases(hidden), backend)


# --- chapter 3: one query, a soft lookup ----------------------------------------------------------


def _reference_soft_lookup(query, keys, values):
    return _t.ref_softmax(keys @ query) @ values


def _soft_lookup_mistakes(query, keys, values):
    d_head = query.shape[-1]
    yield Mistake(
        f"{{name}} divides the scores by sqrt(d_head) = sqrt({d_head}); in this chapter the "
        "weights are softmax(keys @ query), with no scaling (chapter 4 adds it).",
        lambda q, k, v: _t.ref_softmax(k @ q / math.sqrt(d_head)) @ v)
    yield Mistake(
        "{name} returns the value of the best-matching key only, like a dictionary (a hard "
        "lookup). Attention blends ALL the values: weights = softmax(keys @ query), then "
        "weights @ values.",
        lambda q, k, v: v[np.argmax(k @ q)])
    yield Mistake(
        "{name} uses the raw scores as weights; turn them into weights with a softmax first, so "
        "they are positive and sum to 1.",
        lambda q, k, v: (k @ q) @ v)
    yield Mistake(
        "{name} divides the scores by their sum without exponentiating; the weights are "
        "exp(s) / sum(exp(s)).",
        lambda q, k, v: ((k @ q) / np.sum(k @ q)) @ v)
    yield Mistake(
        "{name} blends the keys; the answer is a blend of the VALUES: weights @ values.",
        lambda q, k, v: _t.ref_softmax(k @ q) @ k)
    yield Mistake(
        "{name} returns the weights; return the blend of the values they give: weights @ values.",
        lambda q, k, v: _t.ref_softmax(k @ q))
    yield Mistake(
        "{name} averages all the values equally; weight each value by softmax(keys @ query).",
        lambda q, k, v: np.mean(v, axis=0))


def _soft_lookup_cases(hidden: bool):
    names = ("query", "keys", "values")
    if not hidden:
        rng = _t.default_rng(33)
        keys = np.array([[2.0, 0.0], [1.4, 1.4], [0.0, 2.0], [-2.0, 0.0]])
        return [Case((np.array([2.0, 0.6]), keys, np.array([[100.0], [200.0], [300.0],
                                                             [400.0]])), names,
                     "This is the chapter's example: one query, four keys, one number per value."),
                Case((_normal(rng, 4), _normal(rng, 6, 4), _normal(rng, 6, 3)), names),
                Case((_normal(rng, 3), _normal(rng, 5, 3), _normal(rng, 5, 3)), names)]
    rng = _t.default_rng(133)
    return [Case((_normal(rng, 4), _normal(rng, 1, 4), _normal(rng, 1, 2)), names,
                 "A single key: all the weight goes to it."),
            Case((_normal(rng, 8, dtype=np.float32), _normal(rng, 7, 8, dtype=np.float32),
                  _normal(rng, 7, 8, dtype=np.float32)), names, "Everything is float32 here."),
            Case((_normal(rng, 4, scale=3.0), _normal(rng, 9, 4, scale=3.0), _normal(rng, 9, 5)),
                 names, "The scores here are larger (up to about 40)."),
            Case((_normal(rng, 2), _normal(rng, 3, 2), _normal(rng, 3, 1)), names)]


def check_soft_lookup(soft_lookup, hidden: bool = False, backend: str = "auto") -> None:
    """soft_lookup(query, keys, values) = softmax(keys @ query) @ values (no scaling).

    query (d_head,), keys (seq_k, d_head), values (seq_k, d_v) -> (d_v,).
    """
    spec = Spec("soft_lookup", _reference_soft_lookup, _soft_lookup_mistakes)
    _run(spec, soft_lookup, _soft_lookup_cases(hidden), backend)


# --- chapter 3: a hand-picked W_Q -----------------------------------------------------------------

# The chapter's features and key matrix: a key says what a token IS (person, place, action).
QUERY_FEATURES = ("person", "place", "action", "name")
QUERY_W_K = 2.0 * np.array([[1.0, 0.0, 0.0], [0.0, 1.0, 0.0], [0.0, 0.0, 1.0], [0.0, 0.0, 0.0]])
QUERY_GOAL = {"person": "action", "action": "place", "place": "person"}  # who looks for what
QUERY_MIN_WEIGHT = 0.9

_ROLE = {"person": (1, 0, 0), "place": (0, 1, 0), "action": (0, 0, 1)}
_QUERY_SENTENCES = {  # word: (role, has a name)
    False: [[("jane", "person", 1), ("visits", "action", 0), ("africa", "place", 1)]],
    True: [[("the city", "place", 0), ("welcomes", "action", 0), ("her", "person", 0)],
           [("africa", "place", 1), ("greets", "action", 0), ("bob", "person", 1)],
           [("she", "person", 0), ("visits", "action", 0), ("peru", "place", 1)],
           [("lima", "place", 1), ("tom", "person", 1), ("runs", "action", 0)]],
}


def _sentence_x(sentence) -> np.ndarray:
    return np.array([list(_ROLE[role]) + [float(named)] for _, role, named in sentence],
                    dtype=np.float64)


def _query_weights(w_q, sentence) -> np.ndarray:
    x = _sentence_x(sentence)
    return _t.ref_softmax((x @ w_q) @ (x @ QUERY_W_K).T)  # (T, T): row i = word i's weights


def _read_w_q(name: str, out) -> np.ndarray:
    torch = _t.torch_refs()
    if torch is not None and _t.type_(out) is torch.Tensor:
        out = torch.numpy(torch.cpu(torch.detach(out)))
    if _t.type_(out) is list:
        try:
            out = _t.asarray(out)
        except Exception:
            raise AssertionError(f"{name} returned a list that is not a table of numbers; return "
                                 f"a NumPy array of shape (4, 3).") from None
    if _t.type_(out) is not _t.ndarray:
        raise AssertionError(f"{name} returned {_kind_of_object(out)}; it should return W_Q, a "
                             f"NumPy array of shape (d_model, d_head) = (4, 3).")
    if _t.kind_of(out) not in "iuf":
        raise AssertionError(f"{name} returned an array of dtype {out.dtype}; W_Q holds numbers.")
    if out.shape == (3, 4):
        raise AssertionError(
            f"{name} returned an array of shape (3, 4), W_Q transposed: it is (d_model, d_head) = "
            f"(4, 3), one ROW per feature ({', '.join(QUERY_FEATURES)}) and one column per key "
            f"feature (person, place, action).")
    if out.shape != (4, 3):
        raise AssertionError(f"{name} returned an array of shape {_shape(out)}; W_Q has shape "
                             f"(d_model, d_head) = (4, 3).")
    w_q = _t.asarray(out, dtype=_t.float64)
    if not _t.isfinite(w_q).all():
        raise AssertionError(f"{name} returned a W_Q with inf or nan in it; use ordinary numbers.")
    return w_q


def _query_problem(name: str, w_q, sentence):
    """What is wrong with ``w_q`` on ``sentence``, in words, or None if every word attends well."""
    words = [word for word, _, _ in sentence]
    roles = [role for _, role, _ in sentence]
    weights = _query_weights(w_q, sentence)
    text = " ".join(words)
    self_pick = all(int(np.argmax(weights[i])) == i for i in range(len(words)))
    for i, role in enumerate(roles):
        target = roles.index(QUERY_GOAL[role])
        got = float(weights[i, target])
        if got >= QUERY_MIN_WEIGHT:
            continue
        shown = ", ".join(f"{w} {p:.2f}" for w, p in zip(words, weights[i], strict=True))
        head = (f"In \"{text}\", '{words[i]}' (a {role}) should look at '{words[target]}' (the "
                f"{QUERY_GOAL[role]}) with weight at least {QUERY_MIN_WEIGHT}, but its weights "
                f"are: {shown}.")
        if self_pick:
            return (head + " Every word looks mostly at itself: your W_Q asks for what a word IS "
                    "(like W_K). Row f of W_Q says what a word with feature f LOOKS FOR.")
        if int(np.argmax(weights[i])) == target:
            return (head + " The right word gets the most weight, but not enough: make the "
                    "matching entries of W_Q larger (the softmax picks a clearer winner when "
                    "the scores are further apart).")
        row = QUERY_FEATURES.index(role)
        column = ("person", "place", "action").index(QUERY_GOAL[role])
        named = " (its 'name' feature is 1 too, so row 3 adds to its query)" \
            if sentence[i][2] else ""
        return (head + f" Row {row} of W_Q (the '{role}' feature) decides what a {role} looks "
                f"for{named}; key column {column} means '{QUERY_GOAL[role]}'.")
    return None


def check_query_design(make_w_q, hidden: bool = False, backend: str = "auto") -> None:
    """make_w_q() -> W_Q (4, 3) such that, with the chapter's W_K and no mask, every person looks
    at the action, every action at the place and every place at the person (weight >= 0.9).

    Weights: softmax((X W_Q)(X W_K)^T) over each row, no scaling. X rows: person, place, action,
    name features of each word.
    """
    name = "make_w_q"
    if not _t.callable_(make_w_q):
        raise AssertionError(f"{name} should be a function, but it is a "
                             f"{_t.type_(make_w_q).__name__}. Define it with `def {name}():`.")
    case = Case((), ())
    with _t.pristine():
        out, exc, _ = _attempt(make_w_q, case, "numpy")
        if exc is not None:
            if _t.isinstance_(exc, NotImplementedError):
                raise AssertionError(_raised(name, exc, case, make_w_q)) from exc
            try:
                text = str(exc)
            except Exception:
                text = ""
            raise AssertionError(f"{name} raised {_t.type_(exc).__name__}"
                                 + (f": {text}" if text else "") + ".") from exc
        w_q = _read_w_q(name, out)
        for sentence in _QUERY_SENTENCES[bool(hidden)]:
            problem = _query_problem(name, w_q, sentence)
            if problem is not None:
                raise AssertionError(problem)


# --- chapter 6: split_heads and merge_heads -------------------------------------------------------


def _split_mistakes(x, n_head):
    *lead, seq, d_model = x.shape
    d_head = d_model // n_head
    yield Mistake(
        "{name} reshapes straight to (..., n_head, seq, d_head), which mixes positions and "
        "features. Reshape to (..., seq, n_head, d_head) first, then swap the seq and n_head "
        "axes: np.swapaxes(x, -3, -2).",
        lambda x, n: x.reshape(*lead, n, seq, d_head))
    yield Mistake(
        "{name} deals the columns out one at a time (head h gets columns h, h + n_head, ...). "
        "Head h gets the BLOCK of columns h*d_head to (h+1)*d_head - 1: reshape to "
        "(..., seq, n_head, d_head), then swap the seq and n_head axes.",
        lambda x, n: np.moveaxis(x.reshape(*lead, seq, d_head, n), -1, -3))
    yield Mistake(
        "{name} stops at (..., seq, n_head, d_head); swap the seq and n_head axes to get "
        "(..., n_head, seq, d_head): np.swapaxes(x, -3, -2).",
        lambda x, n: x.reshape(*lead, seq, n, d_head))


def _merge_mistakes(x):
    *lead, n_head, seq, d_head = x.shape
    yield Mistake(
        "{name} reshapes straight from (..., n_head, seq, d_head) to (..., seq, d_model), which "
        "mixes positions. Swap the n_head and seq axes first (np.swapaxes(x, -3, -2)), then "
        "reshape.",
        lambda x: x.reshape(*lead, seq, n_head * d_head))
    yield Mistake(
        "{name} interleaves the heads' columns (head h lands in columns h, h + n_head, ...). "
        "Put them side by side: swap the n_head and seq axes to get (..., seq, n_head, d_head), "
        "then reshape to (..., seq, n_head * d_head).",
        lambda x: np.moveaxis(x, -3, -1).reshape(*lead, seq, n_head * d_head))
    yield Mistake(
        "{name} stops at (..., seq, n_head, d_head); reshape that to (..., seq, n_head * d_head).",
        lambda x: np.swapaxes(x, -3, -2))


_NO_BATCH = ("x has no batch axis here: use np.swapaxes(x, -3, -2), which works for any number "
             "of leading axes (a fixed np.transpose(x, (0, 2, 1, 3)) does not).")


def _split_cases(hidden: bool):
    names = ("x", "n_head")
    if not hidden:
        rng = _t.default_rng(61)
        return [Case((_normal(rng, 5, 12), 3), names, _NO_BATCH),
                Case((_normal(rng, 2, 4, 8), 2), names, "x is (batch, seq, d_model) here."),
                Case((_normal(rng, 2, 3, 6), 3), names)]
    rng = _t.default_rng(161)
    return [Case((_normal(rng, 1, 8), 1), names, "seq = 1 and n_head = 1 here."),
            Case((_normal(rng, 2, 2, 5, 12), 4), names, "x has two leading axes here."),
            Case((_normal(rng, 3, 6, 8, dtype=np.float32), 8), names,
                 "x is float32 and d_head = 1 here."),
            Case((_normal(rng, 4, 16), 4), names, _NO_BATCH)]


def _merge_cases(hidden: bool):
    names = ("x",)
    if not hidden:
        rng = _t.default_rng(62)
        return [Case((_normal(rng, 3, 5, 4),), names, _NO_BATCH),
                Case((_normal(rng, 2, 2, 4, 4),), names,
                     "x is (batch, n_head, seq, d_head) here."),
                Case((_normal(rng, 2, 3, 3, 2),), names)]
    rng = _t.default_rng(162)
    return [Case((_normal(rng, 1, 6, 8),), names, "n_head = 1 here."),
            Case((_normal(rng, 2, 2, 4, 5, 3),), names, "x has two leading axes here."),
            Case((_normal(rng, 8, 3, 1, dtype=np.float32),), names,
                 "x is float32 and d_head = 1 here."),
            Case((_normal(rng, 4, 1, 4),), names, "seq = 1 here.")]


def check_split_heads(split_heads, hidden: bool = False, backend: str = "auto") -> None:
    """split_heads(x, n_head): (..., seq, d_model) -> (..., n_head, seq, d_head)."""
    spec = Spec("split_heads", _t.ref_split_heads, _split_mistakes)
    _run(spec, split_heads, _split_cases(hidden), backend)


def check_merge_heads(merge_heads, hidden: bool = False, backend: str = "auto") -> None:
    """merge_heads(x): (..., n_head, seq, d_head) -> (..., seq, n_head * d_head)."""
    spec = Spec("merge_heads", _t.ref_merge_heads, _merge_mistakes)
    _run(spec, merge_heads, _merge_cases(hidden), backend)


# --- chapter 6: counting the parameters of multi-head attention -----------------------------------


def _reference_mha_count(d_model, n_head, bias):
    return 4 * d_model * d_model + (4 * d_model if bias else 0)


def _mha_count_mistakes(d_model, n_head, bias):
    d, h = d_model, n_head
    d_head = d // h
    b = 4 * d if bias else 0
    yield Mistake(
        "{name} multiplies by n_head. The heads SHARE the d_model columns of W_Q, W_K and W_V "
        "(each head gets d_head = d_model / n_head of them), so the count does not depend on "
        "n_head.",
        lambda *a: h * (4 * d * d + b))
    yield Mistake(
        "{name} multiplies the weight matrices by n_head. The heads SHARE the d_model columns "
        "(d_head = d_model / n_head each), so the count does not depend on n_head.",
        lambda *a: h * 4 * d * d + b)
    yield Mistake(
        "{name} counts each head's matrices as d_head x d_head; head h's W_Q^(h) is "
        "(d_model, d_head), and side by side the heads make one (d_model, d_model) matrix.",
        lambda *a: h * 4 * d_head * d_head + b)
    yield Mistake(
        "{name} leaves out the output projection: w_out is (d_model, d_model)"
        + (" and b_out has d_model entries." if bias else "."),
        lambda *a: 3 * d * d + (3 * d if bias else 0))
    if bias:
        yield Mistake("{name} leaves out the biases: b_qkv has 3*d_model entries and b_out "
                      "d_model.", lambda *a: 4 * d * d)
        yield Mistake("{name} counts b_qkv as d_model numbers; it has one bias per column of "
                      "w_qkv, 3*d_model.", lambda *a: 4 * d * d + 2 * d)
        yield Mistake("{name} leaves out b_out (d_model entries).", lambda *a: 4 * d * d + 3 * d)
        yield Mistake("{name} leaves out b_qkv (3*d_model entries).", lambda *a: 4 * d * d + d)
    else:
        yield Mistake("{name} counts biases although bias=False; then there are only the weight "
                      "matrices.", lambda *a: 4 * d * d + 4 * d)
    yield Mistake(
        "{name} counts w_qkv as d_model x d_model; it holds W_Q, W_K and W_V side by side: "
        "(d_model, 3*d_model).",
        lambda *a: 2 * d * d + b)


def _mha_count_cases(hidden: bool):
    names = ("d_model", "n_head", "bias")
    if not hidden:
        return [Case((12, 3, True), names),
                Case((768, 12, True), names, "These are the sizes of GPT-2 small."),
                Case((768, 12, False), names, "bias = False here: no bias vectors.")]
    return [Case((6144, 64, True), names, "These are the sizes of GPT-NeoX-20B."),
            Case((6144, 64, False), names, "bias = False here."),
            Case((8, 8, True), names, "d_head = 1 here."),
            Case((64, 1, False), names, "A single head here."),
            Case((512, 8, True), names)]


def check_mha_param_count(mha_param_count, hidden: bool = False, backend: str = "auto") -> None:
    """mha_param_count(d_model, n_head, bias) -> parameters of one multi-head attention layer:
    w_qkv (d_model, 3 d_model), w_out (d_model, d_model), plus b_qkv and b_out if bias."""
    spec = Spec("mha_param_count", _reference_mha_count, _mha_count_mistakes, out="count")
    _run_value(spec, mha_param_count, _mha_count_cases(hidden))


# --- chapter 6: multi-head attention in PyTorch, on the GPU when there is one ---------------------


class _OnDevice:
    """The learner's torch function, called with its tensor inputs moved to ``device``.

    Keeps the learner's ``__code__`` so that an untouched exercise is still reported as "not
    implemented yet", and remembers the type and device of every output.
    """

    def __init__(self, fn, device):
        self.fn = fn
        self.device = device
        self.__code__ = getattr(fn, "__code__", None)
        self.returned = []

    def __call__(self, *args):
        torch = _t.torch_refs()
        moved = tuple(a.to(self.device) if _t.type_(a) is torch.Tensor else a for a in args)
        out = self.fn(*moved)
        self.returned.append((_t.type_(out), getattr(out, "device", None)
                              if _t.type_(out) is torch.Tensor else None))
        return out


def check_multi_head_attention_torch(multi_head_attention, hidden: bool = False,
                                     device=None) -> None:
    """multi_head_attention(x, w_qkv, b_qkv, w_out, b_out, n_head) written with torch tensors.

    Same task and mistakes as ``check_multi_head_attention``; the inputs are torch tensors on
    ``device`` (default: "cuda" when torch sees a GPU, else "cpu"), and the result must be a
    tensor on that same device.
    """
    name = getattr(multi_head_attention, "__name__", "")
    name = name if _t.type_(name) is str and name.isidentifier() else "multi_head_attention"
    if not _t.callable_(multi_head_attention):
        raise AssertionError(f"{name} should be a function, but it is a "
                             f"{_t.type_(multi_head_attention).__name__}. Define it with "
                             f"`def {name}(...):`.")
    torch = _t.load_torch()
    if device is None:
        device = "cuda" if torch.module.cuda.is_available() else "cpu"
    device = torch.module.device(device)
    where = f"The inputs are torch tensors on {device} here"
    hint = (f"{where}: make every new tensor (a mask, say) on x.device, e.g. "
            f"torch.ones(seq, seq, dtype=torch.bool, device=x.device).")
    cases = [Case(c.args, c.names, f"{c.note} {hint}" if c.note else hint)
             for c in _mha_cases(hidden)]
    learner = _OnDevice(multi_head_attention, device)
    spec = Spec(name, _t.ref_multi_head_attention, _mha_mistakes, tol32="float32_model")
    _run(spec, learner, cases, backend="torch")
    for kind, on in learner.returned:
        if kind is not torch.Tensor:
            what = "a NumPy array" if kind is _t.ndarray else f"a {kind.__name__}"
            raise AssertionError(f"{name} returned {what}; this part is about PyTorch: compute "
                                 f"with torch operations and return a tensor.")
        if on.type != device.type or (device.index is not None and on.index != device.index):
            raise AssertionError(f"{name} returned a tensor on {on}, but its inputs were on "
                                 f"{device}: results stay on the inputs' device (no .cpu() or "
                                 f".cuda() inside).")
