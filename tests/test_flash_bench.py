"""benchmarks/flash.py: the rows exist and say what they measured. Times are never checked;
peak memory (tracemalloc) is deterministic, so its growth is."""

import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:  # benchmarks/ is a folder of the repository, not a package
    sys.path.insert(0, str(ROOT))

from benchmarks import flash  # noqa: E402


@pytest.mark.skipif(torch.cuda.is_available(), reason="with a GPU the rows are measured")
def test_gpu_rows_say_not_measured_without_cuda():
    (section,) = flash.run_gpu(quick=False)
    assert {(r["d_head"], r["T"], r["pass_"]) for r in section["rows"]} == {
        (d, t, p) for d in (64, 128) for t in (1024, 2048, 4096, 8192, 16384)
        for p in ("fwd", "fwd+bwd")}
    for row in section["rows"]:
        assert row["status"].startswith("not measured")
        assert not any(key.endswith(("_ms", "_tflops", "_over_sdpa")) for key in row)
    assert section["notes"] == ["target Triton >= 0.7x SDPA at T >= 4096: not measured"]


@pytest.mark.slow
def test_cpu_rows_quick():
    rows = flash.measure_cpu(quick=True)
    assert [r["T"] for r in rows] == [256, 512, 1024]
    for row in rows:
        assert row["naive_ms"] > 0 and row["tiled_ms"] > 0
        assert row["max_abs_diff"] < 1e-5  # the two paths computed the same attention
    exps = {e["path"]: e for e in flash.cpu_exponents(rows)}
    assert exps["naive"]["memory_exponent"] > 1.5  # the (T, T) scores
    assert exps["tiled"]["memory_exponent"] < 1.2  # tiles and O(T) rows only
