"""Exercise 1 in JupyterLab, driven in headless Chromium the way a learner works through it.

A JupyterLab server (127.0.0.1, a random token, no browser) serves a temporary copy of
``exercises/01-tokens-and-embeddings`` (the repository is never written). In Chromium:

1. open the untouched notebook, Run > Run All Cells; the first failing test cell stops the run, so
   each time re-run from the first cell that did not run (Run > Run Selected Cell and All Below)
   until every cell ran: every visible test cell shows "<function> is not implemented yet";
2. write the answers of ``solutions/01-tokens-and-embeddings`` into the notebook through the
   contents API (PUT /api/contents/...), File > Reload Notebook from Disk, Kernel > Restart Kernel
   and Run All Cells: every cell runs and no test cell shows an error.

The server is stopped by its process group at the end. Screenshots of both states go to
``_build/screenshots/``.
"""

import hashlib
import json
import os
import re
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path
from urllib.parse import quote

import pytest

pytestmark = pytest.mark.browser

ROOT = Path(__file__).resolve().parents[2]
CHAPTER = "01-tokens-and-embeddings"
NOTEBOOK = "tokens_and_embeddings.ipynb"
EXERCISE = ROOT / "exercises" / CHAPTER / NOTEBOOK
SOLUTION = ROOT / "solutions" / CHAPTER / NOTEBOOK
SCREENSHOTS = ROOT / "_build" / "screenshots"
VENV_BIN = Path(sys.executable).parent
START_TIMEOUT_S = 90
RUN_TIMEOUT_MS = 120_000
NOT_IMPLEMENTED = "is not implemented yet"

# JupyterLab user settings for the test server: no news or update checks (they would go to the
# network) and no autosave (it could write the notebook between the contents-API PUT and reload).
LAB_SETTINGS = {
    "@jupyterlab/apputils-extension/notification.jupyterlab-settings":
        {"fetchNews": "false", "checkForUpdates": False},
    "@jupyterlab/docmanager-extension/plugin.jupyterlab-settings": {"autosave": False},
}


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _nbgrader(cell):
    return cell.get("metadata", {}).get("nbgrader", {})


def _code_cells(nb):
    return [c for c in nb["cells"] if c["cell_type"] == "code"]


def _source(cell):
    src = cell["source"]
    return "".join(src) if isinstance(src, list) else src


def _solution_answers():
    """grade_id -> the solution's answer-cell source, without the ### BEGIN/END SOLUTION lines."""
    nb = json.loads(SOLUTION.read_text(encoding="utf-8"))
    answers = {}
    for cell in _code_cells(nb):
        if _nbgrader(cell).get("solution"):
            lines = _source(cell).splitlines(keepends=True)
            kept = [ln for ln in lines
                    if ln.strip() not in ("### BEGIN SOLUTION", "### END SOLUTION")]
            answers[_nbgrader(cell)["grade_id"]] = "".join(kept)
    return answers


class Lab:
    """A running JupyterLab server: its URL, token, process and the folder it serves."""

    def __init__(self, url, token, proc, root, log):
        self.url, self.token, self.proc, self.root, self.log = url, token, proc, root, log

    def api(self, method, path, body=None):
        data = None if body is None else json.dumps(body).encode()
        req = urllib.request.Request(
            f"{self.url}/api/{path}", data=data, method=method,
            headers={"Authorization": f"token {self.token}", "Content-Type": "application/json"})
        with urllib.request.urlopen(req, timeout=30) as resp:
            raw = resp.read()
        return json.loads(raw) if raw else None

    def log_tail(self):
        return self.log.read_text(encoding="utf-8", errors="replace")[-4000:]


@pytest.fixture(scope="module")
def lab(chromium_path, tmp_path_factory):
    """JupyterLab on 127.0.0.1 serving a temporary copy of the chapter's exercise folder."""
    base = tmp_path_factory.mktemp("lab")
    root = base / CHAPTER
    shutil.copytree(EXERCISE.parent, root)
    settings = base / "lab-settings"
    for rel, value in LAB_SETTINGS.items():
        (settings / rel).parent.mkdir(parents=True, exist_ok=True)
        (settings / rel).write_text(json.dumps(value), encoding="utf-8")
    env = dict(
        os.environ,
        PATH=f"{VENV_BIN}{os.pathsep}{os.environ.get('PATH', '')}",
        # keep the learner's own Jupyter and IPython set-up out of the test, and the test out of it
        JUPYTER_CONFIG_DIR=str(base / "config"), JUPYTER_DATA_DIR=str(base / "data"),
        JUPYTER_RUNTIME_DIR=str(base / "runtime"), JUPYTERLAB_SETTINGS_DIR=str(settings),
        JUPYTERLAB_WORKSPACES_DIR=str(base / "workspaces"), IPYTHONDIR=str(base / "ipython"),
    )
    token, port = secrets.token_hex(16), _free_port()
    cmd = [str(VENV_BIN / "jupyter-lab"), "--no-browser", "--ip=127.0.0.1", f"--port={port}",
           "--ServerApp.port_retries=0", f"--IdentityProvider.token={token}",
           f"--ServerApp.root_dir={root}", "--LabApp.news_url=None",
           "--LabApp.check_for_updates_class=jupyterlab.NeverCheckForUpdate"]
    if hasattr(os, "geteuid") and os.geteuid() == 0:
        cmd.append("--allow-root")  # CI containers run as root
    log = base / "jupyter-lab.log"
    with open(log, "wb") as out:
        proc = subprocess.Popen(cmd, cwd=root, env=env, stdout=out, stderr=subprocess.STDOUT,
                                stdin=subprocess.DEVNULL, start_new_session=True)
    server = Lab(f"http://127.0.0.1:{port}", token, proc, root, log)
    try:
        deadline = time.monotonic() + START_TIMEOUT_S
        while True:
            if proc.poll() is not None:
                pytest.fail(f"jupyter lab exited with {proc.returncode}:\n{server.log_tail()}")
            try:
                server.api("GET", "status")
                break
            except (urllib.error.URLError, ConnectionError, OSError):
                if time.monotonic() > deadline:
                    pytest.fail(f"jupyter lab did not answer in {START_TIMEOUT_S} s:\n"
                                f"{server.log_tail()}")
                time.sleep(0.5)
        yield server
    finally:
        _stop(server)


def _stop(server):
    """Shut the kernels down through the API, then end the server's process group."""
    if server.proc.poll() is None:
        try:
            for kernel in server.api("GET", "kernels") or []:
                server.api("DELETE", f"kernels/{kernel['id']}")
        except Exception:
            pass  # the process group is ended below either way
    try:
        os.killpg(server.proc.pid, signal.SIGTERM)
    except ProcessLookupError:
        pass
    try:
        server.proc.wait(timeout=15)
    except subprocess.TimeoutExpired:
        os.killpg(server.proc.pid, signal.SIGKILL)
        server.proc.wait(timeout=5)


# --- driving the notebook in the page -------------------------------------------------------

_PROMPTS = """() => Array.from(document.querySelectorAll('.jp-NotebookPanel .jp-CodeCell'))
  .map(c => (c.querySelector('.jp-InputPrompt') || {textContent: ''}).textContent.trim())"""

_STATUS = """() => { const e = document.querySelector('.jp-Notebook-ExecutionIndicator');
                     return e ? e.dataset.status : null; }"""

_CELL = """(i) => { const c = document.querySelectorAll('.jp-NotebookPanel .jp-CodeCell')[i];
  if (!c) return null;
  const outs = Array.from(c.querySelectorAll('.jp-OutputArea-output'));
  return {prompt: (c.querySelector('.jp-InputPrompt') || {textContent: ''}).textContent.trim(),
          source: (c.querySelector('.cm-content') || {textContent: ''}).textContent,
          output: outs.map(o => o.textContent).join('\\n'),
          errors: outs.filter(o => o.dataset.mimeType === 'application/vnd.jupyter.stderr')
                      .map(o => o.textContent.slice(-600))}; }"""


def _ran(prompt):
    return re.fullmatch(r"\[\d+\]:", prompt) is not None


def _open_notebook(page, lab, n_code_cells):
    page.goto(f"{lab.url}/lab/tree/{quote(NOTEBOOK)}?token={lab.token}")
    # JupyterLab attaches off-screen cells lazily: wait for all of them, then for the kernel.
    page.wait_for_function(
        "(n) => document.querySelectorAll('.jp-NotebookPanel .jp-CodeCell').length === n",
        arg=n_code_cells, timeout=RUN_TIMEOUT_MS)
    page.wait_for_function(f"() => ({_STATUS})() === 'idle'", timeout=RUN_TIMEOUT_MS)


def _menu(page, menu, item):
    page.get_by_role("menuitem", name=menu, exact=True).click()
    page.get_by_role("menuitem", name=re.compile("^" + re.escape(item))).click()


def _accept_dialog(page):
    page.locator(".jp-Dialog .jp-mod-accept").click()
    page.locator(".jp-Dialog").wait_for(state="detached")


def _wait_until_settled(page, must_run):
    """Wait until the kernel is idle, cell `must_run` has run and no cell is still queued."""
    page.wait_for_function(
        f"""(i) => {{ const p = ({_PROMPTS})(); const s = ({_STATUS})();
              return s === 'idle' && /^\\[\\d+\\]:$/.test(p[i]) && !p.includes('[*]:'); }}""",
        arg=must_run, timeout=RUN_TIMEOUT_MS, polling=250)


def _run_every_cell(page):
    """Run All, then re-run from each cell a failing test cell stopped, until every cell ran."""
    _menu(page, "Run", "Run All Cells")
    _wait_until_settled(page, 0)
    for _ in range(len(page.evaluate(_PROMPTS))):
        prompts = page.evaluate(_PROMPTS)
        pending = [i for i, p in enumerate(prompts) if not _ran(p)]
        if not pending:
            return
        page.locator(".jp-NotebookPanel .jp-CodeCell").nth(pending[0]) \
            .locator(".jp-InputPrompt").click()
        _menu(page, "Run", "Run Selected Cell and All Below")
        _wait_until_settled(page, pending[0])
    raise AssertionError(f"cells that never ran: {page.evaluate(_PROMPTS)}")


def _screenshot(page, name):
    SCREENSHOTS.mkdir(parents=True, exist_ok=True)
    page.screenshot(path=str(SCREENSHOTS / name))


# --- the test -------------------------------------------------------------------------------

def test_exercise_fails_untouched_and_passes_with_the_solution(browser, lab,
                                                                only_local_requests):
    repo_digest = hashlib.sha256(EXERCISE.read_bytes()).hexdigest()
    nb = json.loads((lab.root / NOTEBOOK).read_text(encoding="utf-8"))
    code = _code_cells(nb)
    tests = {i: _nbgrader(c)["grade_id"] for i, c in enumerate(code) if _nbgrader(c).get("grade")}
    answers = {i: _nbgrader(c)["grade_id"] for i, c in enumerate(code)
               if _nbgrader(c).get("solution")}
    assert tests and answers, "the exercise has no test cells or no answer cells"

    from playwright.sync_api import TimeoutError as PlaywrightTimeout

    context = browser.new_context(viewport={"width": 1400, "height": 1000})
    only_local_requests(context)
    page = context.new_page()
    page.set_default_timeout(60_000)
    page.on("dialog", lambda d: d.accept())  # "leave the page?" for an unsaved notebook
    foreign = []
    page.on("request", lambda r: not r.url.startswith(("http://127.0.0.1", "ws://127.0.0.1",
                                                       "data:", "blob:"))
            and foreign.append(r.url))
    try:
        # 1. The untouched exercise: every visible test names the function left to write.
        _open_notebook(page, lab, len(code))
        _run_every_cell(page)
        _screenshot(page, "lab-untouched-exercise.png")
        for i, grade_id in tests.items():
            cell = page.evaluate(_CELL, i)
            assert NOT_IMPLEMENTED in cell["output"], (
                f"test cell {grade_id!r} of the untouched exercise does not say "
                f"{NOT_IMPLEMENTED!r}; it shows:\n{cell['output'][-1500:]}")

        # 2. The solution written in through the contents API, reloaded in the page.
        solution = _solution_answers()
        model = lab.api("GET", f"contents/{quote(NOTEBOOK)}?content=1")
        missing = []
        for cell in model["content"]["cells"]:
            if cell["cell_type"] == "code" and _nbgrader(cell).get("solution"):
                grade_id = _nbgrader(cell)["grade_id"]
                if grade_id not in solution:
                    missing.append(grade_id)
                else:
                    cell["source"] = solution[grade_id]
        assert not missing, f"no solution for answer cells {missing} in {SOLUTION}"
        lab.api("PUT", f"contents/{quote(NOTEBOOK)}",
                {"type": "notebook", "format": "json", "content": model["content"]})

        _menu(page, "File", "Reload Notebook from Disk")
        try:  # the notebook has unsaved outputs, so JupyterLab asks before it reloads
            page.locator(".jp-Dialog .jp-mod-accept").wait_for(timeout=5_000)
            _accept_dialog(page)
        except PlaywrightTimeout:
            pass
        page.wait_for_function(
            f"""([ids, n]) => document.querySelectorAll('.jp-NotebookPanel .jp-CodeCell').length
                  === n && ids.every(i => {{
                    const c = ({_CELL})(i);
                    return c && !c.source.includes('NotImplementedError'); }})""",
            arg=[sorted(answers), len(code)])
        for i, grade_id in answers.items():
            assert "NotImplementedError" not in page.evaluate(_CELL, i)["source"], (
                f"answer cell {grade_id!r} still shows the stub after the reload")

        _menu(page, "Kernel", "Restart Kernel and Run All Cells")
        _accept_dialog(page)
        _wait_until_settled(page, len(code) - 1)
        _screenshot(page, "lab-solved-exercise.png")
        prompts = page.evaluate(_PROMPTS)
        assert all(_ran(p) for p in prompts), f"cells that did not run: {prompts}"
        for i, grade_id in tests.items():
            cell = page.evaluate(_CELL, i)
            assert not cell["errors"] and "Error" not in cell["output"], (
                f"test cell {grade_id!r} fails with the solution:\n{cell['output'][-1500:]}")
    finally:
        context.close()

    assert not foreign, f"JupyterLab asked other hosts for: {sorted(set(foreign))}"
    assert hashlib.sha256(EXERCISE.read_bytes()).hexdigest() == repo_digest, (
        f"{EXERCISE} changed during the test")
