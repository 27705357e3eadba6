"""Output kinds: how an exercise's output is read, compared with the reference and diagnosed.

An :class:`~qkv.grading.exercise.Exercise` names one kind; the engine hands it the learner's
function(s), already checked to be functions and bound to a backend, and the cases to run.
Each kind raises ``AssertionError`` with the message the learner sees, or returns on a pass.

=============== =========================================================================
kind            what the learner's function returns
=============== =========================================================================
``Array``       one array (float, a bool mask, a single number, or an (inputs, targets) pair)
``Value``       a Python value: text, token ids, True/False, a count
``Parts``       several arrays (or dicts of arrays), compared part by part
``Filter``      logits with removed entries at -inf (the -inf pattern must match exactly)
``GradientPair``a forward (out, cache) and a backward (dict of gradients): two functions
``Judged``      anything the exercise judges by properties with its own function
=============== =========================================================================
"""

from dataclasses import dataclass

from .engine import Spec, run_array
from .pairs import Pair, run_pair
from .several import run_filter, run_parts
from .values import run_value


class Kind:
    """The base of every output kind."""

    learners = 1  # how many learner functions the checker takes
    what = "matches the reference"  # said by the line a passing visible test prints

    def names(self, ex) -> tuple:
        """The learner functions' names, in the checker's argument order."""
        return (ex.name,)

    def spec(self, ex, out: str = "float", tol32: str = "float32_op") -> Spec:
        return Spec(ex.name, ex.reference, ex.mistakes, out=out, tol32=tol32)

    def run(self, ex, learners: list, cases: list) -> None:
        raise NotImplementedError


@dataclass(frozen=True)
class Array(Kind):
    """One array. ``dtype``: "float" | "bool" (a mask) | "scalar" (one number) | "int_pair"
    (two integer arrays); ``tol32``: the TOL entry used when an input or the output is float32."""

    dtype: str = "float"
    tol32: str = "float32_op"

    def run(self, ex, learners, cases):
        run_array(self.spec(ex, self.dtype, self.tol32), learners[0], cases, ex.explain)


@dataclass(frozen=True)
class Value(Kind):
    """A Python value: ``value`` is "text" | "ids" | "flag" | "count". ``whole_run``: name a
    mistake only if it gives the learner's answers on every case (for True/False answers)."""

    value: str = "ids"
    whole_run: bool = False
    hint: str = ""  # said after a wrong value that no catalogued mistake explains
    what = "gives the right answer"

    def run(self, ex, learners, cases):
        spec = Spec(ex.name, ex.reference, ex.mistakes, out=self.value, hint=self.hint)
        run_value(spec, learners[0], cases, self.whole_run)


@dataclass(frozen=True)
class Parts(Kind):
    """Several outputs, labelled in order (e.g. ("new_params", "new_m", "new_v")); a part that
    is a dict of arrays is compared key by key."""

    labels: tuple = ()
    tol32: str = "float32_op"

    def run(self, ex, learners, cases):
        run_parts(self.spec(ex, tol32=self.tol32), learners[0], cases, self.labels)


@dataclass(frozen=True)
class Filter(Kind):
    """Logits with the removed entries at -inf: the -inf pattern must match exactly (the array
    comparison would let 0 or -1e9 pass for -inf), then the kept values."""

    tol32: str = "float32_op"

    def run(self, ex, learners, cases):
        run_filter(self.spec(ex, tol32=self.tol32), learners[0], cases)


@dataclass(frozen=True)
class GradientPair(Kind):
    """A forward/backward pair. The exercise's ``name`` and ``reference`` are the forward's
    ((*args) -> (out, cache)); ``backward`` names the learner's backward and ``ref_backward``
    is the reference ((dout, cache) -> {gradient: array}). ``grads``: ((key, index of the
    argument it belongs to), ...). Cases are (Case, dout) pairs; mistakes are called as
    ``mistakes(*args, dout=dout)`` and their ``fn()`` returns {key: wrong gradient}."""

    backward: str = ""
    ref_backward: object = None
    grads: tuple = ()
    out: str = "float"  # "scalar" for a loss
    learners = 2
    what = "forward and gradients match the reference"

    def names(self, ex):
        return (ex.name, self.backward)

    def run(self, ex, learners, cases):
        pair = Pair(ex.name, self.backward, ex.reference, self.ref_backward, self.grads,
                    ex.mistakes, self.out)
        run_pair(pair, learners[0], learners[1], cases)


@dataclass(frozen=True)
class Judged(Kind):
    """An output judged by properties rather than against one reference output (random
    batches, an initialisation, a designed matrix, a training run): ``judge(ex, learner,
    cases)`` runs the learner through ``engine._call`` and raises what is wrong."""

    judge: object = None
    what_passed: str = "has every property checked"

    @property
    def what(self):
        return self.what_passed

    def run(self, ex, learners, cases):
        self.judge(ex, learners[0], cases)
