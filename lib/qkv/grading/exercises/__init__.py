"""The exercises, one module per chapter: ``chNN_<topic>.py`` lists its exercises in
``EXERCISES``. Modules are found here at import time, so a new chapter adds one module and
nothing else; ``qkv.grading`` exports one ``check_xxx`` per exercise from :data:`CHECKERS`.
"""

import importlib
import pkgutil
import re

from ..exercise import Exercise, checker

_CHAPTER = re.compile(r"ch\d\d_\w+$")


def _discover() -> tuple[dict, dict]:
    exercises, checkers = {}, {}
    for info in sorted(pkgutil.iter_modules(__path__), key=lambda m: m.name):
        if not _CHAPTER.match(info.name):
            continue
        module = importlib.import_module(f"{__name__}.{info.name}")
        for ex in getattr(module, "EXERCISES", ()):
            if not isinstance(ex, Exercise):
                raise TypeError(f"{module.__name__}.EXERCISES holds {ex!r}, not an Exercise")
            if ex.check_name in checkers:
                raise ValueError(f"{ex.check_name} is declared twice (again in {module.__name__})")
            check = checker(ex)
            check.__module__ = module.__name__
            exercises[ex.check_name] = ex
            checkers[ex.check_name] = check
    return exercises, checkers


EXERCISES, CHECKERS = _discover()  # {check name: Exercise}, {check name: check function}
