"""qkv.train past one process: each rank's slice of the global batch, gradient accumulation,
DDP and FSDP under torchrun (gloo, 2 CPU processes), checkpoints across 1 <-> 2 processes.

The reference for a 2-process run is the same global batch in one process, taken as one batch
of 2B windows and as 2 accumulated micro-batches of B: the same windows, so the losses agree to
float32 rounding (TOL["float32_model"]), step after step."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from qkv.data import get_batch
from qkv.distributed import DistInfo, check_global_batch, micro_batches
from qkv.pt import GPT, GPTConfig
from qkv.tolerances import TOL
from qkv.train import ConfigError, make_config, make_optimizer, train, train_step

CORPUS = "the cat sat on the mat. the dog sat on the log.\n" * 40
HERE = Path(__file__).resolve().parent
SMALL = dict(n_layer=1, n_head=2, d_model=16, context_length=16, batch_size=4, max_steps=20,
             lr=1e-2, min_lr=1e-3, warmup_steps=5, eval_interval=10, eval_iters=2,
             sample_tokens=0, device="cpu")  # the same as tests/_dist_runs.py


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture
def corpus(tmp_path):
    path = tmp_path / "corpus.txt"
    path.write_text(CORPUS)
    return path


def run(corpus, out, *, resume=False, stop_at=None, **overrides):
    cfg = make_config("cpu-small", data=str(corpus), out_dir=str(out), **{**SMALL, **overrides})
    return train(cfg, resume=resume, stop_at=stop_at, progress=False, plot=False,
                 log=lambda *a: None)


def close(a, b):
    assert len(a) == len(b)
    torch.testing.assert_close(torch.tensor(a), torch.tensor(b), **TOL["float32_model"])


def torchrun(*args, timeout=240):
    env = dict(os.environ, OMP_NUM_THREADS="1")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           *args]
    done = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=timeout)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-3000:]
    return done


def test_ranks_slice_one_global_batch():
    """Rank r, micro-step k keeps windows (k * world + r) * B ... of the global draw, so the
    union over ranks and micro-steps is the batch one process draws with get_batch."""
    data = torch.arange(200)
    whole = get_batch(data, 12, 8, torch.Generator().manual_seed(3))
    for world, accum in [(1, 1), (2, 3), (3, 2), (6, 1)]:
        parts = {}
        for rank in range(world):
            info = DistInfo(rank=rank, world_size=world)
            mb = micro_batches(data, 12 // (world * accum), 8, torch.Generator().manual_seed(3),
                               info, accum)
            for k, xy in enumerate(mb):
                parts[k * world + rank] = xy
        x = torch.cat([parts[i][0] for i in range(world * accum)])
        y = torch.cat([parts[i][1] for i in range(world * accum)])
        assert torch.equal(x, whole[0]) and torch.equal(y, whole[1]), (world, accum)


def test_accumulated_gradients_equal_the_big_batch_gradient():
    cfg = GPTConfig(vocab_size=13, context_length=8, n_layer=2, n_head=2, d_model=16)
    x = torch.randint(13, (6, 8), generator=torch.Generator().manual_seed(0))
    y = torch.randint(13, (6, 8), generator=torch.Generator().manual_seed(1))
    grads, losses = [], []
    for xs, ys in [(x, y), ([x[:3], x[3:]], [y[:3], y[3:]]), (list(x.split(2)), list(y.split(2)))]:
        model = GPT(cfg, generator=torch.Generator().manual_seed(0))
        opt = make_optimizer(model, make_config(lr=0.0))
        loss, _ = train_step(model, opt, xs, ys, lr=0.0, grad_clip=0.0)
        losses.append(loss)
        grads.append(torch.cat([p.grad.flatten() for p in model.parameters()]))
    for g, loss in zip(grads[1:], losses[1:], strict=True):
        torch.testing.assert_close(g, grads[0], **TOL["float32_op"])
        torch.testing.assert_close(loss, losses[0], **TOL["float32_op"])
    # a wrong recipe (summing micro-batch means without dividing by K) is caught by this test
    assert not torch.allclose(2 * grads[0], grads[0], **TOL["float32_op"])


def test_resume_needs_the_same_global_batch(corpus, tmp_path):
    out = tmp_path / "r"
    run(corpus, out, grad_accum=2, stop_at=5)
    before = (out / "ckpt.pt").read_bytes()
    with pytest.raises(ConfigError, match=r"global batch is 8 windows .* use --grad-accum 2"):
        run(corpus, out, resume=True, grad_accum=1)
    assert (out / "ckpt.pt").read_bytes() == before  # nothing overwritten
    ckpt = torch.load(out / "ckpt.pt", weights_only=True)
    with pytest.raises(ValueError, match=r"3 process\(es\) x batch 4 = 12 does not divide it"):
        check_global_batch(ckpt, 4, 3, 1)
    check_global_batch(ckpt, 4, 2, 1)  # 2 processes x 4 windows: the same 8, accepted
    with pytest.raises(ConfigError, match="grad_accum must be >= 1"):
        run(corpus, tmp_path / "z", grad_accum=0)


@pytest.mark.slow
def test_ddp_and_fsdp_match_one_process_and_resume_across_world_sizes(corpus, tmp_path):
    big = run(corpus, tmp_path / "big", batch_size=8)["train_loss"]
    accum = run(corpus, tmp_path / "accum", grad_accum=2)["train_loss"]
    close(accum, big)
    # a 1-process checkpoint at step 10, to be resumed by 2 processes (grad_accum 2 -> 1)
    run(corpus, tmp_path / "out" / "from_one", grad_accum=2, stop_at=10)
    torchrun(str(HERE / "_dist_runs.py"), str(corpus), str(tmp_path / "out"),
             "ddp", "ddp_stop", "from_one", "fsdp")
    got = {n: json.loads((tmp_path / "out" / f"{n}.json").read_text())
           for n in ["ddp", "ddp_stop", "from_one", "fsdp"]}
    close(got["ddp"], big)  # 2 ranks x 4 = 1 process x 8 = 1 process x 4 x 2 micro-batches
    close(got["ddp"], accum)
    assert got["ddp_stop"] == got["ddp"]  # a DDP checkpoint resumes bit for bit under DDP
    close(got["from_one"], accum)  # 1 process -> 2
    close(got["fsdp"], big)  # FSDP (stopped and resumed at step 10) too
    # 2 processes -> 1 (DDP and FSDP checkpoints alike), accumulating 2 micro-batches instead
    for name, ref in [("ddp_ckpt10", got["ddp"]), ("fsdp_ckpt10", got["fsdp"])]:
        folder = tmp_path / "out" / name
        assert torch.load(folder / "ckpt.pt", weights_only=True)["world_size"] == 2
        close(run(corpus, folder, resume=True, grad_accum=2)["train_loss"], ref)
    def gap(a, b):
        return max(abs(p - q) for p, q in zip(a, b, strict=True))

    print(f"largest |loss difference| over 20 steps: DDP vs 1 x 2B {gap(got['ddp'], big):.1e}, "
          f"DDP vs accumulation {gap(got['ddp'], accum):.1e}, accumulation vs 1 x 2B "
          f"{gap(accum, big):.1e}, FSDP vs 1 x 2B {gap(got['fsdp'], big):.1e}")


@pytest.mark.slow
def test_torchrun_cli_rank_zero_alone_prints_and_saves(corpus, tmp_path):
    out = tmp_path / "cli"
    args = [f"--{k.replace('_', '-')}={v}" for k, v in SMALL.items()]
    done = torchrun("-m", "qkv.train", f"--data={corpus}", f"--out-dir={out}", "--quiet",
                    *args, "--sample-tokens=20")
    assert done.stdout.count("step 0: train loss") == 1, done.stdout
    assert "2 process(es) x 1 micro-batch(es) x 4 windows = global batch 8 (ddp)" in done.stdout
    assert sorted(p.name for p in out.iterdir()) == ["ckpt.pt", "loss.png", "sample.txt"]
    shutil.rmtree(out)
