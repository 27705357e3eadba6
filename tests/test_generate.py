"""Generation: the KV cache gives the tokens of a full recomputation, greedy is argmax, eos
stops, top-k / top-p keep the documented sets, NumPy agrees with PyTorch, and the CLI prints."""

import math

import numpy as np
import pytest
import torch

import qkv.np as npgen
import qkv.pt as qpt
from qkv.pt import GPT, GPTConfig, KVCache, filter_top_k, filter_top_p, generate
from qkv.tolerances import TOL

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


@pytest.mark.parametrize("fused", [True, False], ids=["fused", "naive"])
def test_the_cached_logits_equal_the_full_forward(fused):
    # The step under the token choice: the model's own forward with a KV cache, token by token,
    # against the same forward on the whole prefix (a batch of two sequences at once).
    model = make_model(fused=fused)
    ids = torch.tensor([[1, 4, 1, 5, 9, 2, 6], [3, 3, 0, 10, 7, 1, 2]])
    cache = KVCache(2)
    with torch.no_grad():
        logits = model(ids[:, :3], kv_cache=cache)  # (2, 3, vocab): the prompt in one pass
        torch.testing.assert_close(logits, model(ids[:, :3]), **TOL["float64"])
        for t in range(3, ids.shape[1]):
            logits = model(ids[:, t:t + 1], kv_cache=cache)  # (2, 1, vocab)
            assert cache.pos == t + 1 and cache.layers[1]["k"].shape == (2, 2, t + 1, 8)
            torch.testing.assert_close(logits[:, -1], model(ids[:, :t + 1])[:, -1],
                                       **TOL["float64"])


def test_generation_runs_the_models_own_forward_one_token_per_step(monkeypatch):
    # One wiring: every step goes through GPT.forward (no second copy of the block); with the
    # cache, the prompt runs once and then each step feeds one token, until the window slides.
    model = make_model()
    seen = []
    forward = GPT.forward

    def spy(self, token_ids, targets=None, kv_cache=None):
        seen.append((token_ids.shape[-1], None if kv_cache is None else kv_cache.pos))
        return forward(self, token_ids, targets, kv_cache)

    monkeypatch.setattr(GPT, "forward", spy)
    generate(model, [1, 2, 3], 7, temperature=0)  # 3 + 7 = 10 > CONTEXT = 8
    # prompt (3 at pos 0), then one token at pos 3..7 (the last fills the window to 8), then
    # the window slides: the whole 8 again from pos 0, every step
    assert seen == [(3, 0), (1, 3), (1, 4), (1, 5), (1, 6), (1, 7), (8, 0)]
    seen.clear()
    generate(model, [1, 2, 3], 3, temperature=0, use_cache=False)
    assert seen == [(3, None), (4, None), (5, None)]


def test_numpy_cached_logits_equal_the_full_forward_and_torch(model):
    params, n_head = model.numpy_params(), model.config.n_head
    ids = np.array([2, 7, 1, 8, 2, 8])
    cache = npgen.KVCache(2)
    npgen.gpt_forward(ids[:2], params, n_head, kv_cache=cache)
    for t in range(2, len(ids)):
        logits = npgen.gpt_forward(ids[t:t + 1], params, n_head, kv_cache=cache)[-1]
        np.testing.assert_allclose(logits, npgen.gpt_forward(ids[:t + 1], params, n_head)[-1],
                                   **TOL["float64"])
        with torch.no_grad():
            theirs = model(torch.from_numpy(ids[:t + 1]))[-1].numpy()
        np.testing.assert_allclose(logits, theirs, **TOL["float64"])


@pytest.mark.parametrize("lib", ["pt", "np"])
def test_attention_with_a_cache_and_a_padding_mask(lib):
    # One layer, a cached prefix of 4 and 2 new positions; a padding mask over all 6 keys
    # blocks key 1 for the first sequence. Same result as the full pass over 6 positions.
    rng = np.random.default_rng(5)
    x, w_qkv, w_out = rng.normal(size=(2, 6, 8)), rng.normal(size=(8, 24)), rng.normal(size=(8, 8))
    b_qkv, b_out = rng.normal(size=24), rng.normal(size=8)
    keys = np.ones((2, 1, 6), dtype=bool)
    keys[0, 0, 1] = False
    mod, arr = (qpt, torch.from_numpy) if lib == "pt" else (npgen, np.asarray)
    args = [arr(a) for a in (w_qkv, b_qkv, w_out, b_out)]
    full = mod.multi_head_attention(arr(x), *args, 2, mask=arr(keys))
    layer = {}
    mod.multi_head_attention(arr(x[:, :4]), *args, 2, mask=arr(keys[..., :4]), kv_cache=layer)
    new = mod.multi_head_attention(arr(x[:, 4:]), *args, 2, mask=arr(keys), kv_cache=layer)
    assert tuple(layer["k"].shape) == (2, 2, 6, 4)
    np.testing.assert_allclose(np.asarray(new), np.asarray(full)[:, 4:], **TOL["float64"])


def test_bad_kv_cache(model):
    with pytest.raises(ValueError, match=r"^GPT.forward: kv_cache has 3 layers; the model has "
                                         r"n_layer 2$"):
        model(torch.tensor([1]), kv_cache=KVCache(3))
    cache = KVCache(2)
    with torch.no_grad():
        model(torch.tensor([1] * 6), kv_cache=cache)
    with pytest.raises(ValueError, match=r"^GPT.forward: 6 cached \+ 3 new positions exceed the "
                                         r"context 8"):
        model(torch.tensor([1, 2, 3]), kv_cache=cache)
    with pytest.raises(TypeError, match=r"^multi_head_attention: kv_cache must be one layer's "
                                        r"entry"):
        qpt.decoder_block(torch.zeros(1, 16, dtype=torch.float64),
                          model.transformer.h[0].params(), 2, kv_cache=cache)


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
    ours_model = (model.numpy_params(), model.config.n_head)
    theirs = generate(model, prompt, 12, temperature=0)
    for use_cache in (True, False):
        ours = npgen.generate(ours_model, prompt, 12, temperature=0, use_cache=use_cache)
        assert ours.tolist() == theirs.tolist()
    eos = int(theirs[len(prompt) + 2])
    stopped = npgen.generate(ours_model, prompt, 12, temperature=0, eos_id=eos)
    assert stopped.tolist() == generate(model, prompt, 12, temperature=0, eos_id=eos).tolist()


def test_numpy_sampling_is_seeded_and_filtered(model):
    ours = (model.numpy_params(), model.config.n_head)
    a = npgen.generate(ours, [1], 15, temperature=1.0, seed=2)
    b = npgen.generate(ours, [1], 15, temperature=1.0, seed=2)
    assert a.tolist() == b.tolist()
    one = npgen.generate(ours, [1], 15, temperature=1.0, top_k=1, seed=2)
    assert one.tolist() == npgen.generate(ours, [1], 15, temperature=0).tolist()


@pytest.mark.parametrize("prompt", PROMPTS, ids=["1", "5", "8=context", "12>context"])
def test_numpy_kv_cache_gives_the_tokens_of_a_full_recomputation(model, prompt):
    ours = (model.numpy_params(), model.config.n_head)
    for sampling in (dict(temperature=0.0), dict(temperature=0.8, top_k=5, top_p=0.9, seed=1)):
        cached = npgen.generate(ours, prompt, 14, use_cache=True, **sampling)
        assert cached.tolist() == npgen.generate(ours, prompt, 14, use_cache=False,
                                                 **sampling).tolist()


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
