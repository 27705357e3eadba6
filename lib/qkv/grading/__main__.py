"""Command line: ``python -m qkv.grading release [CHAPTER...]`` | ``grade SUBMISSIONS``."""

from __future__ import annotations

import argparse
import sys

from .course import GradingError


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m qkv.grading", description=__doc__)
    parser.add_argument("--root", help="course root (default: the folder with nbgrader_config.py)")
    sub = parser.add_subparsers(dest="command", required=True)

    rel = sub.add_parser("release", help="regenerate exercises/ from solutions/")
    rel.add_argument("chapters", nargs="*", metavar="CHAPTER", help="default: every chapter")

    grade = sub.add_parser(
        "grade", help="autograde SUBMISSIONS/<student>/<chapter>/<notebook>.ipynb")
    grade.add_argument("submissions", metavar="SUBMISSIONS")
    grade.add_argument("--workers", type=int, help="parallel submissions (default: all cores)")
    grade.add_argument("--timeout", type=int, help="seconds per cell (default: nbgrader_config.py)")
    grade.add_argument("--mem-mb", type=int, help="kernel address-space limit (default 4096)")
    grade.add_argument("--cpu-s", type=int, help="kernel CPU-seconds limit (default 600)")
    grade.add_argument("--out", help="grades, feedback and gradebook go here (default: _grading)")
    grade.add_argument("--force", action="store_true", help="regrade even unchanged submissions")
    grade.add_argument("--hide", action="append", metavar="PATH",
                       help="a file or folder kernels must not see, e.g. another copy of "
                            "solutions/ (repeatable)")
    grade.add_argument("--keep-scratch", action="store_true", help="keep scratch roots (debugging)")

    args = parser.parse_args(argv)
    try:
        if args.command == "release":
            from .release import main as release_main

            return release_main(args)
        from .driver import main as grade_main

        return grade_main(args)
    except GradingError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
