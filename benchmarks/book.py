"""Wall time of a full book build (what ``make book`` runs) from a clean _build.

The repository is copied to a temporary folder first, so the real _build is left alone and the
build cannot reuse anything. Skipped in --quick.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from .common import ROOT, log

# Not part of the book's sources: never copied.
IGNORE = shutil.ignore_patterns(".git", ".venv", "_build", "_grading", "__pycache__",
                                ".pytest_cache", ".ruff_cache", ".ipynb_checkpoints", "out-*")
COMMAND = ["--builder", "html", "-W", "-n", "--keep-going"]  # as in the Makefile's book target


def run(args) -> list[dict]:
    section = dict(name="book", title="Book (jupyter-book build, clean _build)",
                   columns=["status", "wall_s", "pages"], rows=[], notes=[])
    if args.quick:
        section["rows"].append(dict(status="skipped in --quick"))
        return [section]
    bin_dir = Path(sys.executable).parent
    env = {**os.environ, "PATH": f"{bin_dir}{os.pathsep}{os.environ.get('PATH', '')}"}
    with tempfile.TemporaryDirectory(prefix="qkv-bench-book-") as tmp:
        copy = Path(tmp) / "repo"
        shutil.copytree(ROOT, copy, ignore=IGNORE, symlinks=True)
        log(f"  book: jupyter-book build in {copy}")
        t0 = time.perf_counter()
        proc = subprocess.run([str(bin_dir / "jupyter-book"), "build", ".", *COMMAND], cwd=copy,
                              env=env, capture_output=True, text=True)
        wall = time.perf_counter() - t0
        pages = len(list((copy / "_build" / "html" / "book").glob("*.html")))
    status = "ok" if proc.returncode == 0 else f"build failed (exit {proc.returncode})"
    section["rows"].append(dict(status=status, wall_s=wall, pages=pages))
    section["notes"].append("command: jupyter-book build . " + " ".join(COMMAND)
                            + " (every page executed)")
    return [section]
