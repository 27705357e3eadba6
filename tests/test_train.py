"""qkv.train: the loop learns, is deterministic, resumes exactly; optimizer groups, schedule,
clipping; the command line's help and its one-line errors. Tiny models, few steps."""

import math
import os
import signal
import subprocess
import sys
from dataclasses import fields

import pytest
import torch

import qkv.train
from qkv.pt import GPT, GPTConfig
from qkv.train import (
    PRESETS,
    TrainConfig,
    build_parser,
    lr_at,
    main,
    make_config,
    make_optimizer,
    train,
    train_step,
)

CORPUS = "the cat sat on the mat. the dog sat on the log.\n" * 40  # 1,960 characters


def quiet(*args, **kwargs):
    pass


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Tiny models gain nothing from a second thread, and on a busy machine OpenMP threads
    waiting for each other make each step many times slower."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture
def corpus(tmp_path):
    path = tmp_path / "corpus.txt"
    path.write_text(CORPUS)
    return path


def tiny(corpus, out_dir, **overrides) -> TrainConfig:
    values = dict(data=str(corpus), out_dir=str(out_dir), n_layer=1, n_head=2, d_model=16,
                  context_length=16, batch_size=8, max_steps=40, lr=1e-2, min_lr=1e-3,
                  warmup_steps=5, eval_interval=10, eval_iters=2, sample_tokens=0, device="cpu")
    return make_config("cpu-small", **{**values, **overrides})


def run(cfg, **kwargs):
    return train(cfg, progress=False, log=quiet, **{"plot": False, **kwargs})


def test_loss_decreases_on_a_repetitive_corpus(corpus, tmp_path):
    h = run(tiny(corpus, tmp_path / "run", max_steps=60))
    first, last = h["train_loss"][0], sum(h["train_loss"][-10:]) / 10
    assert first > 2.0 and last < first - 1.0, (first, last)
    assert [e[0] for e in h["evals"]] == [0, 10, 20, 30, 40, 50, 60]
    assert h["evals"][0][1] == pytest.approx(math.log(len(set(CORPUS))), abs=0.1)  # ~uniform
    assert h["evals"][-1][2] < h["evals"][0][2]  # validation loss too
    assert (tmp_path / "run" / "ckpt.pt").is_file()


def test_same_seed_same_losses(corpus, tmp_path):
    a = run(tiny(corpus, tmp_path / "a", max_steps=15, dropout=0.1))
    b = run(tiny(corpus, tmp_path / "b", max_steps=15, dropout=0.1))
    c = run(tiny(corpus, tmp_path / "c", max_steps=15, dropout=0.1, seed=7))
    assert a["train_loss"] == b["train_loss"]  # exactly
    assert a["evals"] == b["evals"]
    assert a["train_loss"] != c["train_loss"]


@pytest.mark.parametrize("stop", [20, 17])  # at an evaluation, and between two
def test_resume_gives_the_losses_of_an_uninterrupted_run(corpus, tmp_path, stop):
    # Dropout draws from torch's global generator: resuming must restore it too.
    straight = run(tiny(corpus, tmp_path / "straight", dropout=0.2))
    first = run(tiny(corpus, tmp_path / "stopped", dropout=0.2), stop_at=stop)
    assert first["step"] == stop and len(first["train_loss"]) == stop
    torch.manual_seed(12345)  # scramble what a new process would not have
    torch.rand(1000)
    resumed = run(tiny(corpus, tmp_path / "stopped", dropout=0.2), resume=True)
    assert resumed["step"] == 40
    assert resumed["train_loss"] == straight["train_loss"]  # bit for bit on CPU
    assert resumed["lr"] == straight["lr"]
    assert resumed["evals"] == straight["evals"]


def test_ctrl_c_stops_after_the_step_saves_and_resumes_exactly(corpus, tmp_path, monkeypatch):
    straight = run(tiny(corpus, tmp_path / "straight", dropout=0.2, max_steps=12))
    calls = []

    def interrupted_step(*args, **kwargs):
        calls.append(1)
        if len(calls) == 5:  # Ctrl-C arrives in the middle of the fifth step
            os.kill(os.getpid(), signal.SIGINT)
        return train_step(*args, **kwargs)

    monkeypatch.setattr(qkv.train, "train_step", interrupted_step)
    first = run(tiny(corpus, tmp_path / "stopped", dropout=0.2, max_steps=12))
    assert first["step"] == 5  # the step in flight finished, then the loop stopped
    monkeypatch.undo()
    resumed = run(tiny(corpus, tmp_path / "stopped", dropout=0.2, max_steps=12), resume=True)
    assert resumed["train_loss"] == straight["train_loss"]


def test_resume_refuses_other_settings_and_a_missing_checkpoint(corpus, tmp_path):
    with pytest.raises(ValueError, match="--resume: no checkpoint at "):
        run(tiny(corpus, tmp_path / "none"), resume=True)
    run(tiny(corpus, tmp_path / "r"), stop_at=3)
    with pytest.raises(ValueError, match=r"settings differ from the checkpoint's: lr \(0.5"):
        run(tiny(corpus, tmp_path / "r", lr=0.5), resume=True)


def test_weight_decay_on_matrices_only():
    model = GPT(GPTConfig(vocab_size=11, context_length=8, n_layer=2, n_head=2, d_model=8))
    opt = make_optimizer(model, TrainConfig(weight_decay=0.1))
    decay, no_decay = opt.param_groups
    assert decay["weight_decay"] == 0.1 and no_decay["weight_decay"] == 0.0
    names = {id(p): n for n, p in model.named_parameters()}
    decayed = {names[id(p)] for p in decay["params"]}
    kept = {names[id(p)] for p in no_decay["params"]}
    assert decayed == {n for n, p in model.named_parameters() if p.ndim >= 2}
    assert "transformer.wte.weight" in decayed and "transformer.h.0.attn.c_attn.weight" in decayed
    assert all(n.endswith(("bias", "ln_1.weight", "ln_2.weight", "ln_f.weight")) for n in kept)
    assert len(decay["params"]) + len(no_decay["params"]) == len(list(model.parameters()))


def test_learning_rate_schedule_matches_the_formula():
    cfg = TrainConfig(lr=1e-3, min_lr=1e-4, warmup_steps=10, max_steps=110)
    assert lr_at(0, cfg) == pytest.approx(1e-4)  # lr * 1 / 10
    assert lr_at(4, cfg) == pytest.approx(5e-4)
    assert lr_at(9, cfg) == pytest.approx(1e-3)  # warm-up ends at the peak
    assert lr_at(10, cfg) == pytest.approx(1e-3)  # cosine starts at the peak
    assert lr_at(60, cfg) == pytest.approx(1e-4 + 0.9e-3 * 0.5)  # half way: cos(pi/2) = 0
    assert lr_at(35, cfg) == pytest.approx(1e-4 + 0.9e-3 * 0.5 * (1 + math.cos(math.pi / 4)))
    assert lr_at(110, cfg) == pytest.approx(1e-4) and lr_at(500, cfg) == pytest.approx(1e-4)


def test_the_run_uses_the_schedule(corpus, tmp_path):
    cfg = tiny(corpus, tmp_path / "s", max_steps=12, eval_interval=100)
    assert run(cfg)["lr"] == [lr_at(s, cfg) for s in range(12)]


def test_gradient_clipping_bounds_the_norm():
    torch.manual_seed(0)
    model = GPT(GPTConfig(vocab_size=11, context_length=8, n_layer=1, n_head=2, d_model=8))
    opt = make_optimizer(model, TrainConfig())
    x, y = torch.randint(11, (4, 8)), torch.randint(11, (4, 8))

    def grad_norm():
        return torch.linalg.vector_norm(torch.stack([p.grad.norm() for p in model.parameters()]))

    _, norm = train_step(model, opt, x, y, lr=1e-3, grad_clip=1e-3)
    assert norm > 1e-2  # clipping had work to do ...
    assert grad_norm() <= 1e-3 * (1 + 1e-5)  # ... and did it
    _, norm = train_step(model, opt, x, y, lr=1e-3, grad_clip=0.0)
    assert torch.isnan(norm) and grad_norm() > 1e-2  # 0 turns clipping off


@pytest.mark.cuda
def test_a_few_steps_on_cuda_under_bf16_autocast(corpus, tmp_path):
    h = run(tiny(corpus, tmp_path / "cuda", max_steps=10, device="cuda"))
    assert all(math.isfinite(v) for v in h["train_loss"])
    assert h["train_loss"][-1] < h["train_loss"][0]
    resumed_cfg = tiny(corpus, tmp_path / "cuda", max_steps=10, device="cpu")
    assert run(resumed_cfg, resume=True)["step"] == 10  # a CUDA checkpoint loads on the CPU


# ----- the command line --------------------------------------------------------------------

def cli_error(capsys, argv) -> str:
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1, err  # one line
    prefix = "python -m qkv.train: error: "
    assert err.startswith(prefix), err
    return err[len(prefix):].rstrip("\n")


def test_cli_missing_corpus(capsys, tmp_path):
    path = tmp_path / "missing.txt"
    msg = cli_error(capsys, ["--data", str(path), "--out-dir", str(tmp_path / "o"), "--quiet"])
    assert msg == f"corpus_path: corpus not found: {path}"


def test_cli_empty_corpus(capsys, tmp_path):
    path = tmp_path / "empty.txt"
    path.write_text("")
    msg = cli_error(capsys, ["--data", str(path), "--out-dir", str(tmp_path / "o"), "--quiet"])
    assert msg == f"load_text: corpus is empty: {path}"


def test_cli_context_longer_than_the_data(capsys, tmp_path):
    path = tmp_path / "short.txt"
    path.write_text("to be or not to be: that is the question\n" * 10)  # 410 characters
    msg = cli_error(capsys, ["--data", str(path), "--out-dir", str(tmp_path / "o"), "--quiet",
                             "--context-length", "64"])
    assert msg == (f"context_length 64 is too long for the corpus {path} (410 characters): its "
                   f"train/val splits have 369/41 tokens and a window needs context_length + 1 "
                   f"= 65; use a longer text or a smaller --context-length")


def test_cli_unknown_preset(capsys):
    msg = cli_error(capsys, ["--preset", "gpu-huge"])
    assert msg == "unknown preset 'gpu-huge'; known presets: cpu-small, cpu-modern, gpu-baby"


def test_cli_resume_errors(capsys, tmp_path, corpus):
    out = str(tmp_path / "o")
    assert cli_error(capsys, ["--resume", "--out-dir", out]) == (
        f"--resume: no checkpoint at {tmp_path / 'o' / 'ckpt.pt'}")
    run(tiny(corpus, out), stop_at=2)
    assert cli_error(capsys, ["--resume", "--out-dir", out, "--lr", "0.1", "--d-model", "8"]) == (
        "--resume keeps the checkpoint's hyperparameters; drop --d-model, --lr")


def test_cli_trains_resumes_and_writes_its_files(capsys, tmp_path, corpus):
    out = tmp_path / "cli"
    argv = ["--data", str(corpus), "--out-dir", str(out), "--quiet", "--n-layer", "1",
            "--n-head", "2", "--d-model", "16", "--context-length", "16", "--batch-size", "4",
            "--max-steps", "8", "--eval-interval", "4", "--eval-iters", "1",
            "--sample-tokens", "20", "--device", "cpu"]
    assert main(argv + ["--stop-at", "3"]) == 0
    assert "stopped at step 3 of 8" in capsys.readouterr().out
    assert main(["--resume", "--out-dir", str(out), "--quiet"]) == 0
    printed = capsys.readouterr().out
    assert "resumed from" in printed and "step 8: train loss" in printed
    assert "sample (temperature 0.8):" in printed
    for name in ("ckpt.pt", "loss.png", "sample.txt"):
        assert (out / name).is_file(), name
    assert len((out / "sample.txt").read_text()) == 21  # the newline prompt + 20 characters


def test_help_explains_every_flag(capsys):
    with pytest.raises(SystemExit) as info:
        main(["--help"])
    assert info.value.code == 0
    text = capsys.readouterr().out
    flags = ["--preset", "--resume", "--stop-at", "--quiet", "--threads"]
    flags += ["--" + f.name.replace("_", "-") for f in fields(TrainConfig)]
    for flag in flags:
        assert flag in text, flag
    for action in build_parser()._actions:
        assert action.help and len(action.help) > 10, action.option_strings
    for name in PRESETS:
        assert name in text


def test_python_dash_m_entry_point():
    done = subprocess.run([sys.executable, "-m", "qkv.train", "--help"], capture_output=True,
                          text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert "usage: python -m qkv.train" in done.stdout and "--resume" in done.stdout


def test_log_reports_perplexity_and_bits_beside_the_loss(corpus, tmp_path):
    """Each evaluation line gives the validation loss also as perplexity (e^loss) and bits
    (loss / ln 2), computed here from the logged loss with NumPy, independently."""
    import numpy as np

    lines = []
    h = train(tiny(corpus, tmp_path / "run", max_steps=10), progress=False, plot=False,
              log=lines.append)
    evals = [ln for ln in lines if ln.startswith("step ")]
    assert len(evals) == len(h["evals"]) == 2  # step 0 and step 10
    for line, (_, _, val) in zip(evals, h["evals"], strict=True):
        assert f"perplexity {np.exp(val):.2f}" in line, line
        assert f"{val * np.log2(np.e):.2f} bits per token" in line, line
    # a fresh model is about uniform: perplexity about the vocabulary size
    first = float(evals[0].split("perplexity ")[1].split(",")[0])
    assert abs(first - len(set(CORPUS))) < 0.15 * len(set(CORPUS))
