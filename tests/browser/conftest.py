"""Shared setup for the browser tests: headless Chromium driven by Playwright.

The tests use the system's Chromium (Debian's ``chromium`` package), never a browser that
Playwright downloads: ``playwright install`` needs the network, and these machines have none.

- Without Chromium or without the ``playwright`` package every browser test SKIPS with a message
  saying how to enable it. With ``QKV_REQUIRE_BROWSER=1`` in the environment (CI sets it) a missing
  browser is a failure instead, so CI cannot pass by skipping.
- ``QKV_CHROMIUM`` points at the Chromium binary to use (default: /usr/bin/chromium, then
  ``chromium`` / ``chromium-browser`` on PATH).
- ``built_book``: ``_build/html``, built with the same command as ``make book`` when it is
  missing or older than a source of the book (book/, _config.yml, _toc.yml, lib/qkv).
  ``QKV_BOOK_HTML=dir`` tests the book already built in ``dir`` instead.
- ``browser``: one headless Chromium for the whole session, started with a fresh profile and the
  flags that keep it off the network.
"""

import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
# QKV_BOOK_HTML: test a book built elsewhere (then nothing is built here).
HTML = Path(os.environ.get("QKV_BOOK_HTML") or ROOT / "_build" / "html").resolve()
BUILD_STAMP = ROOT / "_build" / ".browser-tests-built"
BOOK_SOURCES = [ROOT / "book", ROOT / "_config.yml", ROOT / "_toc.yml", ROOT / "lib" / "qkv"]
VENV_BIN = Path(sys.executable).parent

# Flags for a Chromium on a machine with no network (see the machine notes): without the
# background-networking ones, Chromium keeps trying to reach Google's hosts.
CHROMIUM_ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-quic",
    "--no-first-run",
    "--disable-sync",
    "--disable-dev-shm-usage",
]

HOW_TO_ENABLE = (
    "To run the browser tests: install Debian's Chromium (`sudo apt-get install chromium`) and the "
    "pinned Python package (`.venv/bin/pip install -r requirements.txt`, or "
    "`pip install playwright`). Do not run `playwright install`: the tests use the system Chromium."
)


def pytest_configure(config):
    config.addinivalue_line(
        "markers", "browser: drives headless Chromium with Playwright (skipped without them)"
    )


def _missing(what):
    """Skip (or, with QKV_REQUIRE_BROWSER=1, fail) because part of the browser setup is missing."""
    message = f"{what}. {HOW_TO_ENABLE}"
    if os.environ.get("QKV_REQUIRE_BROWSER", "") not in ("", "0"):
        pytest.fail(f"QKV_REQUIRE_BROWSER is set but {message}", pytrace=False)
    pytest.skip(message)


def find_chromium():
    """The Chromium binary to drive, or None. $QKV_CHROMIUM, when set, is the only candidate."""
    if os.environ.get("QKV_CHROMIUM"):
        candidates = [os.environ["QKV_CHROMIUM"]]
    else:
        candidates = ["/usr/bin/chromium", shutil.which("chromium"),
                      shutil.which("chromium-browser")]
    for c in candidates:
        if c and os.path.isfile(c) and os.access(c, os.X_OK):
            return c
    return None


@pytest.fixture(scope="session")
def chromium_path():
    path = find_chromium()
    if path is None:
        where = (f"$QKV_CHROMIUM={os.environ['QKV_CHROMIUM']}" if os.environ.get("QKV_CHROMIUM")
                 else "/usr/bin/chromium, `chromium` and `chromium-browser` on PATH")
        _missing(f"Chromium was not found (looked at {where})")
    try:
        import playwright.sync_api  # noqa: F401
    except ImportError:
        _missing("the Python package `playwright` is not installed")
    return path


@pytest.fixture(scope="session")
def browser(chromium_path):
    """One headless Chromium for the session (Playwright gives every launch a fresh profile)."""
    from playwright.sync_api import sync_playwright

    pw = sync_playwright().start()
    try:
        b = pw.chromium.launch(executable_path=chromium_path, headless=True, args=CHROMIUM_ARGS)
    except Exception as exc:  # a Chromium that cannot start is a failure, not a skip
        pw.stop()
        pytest.fail(f"Chromium at {chromium_path} did not start: {exc}", pytrace=False)
    yield b
    b.close()
    pw.stop()


@pytest.fixture(scope="session")
def only_local_requests():
    """only_local_requests(context): abort every request of that browser context that leaves
    127.0.0.1 (the tests also record such requests and report them)."""
    return _only_local_requests


def _only_local_requests(context):
    import re

    def abort(route):
        route.abort("blockedbyclient")

    # A regex route is matched inside the browser, so requests to 127.0.0.1 never make the round
    # trip to Python; everything else that goes over the network is aborted.
    context.route(re.compile(r"^(https?|wss?)://(?!127\.0\.0\.1[:/])"), abort)


# --- the built book -------------------------------------------------------------------------

def _newest_source_mtime():
    newest = 0.0
    for src in BOOK_SOURCES:
        files = [src] if src.is_file() else [p for p in src.rglob("*") if p.is_file()]
        for f in files:
            if "__pycache__" in f.parts or ".ipynb_checkpoints" in f.parts:
                continue
            newest = max(newest, f.stat().st_mtime)
    return newest


def _last_build_mtime():
    """When the book was last built: Sphinx rewrites searchindex.js on every build that changes
    a page, and this fixture writes its own stamp after each build it runs (so a build that
    changed nothing, e.g. after an edit in lib/qkv, is not repeated on every run)."""
    stamps = [HTML / "searchindex.js", BUILD_STAMP]
    times = [p.stat().st_mtime for p in stamps if p.is_file()]
    return max(times) if times and (HTML / "index.html").is_file() else None


def book_is_stale():
    built = _last_build_mtime()
    return built is None or _newest_source_mtime() > built


@pytest.fixture(scope="session")
def built_book(chromium_path):
    """``_build/html``, rebuilt (as `make book` does) only if it is missing or stale.

    tests/test_book.py builds the book unconditionally; whichever of the two runs first, the
    second finds the build fresh (here) or rebuilds incrementally in seconds (there).
    """
    if not os.environ.get("QKV_BOOK_HTML") and book_is_stale():
        env = dict(os.environ, PATH=f"{VENV_BIN}{os.pathsep}{os.environ.get('PATH', '')}")
        started = time.time()
        proc = subprocess.run(
            [str(VENV_BIN / "jupyter-book"), "build", ".", "--builder", "html", "-W", "-n",
             "--keep-going"],
            cwd=ROOT, env=env, capture_output=True, text=True, timeout=1500,
        )
        log = proc.stdout + proc.stderr
        assert proc.returncode == 0, f"jupyter-book build failed:\n{log[-6000:]}"
        BUILD_STAMP.parent.mkdir(parents=True, exist_ok=True)
        BUILD_STAMP.write_text(f"built by tests/browser in {time.time() - started:.0f} s\n")
    assert (HTML / "index.html").is_file(), "the book build wrote no _build/html/index.html"
    return HTML
