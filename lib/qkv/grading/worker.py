"""Grade ONE submitted notebook in a scratch nbgrader course root of its own.

Run by the driver as ``python -m qkv.grading.worker JOB.json`` (one process per submission). The
scratch root (``tempfile.mkdtemp``) holds a copy of the chapter's gradebook (made once per chapter
by ``generate_assignment``) and this one submission, so whatever the submission does to a
gradebook, it cannot reach another student's rows; the driver merges the scores into
_grading/gradebook.db afterwards. Autograding is nbgrader's own ``Autograde`` converter with two
changes made by configuration:

* the kernel is the sandboxed "qkv-grader" kernel spec (sandbox.py), not the notebook's own;
* ``Execute`` is :class:`QkvExecute`, which, before each test cell, puts back the import-time
  numpy/qkv/builtins/torch namespaces (so ``qkv.grading.check_x = lambda *a: None`` in an answer
  cell cannot replace the checker that the test cell re-imports), and checks after each test cell
  that the cell's code really ran (an IPython input transformer installed by a learner can blank
  later cells, which nbgrader would otherwise score as passed).

The result (status, score, per-test scores, integrity findings) is written atomically to the
job's result file; the feedback page to the job's feedback path.
"""

from __future__ import annotations

import json
import os
import re
import secrets
import shutil
import sys
import tempfile
import time
import traceback
from pathlib import Path
from queue import Empty

import nbformat
import nbgrader.converters  # noqa: F401 - imported here so the driver's fork server preloads them
import nbgrader.preprocessors  # noqa: F401
from nbgrader.api import Gradebook  # noqa: F401

from ..data import local_corpus
from .course import load_config, run
from .feedback import add_section, ungradable_page
from .integrity import FINDINGS, restore, scan
from .sandbox import kill_uid, remove_workdirs, write_kernelspec

FINDINGS.setdefault(
    "test-cell-not-run",
    "a test cell's code did not run as written (e.g. an IPython input transformer); no credit",
)
CANARY_ERROR = "QkvTestDidNotRun"
# Evaluated in the kernel before each test cell: qkv.grading._trusted.resanitize() puts every
# function and module that numpy, qkv (qkv.grading's checkers included), builtins and torch held
# when qkv.grading was imported back in place. A no-op if the notebook never imported it.
RESET_EXPRESSION = ("(lambda m: m and m.resanitize())"
                    "(__import__('sys').modules.get('qkv.grading._trusted'))")
MAX_STREAM_CHARS = 100_000
# The cell QkvExecute is running (its grade id, or "cell N"); None between cells. When nbgrader
# gives up on a notebook (a kernel that died or ignored the interrupt), this names the culprit.
RUNNING: dict[str, str | None] = {"cell": None}
UID_BASE = 1_700_000_000  # kernels run as UID_BASE + worker pid (root only; see sandbox.py)


def atomic_write(path: str | os.PathLike, text: str) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)


# -- nbgrader preprocessors ----------------------------------------------------------------------

def _make_preprocessors():
    """Defined lazily so that importing this module does not import nbgrader's executor."""
    from jupyter_core.utils import ensure_async, run_sync
    from nbgrader.preprocessors import Execute, NbGraderPreprocessor
    from nbgrader.utils import is_grade, is_solution

    class QkvExecute(Execute):
        """nbgrader's Execute, plus a check that each test cell's code really ran.

        Before a test cell runs, a line binding a random name to a random token is appended to
        it (in memory only). Afterwards the kernel is asked for that name through
        ``user_expressions``, which IPython evaluates without passing through input transformers.
        If the cell finished without an error but the name is not bound, its code was rewritten
        on the way in: the cell gets an error output, so nbgrader scores it zero."""

        def preprocess_cell(self, cell, resources, index):
            RUNNING["cell"] = cell.metadata.get("nbgrader", {}).get("grade_id") or (
                f"cell {index + 1}")
            out = self._run_cell(cell, resources, index)
            RUNNING["cell"] = None
            return out

        def _run_cell(self, cell, resources, index):
            if not (cell.cell_type == "code" and is_grade(cell) and not is_solution(cell)
                    and cell.source.strip()):
                return super().preprocess_cell(cell, resources, index)
            # Learner code may have rebound qkv.grading.check_x (which the test cell re-imports),
            # np.allclose, ...: put the import-time objects back first (qkv.grading._trusted).
            run_sync(self._evaluate)(RESET_EXPRESSION)
            token = secrets.token_hex(12)
            name = f"_qkv_ran_{token[:10]}"
            original = cell.source
            cell.source = f"{original}\n{name} = {token!r}"
            try:
                cell, resources = super().preprocess_cell(cell, resources, index)
            finally:
                cell.source = original
            failed = any(o.get("output_type") == "error" for o in cell.get("outputs", []))
            if not failed and run_sync(self._evaluate)(name) != repr(token):
                cell.outputs.append(nbformat.v4.new_output(
                    "error",
                    ename=CANARY_ERROR,
                    evalue="this test cell's code did not run as written, so it gets no credit",
                    traceback=[f"{CANARY_ERROR}: this test cell's code did not run as written "
                               "(was an IPython input transformer installed?)"],
                ))
            return cell, resources

        async def _evaluate(self, expression: str) -> str | None:
            """The repr of ``expression`` evaluated in the kernel, or None on an error or no
            answer. Sent as a ``user_expressions`` of an empty silent request, which IPython
            evaluates without passing it through input transformers."""
            msg_id = await ensure_async(self.kc.execute(
                "", silent=True, store_history=False, user_expressions={"v": expression}))
            deadline = time.monotonic() + 10
            while (left := deadline - time.monotonic()) > 0:
                try:
                    msg = await ensure_async(self.kc.shell_channel.get_msg(timeout=left))
                except Empty:
                    return None
                if msg["parent_header"].get("msg_id") == msg_id:
                    value = msg["content"].get("user_expressions", {}).get("v", {})
                    if value.get("status") != "ok":
                        return None
                    return value.get("data", {}).get("text/plain", "")
            return None

    class TrimOutput(NbGraderPreprocessor):
        """LimitOutput counts lines; this caps characters too (one 100 MB line is one line)."""

        def preprocess_cell(self, cell, resources, index):
            for output in cell.get("outputs", []):
                if output.get("output_type") == "stream" and len(output.text) > MAX_STREAM_CHARS:
                    output.text = output.text[:MAX_STREAM_CHARS] + "\n... Output truncated ..."
            return cell, resources

    return QkvExecute, TrimOutput


# -- one submission ------------------------------------------------------------------------------

def _status_from_log(text: str, cell: str | None = None) -> str:
    where = f" in {cell}" if cell else ""
    if re.search(r"DeadKernelError|Kernel died", text):
        return f"ungradable: kernel died{where} (os._exit, a crash, or out of memory)"
    if re.search(r"Timeout waiting for IOPub|UnresponsiveKernelError|interrupt", text, re.I) and \
            re.search(r"[Tt]imeout", text):
        return (f"ungradable: timeout{where} (a cell ran too long and the kernel ignored the "
                "interrupt)")
    if re.search(r"kernel_info|Kernel didn't respond|Failed to run command", text):
        return "ungradable: the kernel did not start"
    if re.search(r"failed to validate|ValidationError|SchemaTooOld|SchemaTooNew", text):
        return "ungradable: nbgrader metadata is corrupted"
    last = [ln for ln in text.strip().splitlines() if ln.strip()][-1:] or ["unknown error"]
    return f"ungradable: grading error ({last[0].strip()[:200]})"


def _config(job: dict, scratch: Path):
    from nbconvert.preprocessors import ClearMetadataPreprocessor
    from nbgrader.preprocessors import (
        AssignLatePenalties,
        CheckCellMetadata,
        IgnorePattern,
        LimitOutput,
        SaveAutoGrades,
    )

    QkvExecute, TrimOutput = _make_preprocessors()
    cfg = load_config(Path(job["root"]))
    cfg.CourseDirectory.root = str(scratch)
    cfg.CourseDirectory.course_id = "qkv"
    cfg.CourseDirectory.source_directory = "source"
    cfg.CourseDirectory.submitted_directory = "submitted"
    cfg.CourseDirectory.autograded_directory = "autograded"
    cfg.CourseDirectory.feedback_directory = "feedback"
    cfg.CourseDirectory.db_url = f"sqlite:///{scratch / 'gradebook.db'}"
    cfg.Execute.kernel_name = "qkv-grader"
    cfg.Execute.timeout = int(job["timeout"])
    cfg.Autograde.autograde_preprocessors = [
        QkvExecute, IgnorePattern, ClearMetadataPreprocessor, LimitOutput, TrimOutput,
        SaveAutoGrades, AssignLatePenalties, CheckCellMetadata,
    ]
    cfg.HTMLExporter.extra_template_basedirs = [
        str(Path(__file__).parent / "templates"),
        *[d for d in cfg.HTMLExporter.get("extra_template_basedirs", []) if "nbgrader" in d],
    ]
    # Feedback is opened by the student and often by the instructor, in a browser, from disk: a
    # learner's HTML or JavaScript output must not run there (or restyle the grader's own box).
    cfg.HTMLExporter.sanitize_html = True
    cfg.Application.log_level = "INFO"
    return cfg


def _scores(db_url: str, job: dict) -> tuple[float, float, list[dict], bool]:
    with Gradebook(db_url) as gb:
        nb = gb.find_submission_notebook(job["notebook"], job["chapter"], job["student"])
        grades = [
            {"grade_id": g.name, "score": g.score, "auto_score": g.auto_score,
             "max_score": g.max_score, "needs_manual_grade": bool(g.needs_manual_grade)}
            for g in nb.grades
        ]
        return float(nb.score), float(nb.max_score), grades, any(
            g["needs_manual_grade"] for g in grades)


def grade(job: dict) -> dict:
    """Grade the job's submission; return the result (also written to job["result_path"])."""
    from nbgrader.converters import Autograde, GenerateFeedback

    start = time.monotonic()
    student, chapter, notebook = job["student"], job["chapter"], job["notebook"]
    title = f"{student} / {chapter} / {notebook}"
    scratch = Path(tempfile.mkdtemp(prefix="qkv-grade-", dir=job.get("scratch_parent")))
    uid = UID_BASE + os.getpid()
    result = {k: job[k] for k in ("student", "chapter", "notebook", "sha256", "source_sha256")}
    result.update(score=None, max_score=job.get("max_score"), grades=[], findings=[], notes=[])
    note = job.get("status_note", "")  # " (submitted as 'softmax (1).ipynb')" for a renamed file
    page = None
    try:
        submitted = nbformat.read(job["submission"], as_version=4)
        released = nbformat.read(job["release_nb"], as_version=4)
        findings = [{"finding": f.finding, "detail": f.detail} for f in scan(submitted, released)]
        result["findings"] = findings

        sub_dir = scratch / "submitted" / student / chapter
        sub_dir.mkdir(parents=True)
        nbformat.write(restore(submitted, released), sub_dir / f"{notebook}.ipynb")
        shutil.copy(job["chapter_db"], scratch / "gradebook.db")
        data = Path(job["source_dir"])
        for path in data.rglob("*"):  # the chapter's data files (autograde copies them over)
            skip = path.suffix == ".ipynb" or ".ipynb_checkpoints" in path.parts
            if path.is_file() and not skip:
                dest = scratch / "source" / chapter / path.relative_to(data)
                dest.parent.mkdir(parents=True, exist_ok=True)
                shutil.copy(path, dest)

        env = {f"QKV_SANDBOX_{k.upper()}": str(v) for k, v in job["sandbox"].items()}
        env["QKV_SANDBOX_HIDE"] = os.pathsep.join([str(scratch), *job["hide"]])
        env["QKV_SANDBOX_UID"] = str(uid)
        corpus = local_corpus()
        if corpus is not None:  # the kernel reads the same corpus the grader would
            env["QKV_SANDBOX_DATA"] = str(corpus)
        env["QKV_SANDBOX_READONLY"] = os.pathsep.join(
            [job["root"], sys.prefix, sys.base_prefix, os.path.expanduser("~")])
        write_kernelspec(str(scratch / "jupyter"), env)
        os.environ["JUPYTER_PATH"] = str(scratch / "jupyter")

        cfg = _config(job, scratch)
        RUNNING["cell"] = None
        out = run(Autograde, cfg, assignment_id=chapter, student_id=student, notebook_id=notebook)
        log = (out.get("log") or "") + (out.get("error") or "")
        result["log_tail"] = log[-4000:]
        autograded = scratch / "autograded" / student / chapter / f"{notebook}.ipynb"
        if out["success"] and autograded.is_file():
            score, max_score, grades, manual = _scores(cfg.CourseDirectory.db_url, job)
            graded = nbformat.read(autograded, as_version=4)
            notes = []
            for i, cell in enumerate(graded.cells):
                for o in cell.get("outputs", []):
                    if o.get("output_type") != "error":
                        continue
                    where = cell.metadata.get("nbgrader", {}).get("grade_id") or f"cell {i + 1}"
                    if o.get("ename") == "CellTimeoutError":
                        notes.append(f"{where} timed out and was interrupted")
                    if o.get("ename") == CANARY_ERROR:
                        findings.append({"finding": "test-cell-not-run", "detail": where})
            status = "graded" + note + (" (needs manual grading)" if manual else "")
            if notes:
                status += " (" + "; ".join(notes) + ")"
            result.update(score=score, max_score=max_score, grades=grades, notes=notes)
            fb = run(GenerateFeedback, cfg, assignment_id=chapter, student_id=student,
                     notebook_id=notebook)
            html_path = scratch / "feedback" / student / chapter / f"{notebook}.html"
            if fb["success"] and html_path.is_file():
                page = add_section(html_path.read_text(encoding="utf-8"), status, score,
                                   max_score, findings)
            else:
                result["notes"].append("feedback could not be rendered")
                page = ungradable_page(title, status + " (feedback could not be rendered)",
                                       max_score, findings)
            dest = Path(job["autograded_path"])
            dest.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy(autograded, dest)
        else:
            status = _status_from_log(log, RUNNING["cell"]) + note
        result["status"] = status
    except Exception as e:  # noqa: BLE001 - any failure must end as a row, never a crash
        result["status"] = f"ungradable: grading error ({type(e).__name__}: {e})"[:300] + note
        result["log_tail"] = traceback.format_exc()[-4000:]
    finally:
        kill_uid(uid)  # anything the kernel left running
        remove_workdirs(uid)  # its working folders in a shared /tmp
        if not job.get("keep_scratch"):
            shutil.rmtree(scratch, ignore_errors=True)
    if page is None:
        page = ungradable_page(title, result["status"], result["max_score"], result["findings"])
    atomic_write(job["feedback_path"], page)
    result["seconds"] = round(time.monotonic() - start, 2)
    atomic_write(job["result_path"], json.dumps(result, indent=1, sort_keys=True))
    return result


def worker_entry(jobfile: str, logfile: str) -> None:
    """Process entry point used by the driver: own session (so the driver can kill the whole
    group), output to the job's log file, then grade."""
    os.setsid()
    fd = os.open(logfile, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    os.dup2(fd, 1)
    os.dup2(fd, 2)
    null = os.open(os.devnull, os.O_RDONLY)
    os.dup2(null, 0)
    try:
        main([jobfile])
    finally:
        sys.stdout.flush()
        sys.stderr.flush()


def main(argv: list[str]) -> int:
    with open(argv[0], encoding="utf-8") as f:
        job = json.load(f)
    grade(job)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
