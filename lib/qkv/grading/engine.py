"""The engine behind every checker: call the learner's function safely, validate, compare, name
the mistake. ``exercise.run`` drives it; the output kinds (``kinds``) pick the steps they need.

1. ``_call``      call the learner's function on a copy of one seeded input: an exception becomes
                  an AssertionError that gives its own message and the input shapes (plus the
                  case's ``on_error`` hint, never its note about values); "not implemented yet"
                  for an untouched exercise; warnings and prints are swallowed; the inputs must
                  come back unchanged.
2. ``_validate``  the output must be a plain ``np.ndarray`` or ``torch.Tensor`` (exact type: a
                  subclass, or an object whose ``__eq__`` always says yes, fails) of the expected
                  kind of dtype.
3. ``_mismatch``  shape, finiteness and values against the reference, with the tolerances of
                  ``qkv.tolerances`` (float64 results: "float64"; float32: the exercise's entry).
4. ``_diagnose``  on a mismatch, compute the catalogued wrong variants on the same input; when
                  the learner's output matches one, say that mistake in plain words. nan or inf
                  in the output is named first; with no catalogued match, the exercise's
                  ``explain`` may say which part differs (``parts``, through a ``Probe``).

``backend``: "auto" calls the function with NumPy arrays and, if that raises while torch is
imported, with torch tensors; "numpy" or "torch" forces one. Either may return an ndarray or a
tensor; references and diagnoses always run in NumPy float64.

Everything that decides pass or fail goes through ``_trusted`` (captured at import) and runs
inside ``_trusted.pristine()``, so a learner who rebinds ``np.allclose`` (or ``np.exp``, or
``qkv.np.softmax``) after the setup cell cannot turn a wrong answer into a pass.
"""

from dataclasses import dataclass

import numpy as np

from . import _trusted as _t

# ==============================================================================================
# The declarations' building blocks, and the array kind's body
# ==============================================================================================


@dataclass(frozen=True)
class Case:
    """One input: the learner's positional arguments (NumPy), their names, and what is special."""

    args: tuple
    names: tuple
    note: str = ""  # said after a generic failure message on this input
    on_error: str = ""  # said after an exception raised on this input (a shape hint, say)


@dataclass(frozen=True)
class Mistake:
    """A known-wrong computation; ``says`` may use {name} (the function) and {case} (the input)."""

    says: str
    fn: object  # called with the case's arguments (NumPy float64); returns the wrong output


@dataclass(frozen=True)
class Spec:
    """What the steps below need to know of an exercise (built by its output kind)."""

    name: str  # the exercise's function name, used in every message
    reference: object  # trusted qkv.np function (or a tiny formula) with the learner's arguments
    mistakes: object  # callable(*args) -> iterable of Mistake
    out: str = "float"  # "float" | "bool" | "scalar" | "int_pair"
    tol32: str = "float32_op"  # TOL entry when the result or an input is float32
    hint: str = ""  # said after a wrong value (the value kind)


class Learner:
    """The learner's function and the backend chosen for it ("auto" is decided on the first
    call: NumPy, or torch when the NumPy call raises)."""

    def __init__(self, fn, backend: str, name: str = ""):
        self.fn = fn
        self.backend = backend
        self.name = name


def run_array(spec: Spec, learner: Learner, cases, explain=None) -> None:
    """The array kind's body (``kinds.Array``): every case against the reference, the first
    difference named.

    ``explain(probe, got, args, case)``, when given, diagnoses by parts a mismatch that no
    catalogued mistake matches (``probe`` calls the learner again; see ``Probe``).
    """
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
            if problem is None:
                continue
            said = _diagnose(spec, got, expected, args, case, tol)
            nonfinite = _nonfinite(spec, got, expected, case)
            if nonfinite is not None:  # nan or inf is said first, whatever else is said
                raise AssertionError(nonfinite + (" " + said if said is not None else ""))
            if said is None and explain is not None:
                part = _explain(explain, learner, got, args, case)
                if part is not None:
                    raise AssertionError(f"{problem} {part}")
            raise AssertionError(said if said is not None else _with_note(problem, case))


def _nonfinite(spec: Spec, got: tuple, expected: tuple, case: Case):
    """'xxx returned nan at index ...' when an output has nan or inf where a finite number is
    expected (None otherwise, or when the shapes differ)."""
    for g, e in zip(got, expected, strict=True):
        if g.shape != e.shape or _t.kind_of(g) != "f" or _t.kind_of(e) != "f":
            continue
        bad = _t.logical_and(_t.logical_not(_t.isfinite(g)), _t.isfinite(e))
        if bad.any():
            idx = _index(bad)
            count = int(bad.sum())
            return (f"{spec.name} returned {float(g[idx])} at {_at(idx)} for {_describe(case)}"
                    + (f" ({count} entries are nan or inf)" if count > 1 else "")
                    + f", where the expected value is {float(e[idx]):.6g}.")
    return None


class Probe:
    """What a diagnosis by parts may do with the learner's function: call it again on other
    inputs (``call``), or call it with one of the helper functions it uses swapped for the
    reference (``swapped``)."""

    def __init__(self, learner: Learner, case: Case):
        self.fn = learner.fn
        self.backend = learner.backend if learner.backend != "auto" else "numpy"
        self.case = case

    def call(self, *args):
        """The learner's output on ``args`` as a float ndarray, or None if it raised."""
        out, exc, _ = _attempt(self.fn, Case(args, self.case.names), self.backend)
        if exc is not None:
            return None
        try:
            return _as_array(Spec("", None, None), out, "", "float", self.case)
        except AssertionError:
            return None

    def swapped(self, name: str, reference, *args):
        """The learner's output on ``args`` with the global ``name`` its code calls replaced by
        ``reference`` (None if its code does not use that name, or raised)."""
        code = getattr(self.fn, "__code__", None)
        space = getattr(self.fn, "__globals__", None)
        if code is None or _t.type_(space) is not dict or name not in code.co_names \
                or name not in space:
            return None
        saved = space[name]
        space[name] = reference
        try:
            return self.call(*args)
        finally:
            space[name] = saved


def _explain(explain, learner: Learner, got: tuple, args: tuple, case: Case):
    """Run an exercise's diagnosis by parts; anything it raises says nothing."""
    try:
        with _t.catch_warnings(), _t.errstate(all="ignore"):
            _t.simplefilter("ignore")
            return explain(Probe(learner, case), got[0], args, case)
    except Exception:
        return None


# --- step 1: call the learner safely ------------------------------------------------------------


def _call(spec: Spec, learner: Learner, case: Case):
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
        if _t.type_(passed) is list:  # the same length and the same elements, as passed
            same = _t.len_(passed) == _t.len_(original) and all(
                a is b or (_t.type_(a) in (int, float, bool, str) and a == b)
                for a, b in zip(passed, original, strict=False))
        else:
            same = _t.identical(passed, original)
        if not same and _t.type_(passed) is list:
            raise AssertionError(
                f"{spec.name} changed its input {label} (a list) when called with "
                f"{_describe(case)} (for example with `{label}.append(...)` or "
                f"`{label}[k] = ...`). Leave the inputs alone and build a new list instead.")
        if not same:
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
    """A fresh copy of one argument (a tensor for the torch backend); remembers array and list
    copies, to tell afterwards whether the learner changed them in place."""
    if _t.type_(value) is _t.ndarray:
        copy = value.copy()
        copies.append((label, value, copy))
        return copy if torch is None else torch.from_numpy(copy)
    if _t.type_(value) is dict:
        return {k: _to_backend(v, f"{label}[{k!r}]", torch, copies) for k, v in value.items()}
    if _t.type_(value) is list:  # a fresh list, checked afterwards like an array
        passed = [_to_backend(v, f"{label}[{i}]", torch, copies) for i, v in enumerate(value)]
        copies.append((label, tuple(passed), passed))
        return passed
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
    # The case's note is left out: it describes what a wrong *value* may mean on this input,
    # and next to an exception it points the wrong way; ``on_error`` is written for exceptions.
    return f"{message} — when called with {_describe(case)}." + (
        f" {case.on_error}" if case.on_error else "")


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
    shape = _shape(expected[0]) if spec.out != "scalar" else None
    got = _as_array(spec, out, "", spec.out, case, shape)
    if spec.out == "bool" and _t.kind_of(got) != "b":
        same = (_t.kind_of(got) in "iuf" and got.shape == expected[0].shape
                and _t.identical(got != 0, expected[0]))
        raise AssertionError(
            f"{spec.name} returned numbers of dtype {got.dtype} for {_describe(case)}; a mask must "
            f"be boolean (dtype bool, True = may attend) so it can be used in np.where"
            + (" — your True/False pattern is right, only the dtype is not: build it with "
               "dtype=bool (e.g. np.ones((seq, seq), dtype=bool))." if same else "."))
    return (got,)


def _as_array(spec: Spec, out, label: str, kind: str, case: Case, expected_shape=None):
    """One returned value as a plain ndarray: exact np.ndarray or torch.Tensor (or a float).
    expected_shape: the reference's shape, to name a reduction that went one axis too far."""
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
    elif (kind != "scalar" and expected_shape not in (None, ())
          and any(_t.type_(out) is s for s in (float, _t.float64, _t.float32))):
        raise AssertionError(f"{what} a single number ({_t.type_(out).__name__}) for "
                             f"{_describe(case)}; expected an array of shape {expected_shape}. "
                             f"Did a mean or a sum run over one axis too many?")
    else:
        wanted = "a single number" if kind == "scalar" else "a NumPy array (or a torch tensor)"
        raise AssertionError(f"{what} {_kind_of_object(out)} for {_describe(case)}; it should "
                             f"return {wanted}.")
    k = _t.kind_of(arr)
    if kind in ("float", "scalar") and (k != "f" or arr.dtype.itemsize < 4):
        raise AssertionError(f"{what} values of dtype {arr.dtype} for {_describe(case)}; expected "
                             f"floating-point numbers ({_input_dtype(case)}).")
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
    """float64 everywhere -> TOL["float64"]; any float32 result or input -> TOL[spec.tol32].
    A float32 answer to float64 inputs is accepted at float32's tolerance: torch makes float32
    by default, and the answer is right to that precision."""
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
                            f"computation run in float32, or is a constant (such as eps) "
                            f"slightly different?")
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
    """'float32, like the input' or, when no input is a float (sizes, token ids), 'float64'."""
    dtypes = [str(a.dtype) for a in _arrays(case.args) if a.dtype.kind == "f"]
    return f"{dtypes[0]}, like the input" if dtypes else "float64"


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
        elif _t.type_(value) is list and _t.len_(value) > 12:  # e.g. 40 merges: say how many
            parts.append(f"{name} = [{value[0]!r}, {value[1]!r}, ... {_t.len_(value) - 3} more"
                         f" ..., {value[-1]!r}] ({_t.len_(value)} items)")
        else:
            parts.append(f"{name} = {value!r}")
    if not parts:
        return "no arguments"
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
