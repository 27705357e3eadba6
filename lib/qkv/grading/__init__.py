"""qkv.grading: the checkers that the exercise notebooks' test cells call.

Import it in the locked setup cell, before any learner code runs: the checkers capture trusted
references to the numeric functions at import time (see ``_trusted``), so a learner who later
rebinds ``np.allclose`` cannot make a wrong answer pass.

Every exercise is declared once (``exercise.Exercise``: a reference, visible and hidden cases, a
catalogue of known mistakes, an output kind) in its chapter's module under ``exercises/``, and
runs on one engine (``engine``). The modules are found at import time, and each exercise is
exported here as ``check_xxx(fn, hidden=False, backend="auto")`` (a forward/backward pair:
``check_xxx(forward, backward, hidden=False, backend="auto")``). A checker runs the learner's
function on seeded inputs, compares with the reference and raises ``AssertionError`` naming the
most likely mistake; a passing visible test prints one line to stdout. ``backend`` is "auto" or
one of the backends the exercise declares ("numpy", "torch"); any other raises ``ValueError``.
"""

from . import _trusted
from .exercises import CHECKERS as _CHECKERS

globals().update(_CHECKERS)
__all__ = sorted(_CHECKERS)

_trusted.seal()  # last: snapshot numpy, qkv (this package included) and builtins as they are now
