"""``python -m qkv.grading grade SUBMISSIONS``: grade SUBMISSIONS/<student>/<chapter>/<nb>.ipynb.

Writes, under _grading/:

* ``grades.csv`` (student, chapter, notebook, score, max_score, status, findings) and
  ``integrity.csv`` (student, chapter, notebook, finding, detail), rebuilt from the result files
  on every run;
* ``results/<student>/<chapter>/<notebook>.json``: one per submission, written atomically when
  it is done, keyed by the sha256 of the submitted file and of the source notebook. A re-run
  skips submissions whose result matches, so an interrupted run resumes where it stopped;
* ``feedback/<student>/<chapter>/<notebook>.html`` (and ``feedback/mathjax/`` for offline math);
* ``gradebook.db``: nbgrader's gradebook, into which the scores are merged (serially, by this
  process) after each submission is graded in isolation by worker.py; plus copies of the
  submitted and autograded notebooks, so that nbgrader's own tools (formgrader, export) work.

Every expected notebook gets a row. Status is ``graded`` (possibly with notes), ``missing``, or
``ungradable: <why>``; the command exits 1 if any row is not graded, so nothing ends as a silent
zero. SUBMISSIONS is only read.
"""

from __future__ import annotations

import csv
import io
import json
import multiprocessing
import os
import re
import shutil
import signal
import tempfile
import threading
import time
import warnings
from concurrent.futures import ThreadPoolExecutor, as_completed
from pathlib import Path

from .course import (
    GradingError,
    chapters,
    find_root,
    generate_assignment,
    load_config,
    notebooks,
    notebooks_under,
    other_copies,
    sha256,
)
from .feedback import install_mathjax, ungradable_page
from .sandbox import kill_uid, sandbox_report
from .worker import UID_BASE, atomic_write, worker_entry

_CONTEXT = None


def _context():
    """A fork server that has imported the worker (and with it nbgrader) once."""
    global _CONTEXT
    if _CONTEXT is None:
        _CONTEXT = multiprocessing.get_context("forkserver")
        _CONTEXT.set_forkserver_preload(["qkv.grading.worker"])
    return _CONTEXT

STUDENT_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.@-]*$")
SANDBOX_DEFAULTS = {"mem_mb": 4096, "cpu_s": 600, "fsize_mb": 64, "nproc": 256, "tmp_mb": 512}
# findings: how many rows integrity.csv has for the notebook, so the export itself shows them
GRADES_FIELDS = ["student", "chapter", "notebook", "score", "max_score", "status", "findings"]
INTEGRITY_FIELDS = ["student", "chapter", "notebook", "finding", "detail"]


def _precheck(path: Path) -> tuple[str | None, dict | None]:
    """(status, notebook json): status is None when the file looks like a notebook."""
    if not path.exists():
        return "missing", None
    if not path.is_file():
        return "ungradable: not a file", None
    raw = path.read_bytes()
    if not raw.strip():
        return "ungradable: empty file", None
    try:
        data = json.loads(raw.decode("utf-8"))
    except UnicodeDecodeError as e:
        return f"ungradable: not UTF-8 text (byte {e.start})", None
    except json.JSONDecodeError as e:
        return f"ungradable: malformed JSON at line {e.lineno} column {e.colno}", None
    import nbformat

    try:
        nb = nbformat.reads(json.dumps(data), as_version=4)
        nbformat.validate(nb)
    except Exception as e:  # noqa: BLE001 - nbformat raises several kinds
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        return f"ungradable: not a valid notebook ({first[:160]})", None
    if not any(c.get("cell_type") == "code" for c in nb.cells):
        return "ungradable: notebook has no code cells", None
    return None, nb


class Grader:
    def __init__(self, submissions, root=None, workers=None, timeout=None, sandbox=None,
                 force=False, keep_scratch=False, grading_dir=None, log=print, hide=()):
        self.root = find_root(root)
        self.submissions = Path(submissions).resolve()
        if not self.submissions.is_dir():
            raise GradingError(f"no such folder: {self.submissions}")
        self.config = load_config(self.root)
        self.grading = Path(grading_dir).resolve() if grading_dir else self.root / "_grading"
        self.db_url = (f"sqlite:///{self.grading / 'gradebook.db'}" if grading_dir
                       else self.config.CourseDirectory.db_url)
        self.workers = workers or os.cpu_count() or 1
        self.timeout = int(timeout or self.config.Execute.get("timeout", 30))
        self.sandbox = dict(SANDBOX_DEFAULTS, **(sandbox or {}))
        self.sandbox.setdefault("threads", max(1, (os.cpu_count() or 1) // self.workers))
        self.force = force
        self.keep_scratch = keep_scratch
        self.hide = [Path(p).resolve() for p in hide]  # more paths no kernel may see
        self.log = log
        self.errors: list[str] = []
        self.procs: dict = {}
        self._start_lock = threading.Lock()
        self.interrupted = False

    # -- layout ------------------------------------------------------------------------------
    def path(self, kind: str, student: str, chapter: str, notebook: str, ext: str) -> Path:
        return self.grading / kind / student / chapter / f"{notebook}.{ext}"

    def discover(self) -> list[tuple[str, str, str]]:
        """Every (student, chapter, notebook) expected: each notebook of each chapter that any
        student handed in. A notebook not at <student>/<chapter>/<notebook>.ipynb is graded in
        place of a missing one when that is unambiguous (``self.stand_ins``), else skipped with
        a warning: the only one of a chapter folder under another name or in a subfolder
        ("softmax (1).ipynb", a zip's nested folder), or one with a chapter's notebook name
        outside any chapter folder (a flat upload: <student>/softmax.ipynb)."""
        known = {ch: notebooks(self.root, ch) for ch in chapters(self.root)}
        owner: dict[str, list[str]] = {}  # notebook name -> the chapters that have it
        for ch, names in known.items():
            for n in names:
                owner.setdefault(n, []).append(ch)
        students, in_play = [], set()
        self.stand_ins: dict[tuple[str, str, str], tuple[Path, str]] = {}
        loose: list[tuple[str, Path]] = []  # notebooks outside every chapter folder
        for sdir in sorted(p for p in self.submissions.iterdir() if p.is_dir()):
            if sdir.name.startswith("."):
                continue
            students.append(sdir.name)
            for entry in sorted(sdir.iterdir()):
                if entry.name.startswith("."):
                    continue
                if entry.is_dir() and entry.name in known:
                    in_play.add(entry.name)
                elif entry.suffix == ".ipynb" and entry.is_file():
                    loose.append((sdir.name, entry))
                elif entry.is_dir() and notebooks_under(entry):
                    loose += [(sdir.name, nb) for nb in notebooks_under(entry)]
                else:
                    self.log(f"warning: {sdir.name}/{entry.name}: not a chapter folder, skipped")
        for s, path in loose:
            rel = path.relative_to(self.submissions / s).as_posix()
            chs = owner.get(path.stem, [])
            key = (s, chs[0], path.stem) if len(chs) == 1 else None
            if key and key not in self.stand_ins and not (
                    self.submissions / s / chs[0] / path.name).exists():
                self.stand_ins[key] = (path, rel)
                in_play.add(chs[0])
                self.log(f"warning: {s}/{rel}: graded as {chs[0]}/{path.name}")
            else:
                self.log(f"warning: {s}/{rel}: not in a chapter folder, skipped")
        self.chapters = sorted(in_play)
        expected = set()
        for ch in self.chapters:
            names = known[ch]
            for s in students:
                folder = self.submissions / s / ch
                extras = [p for p in notebooks_under(folder)
                          if p.parent != folder or p.stem not in names]
                absent = [n for n in names if not (folder / f"{n}.ipynb").exists()
                          and (s, ch, n) not in self.stand_ins]
                if len(extras) == 1 and len(absent) == 1:
                    # One notebook under another name ("softmax (1).ipynb", as browsers save a
                    # second download) where one is missing: grade it, and say so in the status.
                    rel = extras[0].relative_to(folder).as_posix()
                    self.stand_ins[(s, ch, absent[0])] = (extras[0], rel)
                    self.log(f"warning: {s}/{ch}/{rel}: graded as {ch}/{absent[0]}.ipynb")
                else:
                    for extra in extras:
                        self.log(f"warning: {s}/{ch}/{extra.relative_to(folder).as_posix()}: "
                                 f"not a notebook of {ch} "
                                 f"({', '.join(n + '.ipynb' for n in names)}), skipped")
                expected.update((s, ch, n) for n in names)
        return sorted(expected)

    # -- per chapter ---------------------------------------------------------------------------
    def prepare_chapters(self, scratch: Path) -> None:
        """A gradebook holding the chapters in play (generate_assignment into a scratch root),
        to be copied for each submission; and the chapters' assignments in the main gradebook."""
        from nbgrader.api import Gradebook

        self.chapter_info: dict[str, dict] = {}
        tdir = scratch / "chapters"
        cfg = load_config(self.root)
        cfg.CourseDirectory.root = str(tdir)
        cfg.CourseDirectory.source_directory = "source"
        cfg.CourseDirectory.release_directory = "release"
        cfg.CourseDirectory.db_url = f"sqlite:///{tdir / 'gradebook.db'}"
        cfg.Application.log_level = "WARN"
        main = load_config(self.root)  # the course's own gradebook learns the assignments
        main.CourseDirectory.release_directory = str(tdir / "main-release")
        main.CourseDirectory.db_url = self.db_url
        main.Application.log_level = "WARN"
        for ch in self.chapters:
            shutil.copytree(self.root / "solutions" / ch, tdir / "source" / ch)
            generate_assignment(cfg, ch)
            with Gradebook(cfg.CourseDirectory.db_url) as gb:
                nbs = gb.find_assignment(ch).notebooks
                max_scores = {nb.name: float(nb.max_score) for nb in nbs}
            self.chapter_info[ch] = {"db": str(tdir / "gradebook.db"),
                                     "release": tdir / "release" / ch,
                                     "max": max_scores, "mergeable": True}
            try:
                generate_assignment(main, ch)
            except GradingError as e:
                self.chapter_info[ch]["mergeable"] = False
                self.errors.append(
                    f"{ch}: could not update {self.db_url} (scores are in grades.csv, not in "
                    f"the gradebook): {str(e).strip().splitlines()[-1]}")

    # -- jobs ----------------------------------------------------------------------------------
    def _source_hash(self, ch: str, nb: str) -> str:
        return sha256(self.root / "solutions" / ch / f"{nb}.ipynb") + f":t{self.timeout}"

    def _write_result(self, result: dict) -> None:
        s, ch, nb = result["student"], result["chapter"], result["notebook"]
        text = json.dumps(result, indent=1, sort_keys=True)
        atomic_write(self.path("results", s, ch, nb, "json"), text)

    def _immediate(self, s, ch, nb, status, sha, src) -> dict:
        """Result for a submission that never reaches nbgrader (missing, malformed ...)."""
        max_score = self.chapter_info[ch]["max"].get(nb)
        result = {"student": s, "chapter": ch, "notebook": nb, "sha256": sha, "source_sha256": src,
                  "status": status, "score": 0.0 if status == "missing" else None,
                  "max_score": max_score, "grades": [], "findings": [], "notes": [], "seconds": 0}
        self._write_result(result)
        page = ungradable_page(f"{s} / {ch} / {nb}", status, max_score, [])
        atomic_write(self.path("feedback", s, ch, nb, "html"), page)
        return result

    def plan(self, expected, scratch: Path) -> tuple[list[dict], list[dict]]:
        """Split into results already known and jobs to run."""
        done, jobs = [], []
        hide = [str(p) for p in (self.root / "solutions", self.root / "_grading", self.grading,
                                 self.root / ".git", self.submissions, scratch,
                                 *other_copies(self.root), *self.hide)]
        for s, ch, nb in expected:
            src = self._source_hash(ch, nb)
            path = self.submissions / s / ch / f"{nb}.ipynb"
            stand_in, shown = self.stand_ins.get((s, ch, nb), (None, ""))
            note = f" (submitted as {shown!r})" if stand_in else ""
            path = stand_in or path
            sha = sha256(path) if path.is_file() else None
            old = self.path("results", s, ch, nb, "json")
            if old.is_file() and not self.force:
                try:
                    prev = json.loads(old.read_text())
                    retry = prev.get("status", "").startswith("ungradable: grading error")
                    if prev.get("sha256") == sha and prev.get("source_sha256") == src and not retry:
                        done.append(prev)
                        continue
                except (OSError, ValueError):
                    pass
            if not STUDENT_ID.match(s):
                done.append(self._immediate(s, ch, nb, "ungradable: student folder name is not a "
                                            "valid id (letters, digits, _ . @ -)", sha, src))
                continue
            status, parsed = _precheck(path)
            if status:
                done.append(self._immediate(s, ch, nb, status + note, sha, src))
                continue
            copy = self.path("submitted", s, ch, nb, "ipynb")
            copy.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(path, copy)
            info = self.chapter_info[ch]
            n_code = sum(c.cell_type == "code" for c in parsed.cells)
            jobs.append({
                "root": str(self.root), "student": s, "chapter": ch, "notebook": nb,
                "submission": str(copy), "sha256": sha, "source_sha256": src,
                "chapter_db": info["db"], "release_nb": str(info["release"] / f"{nb}.ipynb"),
                "source_dir": str(self.root / "solutions" / ch), "max_score": info["max"].get(nb),
                "result_path": str(old),
                "feedback_path": str(self.path("feedback", s, ch, nb, "html")),
                "autograded_path": str(self.path("autograded", s, ch, nb, "ipynb")),
                "timeout": self.timeout, "sandbox": self.sandbox, "hide": hide,
                "keep_scratch": self.keep_scratch, "scratch_parent": str(scratch),
                "budget": self.timeout * (n_code + 4) + 120, "status_note": note,
            })
        return done, jobs

    def run_job(self, job: dict, jobdir: Path) -> dict | None:
        """Run worker.grade for one job in a process (and session) of its own.

        Processes are forked from a multiprocessing fork server that has imported nbgrader once
        (a fresh interpreter would spend seconds on imports for every submission)."""
        s, ch, nb = job["student"], job["chapter"], job["notebook"]
        jobfile = jobdir / f"{s}--{ch}--{nb}.json"
        jobfile.write_text(json.dumps(job))
        logfile = self.path("logs", s, ch, nb, "log")
        logfile.parent.mkdir(parents=True, exist_ok=True)
        result_path = Path(job["result_path"])
        result_path.unlink(missing_ok=True)
        start = time.monotonic()
        with self._start_lock:
            if self.interrupted:
                return None
            proc = _context().Process(target=worker_entry, args=(str(jobfile), str(logfile)))
            proc.start()
            self.procs[proc.pid] = proc
        try:
            proc.join(timeout=job["budget"])
            if proc.is_alive():
                problem = f"grading took longer than {job['budget']} s and was stopped"
                self._kill(proc)
            else:
                code = proc.exitcode
                problem = None if code == 0 else f"the grading process exited with code {code}"
        finally:
            self.procs.pop(proc.pid, None)
        if self.interrupted:  # killed by us: no result, so that a re-run grades it
            return None
        if result_path.is_file():
            try:
                return json.loads(result_path.read_text())
            except ValueError:
                problem = problem or "the result file is unreadable"
        kill_uid(UID_BASE + proc.pid)
        result = self._immediate(s, ch, nb, f"ungradable: grading error ({problem or 'no result'})",
                                 job["sha256"], job["source_sha256"])
        result["seconds"] = round(time.monotonic() - start, 2)
        self._write_result(result)
        return result

    def _kill(self, proc) -> None:
        for kill in (lambda: os.killpg(proc.pid, signal.SIGKILL), proc.kill):
            try:
                kill()
            except (ProcessLookupError, PermissionError):
                pass
        proc.join()
        kill_uid(UID_BASE + proc.pid)

    # -- gradebook -----------------------------------------------------------------------------
    def merge(self, result: dict) -> None:
        from nbgrader.api import Gradebook

        s, ch, nb = result["student"], result["chapter"], result["notebook"]
        if not self.chapter_info[ch]["mergeable"] or not STUDENT_ID.match(s):
            return
        by_id = {g["grade_id"]: g for g in result.get("grades", [])}
        status = result["status"]
        with Gradebook(self.db_url, "qkv") as gb, warnings.catch_warnings():
            warnings.simplefilter("ignore")  # nbgrader's SQLAlchemy use warns on newer SQLAlchemy
            gb.update_or_create_student(s)
            gb.update_or_create_submission(ch, s)
            snb = gb.find_submission_notebook(nb, ch, s)
            for grade in snb.grades:
                g = by_id.get(grade.name)
                if status.startswith("graded") and g:
                    grade.auto_score = g["auto_score"]
                    grade.needs_manual_grade = g["needs_manual_grade"]
                elif status == "missing":  # nbgrader's own convention for a missing notebook
                    grade.auto_score, grade.needs_manual_grade = 0.0, False
                else:  # no score: formgrader lists it as needing a look
                    grade.auto_score, grade.needs_manual_grade = None, True
            gb.db.commit()

    # -- reports -------------------------------------------------------------------------------
    def write_reports(self, results: list[dict]) -> None:
        results = sorted(results, key=lambda r: (r["student"], r["chapter"], r["notebook"]))
        grades, integrity = io.StringIO(), io.StringIO()
        gw = csv.DictWriter(grades, GRADES_FIELDS, lineterminator="\n")
        iw = csv.DictWriter(integrity, INTEGRITY_FIELDS, lineterminator="\n")
        gw.writeheader()
        iw.writeheader()
        for r in results:
            score = "" if r.get("score") is None else f"{r['score']:g}"
            max_score = "" if r.get("max_score") is None else f"{r['max_score']:g}"
            gw.writerow({"student": r["student"], "chapter": r["chapter"],
                         "notebook": r["notebook"], "score": score, "max_score": max_score,
                         "status": r["status"], "findings": len(r.get("findings", []))})
            for f in r.get("findings", []):
                iw.writerow({"student": r["student"], "chapter": r["chapter"],
                             "notebook": r["notebook"], **f})
        atomic_write(self.grading / "grades.csv", grades.getvalue())
        atomic_write(self.grading / "integrity.csv", integrity.getvalue())

    def summary(self, results: list[dict]) -> str:
        results = sorted(results, key=lambda r: (r["student"], r["chapter"], r["notebook"]))
        rows = [("student", "chapter", "notebook", "score", "findings", "status")]
        for r in results:
            score = "-" if r.get("score") is None else f"{r['score']:g}/{r.get('max_score') or 0:g}"
            rows.append((r["student"], r["chapter"], r["notebook"], score,
                         str(len(r.get("findings", []))), r["status"]))
        widths = [max(len(row[i]) for row in rows) for i in range(5)]
        lines = ["  ".join(c.ljust(w) for c, w in zip(row[:5], widths, strict=True)) + "  " + row[5]
                 for row in rows]
        graded = sum(r["status"].startswith("graded") for r in results)
        missing = sum(r["status"] == "missing" for r in results)
        flagged = sum(bool(r.get("findings")) for r in results)
        lines.append(
            f"\n{len(results)} notebooks: {graded} graded, {missing} missing, "
            f"{len(results) - graded - missing} ungradable; {flagged} with integrity findings")
        lines.append(f"gradebook: {self.db_url}")
        lines.append(f"grades:    {self.grading / 'grades.csv'}")
        lines.append(f"integrity: {self.grading / 'integrity.csv'}")
        lines.append(f"feedback:  {self.grading / 'feedback'}/<student>/<chapter>/<notebook>.html")
        lines += [f"error: {e}" for e in self.errors]
        return "\n".join(lines)

    # -- all of it -----------------------------------------------------------------------------
    def run(self) -> int:
        self.grading.mkdir(exist_ok=True)
        expected = self.discover()
        if not expected:
            self.log(f"nothing to grade in {self.submissions} "
                     "(expected <student>/<chapter>/<notebook>.ipynb)")
            return 1
        self.log(f"sandbox: {sandbox_report()}")
        # Everything temporary of this run (chapter gradebooks, job files, every submission's
        # scratch course root) lives in here, so it is all removed even if workers are killed.
        scratch = Path(tempfile.mkdtemp(prefix="qkv-run-"))
        results: list[dict] = []
        try:
            self.prepare_chapters(scratch)
            install_mathjax(self.grading / "feedback")
            done, jobs = self.plan(expected, scratch)
            for r in done:
                self.merge(r)
            results += done
            if done:
                self.log(f"{len(done)} result(s) already up to date or decided without running")
            self.log(f"grading {len(jobs)} notebook(s) with {self.workers} worker(s), "
                     f"{self.timeout} s per cell")
            jobdir = scratch / "jobs"
            jobdir.mkdir()
            with ThreadPoolExecutor(max_workers=self.workers) as pool:
                futures = [pool.submit(self.run_job, job, jobdir) for job in jobs]
                try:
                    for n, fut in enumerate(as_completed(futures), 1):
                        r = fut.result()
                        self.merge(r)
                        results.append(r)
                        score = "-" if r.get("score") is None else (
                            f"{r['score']:g}/{r['max_score']:g}")
                        self.log(f"[{n}/{len(jobs)}] {r['student']}/{r['chapter']}/"
                                 f"{r['notebook']}: {score} {r['status']} "
                                 f"({r.get('seconds', 0):.1f} s)")
                except KeyboardInterrupt:
                    with self._start_lock:
                        self.interrupted = True
                        running = list(self.procs.values())
                    for fut in futures:
                        fut.cancel()
                    for proc in running:
                        self._kill(proc)
                    self.log("interrupted: finished results are kept; run again to resume")
                    raise
            self.write_reports(results)
        finally:
            if not self.keep_scratch:
                shutil.rmtree(scratch, ignore_errors=True)
        self.log(self.summary(results))
        bad = [r for r in results if not r["status"].startswith("graded")]
        return 1 if bad or self.errors else 0


def main(args) -> int:
    sandbox = {k: v for k, v in {"mem_mb": args.mem_mb, "cpu_s": args.cpu_s}.items() if v}
    grader = Grader(args.submissions, root=args.root, workers=args.workers, timeout=args.timeout,
                    sandbox=sandbox, force=args.force, keep_scratch=args.keep_scratch,
                    grading_dir=args.out, hide=args.hide or ())
    def stop(signum, frame):  # SIGTERM (a CI timeout, `kill`): stop like Ctrl-C, cleanly
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, stop)
    try:
        return grader.run()
    except KeyboardInterrupt:
        return 130
