"""Generation: the KV cache gives the tokens of a full recomputation, greedy is argmax, eos
stops, top-k / top-p keep the documented sets, NumPy agrees with PyTorch, and the CLI prints."""

import math

import numpy as np
import pytest
import torch

import qkv.np as npgen
import qkv.pt as qpt
from qkv.pt import GPT, GPTConfig, filter_top_k, filter_top_p, generate

VOCAB, CONTEXT = 11, 8


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny models; a busy machine punishes waiting threads
    yield
    torch.set_num_threads(before)


def make_model(fused=True, seed=0) -> GPT:
    """A tiny float64 GPT with large random weights, so its distributions are far from
    uniform (greedy choices are clear, sampling has something to follow)."""
    cfg = GPTConfig(vocab_size=VOCAB, context_length=CONTEXT, n_layer=2, n_head=2, d_model=16,
                    fused=fused)
    model = GPT(cfg, generator=torch.Generator().manual_seed(seed)).double()
    with torch.no_grad():
        for p in model.parameters():
            p.mul_(15.0)  # std 0.3 instead of 0.02
    return model


@pytest.fixture(scope="module")
def model():
    return make_model()


PROMPTS = [[3], [1, 4, 1, 5, 9], [2, 7, 1, 8, 2, 8, 1, 8], [3, 1, 4, 1, 5, 9, 2, 6, 5, 3, 5, 8]]
# 1 token, shorter than the context, exactly the context, longer than the context


@pytest.mark.parametrize("fused", [True, False], ids=["fused", "naive"])
@pytest.mark.parametrize("prompt", PROMPTS, ids=["1", "5", "8=context", "12>context"])
@pytest.mark.parametrize("sampling", [dict(temperature=0.0), dict(temperature=1.0, seed=3),
                                      dict(temperature=0.7, top_k=4, top_p=0.9, seed=11)],
                         ids=["greedy", "sampled", "top-k-p"])
def test_kv_cache_gives_the_tokens_of_a_full_recomputation(prompt, sampling, fused):
    model = make_model(fused=fused)
    n_new = 14  # every run crosses or slides past context_length
    cached = generate(model, prompt, n_new, use_cache=True, **sampling)
    full = generate(model, prompt, n_new, use_cache=False, **sampling)
    assert cached.tolist() == full.tolist()
    assert cached[:len(prompt)].tolist() == prompt and len(cached) == len(prompt) + n_new


def test_the_cached_logits_equal_the_full_forward(model):
    # The step under the token choice: the cache's last-position logits, token by token.
    from qkv.pt.generate import _forward_with_cache

    ids = torch.tensor([1, 4, 1, 5, 9, 2, 6])
    cache = [None] * 2
    logits = _forward_with_cache(model, ids[:3], cache, start=0)
    torch.testing.assert_close(logits, model(ids[:3])[-1], rtol=1e-12, atol=1e-12)
    for t in range(3, len(ids)):
        logits = _forward_with_cache(model, ids[t:t + 1], cache, start=t)
        assert cache[0][0].shape == (2, t + 1, 8)  # (n_head, seq so far, d_head)
        torch.testing.assert_close(logits, model(ids[:t + 1])[-1], rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("prompt", [PROMPTS[1], PROMPTS[3]], ids=["short", "long"])
def test_greedy_is_the_argmax_of_the_last_logits_step_by_step(model, prompt):
    ids = list(prompt)
    with torch.no_grad():
        for _ in range(12):
            logits = model(torch.tensor(ids[-CONTEXT:]))[-1]  # (vocab,)
            ids.append(int(logits.argmax()))
    assert generate(model, prompt, 12, temperature=0).tolist() == ids


def test_generation_stops_at_eos_and_includes_it(model):
    prompt = [1, 2]
    full = generate(model, prompt, 12, temperature=0).tolist()
    new = full[2:]
    eos = new[4]
    k = new.index(eos)  # its first appearance (maybe before position 4)
    stopped = generate(model, prompt, 12, temperature=0, eos_id=eos)
    assert stopped.tolist() == full[:2 + k + 1]  # ends with the eos token itself
    assert stopped[-1] == eos
    absent = next(t for t in range(VOCAB) if t not in new)
    assert generate(model, prompt, 12, temperature=0, eos_id=absent).tolist() == full


def test_temperature_zero_is_deterministic_and_seeds_repeat(model):
    a = generate(model, [5], 10, temperature=0, seed=1)
    b = generate(model, [5], 10, temperature=0, seed=2)
    assert torch.equal(a, b)
    s1 = generate(model, [5], 20, temperature=1.0, seed=4)
    s2 = generate(model, [5], 20, temperature=1.0, seed=4)
    s3 = generate(model, [5], 20, temperature=1.0, seed=5)
    assert torch.equal(s1, s2) and not torch.equal(s1, s3)
    # top_k=1 leaves one candidate: sampling is then greedy
    assert torch.equal(generate(model, [5], 10, temperature=1.0, top_k=1, seed=9), a)


def test_generate_leaves_the_model_and_global_rng_alone(model):
    model.train()
    state = torch.get_rng_state()
    generate(model, [5], 5, temperature=1.0, seed=0)
    assert model.training and torch.equal(torch.get_rng_state(), state)
    model.eval()


@pytest.mark.cuda
def test_kv_cache_on_cuda():
    model = make_model().cuda()
    for sampling in (dict(temperature=0.0), dict(temperature=1.0, top_p=0.9, seed=3)):
        cached = generate(model, PROMPTS[3], 10, use_cache=True, **sampling)
        assert cached.device.type == "cuda"
        assert cached.tolist() == generate(model, PROMPTS[3], 10, use_cache=False,
                                           **sampling).tolist()


# ----- filters, by hand ----------------------------------------------------------------------

@pytest.mark.parametrize("lib", ["pt", "np"])
def test_top_k_keeps_exactly_k(lib):
    top_k = filter_top_k if lib == "pt" else npgen.filter_top_k
    arr = torch.tensor if lib == "pt" else np.array
    inf = float("-inf")
    out = top_k(arr([1.0, 3.0, 2.0, 0.5, -1.0]), 2)
    assert out.tolist() == [inf, 3.0, 2.0, inf, inf]
    out = top_k(arr([2.0, 1.0, 2.0, 2.0]), 2)  # a three-way tie for the top: lower ids win
    assert out.tolist() == [2.0, inf, 2.0, inf]
    out = top_k(arr([[0.0, 1.0, 2.0], [5.0, 4.0, 3.0]]), 1)  # row by row
    assert out.tolist() == [[inf, inf, 2.0], [5.0, inf, inf]]
    assert top_k(arr([1.0, 2.0]), 5).tolist() == [1.0, 2.0]  # k >= vocab keeps all
    with pytest.raises(ValueError, match=r"^filter_top_k: k must be an integer >= 1; got 0$"):
        top_k(arr([1.0, 2.0]), 0)


@pytest.mark.parametrize("lib", ["pt", "np"])
def test_top_p_keeps_the_smallest_set_reaching_p(lib):
    top_p = filter_top_p if lib == "pt" else npgen.filter_top_p
    arr = torch.tensor if lib == "pt" else np.array
    logits = arr([math.log(q) for q in (0.1, 0.4, 0.2, 0.3)], dtype=torch.float64) \
        if lib == "pt" else np.log([0.1, 0.4, 0.2, 0.3])

    def kept(p):
        return [i for i, v in enumerate(top_p(logits, p).tolist()) if v != float("-inf")]

    assert kept(0.35) == [1]  # 0.4 already reaches 0.35
    assert kept(0.5) == [1, 3]  # 0.4 < 0.5 <= 0.4 + 0.3
    assert kept(0.75) == [1, 2, 3]  # 0.7 < 0.75 <= 0.9
    assert kept(1.0) == [0, 1, 2, 3]
    assert top_p(logits, 0.5)[1] == logits[1]  # kept logits are unchanged
    # Ties: four equal tokens, p = 0.5 is reached by two of them; the lower ids are kept.
    flat = arr([0.0, 0.0, 0.0, 0.0])
    assert [v != float("-inf") for v in top_p(flat, 0.5).tolist()] == [True, True, False, False]
    assert [v != float("-inf") for v in top_p(flat, 0.6).tolist()] == [True, True, True, False]
    for bad in (0.0, 1.5):
        with pytest.raises(ValueError, match=r"^filter_top_p: p must be in \(0, 1\]; got "):
            top_p(flat, bad)


def test_np_and_pt_filters_agree_on_random_logits():
    rng = np.random.default_rng(0)
    logits = rng.normal(size=(6, 50)).round(1)  # rounding makes ties
    for k in (1, 5, 17):
        np.testing.assert_array_equal(npgen.filter_top_k(logits, k),
                                      filter_top_k(torch.from_numpy(logits), k).numpy())
    for p in (0.1, 0.5, 0.93):
        np.testing.assert_array_equal(npgen.filter_top_p(logits, p),
                                      filter_top_p(torch.from_numpy(logits), p).numpy())


# ----- NumPy generator -----------------------------------------------------------------------

@pytest.mark.parametrize("prompt", [PROMPTS[0], PROMPTS[3]], ids=["short", "long"])
def test_numpy_greedy_equals_pytorch_greedy(model, prompt):
    params = model.numpy_params()
    ours = npgen.generate(params, model.config.n_head, prompt, 12, temperature=0)
    theirs = generate(model, prompt, 12, temperature=0)
    assert ours.tolist() == theirs.tolist()
    eos = int(theirs[len(prompt) + 2])
    stopped = npgen.generate(params, model.config.n_head, prompt, 12, temperature=0, eos_id=eos)
    assert stopped.tolist() == generate(model, prompt, 12, temperature=0, eos_id=eos).tolist()


def test_numpy_sampling_is_seeded_and_filtered(model):
    params, n_head = model.numpy_params(), model.config.n_head
    a = npgen.generate(params, n_head, [1], 15, temperature=1.0, seed=2)
    b = npgen.generate(params, n_head, [1], 15, temperature=1.0, seed=2)
    assert a.tolist() == b.tolist()
    one = npgen.generate(params, n_head, [1], 15, temperature=1.0, top_k=1, seed=2)
    assert one.tolist() == npgen.generate(params, n_head, [1], 15, temperature=0).tolist()


# ----- bad input and the command line --------------------------------------------------------

def test_bad_arguments(model):
    with pytest.raises(ValueError, match=r"^generate: prompt_ids is empty"):
        generate(model, [], 3)
    with pytest.raises(ValueError, match=r"^generate: temperature must be >= 0; got -1"):
        generate(model, [1], 3, temperature=-1)
    with pytest.raises(ValueError, match=r"^filter_top_k: k must be an integer >= 1"):
        qpt.generate(model, [1], 3, top_k=0)
    with pytest.raises(ValueError, match=r"^generate: prompt_ids must be 1-D \(seq,\); got"):
        generate(model, [[1, 2]], 3)


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    from qkv.train import make_config, train

    root = tmp_path_factory.mktemp("gen")
    (root / "corpus.txt").write_text("abcabcabd " * 60)
    cfg = make_config("cpu-small", data=str(root / "corpus.txt"), out_dir=str(root / "out"),
                      n_layer=1, n_head=2, d_model=16, context_length=8, batch_size=8,
                      max_steps=30, lr=1e-2, warmup_steps=3, eval_interval=30, eval_iters=1,
                      sample_tokens=0, device="cpu")
    train(cfg, progress=False, plot=False, log=lambda *a: None)
    return root / "out" / "ckpt.pt"


def test_cli_prints_the_prompt_and_its_continuation(capsys, checkpoint):
    from qkv.generate import main
    from qkv.train import load_checkpoint

    assert main(["--checkpoint", str(checkpoint), "--prompt", "abca", "--max-new-tokens", "20",
                 "--temperature", "0"]) == 0
    printed = capsys.readouterr().out
    model, tok, _ = load_checkpoint(checkpoint)
    expected = tok.decode(generate(model, tok.encode("abca"), 20, temperature=0).tolist())
    assert printed == expected + "\n" and len(expected) == 24
    assert main(["--checkpoint", str(checkpoint), "--prompt", "abca", "--max-new-tokens", "20",
                 "--temperature", "0", "--no-cache"]) == 0
    assert capsys.readouterr().out == printed


def test_cli_errors(capsys, checkpoint, tmp_path):
    from qkv.generate import main

    assert main(["--checkpoint", str(tmp_path / "none.pt")]) == 2
    assert capsys.readouterr().err == (f"python -m qkv.generate: error: no checkpoint at "
                                       f"{tmp_path / 'none.pt'}\n")
    assert main(["--checkpoint", str(checkpoint), "--prompt", "xyz"]) == 2
    err = capsys.readouterr()
    assert err.out == ""  # nothing printed before the error
    assert err.err == ("python -m qkv.generate: error: CharTokenizer.encode: characters not in "
                       "the vocabulary: 'xyz'\n")
    assert main(["--checkpoint", str(checkpoint), "--prompt", "ab", "--top-p", "2"]) == 2
    assert "filter_top_p: p must be in (0, 1]; got 2.0" in capsys.readouterr().err
