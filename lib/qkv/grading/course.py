"""Where things are (repo root, chapters, notebooks) and how nbgrader is driven.

Chapters are the folders of ``solutions/`` (named like ``04-scores-and-softmax``); the nbgrader
assignment id is the chapter folder name and the notebook id is the notebook's file stem.
nbgrader is driven through its converter classes with the same calls ``NbGraderAPI`` makes
(``capture_log(app)`` returns ``{"success": ..., "log": ..., "error": ...}`` and never raises);
the API object itself is not used because it also probes an exchange folder we have no use for.
"""

from __future__ import annotations

import functools
import hashlib
import os
import shutil
import subprocess
import sys
from pathlib import Path

from traitlets.config import Config, PyFileConfigLoader

CONFIG_FILE = "nbgrader_config.py"


class GradingError(RuntimeError):
    """nbgrader could not do what was asked; the message carries its log."""


def find_root(root: str | os.PathLike | None = None) -> Path:
    """The course root: ``root`` if given, else the working folder, else the repo holding qkv."""
    candidates = [Path(root)] if root else [Path.cwd(), Path(__file__).resolve().parents[3]]
    for path in candidates:
        if (path / CONFIG_FILE).is_file():
            return path.resolve()
    raise GradingError(f"no {CONFIG_FILE} in {', '.join(map(str, candidates))}")


def load_config(root: Path) -> Config:
    """The course's nbgrader_config.py, as nbgrader itself would load it."""
    _tools_on_path()
    _cache_alembic_head()
    return PyFileConfigLoader(CONFIG_FILE, path=str(root)).load_config()


def _tools_on_path() -> None:
    """nbgrader's Gradebook shells out to `alembic`: make sure this interpreter's bin is on PATH."""
    bindir = os.path.dirname(sys.executable)
    if shutil.which("alembic") is None and os.path.isfile(os.path.join(bindir, "alembic")):
        os.environ["PATH"] = bindir + os.pathsep + os.environ.get("PATH", "")


def _cache_alembic_head() -> None:
    """nbgrader runs `alembic heads` in a subprocess for every new gradebook (seconds each); the
    answer only depends on the installed nbgrader, so ask once per process."""
    import nbgrader.api

    if not hasattr(nbgrader.api.get_alembic_version, "cache_info"):
        nbgrader.api.get_alembic_version = functools.cache(nbgrader.api.get_alembic_version)


def chapters(root: Path) -> list[str]:
    """Chapter folders of solutions/ that hold at least one notebook, sorted."""
    src = root / "solutions"
    if not src.is_dir():
        return []
    return sorted(p.name for p in src.iterdir() if p.is_dir() and any(p.glob("*.ipynb")))


def notebooks(root: Path, chapter: str) -> list[str]:
    """Notebook ids (file stems) of a chapter's source notebooks, sorted."""
    return sorted(p.stem for p in (root / "solutions" / chapter).glob("*.ipynb"))


def notebooks_under(folder: Path) -> list[Path]:
    """The .ipynb files in folder and its subfolders, sorted, leaving out hidden ones (such as
    Jupyter's .ipynb_checkpoints/)."""
    if not folder.is_dir():
        return []
    return sorted(p for p in folder.rglob("*.ipynb") if p.is_file() and not any(
        part.startswith(".") for part in p.relative_to(folder).parts))


def other_copies(root: Path) -> list[Path]:
    """What other checkouts of this repository give away: each git worktree's solutions/ and
    _grading/, and the shared .git folder (solutions/ is in its history). A kernel runs with the
    rights of a user who may read them, so the sandbox hides them like the course's own."""
    def git(*args: str) -> str:
        try:
            done = subprocess.run(["git", "-C", str(root), *args], capture_output=True,
                                  text=True, timeout=30)
        except (OSError, subprocess.SubprocessError):
            return ""
        return done.stdout if done.returncode == 0 else ""

    paths = []
    for line in git("worktree", "list", "--porcelain").splitlines():
        if line.startswith("worktree ") and Path(line[9:]).resolve() != root.resolve():
            paths += [Path(line[9:]) / "solutions", Path(line[9:]) / "_grading"]
    common = git("rev-parse", "--path-format=absolute", "--git-common-dir").strip()
    if common:
        paths.append(Path(common))
    return paths


def sha256(path: str | os.PathLike) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def run(converter_cls, config: Config, **coursedir_traits) -> dict:
    """Run one nbgrader converter (GenerateAssignment, Autograde, GenerateFeedback) the way
    NbGraderAPI does: force=True, and return capture_log's dict."""
    from nbgrader.coursedir import CourseDirectory
    from nbgrader.utils import capture_log

    coursedir = CourseDirectory(config=config)
    for name, value in coursedir_traits.items():
        setattr(coursedir, name, value)
    app = converter_cls(coursedir=coursedir, config=config)
    app.force = True
    return capture_log(app)


def generate_assignment(config: Config, chapter: str) -> None:
    """``nbgrader generate_assignment CHAPTER --force`` with ``config``; raise on failure."""
    from nbgrader.converters import GenerateAssignment

    result = run(GenerateAssignment, config, assignment_id=chapter)
    if not result["success"]:
        raise GradingError(
            f"nbgrader generate_assignment {chapter} failed:\n"
            + (result.get("log") or "")
            + (result.get("error") or "")
        )
