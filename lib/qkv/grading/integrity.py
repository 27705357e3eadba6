"""Static integrity scan of a submitted notebook, and repair of its nbgrader structure.

``scan(submission, release)`` returns findings (``Finding(finding, detail)``) of two kinds:

* code findings, from an ``ast`` walk (plus a text scan when a cell does not parse) of the
  LEARNER cells (file access outside the notebook's folder, by any route, is read by
  integrity_files.py): cells nbgrader marks ``solution``, and every cell whose text is not a cell of
  the released notebook (new cells, edited cells that lost their nbgrader metadata);
* structure findings, from comparing the submission's nbgrader cells with the released ones
  (test cell edited or deleted, nbgrader metadata stripped or edited).

Findings flag a submission for an instructor to look at; they do not change the score (a
reference-using answer still passes the tests). The sandbox (sandbox.py) and the trusted
references in the checkers are what keep most of these from working at all.

``restore(submission, release)`` gives back a copy of the submission in which nbgrader cells
whose metadata was stripped get it back and deleted test cells are put back, so that every test
runs on every submission (nbgrader then restores the locked cells' text, hidden tests included).
"""

from __future__ import annotations

import ast
import copy
import re
from dataclasses import dataclass

from .integrity_files import TEXT_PATTERN as FILE_TEXT_PATTERN
from .integrity_files import file_access

# -- what is looked for ----------------------------------------------------------------------

FINDINGS = {
    "reference-use": "uses the reference implementation (qkv)",
    "dynamic-import": "imports modules dynamically (importlib, __import__, sys.modules)",
    "dynamic-code": "runs code built at run time (eval, exec, compile)",
    "monkeypatch": "changes a module, builtin or test function (attribute assignment, setattr)",
    "test-name-rebound": "rebinds a name the tests use",
    "ipython-hook": "reaches into IPython (get_ipython, input transformers, events, tracebacks)",
    "introspection": "inspects or rewrites the running program (frames, gc, ctypes, threads)",
    "process-control": "exits, signals or starts processes (os._exit, signal, subprocess)",
    "file-access": "reads, lists or writes files outside the notebook's own folder (absolute "
                   "paths, '..', ~, the environment; open, pathlib, os, shutil, subprocess ...)",
    "grader-detection": "checks whether it is being graded (NBGRADER_EXECUTION)",
    "operator-override": "defines comparison/array dunders that can fake a result (__eq__ ...)",
    "magic": "uses an IPython magic or shell command",
    "unparsable-cell": "a learner cell is not valid Python (scanned as text only)",
    "test-cell-edited": "a test cell's code was edited (nbgrader restores it before grading)",
    "test-cell-deleted": "a test cell was deleted (put back before grading)",
    "locked-cell-edited": "a read-only cell was edited (nbgrader restores it before grading)",
    "locked-cell-deleted": "a read-only cell was deleted (put back before grading)",
    "answer-cell-missing": "an answer cell is missing (deleted, or its nbgrader metadata removed)",
    "nbgrader-metadata-stripped": "a cell lost its nbgrader metadata (restored before grading)",
    "nbgrader-metadata-edited": "a cell's nbgrader metadata was edited (points, type, lock)",
    "unknown-nbgrader-cell": "a cell carries nbgrader metadata the release does not have",
}

PATCHABLE_MODULES = {
    "numpy", "torch", "qkv", "builtins", "math", "sys", "os", "IPython", "ipykernel",
    "nbgrader", "warnings", "random", "unittest", "pytest", "types", "operator", "functools",
}
DYNAMIC_IMPORT = {"importlib", "__import__", "imp", "pkgutil", "runpy", "zipimport"}
INTROSPECTION_MODULES = {"ctypes", "gc", "inspect", "threading", "_thread", "cffi", "dis",
                         "marshal"}
PROCESS_MODULES = {"signal", "subprocess", "pty", "multiprocessing", "atexit", "faulthandler",
                   "resource", "socket", "shutil"}
PROCESS_CALLS = {"_exit", "kill", "killpg", "abort", "system", "popen", "fork", "forkpty", "execv",
                 "execve", "execl", "execlp", "execvp", "execvpe", "spawnl", "spawnv", "spawnve",
                 "posix_spawn", "setsid", "chdir", "chroot", "exit"}
IPYTHON_ATTRS = {"input_transformers_cleanup", "input_transformers_post", "ast_transformers",
                 "showtraceback", "_showtraceback", "showsyntaxerror", "set_custom_exc",
                 "register_magic_function", "run_line_magic", "run_cell_magic", "InteractiveShell",
                 "display_pub", "displayhook", "excepthook", "user_ns", "user_global_ns",
                 "custom_exceptions", "kernel", "shell"}
INTROSPECTION_ATTRS = {"_getframe", "settrace", "setprofile", "f_globals", "f_locals", "f_back",
                       "gi_frame", "tb_frame", "__globals__", "__code__", "__closure__",
                       "__subclasses__", "__mro__", "__bases__", "__builtins__", "meta_path",
                       "path_hooks", "addaudithook", "__defaults__", "__kwdefaults__"}
DUNDERS = {"__eq__", "__ne__", "__lt__", "__le__", "__gt__", "__ge__", "__bool__", "__len__",
           "__array__", "__array_ufunc__", "__array_function__", "__array_interface__",
           "__array_priority__", "__array_wrap__", "__array_finalize__", "__torch_function__",
           "__float__", "__abs__", "__sub__", "__rsub__", "__getattr__", "__getattribute__",
           "__instancecheck__", "__subclasscheck__", "__hash__", "__getitem__", "__iter__"}
ALLOWED_MAGICS = {"time", "timeit", "matplotlib", "precision", "who", "whos", "pdb", "debug",
                  "xmode", "prun", "pprint"}
TEXT_PATTERNS = [  # for cells that do not parse
    ("reference-use", re.compile(r"\bqkv\b")),
    ("dynamic-import", re.compile(r"importlib|__import__|sys\.modules")),
    ("dynamic-code", re.compile(r"\b(eval|exec|compile)\s*\(")),
    ("monkeypatch", re.compile(r"\bsetattr\s*\(|\b(np|numpy|torch|builtins)\.\w+\s*=[^=]")),
    ("ipython-hook",
     re.compile(r"get_ipython|input_transformers|ast_transformers|events\.register")),
    ("process-control", re.compile(r"_exit|\bsignal\b|subprocess|os\.kill|os\.system")),
    ("file-access", FILE_TEXT_PATTERN),
    ("grader-detection", re.compile(r"NBGRADER")),
]


@dataclass(frozen=True)
class Finding:
    finding: str
    detail: str


# -- notebook helpers ---------------------------------------------------------------------------

def _nbg(cell) -> dict:
    meta = cell.get("metadata", {}).get("nbgrader", {})
    return meta if isinstance(meta, dict) else {}


def grade_id(cell) -> str | None:
    return _nbg(cell).get("grade_id")


def is_test(cell) -> bool:
    m = _nbg(cell)
    return bool(m.get("grade")) and not m.get("solution")


def is_solution(cell) -> bool:
    return bool(_nbg(cell).get("solution"))


def _norm(source) -> str:
    if isinstance(source, list):
        source = "".join(source)
    return "\n".join(line.rstrip() for line in str(source).strip().splitlines())


def _label(cell, index: int) -> str:
    return grade_id(cell) or f"cell {index + 1}"


# -- code scan ------------------------------------------------------------------------------------

class _Scanner(ast.NodeVisitor):
    def __init__(self, aliases: dict[str, str], test_names: set[str], where: str):
        self.aliases = dict(aliases)  # local name -> module it refers to
        self.test_names = test_names
        self.where = where
        self.found: list[Finding] = []

    def flag(self, kind: str, what: str) -> None:
        self.found.append(Finding(kind, f"{self.where}: {what}"))

    # names ----------------------------------------------------------------------------------
    def _root(self, node) -> str | None:
        while isinstance(node, (ast.Attribute, ast.Subscript, ast.Call)):
            node = node.func if isinstance(node, ast.Call) else node.value
        return node.id if isinstance(node, ast.Name) else None

    def _module_of(self, node) -> str | None:
        root = self._root(node)
        if root is None:
            return None
        module = self.aliases.get(root, root if root in PATCHABLE_MODULES else None)
        if root in ("__builtins__", "builtins"):
            module = "builtins"
        return module

    def _import(self, module: str, names: list[str], node) -> None:
        top = module.split(".")[0]
        if top == "qkv":
            self.flag("reference-use", f"imports {module} ({', '.join(names)})")
        if top in DYNAMIC_IMPORT:
            self.flag("dynamic-import", f"imports {module}")
        if top in INTROSPECTION_MODULES:
            self.flag("introspection", f"imports {module}")
        if top in PROCESS_MODULES:
            self.flag("process-control", f"imports {module}")
        if top == "IPython" and module != "IPython.display":
            self.flag("ipython-hook", f"imports {module}")
        if top == "builtins":
            self.flag("monkeypatch", "imports builtins")

    def visit_Import(self, node):
        for a in node.names:
            top = a.name.split(".")[0]
            self.aliases[(a.asname or a.name).split(".")[0]] = a.name if a.asname else top
            self._import(a.name, [a.asname or a.name], node)
        self.generic_visit(node)

    def visit_ImportFrom(self, node):
        module = "." * node.level + (node.module or "")
        for a in node.names:
            self.aliases[a.asname or a.name] = f"{module}.{a.name}"
            if a.name in PROCESS_CALLS | {"getattr", "setattr"} and module in ("os", "sys"):
                self.flag("process-control", f"imports {a.name} from {module}")
        self._import(module, [a.name for a in node.names], node)
        if node.level:
            self.flag("file-access", f"relative import {module}")
        self.generic_visit(node)

    # assignments -----------------------------------------------------------------------------
    def _target(self, target, verb: str) -> None:
        if isinstance(target, (ast.Tuple, ast.List)):
            for t in target.elts:
                self._target(t, verb)
            return
        if isinstance(target, ast.Starred):
            self._target(target.value, verb)
            return
        if isinstance(target, ast.Name):
            if target.id in self.test_names:
                self.flag("test-name-rebound", f"{verb} {target.id}")
            if target.id == "__builtins__":
                self.flag("monkeypatch", f"{verb} __builtins__")
            return
        if isinstance(target, (ast.Attribute, ast.Subscript)):
            module = self._module_of(target)
            root = self._root(target)
            text = ast.unparse(target)
            if module or root in self.test_names:
                self.flag("monkeypatch", f"{verb} {text}")
            elif isinstance(target, ast.Subscript) and re.search(
                r"__dict__|globals\(\)|vars\(|__builtins__", text
            ):
                self.flag("monkeypatch", f"{verb} {text}")
            elif isinstance(target, ast.Attribute) and target.attr in INTROSPECTION_ATTRS | {
                "__class__"
            }:
                self.flag("introspection", f"{verb} {text}")

    def visit_Assign(self, node):
        for t in node.targets:
            self._target(t, "assigns")
        self.generic_visit(node)

    def visit_AugAssign(self, node):
        self._target(node.target, "assigns")
        self.generic_visit(node)

    def visit_AnnAssign(self, node):
        self._target(node.target, "assigns")
        self.generic_visit(node)

    def visit_Delete(self, node):
        for t in node.targets:
            self._target(t, "deletes")
        self.generic_visit(node)

    def visit_NamedExpr(self, node):
        self._target(node.target, "assigns")
        self.generic_visit(node)

    def visit_Global(self, node):
        for name in node.names:
            if name in self.test_names:
                self.flag("test-name-rebound", f"global {name}")
        self.generic_visit(node)

    def _define(self, node, kind: str) -> None:
        if node.name in self.test_names:
            self.flag("test-name-rebound", f"{kind} {node.name}")

    def visit_FunctionDef(self, node):
        self._define(node, "def")
        for target in [a for a in node.args.args + node.args.kwonlyargs]:
            self.aliases.pop(target.arg, None)
        self.generic_visit(node)

    visit_AsyncFunctionDef = visit_FunctionDef

    def visit_ClassDef(self, node):
        self._define(node, "class")
        dunders = set()
        for item in node.body:
            if isinstance(item, (ast.FunctionDef, ast.AsyncFunctionDef)) and item.name in DUNDERS:
                dunders.add(item.name)
            for t in getattr(item, "targets", []):
                if isinstance(t, ast.Name) and t.id in DUNDERS:
                    dunders.add(t.id)
        if dunders:
            names = ", ".join(sorted(dunders))
            self.flag("operator-override", f"class {node.name} defines {names}")
        for base in node.bases:
            if self._module_of(base) in ("numpy", "torch"):
                self.flag("operator-override", f"class {node.name} subclasses {ast.unparse(base)}")
        self.generic_visit(node)

    # uses -----------------------------------------------------------------------------------
    def visit_Name(self, node):
        kind = {
            "qkv": "reference-use",
            "__import__": "dynamic-import",
            "eval": "dynamic-code", "exec": "dynamic-code", "compile": "dynamic-code",
            "setattr": "monkeypatch", "delattr": "monkeypatch",
            "globals": "introspection", "vars": "introspection", "__builtins__": "introspection",
            "breakpoint": "introspection",
            "get_ipython": "ipython-hook",
            "exit": "process-control", "quit": "process-control",
        }.get(node.id)
        if kind:
            self.flag(kind, node.id)
        self.generic_visit(node)

    def visit_Attribute(self, node):
        module = self._module_of(node)
        dotted = ast.unparse(node)
        if module and module.split(".")[0] == "qkv":
            self.flag("reference-use", dotted)
        if node.attr in IPYTHON_ATTRS or re.search(r"\bevents\.register\b", dotted):
            self.flag("ipython-hook", dotted)
        if node.attr == "modules" and module == "sys":
            self.flag("dynamic-import", dotted)
        elif node.attr in INTROSPECTION_ATTRS or (node.attr == "__dict__" and module):
            self.flag("introspection", dotted)
        if module in ("os", "sys", "posix") and node.attr in PROCESS_CALLS:
            self.flag("process-control", dotted)
        self.generic_visit(node)

    def visit_Call(self, node):
        name = node.func.attr if isinstance(node.func, ast.Attribute) else (
            node.func.id if isinstance(node.func, ast.Name) else None)
        if name in ("setattr", "delattr") and node.args:
            target = node.args[0]
            if self._module_of(target) or self._root(target) in self.test_names:
                self.flag("monkeypatch", ast.unparse(node)[:120])
        self.generic_visit(node)

    def visit_Constant(self, node):
        if isinstance(node.value, str):
            text = node.value
            if re.search(r"\bqkv\.(np|pt|grading|_)|^\s*qkv\s*$", text):
                self.flag("reference-use", f"string {text[:60]!r}")
            if "NBGRADER" in text.upper():
                self.flag("grader-detection", f"string {text[:60]!r}")
            if text in ("get_ipython", "input_transformers_cleanup", "_exit"):
                self.flag("ipython-hook" if "ipython" in text or "input" in text else
                          "process-control", f"string {text!r}")
        self.generic_visit(node)


def _magics(source: str) -> tuple[str, list[str]]:
    """Replace IPython magics/shell lines by `pass` so the cell parses; return the magic names."""
    lines = source.splitlines()
    found: list[str] = []
    if lines and lines[0].lstrip().startswith("%%"):
        name = lines[0].lstrip()[2:].split()[0] if lines[0].strip() != "%%" else ""
        found.append("%%" + name)
        if name in ("time", "timeit", "capture", "prun"):
            return "\n".join(["pass"] + lines[1:]), found
        return "pass", found
    out = []
    for line in lines:
        stripped = line.lstrip()
        indent = line[: len(line) - len(stripped)]
        m = re.match(r"^(%{1,2}|!{1,2})(\w*)", stripped)
        if m:
            found.append(m.group(1) + m.group(2))
            out.append(indent + "pass")
            continue
        m = re.match(r"^(.*?)=\s*(%|!)(\w*)(.*)$", stripped)  # x = !ls, x = %sx ls
        if m and re.match(r"^[\w\s,]+$", m.group(1)):
            found.append(m.group(2) + m.group(3))
            out.append(indent + m.group(1) + "= None")
            continue
        out.append(line.rstrip("?") if stripped.endswith("?") and not stripped.startswith("#")
                   else line)
    return "\n".join(out), found


def scan_code(source: str, where: str, aliases: dict[str, str],
              test_names: set[str]) -> list[Finding]:
    code, magics = _magics(source)
    findings = []
    for magic in magics:
        name = magic.lstrip("%!")
        if magic.startswith("!") or name not in ALLOWED_MAGICS:
            findings.append(Finding("magic", f"{where}: {magic}"))
    try:
        tree = ast.parse(code)
    except SyntaxError:
        findings.append(Finding("unparsable-cell", where))
        for kind, pattern in TEXT_PATTERNS:
            m = pattern.search(code)
            if m:
                findings.append(Finding(kind, f"{where}: text {m.group(0)!r}"))
        return findings
    scanner = _Scanner(aliases, test_names, where)
    scanner.visit(tree)
    files = [Finding("file-access", f"{where}: {d}") for d in file_access(tree, aliases)]
    return findings + scanner.found + files


def _aliases_and_names(cells) -> tuple[dict[str, str], set[str]]:
    """Module aliases bound by the locked (setup) cells, and every name those cells define."""
    aliases: dict[str, str] = {}
    names: set[str] = set()
    for cell in cells:
        if cell.get("cell_type") != "code":
            continue
        try:
            tree = ast.parse(_magics(_norm(cell.get("source", "")))[0])
        except SyntaxError:
            continue
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                for a in node.names:
                    local = (a.asname or a.name).split(".")[0]
                    aliases[local] = a.name if a.asname else local
                    names.add(local)
            elif isinstance(node, ast.ImportFrom):
                for a in node.names:
                    aliases[a.asname or a.name] = f"{node.module}.{a.name}"
                    names.add(a.asname or a.name)
            elif isinstance(node, (ast.FunctionDef, ast.ClassDef)) and node in tree.body:
                names.add(node.name)
    return aliases, names


# -- structure ------------------------------------------------------------------------------------

def _structure(sub, rel) -> list[Finding]:
    findings = []
    sub_cells = sub.get("cells", [])
    by_id: dict[str, list[int]] = {}
    for i, cell in enumerate(sub_cells):
        if grade_id(cell):
            by_id.setdefault(grade_id(cell), []).append(i)
    rel_ids = {grade_id(c) for c in rel.cells if grade_id(c)}
    unlabelled = {_norm(c.get("source", "")) for c in sub_cells if not grade_id(c)}
    for rc in rel.cells:
        g = grade_id(rc)
        if not g:
            continue
        test, locked, sol = is_test(rc), bool(_nbg(rc).get("locked")), is_solution(rc)
        if g not in by_id:
            if _norm(rc.source) in unlabelled and (_norm(rc.source) or not sol):
                findings.append(Finding("nbgrader-metadata-stripped", f"cell {g}"))
            elif sol:
                findings.append(Finding("answer-cell-missing", f"cell {g}"))
            elif test:
                findings.append(Finding("test-cell-deleted", f"cell {g}"))
            elif locked:
                findings.append(Finding("locked-cell-deleted", f"cell {g}"))
            continue
        cell = sub_cells[by_id[g][0]]
        changed = [
            k for k in ("grade", "solution", "locked", "points", "task")
            if _nbg(cell).get(k) != _nbg(rc).get(k)
        ]
        if cell.get("cell_type") != rc.cell_type:
            changed.append("cell type")
        if changed:
            findings.append(Finding("nbgrader-metadata-edited", f"cell {g}: {', '.join(changed)}"))
        if locked and _norm(cell.get("source", "")) != _norm(rc.source):
            kind = "test-cell-edited" if test else "locked-cell-edited"
            findings.append(Finding(kind, f"cell {g}"))
    for g, where in by_id.items():
        if g not in rel_ids:
            findings.append(Finding("unknown-nbgrader-cell", f"cell {g}"))
        elif len(where) > 1:
            findings.append(Finding("unknown-nbgrader-cell",
                                    f"cell {g} appears {len(where)} times"))
    return findings


def learner_cells(sub, rel) -> list[tuple[int, dict]]:
    """(index, cell) of every cell whose code is the learner's."""
    rel_solution_ids = {grade_id(c) for c in rel.cells if is_solution(c)}
    rel_texts = {_norm(c.source) for c in rel.cells}
    out = []
    for i, cell in enumerate(sub.get("cells", [])):
        if cell.get("cell_type") != "code":
            continue
        if is_solution(cell) or grade_id(cell) in rel_solution_ids:
            out.append((i, cell))
        elif not grade_id(cell) and _norm(cell.get("source", "")) not in rel_texts:
            out.append((i, cell))
    return out


def scan(sub, rel) -> list[Finding]:
    """Findings for submission ``sub`` against the released notebook ``rel`` (both nbformat v4
    NotebookNodes or plain dicts), in order and without duplicates."""
    locked = [c for c in rel.cells if _nbg(c).get("locked") and not is_solution(c)]
    aliases, defined = _aliases_and_names(locked)
    test_names = {n for n in defined if n not in aliases or aliases[n].startswith("qkv")}
    test_names |= {n for n, mod in aliases.items() if mod.startswith("qkv")}
    findings: list[Finding] = []
    for i, cell in learner_cells(sub, rel):
        findings += scan_code(_norm(cell.get("source", "")), _label(cell, i), aliases, test_names)
    findings += _structure(sub, rel)
    seen, unique = set(), []
    for f in findings:
        if f not in seen:
            seen.add(f)
            unique.append(f)
    return [f for f in unique if not _inside_another(f, unique)]


def _inside_another(f: Finding, findings: list[Finding]) -> bool:
    """One line of code gives a finding per nested expression ('/proc', then
    os.listdir('/proc')); keep the outermost, so the report has a row per thing done."""
    where, _, detail = f.detail.partition(": ")
    snippet = detail.rpartition(": ")[2]
    for g in findings:
        g_where, _, g_detail = g.detail.partition(": ")
        g_snippet = g_detail.rpartition(": ")[2]
        if (g is not f and g.finding == f.finding and g_where == where and snippet
                and snippet != g_snippet and snippet in g_snippet):
            return True
    return False


# -- repair -----------------------------------------------------------------------------------

def restore(sub, rel):
    """A copy of ``sub`` where every nbgrader cell of ``rel`` is present with its metadata."""
    sub = copy.deepcopy(sub)
    cells = sub.cells
    rel_texts = {_norm(c.source) for c in rel.cells}
    used_ids = {c.get("id") for c in cells}

    def anchor(rc) -> int | None:
        g = grade_id(rc)
        for i, c in enumerate(cells):
            if grade_id(c) == g:
                return i
        for i, c in enumerate(cells):
            same = c.cell_type == rc.cell_type and _norm(c.source) == _norm(rc.source)
            if not grade_id(c) and same:
                return i
        return None

    def adopt(cell, rc) -> None:
        cell.metadata["nbgrader"] = copy.deepcopy(rc.metadata["nbgrader"])
        for key in ("editable", "deletable"):
            if key in rc.metadata:
                cell.metadata[key] = rc.metadata[key]

    present = {grade_id(c) for c in cells if grade_id(c)}
    for k, rc in enumerate(rel.cells):
        g = grade_id(rc)
        if not g or g in present:
            continue
        i = anchor(rc)
        if i is None and is_solution(rc):
            before = [anchor(p) for p in rel.cells[:k] if grade_id(p)]
            after = [anchor(p) for p in rel.cells[k + 1:] if grade_id(p)]
            lo = max([a for a in before if a is not None], default=-1)
            hi = min([a for a in after if a is not None and a > lo], default=len(cells))
            candidates = [
                j for j in range(lo + 1, hi)
                if cells[j].cell_type == rc.cell_type and not grade_id(cells[j])
                and _norm(cells[j].source) not in rel_texts
            ]
            i = candidates[0] if candidates else None
        if i is not None:
            adopt(cells[i], rc)
        else:
            before = [anchor(p) for p in rel.cells[:k] if grade_id(p) or _norm(p.source)]
            pos = max([a for a in before if a is not None], default=-1) + 1
            new = copy.deepcopy(rc)
            if new.get("id") in used_ids:
                new["id"] = f"{new['id']}-restored"
            used_ids.add(new.get("id"))
            cells.insert(pos, new)
        present.add(g)
    return sub
