"""The exercise declaration and the one runner behind every ``check_xxx``.

An exercise is declared, not hand-coded::

    SOFTMAX = Exercise(
        name="softmax",                      # the learner's function, named in every message
        reference=_t.ref_softmax,            # trusted, captured before any learner code runs
        visible=lambda: [Case((x,), ("x",)), ...],  # seeded inputs the visible test runs
        hidden=lambda: [...],                # other seeds and sizes, for the hidden test
        mistakes=_softmax_mistakes,          # (*args) -> Mistakes: known-wrong computations
        output=Array(),                      # how the output is read, compared, diagnosed
    )

and ``checker(SOFTMAX)`` is ``check_softmax(fn, hidden=False, backend="auto")`` (a gradient
pair's checker takes two functions: ``check_xxx(forward, backward, hidden=False,
backend="auto")``). The chapter modules in ``qkv.grading.exercises`` list their exercises in
``EXERCISES``; ``qkv.grading`` exports one checker per exercise.

What a checker does, in order: each argument must be a function; ``backend`` must be one the
exercise declares ("auto" picks: NumPy first, then torch if NumPy inputs raise, when both are
declared; otherwise the one declared); the kind runs the cases (``engine``: call safely,
validate, compare, name the mistake); ``then`` runs further exercises on the same functions;
a passing visible test prints one line to stdout.
"""

from dataclasses import dataclass, field

from . import _trusted as _t
from .engine import Case, Learner, Mistake
from .kinds import Array, Kind

__all__ = ["Case", "Exercise", "Mistake", "checker", "run"]

BACKENDS = ("numpy", "torch")


def no_mistakes(*args, **kwargs):
    """The catalogue of an exercise that names no mistakes (its messages say what differs)."""
    return ()


@dataclass(frozen=True)
class Exercise:
    """One exercise: what the learner writes, what it is compared with, on which inputs, and
    which wrong answers are recognised."""

    name: str  # the learner's function (a gradient pair: the forward), used in every message
    reference: object  # trusted function with the learner's arguments (None for Judged kinds)
    visible: object  # () -> list of Case (a gradient pair: of (Case, dout))
    hidden: object  # () -> list: other seeds, sizes and the edge cases the task text states
    mistakes: object = no_mistakes  # (*args) -> iterable of Mistake
    output: Kind = field(default_factory=Array)
    backends: tuple = BACKENDS  # the backends the learner may write it with
    check: str = ""  # the checker's name; default "check_" + name
    doc: str = ""  # the checker's docstring: the task in one or two lines, with shapes
    explain: object = None  # (probe, got, args, case) -> str | None: diagnosis by parts
    wrap: object = None  # fn -> callable run instead; its .problem() is asked after the run
    then: tuple = ()  # further exercises run on the same function(s) once this one passes
    passed: str = ""  # what a passing visible test says was checked (default: from the kind)

    @property
    def check_name(self) -> str:
        return self.check or f"check_{self.name}"


def _backend(ex: Exercise, backend) -> str:
    if backend == "auto":
        return "auto" if set(ex.backends) == set(BACKENDS) else ex.backends[0]
    if backend not in BACKENDS:
        raise ValueError(f"backend must be 'auto', 'numpy' or 'torch'; got {backend!r}")
    if backend not in ex.backends:
        raise ValueError(f"{ex.check_name} checks {ex.name} written with "
                         f"{' or '.join(ex.backends)}; backend={backend!r} is not one of them.")
    if backend == "torch":
        _t.load_torch()
    return backend


def run(ex: Exercise, fns: tuple, hidden: bool = False, backend: str = "auto") -> int:
    """Run ``ex`` on the learner's function(s); AssertionError on the first problem. Returns
    how many cases ran (this exercise and its ``then``)."""
    names = ex.output.names(ex)
    for name, fn in zip(names, fns, strict=True):
        if fn is None:
            raise AssertionError(f"{name} is None: the cell that should make it stopped early "
                                 f"or never set it. Run that cell again and read its error.")
        if not _t.callable_(fn):
            raise AssertionError(f"{name} should be a function, but it is a "
                                 f"{_t.type_(fn).__name__}. Define it with `def {name}(...):`.")
    chosen = _backend(ex, backend)
    cases = list((ex.hidden if hidden else ex.visible)())
    wrapped = [ex.wrap(fn) if ex.wrap is not None else fn for fn in fns]
    learners = [Learner(fn, chosen, name) for fn, name in zip(wrapped, names, strict=True)]
    ex.output.run(ex, learners, cases)
    for w in wrapped:
        problem = getattr(w, "problem", None) if ex.wrap is not None else None
        said = problem() if problem is not None else None
        if said is not None:
            raise AssertionError(said)
    return len(cases) + sum(run(sub, fns, hidden, backend) for sub in ex.then)


def passed_line(ex: Exercise, count: int) -> str:
    """The one line a passing visible test prints (stdout: nbgrader scores stderr as a fail)."""
    inputs = "the visible input" if count == 1 else f"all {count} visible inputs"
    what = ex.passed or f"{ex.output.what} on {inputs}"
    more = " (The hidden tests try other inputs.)" if any(True for _ in ex.hidden()) else ""
    return f"\u2713 {ex.name}: {what}.{more}"


def checker(ex: Exercise):
    """``check_xxx`` for ``ex``: the documented signature, a one-line report on a pass."""
    def report(fns, hidden, backend):
        count = run(ex, fns, hidden, backend)
        if not hidden:
            _t.print_(passed_line(ex, count))

    if ex.output.learners == 2:
        def check(forward, backward, hidden: bool = False, backend: str = "auto") -> None:
            report((forward, backward), hidden, backend)
    else:
        def check(fn, hidden: bool = False, backend: str = "auto") -> None:
            report((fn,), hidden, backend)
    check.__name__ = check.__qualname__ = ex.check_name
    check.__doc__ = ex.doc or f"Check {ex.name}."
    check.exercise = ex
    return check
