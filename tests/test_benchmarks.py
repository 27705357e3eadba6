"""Smoke test of benchmarks/: it runs and writes the JSON it promises. Times are never checked
(CI does not time anything; the numbers are only printed)."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:  # benchmarks/ is a folder of the repository, not an installed package
    sys.path.insert(0, str(ROOT))


@pytest.mark.slow
def test_quick_attention_cpu_writes_json(tmp_path):
    out = tmp_path / "bench.json"
    proc = subprocess.run([sys.executable, "-m", "benchmarks", "--quick", "--only",
                           "attention-cpu", "--out", str(out)],
                          cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert "Attention, CPU" in proc.stdout and "target NumPy" in proc.stdout

    result = json.loads(out.read_text())
    assert set(result) == {"machine", "args", "sections"}
    for key in ("date", "cpu", "cores", "threads", "numpy", "torch", "gpu"):
        assert key in result["machine"]
    assert result["args"]["quick"] is True and result["args"]["only"] == ["attention-cpu"]
    assert set(result["sections"]) == {"attention-cpu", "attention-cpu-exponents"}

    section = result["sections"]["attention-cpu"]
    assert {"title", "columns", "rows", "notes", "target"} <= set(section)
    assert isinstance(section["target"]["met"], bool)
    ops = {(r["op"], r["d_model"], r["T"]) for r in section["rows"]}
    assert {op for op, _, _ in ops} == {"attention", "block", "model"}
    for row in section["rows"]:
        for key in ("numpy_ms", "torch_naive_ms", "torch_fused_ms", "np_over_naive",
                    "np_over_fused"):
            assert row[key] > 0
        assert row["max_abs_diff"] < 1e-3  # the two backends computed the same thing
    for row in result["sections"]["attention-cpu-exponents"]["rows"]:
        assert isinstance(row["numpy_exponent"], float)


def test_gpu_attention_code_runs_on_cpu_with_tiny_sizes():
    """The GPU benchmark cannot run without CUDA; its measuring code still can, on the CPU."""
    from benchmarks import attention_gpu

    rate, rows = attention_gpu.measure(torch.device("cpu"), torch.bfloat16, d_heads=(8,),
                                       seqs=(16, 32), batch=1, n_head=2, matmul_n=32,
                                       fit_from_T=16, repeat=1)
    assert rate > 0
    assert [(r["T"], r["path"]) for r in rows] == [
        (t, p) for t in (16, 32) for p in ("naive", "fused", "sdpa")]
    assert all(r["status"] == "ok" and r["tflops"] > 0 and "vs_sdpa" in r for r in rows)
    exps = attention_gpu.exponents(rows, fit_from_T=16)
    assert [e["path"] for e in exps] == ["naive", "fused", "sdpa"]
    assert all(isinstance(e["time_exponent"], float) for e in exps)
