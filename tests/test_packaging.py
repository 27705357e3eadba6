"""pyproject.toml declares what each part of qkv needs, and agrees with requirements.txt (the
pinned full set `make setup` installs): every pin is declared, every declaration is pinned at a
version it accepts, and every third-party module a part imports comes with its declaration."""

import ast
import importlib.metadata as md
import re
import sys
import tomllib
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

REPO = Path(__file__).resolve().parents[1]
LIB = REPO / "lib" / "qkv"
PROJECT = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
EXTRAS = PROJECT["optional-dependencies"]


def _declared(part: str) -> list[Requirement]:
    """The requirements of `base` (dependencies) or of an extra, self-references expanded."""
    reqs = PROJECT["dependencies"] if part == "base" else EXTRAS[part]
    out = []
    for req in map(Requirement, reqs):
        if canonicalize_name(req.name) == "qkv":
            out += [r for extra in req.extras for r in _declared(extra)]
        else:
            out.append(req)
    return out


def _pins() -> dict[str, str]:
    pins = {}
    for line in (REPO / "requirements.txt").read_text().splitlines():
        line = line.split("#")[0].strip()
        if line:
            name, version = line.split("==")
            pins[canonicalize_name(name)] = version.strip()
    return pins


def test_every_pin_is_declared_and_every_declaration_accepts_its_pin():
    pins = _pins()
    declared = [r for part in ["base", *EXTRAS] for r in _declared(part)]
    # A pin may also fix a package that a declared one requires (sphinxcontrib-bibtex for
    # jupyter-book): pinned for the same build everywhere, declared through its parent.
    missing = set(pins) - _closure(r.name for r in declared)
    assert not missing, f"pinned in requirements.txt but in no part of pyproject.toml: {missing}"
    for req in declared:
        name = canonicalize_name(req.name)
        assert name in pins, f"{req} is declared in pyproject.toml but not pinned"
        assert req.specifier.contains(pins[name], prereleases=True), (
            f"pyproject.toml's {req} rejects the pinned {name}=={pins[name]}")


def _closure(names) -> set[str]:
    """These installed distributions and everything they require (markers without extras)."""
    seen, todo = set(), [canonicalize_name(n) for n in names]
    while todo:
        name = todo.pop()
        if name in seen:
            continue
        seen.add(name)
        try:
            requires = md.requires(name) or []
        except md.PackageNotFoundError:
            continue
        for text in requires:
            req = Requirement(text)
            if req.marker is None or req.marker.evaluate({"extra": ""}):
                todo.append(req.name)
    return seen


def _imports(path: Path) -> set[str]:
    tops = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            tops |= {a.name.split(".")[0] for a in node.names}
        elif isinstance(node, ast.ImportFrom) and not node.level:
            tops.add(node.module.split(".")[0])
    return tops - set(sys.stdlib_module_names) - {"qkv", "__future__"}


def _part(path: Path) -> str:
    rel = path.relative_to(LIB).as_posix()
    if rel.startswith("grading/"):
        return "grading"
    if rel in ("train.py", "generate.py", "data.py", "_train_loop.py"):
        return "train"
    if rel == "pt/flash.py":
        return "flash"
    return "base"


@pytest.mark.parametrize("part", ["base", "train", "grading", "flash"])
def test_each_part_declares_what_it_imports(part):
    provides = _closure([r.name for r in _declared("base")]
                        + ([r.name for r in _declared(part)] if part != "base" else []))
    dists = md.packages_distributions()
    for path in sorted(LIB.rglob("*.py")):
        if _part(path) != part:
            continue
        for module in _imports(path):
            names = {canonicalize_name(d) for d in dists.get(module, [module])}
            assert names & provides, (f"{path.relative_to(REPO)} imports {module} "
                                      f"({', '.join(sorted(names))}), which the {part!r} part "
                                      f"of pyproject.toml does not bring")


def test_requirements_are_exact_pins():
    for line in (REPO / "requirements.txt").read_text().splitlines():
        line = line.split("#")[0].strip()
        assert not line or re.fullmatch(r"[A-Za-z0-9._\[\]-]+==[A-Za-z0-9.+]+", line), line
