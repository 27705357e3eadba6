"""Kernel launcher for autograding: ``python .../qkv/grading/sandbox.py -f CONNECTION_FILE [args]``.

The grader registers a kernel spec ("qkv-grader", see :func:`write_kernelspec`) whose argv runs this
module instead of ipykernel. Before it execs ipykernel it:

1. reads the connection file and the non-notebook files of the kernel's starting folder (data a
   notebook may open) into memory;
2. enters a private mount namespace (root: ``unshare(CLONE_NEWNS)``; otherwise
   ``unshare(CLONE_NEWUSER|CLONE_NEWNS)``), mounts a fresh tmpfs over ``/tmp``, ``/var/tmp`` and
   ``/dev/shm``, makes the paths in ``QKV_SANDBOX_READONLY`` read-only (the course, its Python,
   the grader's home) and mounts an empty read-only tmpfs over every path in
   ``QKV_SANDBOX_HIDE`` (the grading roots, ``solutions/``, ``_grading/``, ``.git``, the
   submissions folder);
3. as root: switches to a uid of its own (``QKV_SANDBOX_UID``) with no groups and
   ``PR_SET_NO_NEW_PRIVS``, so the kernel cannot undo the mounts, cannot read root-only files or
   ``/proc/<grader>/cwd``, cannot write the repository, and cannot signal or ptrace the kernels of
   other submissions (each has its own uid). As a normal user the mounts are locked instead by a
   second, nested user namespace;
4. sets resource limits (address space, CPU seconds, file size, no core files, processes);
5. changes into a fresh, empty working folder (so the autograded notebook, which holds the
   restored hidden tests, is not in the kernel's cwd) with a minimal environment, and execs
   ``python -m ipykernel_launcher``.

Any step that the platform refuses is skipped and reported on stderr; the kernel still starts
(``sandbox_report()`` tells the grader in advance which steps work on this machine).

Settings come from the environment (the kernel spec's "env"), so tests can set them low:
QKV_SANDBOX_HIDE and QKV_SANDBOX_READONLY (os.pathsep-separated), QKV_SANDBOX_UID,
QKV_SANDBOX_MEM_MB (default 4096), QKV_SANDBOX_CPU_S (600), QKV_SANDBOX_FSIZE_MB (64),
QKV_SANDBOX_NPROC (256), QKV_SANDBOX_TMP_MB (512), QKV_SANDBOX_THREADS (1), and
QKV_SANDBOX_DATA: the course corpus, kept visible and handed to the kernel as $QKV_DATA (the
kernel sees neither the grader's environment nor, under a closed folder, ../shared).
"""

from __future__ import annotations

import ctypes
import json
import os
import resource
import shutil
import signal
import sys
import tempfile

KERNEL_NAME = "qkv-grader"

CLONE_NEWNS = 0x00020000
CLONE_NEWUSER = 0x10000000
MS_RDONLY, MS_NOSUID, MS_NODEV, MS_NOEXEC = 1, 2, 4, 8
MS_REMOUNT, MS_BIND, MS_REC, MS_PRIVATE = 32, 4096, 16384, 1 << 18
PR_SET_PDEATHSIG, PR_SET_NO_NEW_PRIVS = 1, 38

MAX_DATA_BYTES = 64 << 20  # data files copied into the kernel's working folder, in all

_libc = ctypes.CDLL(None, use_errno=True)


def _check(ret: int, what: str) -> None:
    if ret != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"{what}: {os.strerror(err)}")


def _unshare(flags: int) -> None:
    _check(_libc.unshare(flags), "unshare")


def _mount(source: str, target: str, fstype: str | None, flags: int,
           data: str | None = None) -> None:
    _check(
        _libc.mount(
            source.encode(),
            target.encode(),
            fstype.encode() if fstype else None,
            ctypes.c_ulong(flags),
            data.encode() if data else None,
        ),
        f"mount {target}",
    )


def _write(path: str, text: str) -> None:
    with open(path, "w") as f:
        f.write(text)


def _env_int(name: str, default: int) -> int:
    value = os.environ.get(name, "")
    return int(value) if value.strip() else default


def _under(path: str, parent: str) -> bool:
    path, parent = os.path.realpath(path), os.path.realpath(parent)
    return path == parent or path.startswith(parent.rstrip("/") + "/")


def _needed_paths() -> list[str]:
    """What the kernel must still see: the interpreter, its packages, and qkv itself."""
    qkv_dir = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    cwd = os.getcwd()
    python_bin = os.path.dirname(os.path.realpath(sys.executable))
    paths = [sys.prefix, sys.base_prefix, python_bin, qkv_dir]
    paths += [p for p in sys.path if p and os.path.isdir(p) and os.path.realpath(p) != cwd]
    if _corpus():
        paths.append(_corpus())  # the file alone, so a closed parent cannot hide it
    return sorted({os.path.realpath(p) for p in paths})


def _corpus() -> str | None:
    """QKV_SANDBOX_DATA when it is a file outside every hidden path, else None."""
    corpus = os.environ.get("QKV_SANDBOX_DATA", "")
    if not os.path.isfile(corpus):
        return None
    if any(_under(corpus, hidden) for hidden in _env_paths("QKV_SANDBOX_HIDE")):
        return None
    return os.path.realpath(corpus)


def _closed_ancestor(path: str) -> str | None:
    """The top-most folder above ``path`` that other users cannot enter (e.g. /root, mode 700)."""
    parts = path.strip("/").split("/")
    for n in range(1, len(parts)):
        folder = "/" + "/".join(parts[:n])
        if not os.stat(folder).st_mode & 0o001:
            return folder
    return None


def _reexpose(needed: list[str], log: list[str]) -> None:
    """For a kernel with a uid of its own: a needed path under a closed folder (a Python under
    /root) is unreachable. Replace each closed folder by a tmpfs that holds only the needed paths
    (bind mounts), which also hides the rest of it (root's home)."""
    closed: dict[str, list[str]] = {}
    for p in needed:
        top = _closed_ancestor(p)
        if top:
            closed.setdefault(top, []).append(p)
    for top, inside in closed.items():
        fds = {p: os.open(p, os.O_PATH) for p in inside}
        _mount("tmpfs", top, "tmpfs", MS_NOSUID | MS_NODEV, "size=4k,mode=755")
        for p, fd in fds.items():
            if os.path.isdir(f"/proc/self/fd/{fd}"):
                os.makedirs(p, exist_ok=True)
            else:  # a single file (the corpus): an empty file to mount it on
                os.makedirs(os.path.dirname(p), exist_ok=True)
                open(p, "a").close()
            _mount(f"/proc/self/fd/{fd}", p, None, MS_BIND | MS_REC)
            os.close(fd)
        os.chmod(top, 0o755)
        log.append(f"{top} replaced by a tmpfs exposing only {', '.join(inside)}")


def _env_paths(name: str) -> list[str]:
    return [p for p in os.environ.get(name, "").split(os.pathsep) if p]


def _read_data_files(folder: str) -> dict[str, bytes]:
    """Non-notebook files next to the notebook (a chapter's data), to copy into the new cwd."""
    files: dict[str, bytes] = {}
    total = 0
    for dirpath, dirnames, filenames in os.walk(folder):
        dirnames[:] = [d for d in dirnames if not d.startswith(".")]
        for name in filenames:
            path = os.path.join(dirpath, name)
            if name.endswith(".ipynb") or not os.path.isfile(path) or os.path.islink(path):
                continue
            size = os.path.getsize(path)
            if total + size > MAX_DATA_BYTES:
                continue
            with open(path, "rb") as f:
                files[os.path.relpath(path, folder)] = f.read()
            total += size
    return files


def _private_mounts(hide: list[str], tmp_mb: int, own_uid: bool, log: list[str]) -> None:
    """Runs inside a fresh mount namespace: private /tmp etc., hide the given paths."""
    _mount("none", "/", None, MS_REC | MS_PRIVATE)
    needed = _needed_paths()
    if own_uid:
        _reexpose(needed, log)
    for path in _env_paths("QKV_SANDBOX_READONLY"):
        # Matters when the kernel runs as the grader's own uid (no root): the course, its
        # Python and the grader's home would otherwise be writable by the submission.
        if os.path.isdir(path) and not any(_under(path, t) for t in ("/tmp", "/var/tmp")):
            try:
                _mount(path, path, None, MS_BIND | MS_REC)
                _mount("none", path, None, MS_BIND | MS_RDONLY | MS_REMOUNT | MS_NOSUID | MS_NODEV)
            except OSError as e:
                log.append(f"could not make {path} read-only: {e}")
    for tmp in ("/tmp", "/var/tmp", "/dev/shm"):
        if not os.path.isdir(tmp):
            continue
        if any(_under(p, tmp) for p in needed):
            log.append(f"kept {tmp} (the Python environment lives there)")
            continue
        _mount("tmpfs", tmp, "tmpfs", MS_NOSUID | MS_NODEV, f"size={tmp_mb}m,mode=1777")
    for path in hide:
        if not path or not os.path.exists(path):
            continue  # not there, or already under a fresh tmpfs
        if any(_under(p, path) for p in needed):
            log.append(f"could not hide {path}: the kernel needs what is inside")
            continue
        flags = MS_RDONLY | MS_NOSUID | MS_NODEV | MS_NOEXEC
        if os.path.isdir(path):
            _mount("tmpfs", path, "tmpfs", flags, "size=4k,mode=555")
        else:
            _mount("/dev/null", path, None, MS_BIND)
            _mount("/dev/null", path, None, MS_BIND | MS_RDONLY | MS_REMOUNT)


def _isolate(hide: list[str], uid: int | None, tmp_mb: int, log: list[str]) -> bool:
    """Mount namespace + (as root) a uid of our own. Returns whether the mounts are in place."""
    real_uid, real_gid = os.getuid(), os.getgid()
    if real_uid == 0:
        try:
            _unshare(CLONE_NEWNS)
            _private_mounts(hide, tmp_mb, uid is not None, log)
            log.append("mount namespace: private /tmp, hidden paths")
            return True
        except OSError as e:
            log.append(f"no mount namespace ({e}); paths are not hidden")
            return False
    try:
        _unshare(CLONE_NEWUSER | CLONE_NEWNS)
        _write("/proc/self/setgroups", "deny")
        _write("/proc/self/uid_map", f"0 {real_uid} 1")
        _write("/proc/self/gid_map", f"0 {real_gid} 1")
        _private_mounts(hide, tmp_mb, False, log)
        # A second user namespace, owned by "us" again, locks the mounts made above: from here on
        # they cannot be unmounted or bind-mounted apart to uncover what they hide.
        _unshare(CLONE_NEWUSER | CLONE_NEWNS)
        _write("/proc/self/setgroups", "deny")
        _write("/proc/self/uid_map", f"{real_uid} 0 1")
        _write("/proc/self/gid_map", f"{real_gid} 0 1")
        log.append("user+mount namespace: private /tmp, hidden paths (locked)")
        return True
    except OSError as e:
        log.append(f"no user namespace ({e}); paths are not hidden")
        return False


def _private_workdir(workdir: str, tmp_mb: int, log: list[str]) -> None:
    """A tmpfs of this mount namespace on the working folder, when /tmp is the shared one (the
    Python environment lives under it): otherwise a later kernel with the same uid, or any
    kernel of a grader that is not root, could read this kernel's files (its connection key)."""
    try:
        _mount("tmpfs", workdir, "tmpfs", MS_NOSUID | MS_NODEV, f"size={tmp_mb}m,mode=700")
        log.append("private working folder (a tmpfs: /tmp is shared)")
    except OSError as e:
        log.append(f"could not make the working folder private: {e}")


def _limits(own_uid: bool, log: list[str]) -> None:
    mb = 1 << 20
    limits = [
        (resource.RLIMIT_AS, _env_int("QKV_SANDBOX_MEM_MB", 4096) * mb),
        (resource.RLIMIT_FSIZE, _env_int("QKV_SANDBOX_FSIZE_MB", 64) * mb),
        (resource.RLIMIT_CORE, 0),
    ]
    if own_uid:  # RLIMIT_NPROC counts all processes of the uid: meaningful for a uid of our own
        limits.append((resource.RLIMIT_NPROC, _env_int("QKV_SANDBOX_NPROC", 256)))
    for which, value in limits:
        try:
            resource.setrlimit(which, (value, value))
        except (ValueError, OSError) as e:
            log.append(f"could not set rlimit {which}: {e}")
    cpu = _env_int("QKV_SANDBOX_CPU_S", 600)
    try:  # SIGXCPU at the soft limit, SIGKILL one second later
        resource.setrlimit(resource.RLIMIT_CPU, (cpu, cpu + 1))
    except (ValueError, OSError) as e:
        log.append(f"could not set RLIMIT_CPU: {e}")


def _kernel_env(workdir: str) -> dict[str, str]:
    """A minimal environment: nothing that names the grading folders, no NBGRADER_EXECUTION."""
    keep = ("PATH", "LANG", "LC_ALL", "LC_CTYPE", "TZ", "TERM", "PYTHONHASHSEED")
    env = {k: v for k, v in os.environ.items() if k in keep or k.startswith("JPY_")}
    threads = os.environ.get("QKV_SANDBOX_THREADS", "1")
    env.update(
        HOME=workdir,
        USER="qkv-sandbox",
        LOGNAME="qkv-sandbox",
        TMPDIR=os.path.join(workdir, ".tmp"),
        IPYTHONDIR=os.path.join(workdir, ".ipython"),
        MPLCONFIGDIR=os.path.join(workdir, ".matplotlib"),
        MPLBACKEND="Agg",
        OMP_NUM_THREADS=threads,
        MKL_NUM_THREADS=threads,
        OPENBLAS_NUM_THREADS=threads,
        PYDEVD_DISABLE_FILE_VALIDATION="1",
    )
    if _corpus():
        env["QKV_DATA"] = _corpus()  # qkv.data.corpus_path reads it
    return env


def main(argv: list[str]) -> None:
    if "-f" not in argv or argv.index("-f") + 1 >= len(argv):
        sys.exit("usage: python sandbox.py -f CONNECTION_FILE [ipykernel args]")
    i = argv.index("-f")
    with open(argv[i + 1], "rb") as f:
        connection = f.read()
    rest = argv[:i] + argv[i + 2 :]
    data = _read_data_files(os.getcwd())

    log: list[str] = []
    hide = _env_paths("QKV_SANDBOX_HIDE")
    uid_text = os.environ.get("QKV_SANDBOX_UID", "").strip()
    uid = int(uid_text) if uid_text and os.getuid() == 0 else None
    tmp_mb = _env_int("QKV_SANDBOX_TMP_MB", 512)
    isolated = _isolate(hide, uid, tmp_mb, log)

    workdir = tempfile.mkdtemp(prefix="qkv-kernel-", dir="/tmp" if os.path.isdir("/tmp") else None)
    if isolated and any(line.startswith("kept /tmp") for line in log):
        _private_workdir(workdir, tmp_mb, log)
    os.makedirs(os.path.join(workdir, ".tmp"))
    for rel, content in data.items():
        os.makedirs(os.path.dirname(os.path.join(workdir, rel)), exist_ok=True)
        with open(os.path.join(workdir, rel), "wb") as f:
            f.write(content)
    conn_path = os.path.join(workdir, ".kernel.json")
    with open(conn_path, "wb") as f:
        f.write(connection)
    json.loads(connection)  # fail here, loudly, rather than in ipykernel

    own_uid = False
    if uid is not None:
        try:
            for dirpath, dirnames, filenames in os.walk(workdir):
                for name in [dirpath] + [os.path.join(dirpath, n) for n in dirnames + filenames]:
                    os.lchown(name, uid, uid)
            os.setgroups([])
            os.setgid(uid)
            os.setuid(uid)
            own_uid = True
            log.append(f"running as uid {uid}")
        except OSError as e:
            log.append(f"could not switch to uid {uid}: {e}")
    _libc.prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0)
    _libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)  # die with the grader
    _limits(own_uid, log)

    os.chdir(workdir)
    failed = any(w in " ".join(log) for w in ("no ", "could not"))
    if os.environ.get("QKV_SANDBOX_VERBOSE") or failed:
        print("qkv sandbox: " + "; ".join(log), file=sys.stderr, flush=True)
    env = _kernel_env(workdir)
    cmd = [sys.executable, "-m", "ipykernel_launcher", "-f", conn_path, *rest]
    os.execve(sys.executable, cmd, env)


def write_kernelspec(jupyter_dir: str, env: dict[str, str]) -> str:
    """Write <jupyter_dir>/kernels/qkv-grader/kernel.json (use it: jupyter_dir on JUPYTER_PATH)."""
    spec_dir = os.path.join(jupyter_dir, "kernels", KERNEL_NAME)
    os.makedirs(spec_dir, exist_ok=True)
    spec = {
        # The file itself, not `-m qkv.grading.sandbox`: -m would import the qkv.grading package,
        # whose NumPy import starts BLAS threads, and a multithreaded process may not
        # unshare(CLONE_NEWUSER) (EINVAL). It is also 0.2 s faster per kernel.
        "argv": [sys.executable, os.path.abspath(__file__), "-f", "{connection_file}"],
        "display_name": "Python 3 (qkv grading sandbox)",
        "language": "python",
        "interrupt_mode": "signal",
        "env": env,
    }
    with open(os.path.join(spec_dir, "kernel.json"), "w") as f:
        json.dump(spec, f, indent=1)
    return spec_dir


def sandbox_report() -> str:
    """One line saying which isolation steps work here (probed in a throwaway child process)."""
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:  # child: try the steps, report, exit without running anything else
        os.close(r)
        log: list[str] = []
        ok = _isolate([], None, 1, log)
        if ok and os.getuid() == 0:
            log.append("kernels run as a uid of their own")
        os.write(w, "; ".join(log).encode())
        os._exit(0)
    os.close(w)
    with os.fdopen(r) as f:
        text = f.read()
    os.waitpid(pid, 0)
    return text or "unknown"


def kill_uid(uid: int) -> None:
    """Kill every process running as ``uid`` (a kernel's leftovers). Needs root."""
    if os.getuid() != 0:
        return
    pid = os.fork()
    if pid == 0:
        try:
            os.setgroups([])
            os.setgid(uid)
            os.setuid(uid)
            os.kill(-1, signal.SIGKILL)  # every process this uid may signal, i.e. its own
        except OSError:
            pass
        os._exit(0)
    os.waitpid(pid, 0)


def remove_workdirs(uid: int) -> None:
    """Delete the kernels' working folders that ``uid`` owns in /tmp (left there, empty or not,
    when /tmp is the shared one). Needs root, like the uid itself."""
    if os.getuid() != 0 or not os.path.isdir("/tmp"):
        return
    for name in os.listdir("/tmp"):
        path = os.path.join("/tmp", name)
        try:
            if name.startswith("qkv-kernel-") and os.lstat(path).st_uid == uid:
                shutil.rmtree(path, ignore_errors=True)
        except OSError:
            pass


if __name__ == "__main__":
    main(sys.argv[1:])
