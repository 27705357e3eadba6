"""Feedback HTML: offline math, no hidden tests, and a section for the grading status and findings.

nbgrader's ``generate_feedback`` renders the autograded notebook; nbgrader_config.py adds
``ClearHiddenTests`` (hidden test code is removed) and :class:`HideHiddenTracebacks` (a failing
hidden test shows only its message, not traceback lines quoting hidden test code) and points the
feedback template at a local MathJax 3 (templates/feedback/mathjax.html.j2), which
:func:`install_mathjax` copies next to the feedback.
"""

from __future__ import annotations

import html
import os
import shutil
import sysconfig
from pathlib import Path

from nbgrader.preprocessors import NbGraderPreprocessor
from nbgrader.utils import is_grade

MATHJAX_DIRNAME = "mathjax"


def mathjax_source() -> Path:
    """MathJax 3 as shipped by the PyPI package sphinx-mathjax-offline."""
    return Path(sysconfig.get_paths()["purelib"]) / "sphinx-mathjax-offline" / "static" / "mathjax"


def install_mathjax(feedback_root: str | os.PathLike) -> Path | None:
    """Copy MathJax to <feedback_root>/mathjax once; pages load ../../mathjax/tex-svg.js."""
    dest = Path(feedback_root) / MATHJAX_DIRNAME
    src = mathjax_source()
    if (dest / "tex-svg.js").is_file() or not (src / "tex-svg.js").is_file():
        return dest if dest.is_dir() else None
    tmp = Path(str(dest) + f".tmp{os.getpid()}")
    shutil.copytree(src, tmp, dirs_exist_ok=True)
    try:
        os.replace(tmp, dest)
    except OSError:  # another process won the race
        shutil.rmtree(tmp, ignore_errors=True)
    return dest


class HideHiddenTracebacks(NbGraderPreprocessor):
    """In test cells with a hidden-test region, cut tracebacks down to their last line
    (e.g. ``AssertionError: your softmax ...``): traceback frames quote the failing line, and in
    these cells that line may be hidden test code. Must run before ClearHiddenTests."""

    marker = "BEGIN HIDDEN TESTS"

    def preprocess_cell(self, cell, resources, index):
        if cell.cell_type == "code" and is_grade(cell) and self.marker in cell.source:
            for output in cell.get("outputs", []):
                if output.get("output_type") == "error" and output.get("traceback"):
                    output["traceback"] = output["traceback"][-1:]
        return cell, resources


def _section(status: str, score, max_score, findings: list[dict]) -> str:
    e = html.escape
    graded = status.startswith("graded")
    kind = "danger" if not graded else ("warning" if findings else "info")
    score_text = f"{score:g} / {max_score:g}" if score is not None and max_score else "no score"
    rows = "".join(
        f"<li><code>{e(f['finding'])}</code>: {e(f['detail'])}</li>" for f in findings
    )
    body = (
        f"<p><strong>Grading status:</strong> {e(status)} &mdash; <strong>score:</strong> "
        f"{e(score_text)}</p>"
    )
    if findings:
        body += (
            "<p><strong>Integrity findings</strong>, for your instructor to review:</p>"
            f"<ul>{rows}</ul>"
        )
    return f'<div class="alert alert-{kind}" id="qkv-grading" role="status">{body}</div>'


def add_section(page: str, status: str, score, max_score, findings: list[dict]) -> str:
    """Insert the status/findings section at the top of the feedback page's body."""
    section = _section(status, score, max_score, findings)
    marker = '<div tabindex="-1" id="notebook"'
    if marker in page:
        return page.replace(marker, section + "\n" + marker, 1)
    lower = page.lower()
    i = lower.find("<body")
    if i >= 0:
        j = page.find(">", i) + 1
        return page[:j] + "\n" + section + page[j:]
    return section + page


def ungradable_page(title: str, status: str, max_score, findings: list[dict]) -> str:
    """A feedback page for a submission nbgrader could not grade, or that is missing."""
    if status == "missing":  # scored 0, as nbgrader scores a missing notebook
        score = 0.0
        text = ("No notebook was found for this one, so it scores 0. If you did hand it in, check "
                "with your instructor that it was saved as &lt;chapter&gt;/&lt;notebook&gt;.ipynb "
                "with the names above.")
    else:
        score = None
        text = ("Your notebook could not be graded, so it has no score yet. Fix the problem named "
                "above and submit again, or ask your instructor.")
    return (
        "<!DOCTYPE html>\n<html><head><meta charset=\"utf-8\"><title>"
        + html.escape(title)
        + "</title></head><body style=\"font-family: sans-serif; margin: 2em\">\n<h1>"
        + html.escape(title)
        + "</h1>\n"
        + _section(status, score, max_score, findings)
        + f"\n<p>{text}</p>\n</body></html>\n"
    )
