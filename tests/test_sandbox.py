"""The grading sandbox: the kernel reads the same corpus as the grader, even from under a
closed folder; its working folder stays its own when /tmp is shared.

The sandbox gives each kernel a minimal environment (no $QKV_DATA) and, when it runs as a uid
of its own, replaces every closed folder above the course (a home folder of mode 700) by one that
holds only what the kernel needs. The grader therefore names the corpus in QKV_SANDBOX_DATA;
these tests run the real isolation steps in a child process and read the file as the kernel's uid.
"""

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

import qkv.grading.sandbox as sandbox

SANDBOX = sandbox.__file__
KERNEL_UID = 64_999  # a uid nobody uses here (the grader picks its own per worker)

# Loaded by path, as the kernel spec does: importing qkv.grading would start BLAS threads, and a
# multithreaded process may not unshare.
CHILD = textwrap.dedent("""
    import importlib.util, json, os, sys
    spec = importlib.util.spec_from_file_location("sb", sys.argv[1])
    sb = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(sb)
    log = []
    if not sb._isolate([sys.argv[2]], int(sys.argv[3]), 16, log):
        print(json.dumps({"isolated": False, "log": log}))
        sys.exit(0)
    os.setgroups([]); os.setgid(int(sys.argv[3])); os.setuid(int(sys.argv[3]))
    env = sb._kernel_env("/tmp")
    text = None
    try:
        with open(env.get("QKV_DATA", "/nonexistent")) as f:
            text = f.read()
    except OSError as e:
        text = repr(e)
    print(json.dumps({"isolated": True, "log": log, "QKV_DATA": env.get("QKV_DATA"),
                      "text": text}))
""")


def _run_kernel_side(corpus: Path, hidden: Path) -> dict:
    import json

    env = dict(os.environ, QKV_SANDBOX_DATA=str(corpus), QKV_SANDBOX_HIDE=str(hidden))
    out = subprocess.run([sys.executable, "-c", CHILD, SANDBOX, str(hidden), str(KERNEL_UID)],
                         env=env, capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout)


needs_root = pytest.mark.skipif(os.getuid() != 0, reason="a kernel uid of its own needs root")


@needs_root
def test_kernel_reads_the_corpus_from_under_a_closed_folder(tmp_path):
    home = tmp_path / "home"  # an instructor's home: other users cannot enter it
    data = home / "shared" / "data"
    data.mkdir(parents=True)
    corpus = data / "tinyshakespeare.txt"
    corpus.write_text("First Citizen:\nBefore we proceed any further, hear me speak.\n")
    corpus.chmod(0o644)
    (data / "secret.txt").write_text("not for the kernel")
    home.chmod(0o700)
    hidden = tmp_path / "grading"
    hidden.mkdir()
    got = _run_kernel_side(corpus, hidden)
    if not got["isolated"]:
        pytest.skip(f"no mount namespace here: {got['log']}")
    assert got["QKV_DATA"] == str(corpus.resolve())
    assert got["text"] == corpus.read_text()  # the kernel's uid read it through the closed folder


@needs_root
def test_a_corpus_inside_a_hidden_folder_stays_hidden(tmp_path):
    hidden = tmp_path / "grading"
    hidden.mkdir()
    corpus = hidden / "tinyshakespeare.txt"
    corpus.write_text("hidden")
    corpus.chmod(0o644)
    got = _run_kernel_side(corpus, hidden)
    if not got["isolated"]:
        pytest.skip(f"no mount namespace here: {got['log']}")
    assert got["QKV_DATA"] is None  # never un-hide a grading folder for the corpus's sake
    assert "hidden" not in (got["text"] or "")


def test_without_a_corpus_the_kernel_gets_no_qkv_data(monkeypatch):
    monkeypatch.delenv("QKV_SANDBOX_DATA", raising=False)
    monkeypatch.setenv("QKV_DATA", "/somewhere/else.txt")  # the grader's own, never passed on
    assert "QKV_DATA" not in sandbox._kernel_env("/tmp/k")


PRIVATE = textwrap.dedent("""
    import importlib.util, os, sys
    spec = importlib.util.spec_from_file_location("sb", sys.argv[1])
    sb = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(sb)
    log = []
    if not sb._isolate([], None, 16, log):
        print("not isolated"); sys.exit(0)
    sb._private_workdir(sys.argv[2], 16, log)
    with open(os.path.join(sys.argv[2], ".kernel.json"), "w") as f:
        f.write("secret key")
    print(open(os.path.join(sys.argv[2], ".kernel.json")).read())
""")


@needs_root
def test_a_kernels_working_folder_stays_private_when_tmp_is_shared():
    """With the Python environment under /tmp the sandbox keeps the shared /tmp; the working
    folder (connection key included) then gets a tmpfs of the kernel's own mount namespace, so
    nothing outside it, a later kernel of the same uid included, finds its files."""
    import shutil
    import tempfile

    # outside /tmp, which the isolation itself replaces here (this Python does not live there)
    workdir = Path(tempfile.mkdtemp(prefix="qkv-kernel-test-", dir=Path(__file__).parent))
    try:
        out = subprocess.run([sys.executable, "-c", PRIVATE, SANDBOX, str(workdir)],
                             capture_output=True, text=True, timeout=60)
        leftover = list(workdir.iterdir())
    finally:
        shutil.rmtree(workdir)
    assert out.returncode == 0, out.stderr
    if out.stdout.strip() == "not isolated":
        pytest.skip("no mount namespace here")
    assert out.stdout.strip() == "secret key"  # the kernel side wrote and read it
    assert leftover == []  # outside its namespace: nothing


@needs_root
def test_a_finished_jobs_working_folders_are_removed():
    import tempfile

    left = Path(tempfile.mkdtemp(prefix="qkv-kernel-", dir="/tmp"))
    mine = Path(tempfile.mkdtemp(prefix="qkv-kernel-", dir="/tmp"))
    (left / ".kernel.json").write_text("x")
    os.chown(left, KERNEL_UID, KERNEL_UID)
    try:
        sandbox.remove_workdirs(KERNEL_UID)
        assert not left.exists()
        assert mine.exists()  # another uid's (here root's) folder is not touched
    finally:
        for p in (left, mine):
            if p.exists():
                import shutil

                shutil.rmtree(p)
