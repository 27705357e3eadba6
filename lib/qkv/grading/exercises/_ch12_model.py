"""Chapter 12's checkers, part 1: the learner's GPT module, the trained model's targets and
sampling (declared as exercises in ``ch12_your_gpt``), and the steps every ch12 judge shares."""

import contextlib
import io
import math
import warnings

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.overrides import TorchFunctionMode

from qkv.data import CharTokenizer, course_text, get_batch, mark_ends, split
from qkv.pt import GPT as RefGPT
from qkv.pt import GPTConfig, load_gpt2_weights
from qkv.tolerances import TOL

from .. import _trusted as _t
from .ch12_your_gpt import TARGETS

FORBIDDEN_MODULES = (nn.Linear, nn.LayerNorm, nn.MultiheadAttention, nn.Embedding)
FORBIDDEN_FUNCTIONS = {F.scaled_dot_product_attention: "F.scaled_dot_product_attention"}

EVAL_BATCHES, EVAL_BATCH, EVAL_CONTEXT, EVAL_SEED = 20, 16, 64, 12345


# ==============================================================================================
# Shared steps: call quietly, name what was raised, compare
# ==============================================================================================


def _call(name: str, fn, *args, **kwargs):
    """fn(*args) with warnings and prints swallowed; an exception becomes a sentence."""
    sink = io.StringIO()
    try:
        with warnings.catch_warnings(), contextlib.redirect_stdout(sink), \
                contextlib.redirect_stderr(sink):
            warnings.simplefilter("ignore")
            return fn(*args, **kwargs)
    except NotImplementedError as exc:
        if not str(exc):
            raise AssertionError(f"{name} is not implemented yet (it raised "
                                 f"NotImplementedError): replace `raise NotImplementedError()` "
                                 f"with your code.") from None
        raise AssertionError(f"{name} raised NotImplementedError: {exc}") from None
    except AssertionError:
        raise
    except Exception as exc:  # the learner's error, reported as a failed test
        raise AssertionError(f"{name} raised {type(exc).__name__}: {exc} — when called with "
                             f"{_describe(args)}.") from None


def _describe(args) -> str:
    """The arguments in a few words: shapes of arrays, the type of anything else."""
    words = []
    for a in args:
        if isinstance(a, (torch.Tensor, np.ndarray)):
            words.append(f"an array of shape {tuple(a.shape)}")
        elif isinstance(a, (int, float, str, type(None))):
            words.append(repr(a))
        elif isinstance(a, (list, tuple)):
            words.append(f"a {type(a).__name__} of {len(a)}")
        else:
            words.append(f"a {type(a).__name__}")
    return ", ".join(words) or "no arguments"


def _returned(name: str, out, wanted: str) -> AssertionError:
    return AssertionError(f"{name} returned a {type(out).__name__}; it should return {wanted}.")


def _function(name: str, fn) -> None:
    if not callable(fn):
        raise AssertionError(f"{name} should be a function, but it is a {type(fn).__name__}. "
                             f"Define it with `def {name}(...):`.")


def _close(a, b, tol: str) -> bool:
    """Same shape and close, through the references _trusted took before any learner code ran
    (a notebook that rebinds np.allclose cannot make a wrong answer pass)."""
    a, b = _t.asarray(a, dtype=_t.float64), _t.asarray(b, dtype=_t.float64)
    return _t.close(a, b, **TOL[tol])


def _diagnose(got, variants: dict, tol: str):
    """The sentence of the first variant whose output matches ``got``, else None."""
    for says, out in variants.items():
        if out is not None and _close(got, out, tol):
            return says
    return None


# ==============================================================================================
# (a) The GPT module
# ==============================================================================================


def _gpt_configs(hidden: bool):
    if hidden:
        return [GPTConfig(vocab_size=17, context_length=12, n_layer=3, n_head=4, d_model=16),
                GPTConfig(vocab_size=5, context_length=4, n_layer=1, n_head=1, d_model=6)]
    return [GPTConfig(vocab_size=11, context_length=8, n_layer=2, n_head=2, d_model=8)]


def _random_gpt2_weights(config: GPTConfig, seed: int) -> dict:
    """GPT-2-format weights large enough that every piece (mask, scale, norms) shows."""
    gen = torch.Generator().manual_seed(seed)
    with torch.random.fork_rng(devices=[]):
        ref = RefGPT(config, generator=gen)
    with torch.no_grad():
        for name, p in ref.named_parameters():
            noise = torch.randn(p.shape, generator=gen)
            if name.endswith(("ln_1.weight", "ln_2.weight", "ln_f.weight")):
                p.copy_(1.0 + 0.3 * noise)
            else:
                p.copy_(0.3 * noise)
    return {k: v.detach().clone() for k, v in ref.to_gpt2_state_dict().items()}


def _heads(t, n_head, *, transpose=True):
    """(..., seq, d_model) -> (..., n_head, seq, d_head)."""
    *lead, seq, d_model = t.shape
    if not transpose:  # the classic slip: a reshape that cuts across positions
        return t.reshape(*lead, n_head, seq, d_model // n_head)
    return t.reshape(*lead, seq, n_head, d_model // n_head).transpose(-3, -2)


def _norm(x, w, b, unbiased=False):
    mean = x.mean(-1, keepdim=True)
    var = x.var(-1, keepdim=True, unbiased=unbiased)
    return (x - mean) / torch.sqrt(var + 1e-5) * w + b


def _gelu(h, exact=False):
    if exact:
        return 0.5 * h * (1 + torch.erf(h / math.sqrt(2)))
    return 0.5 * h * (1 + torch.tanh(math.sqrt(2 / math.pi) * (h + 0.044715 * h**3)))


def _ln(p, t, which, unbiased):
    return _norm(t, p[f"{which}.weight"], p[f"{which}.bias"], unbiased)


def _attn(p, t, n_head, mask, scale, transpose, axis=-1, merge=True):
    seq, d_model = t.shape[-2:]
    q, k, v = (t @ p["attn.c_attn.weight"] + p["attn.c_attn.bias"]).split(d_model, -1)
    q, k, v = (_heads(z, n_head, transpose=transpose) for z in (q, k, v))
    s = q @ k.transpose(-2, -1)  # (..., n_head, seq, seq)
    if scale:  # True: 1/sqrt(d_head); "d_model": the slip of scaling by the model's width
        s = s / math.sqrt(d_model if scale == "d_model" else d_model // n_head)
    if mask:
        s = s.masked_fill(torch.ones(seq, seq, dtype=torch.bool).triu(1), float("-inf"))
    o = torch.softmax(s, axis) @ v  # (..., n_head, seq, d_head)
    if merge:
        o = o.transpose(-3, -2)  # (..., seq, n_head, d_head): then the heads side by side
    o = o.reshape(*t.shape)
    return o @ p["attn.c_proj.weight"] + p["attn.c_proj.bias"]


def _ffn(p, t, exact_gelu):
    h = _gelu(t @ p["mlp.c_fc.weight"] + p["mlp.c_fc.bias"], exact_gelu)
    return h @ p["mlp.c_proj.weight"] + p["mlp.c_proj.bias"]


def _gpt_logits(sd: dict, ids, n_head: int, *, mask=True, scale=True, pre_ln=True,
                final_ln=True, positions=True, unbiased=False, exact_gelu=False,
                transpose=True, residual=True, axis=-1, merge=True):
    """GPT-2's forward from a state dict (float64), with one switch per known mistake."""
    wte, wpe = sd["transformer.wte.weight"], sd["transformer.wpe.weight"]
    x = wte[ids] + (wpe[:ids.shape[-1]] if positions else 0)
    n_layer = len({k.split(".")[2] for k in sd if k.startswith("transformer.h.")})
    for i in range(n_layer):
        p = {k[len(f"transformer.h.{i}."):]: v for k, v in sd.items()
             if k.startswith(f"transformer.h.{i}.")}

        def attn(t, p=p):
            return _attn(p, t, n_head, mask, scale, transpose, axis, merge)

        if pre_ln:
            x = (x if residual else 0) + attn(_ln(p, x, "ln_1", unbiased))
            x = (x if residual else 0) + _ffn(p, _ln(p, x, "ln_2", unbiased), exact_gelu)
        else:
            x = _ln(p, x + attn(x), "ln_1", unbiased)
            x = _ln(p, x + _ffn(p, x, exact_gelu), "ln_2", unbiased)
    if final_ln:
        x = _norm(x, sd["transformer.ln_f.weight"], sd["transformer.ln_f.bias"], unbiased)
    return x @ wte.T


GPT_MISTAKES = {
    "mask": "GPT's logits match a model WITHOUT the causal mask: every position can see the "
            "tokens after it. Set the scores above the diagonal to -inf before the softmax.",
    "scale": "GPT's logits match attention without the 1/sqrt(d_head) scale on the scores.",
    "scale_d_model": "GPT's logits match attention scaled by 1/sqrt(d_model): each head's scores "
                     "are dot products of d_head numbers, so the scale is 1/sqrt(d_head), "
                     "d_head = d_model // n_head.",
    "pre_ln": "GPT's logits match a post-LN block (x = ln(x + attn(x))). GPT-2's block is pre-LN: "
              "x = x + attn(ln_1(x)), then x = x + mlp(ln_2(x)).",
    "final_ln": "GPT's logits match a model without the final layer norm (ln_f) before the "
                "unembedding.",
    "positions": "GPT's logits match a model that never adds the position embeddings (wpe).",
    "unbiased": "GPT's layer norm uses the unbiased variance (divide by d_model - 1); GPT-2 "
                "divides by d_model (x.var(-1, unbiased=False), or the mean of the squares).",
    "exact_gelu": "GPT's MLP uses the exact (erf) GELU; GPT-2 uses the tanh approximation "
                  "0.5 h (1 + tanh(sqrt(2/pi) (h + 0.044715 h^3))).",
    "transpose": "GPT splits the heads with a reshape straight to (n_head, seq, d_head): that "
                 "mixes positions. Reshape to (seq, n_head, d_head), then swap those two axes.",
    "residual": "GPT's logits match a block without the residual connections (x + ...).",
    "axis": "GPT's logits match a softmax over the wrong axis of the scores: each query's row "
            "(the keys, the last axis) must sum to 1, so softmax(scores, dim=-1).",
    "merge": "GPT puts the heads back with a reshape straight from (n_head, seq, d_head) to "
             "(seq, d_model): that mixes positions. Swap to (seq, n_head, d_head) first, then "
             "reshape.",
}


_GPT_SWITCHES = {flag: {flag: flag in ("unbiased", "exact_gelu")} for flag in GPT_MISTAKES}
_GPT_SWITCHES.update(scale_d_model={"scale": "d_model"}, axis={"axis": -2},
                     merge={"merge": False})


def _gpt_difference(got, expected, config, shape) -> str:
    """The generic message, with where the logits differ: position 0 sees only itself, so a
    slip in how positions are mixed leaves it right and shows from position 1 on."""
    where = (f"on ids of shape {shape} with n_layer {config.n_layer}, n_head {config.n_head}")
    if torch.isnan(got).any():
        return (f"GPT's logits contain NaN {where}. A softmax over scores that are all -inf "
                f"gives NaN: the causal mask must leave the diagonal open (each position sees "
                f"itself), e.g. torch.ones(seq, seq, dtype=torch.bool).triu(1) marks the future.")
    wrong = ((got - expected).abs() > TOL["float32_model"]["atol"] +
             TOL["float32_model"]["rtol"] * expected.abs()).any(-1).any(0)  # (seq,)
    worst = (got - expected).abs().max().item()
    text = (f"GPT's logits differ from GPT-2's (qkv.pt.GPT's) {where}: largest difference "
            f"{worst:.3g}.")
    if shape[1] > 1 and not wrong[0] and wrong[1:].any():
        text += (" Position 0 is right and later positions are not: position 0 attends only to "
                 "itself, so look at what mixes positions: the scores (queries against keys, "
                 "the order of [Q | K | V] in c_attn), the mask, the softmax's axis.")
    return text


class _Recorder(TorchFunctionMode):
    """Records which forbidden torch functions a forward calls."""

    def __init__(self):
        super().__init__()
        self.used = set()

    def __torch_function__(self, func, types, args=(), kwargs=None):
        if func in FORBIDDEN_FUNCTIONS:
            self.used.add(FORBIDDEN_FUNCTIONS[func])
        return func(*args, **(kwargs or {}))


def _forbidden_modules(model) -> list[str]:
    found = []
    for name, m in model.named_modules():
        if not isinstance(m, FORBIDDEN_MODULES):
            continue
        base = next(c for c in FORBIDDEN_MODULES if isinstance(m, c))
        what = (f"torch.nn.{base.__name__}" if type(m) is base else
                f"your class {type(m).__name__} (a subclass of torch.nn.{base.__name__})")
        found.append(f"{what} at '{name or 'the model'}'")
    return found


def _check_from_scratch(model) -> None:
    if isinstance(model, RefGPT):
        raise AssertionError("GPT is the course's qkv.pt.GPT: write your own class.")
    used = _forbidden_modules(model)
    if used:
        raise AssertionError(f"GPT uses {', '.join(used)}. This chapter builds every layer from "
                             f"nn.Parameter and tensor operations (no nn.Linear, nn.LayerNorm, "
                             f"nn.MultiheadAttention, nn.Embedding).")


def _judge_gpt_module(GPT, hidden: bool = False) -> None:
    """GPT(config) from nn.Parameter and tensor ops; GPT-2 weights give qkv.pt.GPT's logits."""
    _function("GPT", GPT)
    for i, config in enumerate(_gpt_configs(hidden)):
        model = _call("GPT(config)", GPT, config)
        if not isinstance(model, nn.Module):
            raise _returned("GPT(config)", model, "an nn.Module (class GPT(nn.Module): ...)")
        _check_from_scratch(model)
        if getattr(getattr(model, "config", None), "context_length", None) != \
                config.context_length:
            raise AssertionError("GPT(config) should keep its config as self.config (the task's "
                                 "cell starts with that line): sample reads "
                                 "model.config.context_length.")
        sd = _random_gpt2_weights(config, seed=100 + i + 10 * hidden)
        try:
            load_gpt2_weights(model, sd)
        except (KeyError, ValueError) as exc:
            raise AssertionError(f"GPT-2's weights do not load into your GPT: {exc.args[0]}. "
                                 f"Name the parameters as GPT-2 does (see the task).") from None
        model = model.float()
        gen = torch.Generator().manual_seed(7 + i)
        batch = 3 if hidden else 2
        for seq in (config.context_length, max(1, config.context_length // 2)):
            ids = torch.randint(config.vocab_size, (batch, seq), generator=gen)
            recorder = _Recorder()
            with torch.no_grad(), recorder:
                got = _call("GPT's forward", model, ids)
            if recorder.used:
                raise AssertionError(f"GPT's forward calls {', '.join(sorted(recorder.used))}. "
                                     f"Write attention from matrix products, a mask and a "
                                     f"softmax.")
            if not isinstance(got, torch.Tensor):
                raise _returned("GPT's forward", got, "the logits, a tensor")
            shape = (batch, seq, config.vocab_size)
            if tuple(got.shape) != shape:
                raise AssertionError(f"GPT's forward on token ids of shape {(batch, seq)} should "
                                     f"return logits of shape (batch, seq, vocab) = {shape}; got "
                                     f"{tuple(got.shape)}.")
            sd64 = {k: v.double() for k, v in sd.items()}
            expected = _gpt_logits(sd64, ids, config.n_head)
            got = got.detach().double()
            if _close(got, expected, "float32_model"):
                continue
            variants = {says: _gpt_logits(sd64, ids, config.n_head, **_GPT_SWITCHES[flag])
                        for flag, says in GPT_MISTAKES.items()}
            said = _diagnose(got, variants, "float32_model")
            raise AssertionError(said or _gpt_difference(got, expected, config, (batch, seq)))



@torch.no_grad()
def _ref_evaluate(model, ids, batch_size, context, n_batches, seed, *, fresh=True, gen=None,
                  last_only=False):
    gen = torch.Generator().manual_seed(seed) if fresh else gen
    losses = []
    for _ in range(n_batches):
        x, y = get_batch(ids, batch_size, context, gen)
        logits = model(x)
        losses.append(F.cross_entropy(logits.flatten(0, 1), y.flatten()))
    return (losses[-1] if last_only else torch.stack(losses).mean()).item()


# ==============================================================================================
# (d) The trained model: three targets, one graded cell each
# ==============================================================================================


def course_data():
    """(tokenizer, train_ids, val_ids, corpus name), exactly as the notebook builds them."""
    text, name = course_text()
    marked = mark_ends(text)
    tok = CharTokenizer.from_text(marked, eot="<|endoftext|>")
    ids = torch.tensor(tok.encode(marked), dtype=torch.long)
    train_ids, val_ids = split(ids)
    return tok, train_ids, val_ids, name


_VAL_CACHE = {}


class _Checked:
    """The learner's model seen through a forward that checks what it returns."""

    def __init__(self, model, vocab):
        self.model, self.vocab = model, vocab

    def __call__(self, x):
        out = _call("your trained GPT", self.model, x)
        if not isinstance(out, torch.Tensor):
            raise _returned("your trained GPT", out, "the logits, a tensor")
        if tuple(out.shape) != (*x.shape, self.vocab):
            raise AssertionError(f"your trained GPT returned logits of shape "
                                 f"{tuple(out.shape)} for token ids of shape {tuple(x.shape)}; "
                                 f"expected {(*x.shape, self.vocab)}.")
        return out.float()


def validation_loss(model) -> float:
    """The checker's own measure: mean loss over EVAL_BATCHES fixed validation windows."""
    if "data" not in _VAL_CACHE:
        _VAL_CACHE["data"] = course_data()
    tok, _, val_ids, _ = _VAL_CACHE["data"]
    context = min(EVAL_CONTEXT, int(getattr(getattr(model, "config", None), "context_length",
                                            EVAL_CONTEXT)))
    module = isinstance(model, nn.Module)
    was_training = model.training if module else False
    if module:
        model.eval()
    try:
        return _ref_evaluate(_Checked(model, tok.vocab_size), val_ids, EVAL_BATCH, context,
                             EVAL_BATCHES, EVAL_SEED)
    finally:
        if module:
            model.train(was_training)


def _judge_trained_gpt(model, part: int, hidden: bool = False) -> None:
    """Target 1, 2 or 3: the validation loss of the learner's trained model is within TARGETS.
    ``model``: the trained GPT (any callable from ids (batch, seq) to logits is measured)."""
    if model is None:
        raise AssertionError("there is no trained model: GPT, make_optimizer or train is not "
                             "implemented yet, so the cell with the settings did not make one. "
                             "Write them, then run that cell and the six training cells.")
    if isinstance(model, nn.Module):
        _check_from_scratch(model)
    if "data" not in _VAL_CACHE:
        _VAL_CACHE["data"] = course_data()
    tok, name = _VAL_CACHE["data"][0], _VAL_CACHE["data"][3]
    target = TARGETS[name][part - 1]
    loss = validation_loss(model)
    if not math.isfinite(loss):
        raise AssertionError(f"your GPT's validation loss is {loss}: training diverged (try a "
                             f"smaller learning rate, and check the clipping).")
    if loss > target:
        untrained = abs(loss - math.log(tok.vocab_size)) < 0.1
        raise AssertionError(f"validation loss {loss:.3f} misses target {part}, "
                             f"{target:.2f} ({name}), by {loss - target:.3f} nats per character."
                             + (f" That is about ln {tok.vocab_size} = "
                                f"{math.log(tok.vocab_size):.3f}, the loss of a model that knows "
                                f"nothing: did the six training cells run?" if untrained else ""))


# ==============================================================================================
# (e) Sampling that stops at the end token
# ==============================================================================================


class _NextModel(nn.Module):
    """A toy model: strong logits for (last token + 1) % vocab, or fixed logits; refuses
    windows longer than its context."""

    def __init__(self, vocab, context, fixed=None):
        super().__init__()
        self.config = GPTConfig(vocab_size=vocab, context_length=context, n_layer=1, n_head=1,
                                d_model=2)
        self.vocab, self.context, self.fixed = vocab, context, fixed
        self.longest = 0

    def forward(self, ids):
        self.longest = max(self.longest, ids.shape[-1])  # a real GPT would raise past context
        if self.fixed is not None:
            return self.fixed.expand(*ids.shape, self.vocab).clone()
        return 60.0 * F.one_hot((ids + 1) % self.vocab, self.vocab).double()


def _sample_ids(sample, model, prompt, max_new, temperature, eos_id, seed):
    original = list(prompt)
    gen = torch.Generator().manual_seed(seed)
    out = _call("sample", sample, model, prompt, max_new, temperature, eos_id, gen)
    if prompt != original:
        raise AssertionError("sample changed the prompt list it was given: copy it first "
                             "(ids = list(prompt_ids)).")
    try:
        return [int(t) for t in out]
    except (TypeError, ValueError):
        raise AssertionError(f"sample should return a list of token ids; it returned "
                             f"{type(out).__name__}.") from None


def _judge_sample(sample, hidden: bool = False) -> None:
    """Stops right after eos_id (kept), at most max_new_tokens, crops to context_length, and
    divides the logits by the temperature."""
    _function("sample", sample)
    vocab = 9 if hidden else 7
    model = _NextModel(vocab, context=5)
    got = _sample_ids(sample, model, [1], 20, 1.0, 4, 0)
    want = [1, 2, 3, 4]
    if got != want:
        if got[:len(want)] == want:
            raise AssertionError(f"sample should stop right after producing eos_id 4 and keep "
                                 f"it; from prompt [1] with a model that always says 'the next "
                                 f"id' it gave {got}, expected {want}.")
        raise AssertionError(f"sample from prompt [1], with a model that always says 'the next "
                             f"id', should give {want} (stopping after eos_id 4); got {got}.")
    got = _sample_ids(sample, model, [0, 1, 2, 3, 4, 5], 8, 1.0, None, 0)
    want = [0, 1, 2, 3, 4, 5] + [(6 + i) % vocab for i in range(8)]
    if model.longest > model.context:
        raise AssertionError(f"sample fed the model {model.longest} tokens, more than "
                             f"context_length = {model.context}: run it on the last "
                             f"model.config.context_length ids only.")
    if got != want:
        if model.longest == 0:
            raise AssertionError("sample never called the model.")
        raise AssertionError(f"sample with eos_id None should add exactly max_new_tokens = 8 "
                             f"tokens; from {[0, 1, 2, 3, 4, 5]} it should give {want}; got {got}.")
    # Temperature: two tokens with logits (0, 2): p(1) = 0.88 at temperature 1, 0.62 at 4.
    fixed = torch.tensor([0.0, 2.0], dtype=torch.float64)
    for temperature, p1 in ((1.0, 1 / (1 + math.exp(-2))), (4.0, 1 / (1 + math.exp(-0.5)))):
        toy = _NextModel(2, context=4, fixed=fixed)
        n = 400
        got = _sample_ids(sample, toy, [0], n, temperature, None, 11)
        share = sum(got[1:]) / n
        if abs(share - p1) > 0.08:
            raise AssertionError(f"with logits (0, 2) and temperature {temperature}, token 1 "
                                 f"should come up {p1:.0%} of the time; in {n} draws sample "
                                 f"gave it {share:.0%}. Sample from softmax(logits / "
                                 f"temperature) with torch.multinomial(probs, 1, "
                                 f"generator=gen).")
    # The draws come from gen: the same seed gives the same tokens, whatever torch's global
    # generator holds.
    toy = _NextModel(2, context=4, fixed=fixed)
    runs = []
    for global_seed in (1, 2):
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(global_seed)
            runs.append(_sample_ids(sample, toy, [0], 40, 1.0, None, 5))
    if runs[0] != runs[1]:
        raise AssertionError("sample gave different tokens for two generators with the same "
                             "seed: draw with torch.multinomial(probs, 1, generator=gen), so "
                             "that the generator (not torch's global one) fixes the sample.")


