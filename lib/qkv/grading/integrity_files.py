"""File access outside the notebook's own folder, for the integrity scan (integrity.py).

Files in the notebook's own folder (and below it) are the learner's: ``open("data.txt")``,
``np.save("w.npy", w)``, ``glob.glob("*.txt")``, ``os.listdir(".")`` are not flagged. Flagged,
whatever the route (open, pathlib, os, io, shutil, glob, sqlite3, subprocess, os.system, numpy
and torch load/save, ...):

* a path that leaves the folder, wherever it appears as text: absolute (``/etc``, ``C:\\``,
  ``file://``), climbing (``..`` as a component), home (``~``) or an environment variable
  (``$HOME``, ``%USERPROFILE%``), also inside a shell command (``os.system("cat ../x")``) and
  when the text is put together from constant pieces, which are folded back to text first
  (``"." + "./x"``, ``"/".join([...])``, f-strings, ``chr(46)``, ``os.pardir``,
  ``os.sep + "etc"``, ``Path("..") / "x"``, ``"bd.koobedarg/../.."[::-1]``);
* calls that hand out a place outside the folder with no path in sight: the environment
  (``os.environ``, ``getenv``), the home folder (``Path.home``, ``expanduser``), the working
  folder's absolute path and its parents (``os.getcwd``, ``Path.cwd``, ``.parent`` or
  ``dirname`` of an absolute path), the temporary folder (``tempfile``), where modules live
  (``__file__``, ``sys.prefix``, ``site``, ``importlib.resources``), changing folder (``chdir``);
* reaching a file function or module by name, so that no call to it shows
  (``getattr(__builtins__, "open")``, ``vars(builtins)["open"]``,
  ``importlib.import_module("o" + "s")``);
* a path given to a file function that is built from character codes and does not fold to a
  constant (``open("".join(map(chr, codes)))``, ``base64.b64decode(...)``).

Python can always hide a path further; the sandbox, not this scan, is what stops the access.
The scan tells an instructor where to look.
"""

from __future__ import annotations

import ast
import posixpath
import re

# Modules whose calls read, list, write or delete files, or run commands that can.
FILE_MODULES = {"os", "posix", "nt", "io", "_io", "pathlib", "shutil", "glob", "sqlite3",
                "subprocess", "tempfile", "codecs", "fileinput", "dbm", "shelve", "zipfile",
                "tarfile", "pty", "mmap", "builtins"}
# Call names that take a path (or a command) wherever they come from; generic names such as
# copy, replace, run or connect count only when they resolve into FILE_MODULES.
FILE_CALLS = {"open", "Path", "PurePath", "PosixPath", "WindowsPath", "FileIO", "fdopen",
              "listdir", "scandir", "walk", "fwalk", "glob", "iglob", "rglob", "iterdir",
              "loadtxt", "genfromtxt", "fromfile", "memmap", "savetxt", "savez",
              "savez_compressed", "tofile", "read_text", "read_bytes", "write_text",
              "write_bytes", "rmtree", "copyfile", "copytree", "copy2", "unlink", "makedirs",
              "removedirs", "system", "popen", "Popen", "check_output", "getoutput",
              "getstatusoutput", "read_csv", "read_json", "imread", "imsave"}
ARRAY_IO = {"load", "save"}  # numpy.load, torch.save, ...: file calls of these modules
ARRAY_MODULES = {"numpy", "torch", "pandas", "pickle", "json", "joblib"}
# Names by which a file function or module can be fetched (getattr, import_module, ...).
FILE_NAMES = FILE_CALLS | FILE_MODULES | {"remove", "rename", "replace", "mkdir", "rmdir",
                                          "chdir", "environ", "getenv", "__import__"}
# Calls that return a place outside the folder (or move the kernel there).
LOCATION_CALLS = {"getcwd", "getcwdb", "cwd", "home", "expanduser", "expandvars", "getenv",
                  "getenvb", "putenv", "gettempdir", "gettempdirb", "mkdtemp", "mkstemp",
                  "mktemp", "TemporaryFile", "NamedTemporaryFile", "SpooledTemporaryFile",
                  "TemporaryDirectory", "chdir", "fchdir", "chroot", "getsitepackages",
                  "getusersitepackages", "get_paths", "get_path", "getsourcefile", "getfile",
                  "get_data"}
LOCATION_ATTRS = {"os.environ", "os.environb", "posix.environ", "os.pardir", "os.path.pardir",
                  "sys.prefix", "sys.exec_prefix", "sys.base_prefix", "sys.base_exec_prefix",
                  "sys.path", "sys.executable", "sys.platlibdir", "sys.path_importer_cache"}
LOCATION_MODULES = {"site", "sysconfig", "importlib.resources", "importlib.metadata"}
# Calls whose result is an absolute path: .parent or dirname of one climbs out of the folder.
ABSOLUTE_CALLS = {"getcwd", "getcwdb", "cwd", "home", "abspath", "realpath", "resolve",
                  "absolute", "expanduser", "gettempdir", "readlink"}
# Ways to spell text that no static reading follows.
CODED_CALLS = {"chr", "fromhex", "unhexlify", "b64decode", "b32decode", "b16decode",
               "a85decode", "b85decode", "decode", "translate", "maketrans", "bytes",
               "bytearray", "reversed"}
SEPARATORS = {"os.sep": "/", "os.path.sep": "/", "os.altsep": "/", "os.pardir": "..",
              "os.path.pardir": "..", "os.curdir": ".", "os.path.curdir": "."}
SUSPECT_WORDS = re.compile(r"gradebook|solutions|_grading|autograded|submitted|\.git\b|"
                           r"nbgrader|/proc", re.I)
# Variables that hold folders ($QKV in a plot label is maths, not a path: only these count).
ENV_VAR = re.compile(r"\$(HOME|USER|PWD|OLDPWD|TMPDIR|TEMP|TMP|PATH|PYTHONPATH|VIRTUAL_ENV|"
                     r"CONDA_PREFIX|XDG_\w+|JUPYTER\w*|NBGRADER\w*)\b|\$\{\w+\}|"
                     r"%(USERPROFILE|APPDATA|LOCALAPPDATA|TEMP|TMP|HOMEPATH|HOMEDRIVE)%")
TOKEN = re.compile(r"""[\s'"`;|&<>(),=]+""")
UNKNOWN = "\x00"  # stands for a part of a folded text that is not a constant


def outside(text: str | None, words: bool = False) -> str | None:
    """Why ``text`` names a place outside the notebook's folder, or None.

    words: also read every whitespace- or shell-separated word of it as a path (for what is
    handed to a file function or a shell), not only the whole text (any string constant)."""
    if text is None:
        return None
    if text.strip() in ("/", "\\", "~"):
        return "the root or home folder"
    for word in [text] + (TOKEN.split(text) if words else []):
        if not word:
            continue
        if re.match(r"^[/\\]{1,2}[^/\\\s\x00]", word) or re.match(r"^[A-Za-z]:[\\/]", word) \
                or word.lower().startswith("file:"):
            return "an absolute path"
        if re.match(r"^~\w*([/\\]|$)", word):
            return "the home folder (~)"
        if re.search(r"(^|[/\\])\.\.([/\\]|$)", word):
            return "a path that climbs out of the folder (..)"
        if ENV_VAR.search(word):
            return "a path from an environment variable"
        if ("/" in word or "\\" in word) and SUSPECT_WORDS.search(word):
            return "a path to the grader's files"
    return None


class FileScanner(ast.NodeVisitor):
    """Collects ``details`` (one line each) of file access outside the folder in one cell."""

    def __init__(self, aliases: dict[str, str]):
        self.aliases = dict(aliases)  # local name -> dotted name it refers to
        self.values: dict[str, str] = {}  # name -> the constant text assigned to it
        self.coded: set[str] = set()  # names assigned text built from codes
        self.absolute: set[str] = set()  # names assigned an absolute path
        self.details: list[str] = []

    def flag(self, node, why: str) -> None:
        self.details.append(f"{why}: {ast.unparse(node)[:100]}")

    # -- reading expressions ------------------------------------------------------------------
    def dotted(self, node) -> str | None:
        """'os.path.join' for os.path.join (after aliases), 'pathlib.Path.home' for
        Path.home, None when the chain does not start at a name."""
        if isinstance(node, ast.Name):
            return self.aliases.get(node.id, node.id)
        if isinstance(node, ast.Attribute):
            base = self.dotted(node.value)
            return None if base is None else f"{base}.{node.attr}"
        if isinstance(node, ast.Call):
            base = self.dotted(node.func)
            return None if base is None else base  # Path("x").home -> pathlib.Path.home
        return None

    def fold(self, node) -> str | None:
        """The text ``node`` evaluates to when it is built from constants, or None.
        Parts that are not constant (in f-strings) become UNKNOWN."""
        if isinstance(node, ast.Constant):
            if isinstance(node.value, str):
                return node.value
            return node.value.decode("latin-1") if isinstance(node.value, bytes) else None
        if isinstance(node, ast.Name):
            return self.values.get(node.id)
        if isinstance(node, ast.Attribute):
            return SEPARATORS.get(self.dotted(node) or "")
        if isinstance(node, ast.BinOp):
            left, right = self.fold(node.left), self.fold(node.right)
            if isinstance(node.op, ast.Add) and left is not None and right is not None:
                return left + right
            if isinstance(node.op, ast.Div) and left is not None and right is not None:
                return posixpath.join(left, right)  # pathlib's /
            if isinstance(node.op, ast.Mult) and left is not None and \
                    isinstance(node.right, ast.Constant) and isinstance(node.right.value, int):
                return left * min(node.right.value, 100)
            return None
        if isinstance(node, ast.JoinedStr):
            parts = [self.fold(v.value if isinstance(v, ast.FormattedValue) else v)
                     for v in node.values]
            return "".join(UNKNOWN if p is None else p for p in parts)
        if isinstance(node, ast.Subscript) and isinstance(node.slice, ast.Slice):
            text = self.fold(node.value)
            bounds = [self._int(b) for b in (node.slice.lower, node.slice.upper, node.slice.step)]
            return None if text is None or "bad" in bounds else text[slice(*bounds)]
        if isinstance(node, ast.Call):
            return self._fold_call(node)
        return None

    @staticmethod
    def _int(node):
        if node is None:
            return None
        if isinstance(node, ast.UnaryOp) and isinstance(node.op, ast.USub):
            inner = FileScanner._int(node.operand)
            return "bad" if inner in (None, "bad") else -inner
        ok = isinstance(node, ast.Constant) and type(node.value) is int
        return node.value if ok else "bad"

    def _codes(self, node) -> list[int] | None:
        """[46, 46] for a list or tuple of int constants."""
        if isinstance(node, (ast.List, ast.Tuple)):
            codes = [self._int(e) for e in node.elts]
            if all(isinstance(c, int) and 0 <= c < 0x110000 for c in codes):
                return codes
        return None

    def _fold_call(self, node) -> str | None:
        func, args = node.func, node.args
        name = func.attr if isinstance(func, ast.Attribute) else getattr(func, "id", None)
        dotted = self.dotted(func) or ""
        if name == "chr" and len(args) == 1 and isinstance(self._int(args[0]), int):
            return chr(self._int(args[0]) % 0x110000)
        if name in ("str", "Path", "PurePath", "PosixPath") or dotted.endswith("path.join"):
            parts = [self.fold(a) for a in args]
            if not parts:
                return "."
            return None if None in parts else posixpath.join(*parts)
        if name in ("bytes", "bytearray") and args and self._codes(args[0]) is not None:
            return "".join(map(chr, self._codes(args[0])))
        if name == "fromhex" and args and self.fold(args[0]) is not None:
            try:
                return bytes.fromhex(self.fold(args[0])).decode("latin-1")
            except ValueError:
                return None
        if not isinstance(func, ast.Attribute):
            return None
        base = self.fold(func.value)
        if name in ("decode", "encode", "lower", "upper", "strip", "lstrip", "rstrip") and \
                base is not None and not args:
            return getattr(base, name)() if name not in ("decode", "encode") else base
        if name == "format" and base is not None:
            parts = [self.fold(a) for a in args]
            try:
                return base.format(*(UNKNOWN if p is None else p for p in parts))
            except (IndexError, KeyError, ValueError):
                return base
        if name == "join" and base is not None and args:
            items = self._items(args[0])
            return None if items is None else base.join(items)
        return None

    def _items(self, node) -> list[str] | None:
        """The texts of a list/tuple of foldable items, of map(chr, codes), or of
        (chr(c) for c in codes)."""
        if isinstance(node, (ast.List, ast.Tuple)):
            items = [self.fold(e) for e in node.elts]
            return None if None in items else items
        if isinstance(node, ast.Call) and getattr(node.func, "id", None) == "map" and \
                len(node.args) == 2 and getattr(node.args[0], "id", None) == "chr":
            codes = self._codes(node.args[1])
            return None if codes is None else [chr(c) for c in codes]
        if isinstance(node, (ast.GeneratorExp, ast.ListComp)) and len(node.generators) == 1:
            gen, elt = node.generators[0], node.elt
            codes = self._codes(gen.iter)
            if codes is not None and isinstance(elt, ast.Call) and \
                    getattr(elt.func, "id", None) == "chr" and isinstance(gen.target, ast.Name) \
                    and len(elt.args) == 1 and getattr(elt.args[0], "id", None) == gen.target.id:
                return [chr(c) for c in codes]
        return None

    def _absolute(self, node) -> bool:
        """Whether the expression holds an absolute path (a call in ABSOLUTE_CALLS, __file__,
        or a name assigned one)."""
        for sub in ast.walk(node):
            f = getattr(sub, "func", None)
            if isinstance(sub, ast.Call) and \
                    (f.attr if isinstance(f, ast.Attribute) else getattr(f, "id", None)) in \
                    ABSOLUTE_CALLS:
                return True
            if isinstance(sub, ast.Name) and sub.id in self.absolute | {"__file__"} or \
                    isinstance(sub, ast.Attribute) and sub.attr == "__file__":
                return True
        return False

    def _coded(self, node) -> bool:
        """Whether the expression spells text from codes (chr, bytes, b64decode, ... called or
        passed, as in map(chr, codes)) or uses a name assigned such text."""
        for sub in ast.walk(node):
            if isinstance(sub, ast.Attribute) and sub.attr in CODED_CALLS:
                return True
            if isinstance(sub, ast.Name) and sub.id in CODED_CALLS | self.coded:
                return True
        return False

    def _is_file_call(self, node: ast.Call) -> bool:
        func = node.func
        name = func.attr if isinstance(func, ast.Attribute) else getattr(func, "id", None)
        top = (self.dotted(func) or "").split(".")[0]
        return name in FILE_CALLS or top in FILE_MODULES or \
            (name in ARRAY_IO and top in ARRAY_MODULES)

    # -- visiting --------------------------------------------------------------------------------
    def visit_Import(self, node):
        for a in node.names:
            self.aliases[(a.asname or a.name).split(".")[0]] = \
                a.name if a.asname else a.name.split(".")[0]
            if a.name in LOCATION_MODULES or a.name.split(".")[0] in ("site", "sysconfig"):
                self.flag(node, "imports where modules live")
        self.generic_visit(node)

    def visit_ImportFrom(self, node):
        module = node.module or ""
        for a in node.names:
            dotted = f"{module}.{a.name}"
            self.aliases[a.asname or a.name] = dotted
            from_os = module in ("os", "posix", "os.path") and \
                a.name in LOCATION_CALLS | {"environ", "environb", "pardir"}
            if from_os or module in LOCATION_MODULES | {"site", "sysconfig"} or \
                    dotted in LOCATION_ATTRS | LOCATION_MODULES:
                self.flag(node, f"imports {dotted}")
        self.generic_visit(node)

    def visit_Assign(self, node):
        self.generic_visit(node)
        value = self.fold(node.value)
        coded, absolute = self._coded(node.value), self._absolute(node.value)
        for target in node.targets:
            if isinstance(target, ast.Name):
                for table, on in ((self.coded, coded), (self.absolute, absolute)):
                    (table.add if on else table.discard)(target.id)
                if value is None:
                    self.values.pop(target.id, None)
                else:
                    self.values[target.id] = value

    def visit_Constant(self, node):
        if isinstance(node.value, str | bytes):
            why = outside(self.fold(node))
            if why:
                self.flag(node, why)

    def _check_built(self, node) -> bool:
        """Flag text put together from constants that names a place outside."""
        text = self.fold(node)
        why = text and outside(text)
        if why:
            self.details.append(f"{why} (put together: {text[:60]!r}): "
                                f"{ast.unparse(node)[:80]}")
        return bool(why)

    def visit_BinOp(self, node):
        if not self._check_built(node):
            self.generic_visit(node)

    def visit_JoinedStr(self, node):
        self._check_built(node)
        self.generic_visit(node)

    def visit_Subscript(self, node):
        key = self.fold(node.slice)
        namespace = re.search(r"__builtins__|__dict__|\b(vars|globals|locals)\(|sys\.modules",
                              ast.unparse(node.value))
        if key in FILE_NAMES and namespace:
            self.flag(node, f"reaches {key} by name")
        if not (isinstance(node.slice, ast.Slice) and self._check_built(node)):
            self.generic_visit(node)

    def visit_Attribute(self, node):
        dotted = self.dotted(node) or ""
        if dotted in LOCATION_ATTRS or node.attr in ("__file__", "__path__", "__cached__") or \
                node.attr in ("environ", "environb") and dotted.startswith(("os.", "posix.")):
            self.flag(node, "a place outside the folder")
        elif node.attr in ("parent", "parents") and self._absolute(node.value):
            self.flag(node, "climbs from an absolute path")
        self.generic_visit(node)

    def visit_Name(self, node):
        if node.id == "__file__" or self.aliases.get(node.id) in LOCATION_ATTRS:
            self.flag(node, "a place outside the folder")

    def visit_Call(self, node):
        func = node.func
        name = func.attr if isinstance(func, ast.Attribute) else getattr(func, "id", None)
        dotted = self.dotted(func) or ""
        top = dotted.split(".")[0]
        args = list(node.args) + [k.value for k in node.keywords]
        if name in LOCATION_CALLS and (top in FILE_MODULES | {"pathlib", "tempfile", "site",
                                                              "sysconfig", "inspect", "pkgutil",
                                                              "importlib"}
                                       or name in ("getcwd", "expanduser", "expandvars",
                                                   "getenv", "gettempdir", "chdir", "mkdtemp")
                                       or dotted.startswith("pathlib.")):
            self.flag(node, "a place outside the folder")
        elif name in ("dirname", "split") and "path" in dotted and args and \
                self._absolute(args[0]):
            self.flag(node, "climbs from an absolute path")
        if name in ("getattr", "hasattr", "import_module", "__import__", "find_spec",
                    "find_loader") and args:
            key = self.fold(args[1] if name in ("getattr", "hasattr") and len(args) > 1
                            else args[0])
            if key is not None and (key in FILE_NAMES or key.split(".")[0] in FILE_MODULES):
                self.flag(node, f"reaches {key} by name")
        if self._is_file_call(node):
            for arg in args:
                items = arg.elts if isinstance(arg, (ast.List, ast.Tuple)) else [arg]
                for item in items:
                    text = self.fold(item)
                    why = outside(text, words=True)
                    if why:
                        self.flag(node, why)
                    elif text is None and self._coded(item):
                        self.flag(node, "a path built from character codes")
        if not self._check_built(node):
            self.generic_visit(node)


def file_access(tree: ast.AST, aliases: dict[str, str]) -> list[str]:
    """One line per use of a file or folder outside the notebook's folder in ``tree`` (a
    parsed cell); ``aliases`` maps the names the setup cells imported to their modules."""
    scanner = FileScanner(aliases)
    scanner.visit(tree)
    return scanner.details


# For cells that do not parse (scanned as text only).
TEXT_PATTERN = re.compile(
    r"""['"](/[\w.]|~/|\.\./)|/\.\./|\bos\.(environ|getcwd|system|popen|listdir|scandir|walk|"""
    r"""pardir)|getenv|expanduser|\bPath\s*\.\s*(home|cwd)|__file__|sqlite3|shutil|"""
    r"""\b(chr|fromhex|b64decode)\s*\(""")
