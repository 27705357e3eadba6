"""What every benchmark shares: machine info, one timing helper, one table printer, the JSON.

Nothing here imports NumPy or PyTorch at module level: the CPU attention benchmark must set its
thread counts (environment variables) before either library is loaded.
"""

from __future__ import annotations

import datetime
import json
import math
import os
import platform
import statistics
import subprocess
import sys
import time
from importlib import metadata
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent  # the repository
RESULTS = ROOT / "benchmarks" / "results"
THREAD_VARS = ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS")


def thread_env(threads: int) -> dict:
    """os.environ with every BLAS / OpenMP thread count fixed to ``threads``."""
    return {**os.environ, **{name: str(threads) for name in THREAD_VARS}}


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def version(package: str) -> str | None:
    try:
        return metadata.version(package)
    except metadata.PackageNotFoundError:
        return None


def machine_info(threads: dict) -> dict:
    """The machine and library versions a result was measured with."""
    import torch  # safe here: called by the parent process, never by a thread-pinned child

    info = {
        "date": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
        "cpu": cpu_model(),
        "cores": os.cpu_count(),
        "cores_usable": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None,
        "threads": threads,  # per benchmark
        # Other work on the machine slows everything: the 1-minute load average at the start.
        "load_avg_1min": round(os.getloadavg()[0], 2) if hasattr(os, "getloadavg") else None,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "numpy": version("numpy"),
        "torch": version("torch"),
        "jupyter_book": version("jupyter-book"),
        "nbgrader": version("nbgrader"),
        "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
        "cuda": torch.version.cuda if torch.cuda.is_available() else None,
    }
    try:
        info["git_commit"] = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT,
                                            capture_output=True, text=True).stdout.strip() or None
    except OSError:
        info["git_commit"] = None
    return info


def time_calls(fns: dict, *, warmup: int = 1, repeat: int = 5, budget_s: float = 0.5,
               max_repeat: int = 50, number: int = 1, sync=None) -> dict:
    """Median wall time in seconds of each zero-argument function in ``fns``.

    The functions are timed side by side: after ``warmup`` untimed rounds, each round calls every
    function once, so a noisy neighbour slows all of them alike and their ratio stays honest.
    Rounds: at least ``repeat``, more (up to ``max_repeat``) while they fit in ``budget_s``.
    Each sample times ``number`` back-to-back calls (per-call time reported), so on a GPU the
    Python overhead of a call overlaps the previous kernel, as it does in a real model;
    ``sync`` (e.g. torch.cuda.synchronize) runs before each clock read.
    A function that raises is timed as the exception instead (e.g. out of memory): its entry
    is the exception object, and it is not called again.
    """
    sync = sync or (lambda: None)
    times = {name: [] for name in fns}
    failed = {}

    def one_round(record: bool):
        for name, fn in fns.items():
            if name in failed:
                continue
            sync()
            t0 = time.perf_counter()
            try:
                for _ in range(number):
                    fn()
                sync()
            except Exception as e:  # noqa: BLE001 - reported, not hidden
                failed[name] = e.with_traceback(None)  # frees the frames (and GPU memory) it held
                continue
            if record:
                times[name].append((time.perf_counter() - t0) / number)

    for _ in range(warmup):
        one_round(record=False)
    one_round(record=True)
    per_round = number * sum(t[0] for t in times.values() if t) or 1e-9
    rounds = min(max_repeat, max(repeat, int(budget_s / per_round)))
    for _ in range(rounds - 1):
        one_round(record=True)
    return {name: failed.get(name, statistics.median(t) if t else None)
            for name, t in times.items()}


def fit_exponent(xs, ys) -> float | None:
    """Least-squares slope of log(y) against log(x): y grows like x**slope.

    Points with a missing or non-positive y are left out; None with fewer than two points.
    """
    pts = [(math.log(x), math.log(y)) for x, y in zip(xs, ys, strict=True)
           if isinstance(y, (int, float)) and y > 0]
    if len(pts) < 2:
        return None
    mx = sum(p[0] for p in pts) / len(pts)
    my = sum(p[1] for p in pts) / len(pts)
    sxx = sum((p[0] - mx) ** 2 for p in pts)
    return sum((p[0] - mx) * (p[1] - my) for p in pts) / sxx if sxx else None


def fmt(value) -> str:
    """A table cell: numbers to 3 significant figures, None as '-'."""
    if value is None:
        return "-"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, float):
        if value == 0 or 0.01 <= abs(value) < 1e5:
            return f"{value:.3g}" if abs(value) < 100 else f"{value:,.0f}"
        return f"{value:.2e}"
    if isinstance(value, int):
        return f"{value:,}" if abs(value) >= 10000 else str(value)
    return str(value)


def print_table(title: str, columns: list[str], rows: list[dict], file=None) -> None:
    """One table: a title, a header of ``columns``, one line per row (missing keys as '-')."""
    file = file or sys.stdout
    cells = [[fmt(row.get(c)) for c in columns] for row in rows]
    widths = [max([len(c)] + [len(r[i]) for r in cells]) for i, c in enumerate(columns)]
    print(f"\n## {title}", file=file)
    print("  ".join(c.rjust(w) for c, w in zip(columns, widths, strict=True)), file=file)
    print("  ".join("-" * w for w in widths), file=file)
    for r in cells:
        print("  ".join(v.rjust(w) for v, w in zip(r, widths, strict=True)), file=file)
    file.flush()


def write_json(path: Path, machine: dict, args: dict, sections: dict) -> Path:
    """Write {"machine", "args", "sections": {name: {"columns", "rows", "notes"}}} to path."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps({"machine": machine, "args": args, "sections": sections},
                              indent=1, default=_jsonable) + "\n")
    tmp.replace(path)
    return path


def _jsonable(value):
    if isinstance(value, BaseException):
        return f"{type(value).__name__}: {value}"
    if isinstance(value, Path):
        return str(value)
    raise TypeError(f"cannot write {type(value).__name__} to JSON")


def log(message: str) -> None:
    """Progress messages go to stderr, so stdout holds only the tables."""
    print(message, file=sys.stderr, flush=True)
