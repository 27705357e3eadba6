"""``python -m qkv.grading release [CHAPTER...]``: regenerate exercises/ from solutions/.

Each chapter folder exercises/<chapter>/ is rebuilt from scratch by ``nbgrader
generate_assignment`` (solution regions replaced, hidden tests removed, outputs cleared, cells
locked and checksummed). Releasing does not touch the gradebook (``grade`` builds what it needs),
so it never fails because submissions exist, and its output depends only on solutions/: the
drift test in tests/test_release.py relies on that.
"""

from __future__ import annotations

import os
from pathlib import Path

from .course import GradingError, chapters, find_root, generate_assignment, load_config


def release(
    root: str | os.PathLike | None = None,
    selected: list[str] | None = None,
    out: str | os.PathLike | None = None,
) -> list[Path]:
    """Release ``selected`` chapters (default: all) into ``out`` (default: <root>/exercises).

    Returns the notebooks written.
    """
    root = find_root(root)
    available = chapters(root)
    selected = list(selected or available)
    unknown = [c for c in selected if c not in available]
    if unknown:
        raise GradingError(
            f"no such chapter in {root / 'solutions'}: {', '.join(unknown)}"
            f" (have: {', '.join(available) or 'none'})"
        )
    config = load_config(root)
    if out is not None:
        config.CourseDirectory.release_directory = str(Path(out).resolve())
    config.GenerateAssignment.no_database = True  # what `nbgrader generate_assignment --no-db` sets
    config.SaveCells.enabled = False
    config.Application.log_level = "WARN"
    written: list[Path] = []
    for chapter in selected:
        generate_assignment(config, chapter)
        dest = Path(config.CourseDirectory.release_directory)
        dest = (dest if dest.is_absolute() else root / dest) / chapter
        written += sorted(dest.glob("*.ipynb"))
    return written


def main(args) -> int:
    written = release(args.root, args.chapters)
    for path in written:
        print(f"released {path}")
    return 0
