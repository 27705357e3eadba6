"""Chapter 11, generation: probabilities at a temperature, top-k and top-p filters, greedy
decoding that stops at an end token, and one attention step with a KV cache."""

import math

import numpy as np

from qkv.np import filter_top_k as _ref_top_k
from qkv.np import filter_top_p as _ref_top_p

from .. import _trusted as _t
from ..engine import Case, Mistake, _normal
from ..exercise import Exercise
from ..kinds import Filter, Parts, Value
from ..variants import plain_softmax

# --- temperature --------------------------------------------------------------------------------


def _reference_temperature_probs(x, temperature):
    if temperature == 0:
        idx = np.argmax(x, axis=-1)
        out = np.zeros_like(x)
        np.put_along_axis(out, idx[..., None], 1.0, axis=-1)
        return out
    return _t.ref_softmax(x / temperature)


def _one_hot_max(x, pick=np.argmax):
    out = np.zeros_like(x)
    np.put_along_axis(out, pick(x, axis=-1)[..., None], 1.0, axis=-1)
    return out


def _temperature_probs_mistakes(x, temperature):
    if temperature == 0:
        yield Mistake(
            "{name} divides by the temperature when it is 0, which gives inf and then nan. Treat "
            "temperature == 0 on its own: all the probability on the largest logit (a one-hot "
            "vector at np.argmax(logits, axis=-1)), which is what a temperature near 0 tends to.",
            lambda x, t: plain_softmax(x / t))
        yield Mistake(
            "{name} puts the probability on the SMALLEST logit at temperature 0; use np.argmax.",
            lambda x, t: _one_hot_max(x, np.argmin))
        yield Mistake(
            "{name} returns plain softmax(logits) at temperature 0; temperature 0 means greedy: "
            "probability 1 for the largest logit, 0 for every other.",
            lambda x, t: _t.ref_softmax(x))
        return
    yield Mistake(
        "{name} multiplies the logits by the temperature; divide: softmax(logits / temperature).",
        lambda x, t: _t.ref_softmax(x * t))
    yield Mistake(
        "{name} ignores the temperature: it returned softmax(logits). Divide the logits by the "
        "temperature first.", lambda x, t: _t.ref_softmax(x))
    yield Mistake(
        "{name} divides the probabilities by the temperature after the softmax; divide the "
        "logits before it.", lambda x, t: _t.ref_softmax(x) / t)
    yield Mistake(
        "{name} is not numerically stable: for {case}, logits / temperature is large and exp "
        "overflows. Subtract each row's maximum before np.exp.",
        lambda x, t: plain_softmax(x / t, stable=False))
    yield Mistake(
        "{name} returns the filtered logits / temperature, not probabilities: apply the softmax.",
        lambda x, t: x / t)


def _temperature_probs_cases(hidden: bool):
    names = ("logits", "temperature")
    if not hidden:
        rng = _t.default_rng(50)
        return [Case((_normal(rng, 7, scale=2.0), 0.7), names),
                Case((_normal(rng, 3, 5), 1.5), names,
                     "logits is a batch here, (3, 5): one distribution per row."),
                Case((_normal(rng, 2, 6, scale=2.0), 0), names,
                     "temperature is 0 here: greedy, all probability on each row's maximum."),
                Case((np.array([300.0, 290.0, 310.0]), 0.1), names,
                     "Large logits and a low temperature: exp(3100) overflows.")]
    rng = _t.default_rng(150)
    return [Case((_normal(rng, 9), 1.0), names, "At temperature 1: plain softmax."),
            Case((_normal(rng, 2, 3, 4, scale=3.0), 0.5), names),
            Case((_normal(rng, 5), 0.0), names, "temperature is 0.0 here."),
            Case((_normal(rng, 4, 8, dtype=np.float32), 0.8), names, "logits is float32 here."),
            Case((_normal(rng, 6) + 500.0, 0.01), names, "A very low temperature."),
            Case((_normal(rng, 3, 7), 50.0), names, "A high temperature: nearly uniform.")]


TEMPERATURE_PROBS = Exercise(
    name="probs_with_temperature",
    check="check_temperature_probs",
    reference=_reference_temperature_probs,
    visible=lambda: _temperature_probs_cases(False),
    hidden=lambda: _temperature_probs_cases(True),
    mistakes=_temperature_probs_mistakes,
    backends=("numpy",),
    doc="probs_with_temperature(logits, temperature): softmax(logits / temperature) over the "
        "last axis; temperature 0 gives a one-hot vector at each row's argmax (greedy).",
)


# --- top-k and top-p --------------------------------------------------------------------------


def _keep_top(x, k, *, largest=True):
    order = np.argsort(-x if largest else x, axis=-1, kind="stable")
    keep = np.zeros(x.shape, dtype=bool)
    np.put_along_axis(keep, order[..., :max(k, 0)], True, axis=-1)
    return keep


def _top_k_mistakes(x, k):
    vocab = x.shape[-1]
    if k + 1 <= vocab:
        yield Mistake(f"{{name}} keeps {k + 1} logits for k = {k}: keep exactly the k largest.",
                      lambda x, k: np.where(_keep_top(x, k + 1), x, -np.inf))
    if k > 1:
        yield Mistake(f"{{name}} keeps {k - 1} logits for k = {k}: keep exactly the k largest.",
                      lambda x, k: np.where(_keep_top(x, k - 1), x, -np.inf))
    yield Mistake("{name} keeps the k SMALLEST logits; keep the k largest (sort in descending "
                  "order, or take the last k of an ascending sort).",
                  lambda x, k: np.where(_keep_top(x, k, largest=False), x, -np.inf))
    yield Mistake("{name} sets the other logits to 0; set them to -np.inf, so that the softmax "
                  "gives them probability exactly 0 (e^0 = 1 is not small).",
                  lambda x, k: np.where(_keep_top(x, k), x, 0.0))
    for fill in (-1e9, -1e10, -1e4, np.finfo(np.float64).min):
        yield Mistake("{name} fills with a large negative number; use -np.inf, so that removed "
                      "tokens get probability exactly 0 and stay recognisable as removed.",
                      lambda x, k, f=fill: np.where(_keep_top(x, k), x, f))
    yield Mistake("{name} returns probabilities; return the filtered LOGITS (the kept ones "
                  "unchanged, the others -inf). The softmax comes later.",
                  lambda x, k: _t.ref_softmax(np.where(_keep_top(x, k), x, -np.inf)))
    if x.ndim > 1:
        yield Mistake("{name} finds the k-th largest value of the whole array; each row (the "
                      "last axis) is its own distribution: keep the k largest of every row "
                      "(np.sort(logits, axis=-1)[..., -k:]).",
                      lambda x, k: np.where(x >= np.sort(x, axis=None)[-k], x, -np.inf))


def _top_k_cases(hidden: bool):
    names = ("logits", "k")
    if not hidden:
        rng = _t.default_rng(51)
        return [Case((_normal(rng, 8, scale=2.0), 3), names),
                Case((_normal(rng, 4, 6), 2), names,
                     "logits is a batch here, (4, 6): keep the k largest of EACH row."),
                Case((_normal(rng, 5), 1), names, "k = 1 keeps only the largest logit.")]
    rng = _t.default_rng(151)
    return [Case((_normal(rng, 6), 6), names, "k equals the vocabulary size: keep everything."),
            Case((_normal(rng, 4), 10), names, "k is larger than the vocabulary: keep everything."),
            Case((_normal(rng, 2, 3, 9, scale=3.0), 4), names),
            Case((_normal(rng, 3, 12, dtype=np.float32), 5), names, "logits is float32 here."),
            Case((-np.abs(_normal(rng, 7)) - 5.0, 2), names, "Every logit is negative here.")]


TOP_K = Exercise(
    name="top_k_filter",
    check="check_top_k",
    reference=_ref_top_k,
    visible=lambda: _top_k_cases(False),
    hidden=lambda: _top_k_cases(True),
    mistakes=_top_k_mistakes,
    output=Filter(),
    backends=("numpy",),
    doc="top_k_filter(logits, k): the k largest logits of each row (last axis) kept, the others "
        "set to -inf. logits (..., vocab) -> (..., vocab).",
)


def _nucleus(x, p, *, rule="before<p", use_logits=False, ascending=False):
    probs = x if use_logits else _t.ref_softmax(x)
    order = np.argsort(probs if ascending else -probs, axis=-1, kind="stable")
    ps = np.take_along_axis(probs, order, axis=-1)
    cum = np.cumsum(ps, axis=-1)
    keep_sorted = {"before<p": cum - ps < p, "cum<=p": cum <= p, "cum<p": cum < p,
                   "before<=p": cum - ps <= p}[rule]
    keep = np.zeros(x.shape, dtype=bool)
    np.put_along_axis(keep, order, keep_sorted, axis=-1)
    return keep


def _top_p_mistakes(x, p):
    yield Mistake(
        "{name} drops the token that takes the running total past p: keep tokens while the "
        "probability of those ranked ABOVE them is < p, i.e. the smallest set whose total "
        "reaches p (so the most likely token is always kept).",
        lambda x, p: np.where(_nucleus(x, p, rule="cum<=p"), x, -np.inf))
    yield Mistake(  # the same mistake with < instead of <=: the same words
        "{name} drops the token that takes the running total past p: keep tokens while the "
        "probability of those ranked ABOVE them is < p, i.e. the smallest set whose total "
        "reaches p (so the most likely token is always kept).",
        lambda x, p: np.where(_nucleus(x, p, rule="cum<p"), x, -np.inf))
    yield Mistake(
        "{name} adds up the logits; the running total is over probabilities: apply the softmax "
        "first, then sort and cumsum.",
        lambda x, p: np.where(_nucleus(x, p, use_logits=True), x, -np.inf))
    yield Mistake(
        "{name} sorts from least to most likely; sort in descending order of probability.",
        lambda x, p: np.where(_nucleus(x, p, ascending=True), x, -np.inf))
    yield Mistake(
        "{name} sets the other logits to 0; set them to -np.inf (probability exactly 0).",
        lambda x, p: np.where(_nucleus(x, p), x, 0.0))
    for fill in (-1e9, -1e10, np.finfo(np.float64).min):
        yield Mistake("{name} fills with a large negative number; use -np.inf.",
                      lambda x, p, f=fill: np.where(_nucleus(x, p), x, f))
    yield Mistake(
        "{name} returns probabilities; return the filtered LOGITS (kept ones unchanged, the "
        "others -inf).", lambda x, p: _t.ref_softmax(np.where(_nucleus(x, p), x, -np.inf)))
    yield Mistake(
        "{name} returns the logits sorted; put every kept logit back at its own token's "
        "position (np.put_along_axis, or index with the sort order).",
        lambda x, p: np.where(np.take_along_axis(
            _nucleus(x, p), np.argsort(-x, axis=-1, kind="stable"), axis=-1),
            -np.sort(-x, axis=-1), -np.inf))


def _top_p_cases(hidden: bool):
    names = ("logits", "p")
    if not hidden:
        rng = _t.default_rng(52)
        return [Case((_normal(rng, 8, scale=2.0), 0.9), names),
                Case((_normal(rng, 3, 6, scale=1.5), 0.5), names,
                     "logits is a batch here, (3, 6): each row is its own distribution."),
                Case((np.array([4.0, 1.0, 0.5, 0.0, -1.0]), 0.6), names,
                     "The first token alone has probability 0.89 > p: keep only it.")]
    rng = _t.default_rng(152)
    return [Case((_normal(rng, 6), 1.0), names, "p = 1 keeps every token."),
            Case((_normal(rng, 2, 3, 10, scale=2.0), 0.75), names),
            Case((_normal(rng, 4, 9, dtype=np.float32), 0.8), names, "logits is float32 here."),
            Case((np.array([[0.0, 0.0, 0.0, 3.0], [2.0, 1.0, 1.5, -0.5]]), 0.3), names),
            Case((_normal(rng, 12, scale=0.3), 0.95), names,
                 "A flat distribution: most tokens are needed to reach p.")]


TOP_P = Exercise(
    name="top_p_filter",
    check="check_top_p",
    reference=_ref_top_p,
    visible=lambda: _top_p_cases(False),
    hidden=lambda: _top_p_cases(True),
    mistakes=_top_p_mistakes,
    output=Filter(),
    backends=("numpy",),
    doc="top_p_filter(logits, p): keep, in each row, the smallest set of most likely tokens "
        "whose probabilities add up to at least p (the most likely always kept); others -inf.",
)


# --- greedy decoding ---------------------------------------------------------------------------


class _ToyModel:
    """next_logits(ids) -> (vocab,) logits that depend on the last id, the length and the sum."""

    def __init__(self, vocab: int, seed: int):
        rng = _t.default_rng(seed)
        self.vocab = vocab
        self.by_last = rng.normal(size=(vocab, vocab)) * 3.0
        self.by_length = rng.normal(size=(7, vocab)) * 1.5
        self.by_sum = rng.normal(size=(5, vocab)) * 1.5
        self.seed = seed

    def __call__(self, ids):
        ids = [int(i) for i in np.asarray(ids).reshape(-1)]
        if not ids:
            raise ValueError("next_logits needs at least one token")
        return (self.by_last[ids[-1]] + self.by_length[len(ids) % 7]
                + self.by_sum[sum(ids) % 5])

    def __repr__(self):
        return f"a toy model (vocab {self.vocab})"


def _reference_greedy(next_logits, prompt, max_new, eos_id, *, stop=True, keep_eos=True,
                      extra=0, prompt_out=True, last_only=False):
    ids = list(prompt)
    new = []
    for _ in range(max_new + extra):
        token = int(np.argmax(next_logits(ids[-1:] if last_only else ids)))
        if stop and token == eos_id:
            if keep_eos:
                ids.append(token)
                new.append(token)
            break
        ids.append(token)
        new.append(token)
    return ids if prompt_out else new


def _greedy_mistakes(next_logits, prompt, max_new, eos_id):
    def variant(**kw):
        return lambda *a: _reference_greedy(*a, **kw)

    yield Mistake("{name} does not stop at the end token: when the chosen token is eos_id, "
                  "append it and stop.", variant(stop=False))
    yield Mistake("{name} stops at the end token but leaves it out; append eos_id as the last "
                  "token, then stop.", variant(keep_eos=False))
    yield Mistake("{name} returns only the new tokens; return the prompt followed by them.",
                  variant(prompt_out=False))
    yield Mistake("{name} returns only the new tokens and leaves out the end token; return the "
                  "prompt, then the new tokens, the end token included.",
                  variant(prompt_out=False, keep_eos=False))
    yield Mistake("{name} generates one token too many: at most max_new_tokens new tokens.",
                  variant(extra=1))
    if max_new > 0:
        yield Mistake("{name} generates one token too few: up to max_new_tokens new tokens.",
                      variant(extra=-1))
    yield Mistake("{name} passes only the last token to next_logits; pass every token so far "
                  "(the prompt and what was generated): a transformer looks at all of them.",
                  variant(last_only=True))


def _greedy_case(seed, prompt, max_new, stop_at, note=""):
    """A case whose end token comes out as new token number ``stop_at`` (None: never)."""
    names = ("next_logits", "prompt_ids", "max_new_tokens", "eos_id")
    for attempt in range(50):  # the first toy model whose greedy run allows it
        model = _ToyModel(9, seed + 1000 * attempt)
        new = _reference_greedy(model, prompt, max_new + 1, -1, prompt_out=False)
        if stop_at is None:
            unused = [i for i in range(9) if i not in new[:max_new]]
            if unused:
                return Case((model, list(prompt), max_new, unused[0]), names, note)
        elif new[stop_at - 1] not in new[:stop_at - 1]:
            return Case((model, list(prompt), max_new, new[stop_at - 1]), names, note)
    raise RuntimeError("no toy model fits this case")  # never: 50 tries are plenty


def _greedy_cases(hidden: bool):
    if not hidden:
        return [_greedy_case(60, [1, 2], 10, 4,
                             "Here the end token comes out as the 4th new token."),
                _greedy_case(61, [3], 6, None,
                             "Here the end token never comes: stop after max_new_tokens."),
                _greedy_case(62, [0, 5, 2], 12, 1,
                             "Here the very first new token is the end token.")]
    return [_greedy_case(160, [4], 0, None, "max_new_tokens is 0: return the prompt as it is."),
            _greedy_case(161, [7, 7, 1], 20, 9),
            _greedy_case(162, [2], 1, None, "max_new_tokens is 1."),
            _greedy_case(163, [6, 0], 15, 6,
                         "The end token comes out as the 6th new token."),
            _greedy_case(164, [5], 8, 8, "The end token is the last token allowed.")]


GREEDY_DECODE = Exercise(
    name="greedy_decode",
    reference=_reference_greedy,
    visible=lambda: _greedy_cases(False),
    hidden=lambda: _greedy_cases(True),
    mistakes=_greedy_mistakes,
    output=Value("ids"),
    backends=("numpy",),
    doc="greedy_decode(next_logits, prompt_ids, max_new_tokens, eos_id) -> list of ids: the "
        "prompt, then up to max_new_tokens argmax tokens, stopping right after eos_id "
        "(included). next_logits(ids) gives the logits (vocab,) of the token after ids.",
)


# --- one attention step with a KV cache --------------------------------------------------------

_KV_LABELS = ("out", "k_cache", "v_cache")


def _kv_step(x, w_q, w_k, w_v, k_cache, v_cache, *, append="end", attend="all",
             divide_by=None, update=True, causal_softmax=True):
    q, k, v = x @ w_q, x @ w_k, x @ w_v  # (d_head,) each
    if append == "end":
        keys, values = np.concatenate([k_cache, k[None]]), np.concatenate([v_cache, v[None]])
    else:
        keys, values = np.concatenate([k[None], k_cache]), np.concatenate([v[None], v_cache])
    att_k, att_v = (keys, values) if attend == "all" else (k_cache, v_cache)
    scale = math.sqrt(q.shape[-1]) if divide_by is None else divide_by
    scores = att_k @ q / scale  # (t + 1,)
    weights = _t.ref_softmax(scores) if causal_softmax else np.exp(scores)
    out = weights @ att_v
    return (out, keys, values) if update else (out, k_cache, v_cache)


def _reference_kv_step(x, w_q, w_k, w_v, k_cache, v_cache):
    return _kv_step(x, w_q, w_k, w_v, k_cache, v_cache)


def _kv_mistakes(x, w_q, w_k, w_v, k_cache, v_cache):
    d_head = w_q.shape[1]

    def variant(**kw):
        return lambda *a: _kv_step(*a, **kw)

    yield Mistake(
        "{name} attends over the OLD cache only: append the new key and value first, then let "
        "the query attend over all t + 1 of them (a token attends to itself too).",
        variant(attend="cache"))
    yield Mistake(
        "{name} returns the caches it was given; return them with the new key and value "
        "appended, (t + 1, d_head), so the next step can use them.", variant(update=False))
    yield Mistake(
        "{name} puts the new key and value at the FRONT of the cache; append them at the end "
        "(row t), so row i stays position i.", variant(append="front"))
    yield Mistake(
        f"{{name}} does not scale the scores: divide q · k by sqrt(d_head) = sqrt({d_head}).",
        variant(divide_by=1.0))
    yield Mistake(
        f"{{name}} divides the scores by d_head = {d_head}; divide by its square root.",
        variant(divide_by=float(d_head)))
    yield Mistake(
        "{name} forgets to normalise the attention weights: take the softmax of the scores "
        "(they must sum to 1).", variant(causal_softmax=False))


def _kv_args(rng, d_model, d_head, t, dtype=np.float64):
    return (_normal(rng, d_model, dtype=dtype),
            _normal(rng, d_model, d_head, scale=1 / math.sqrt(d_model), dtype=dtype),
            _normal(rng, d_model, d_head, scale=1 / math.sqrt(d_model), dtype=dtype),
            _normal(rng, d_model, d_head, scale=1 / math.sqrt(d_model), dtype=dtype),
            _normal(rng, t, d_head, dtype=dtype), _normal(rng, t, d_head, dtype=dtype))


_KV_NAMES = ("x_new", "w_q", "w_k", "w_v", "k_cache", "v_cache")


def _kv_cases(hidden: bool):
    if not hidden:
        rng = _t.default_rng(70)
        return [Case(_kv_args(rng, 6, 4, 3), _KV_NAMES,
                     "Three positions are cached; the new token is position 3."),
                Case(_kv_args(rng, 8, 4, 0), _KV_NAMES,
                     "The cache is empty here (shape (0, d_head)): the first token attends to "
                     "itself only.")]
    rng = _t.default_rng(170)
    return [Case(_kv_args(rng, 5, 5, 1), _KV_NAMES),
            Case(_kv_args(rng, 12, 3, 9), _KV_NAMES),
            Case(_kv_args(rng, 6, 2, 4, dtype=np.float32), _KV_NAMES, "float32 here.")]


class _Unrolled:
    """The learner's step run over a whole sequence from an empty cache: (seq, d_head) outputs."""

    def __init__(self, fn):
        self.fn = fn
        self.__code__ = getattr(fn, "__code__", None)

    def __call__(self, x, w_q, w_k, w_v):
        d_head = w_q.shape[1]
        k_cache = np.zeros((0, d_head), dtype=x.dtype)
        v_cache = np.zeros((0, d_head), dtype=x.dtype)
        outs = []
        for row in x:
            out, k_cache, v_cache = self.fn(row, w_q, w_k, w_v, k_cache, v_cache)
            outs.append(np.asarray(out))
        return np.stack(outs)


def _reference_full(x, w_q, w_k, w_v):
    seq = x.shape[0]
    return _t.ref_attention(x @ w_q, x @ w_k, x @ w_v, _t.ref_causal_mask(seq))


def _full_mistakes(x, w_q, w_k, w_v):
    yield Mistake(
        "Step by step, {name} does not give full causal attention: row t of the result should "
        "attend over positions 0 .. t. Check that the new key and value are appended before "
        "attending and that the returned caches are the grown ones.",
        lambda x, *w: _t.ref_attention(x @ w[0], x @ w[1], x @ w[2], None))


def _full_case(hidden: bool):
    rng = _t.default_rng(71 if not hidden else 171)
    seq, d_model, d_head = (5, 6, 4) if not hidden else (9, 8, 8)
    w = _kv_args(rng, d_model, d_head, 0)[1:4]
    x = _normal(rng, seq, d_model)
    return [Case((x, *w), ("x", "w_q", "w_k", "w_v"),
                 f"Here your step runs on all {seq} tokens of x, one by one from empty caches; "
                 f"its outputs, stacked, must equal causal attention over the whole sequence.")]


KV_UNROLLED = Exercise(
    name="cached_attention_step",
    check="check_kv_attention_step_unrolled",
    reference=_reference_full,
    visible=lambda: _full_case(False),
    hidden=lambda: _full_case(True),
    mistakes=_full_mistakes,
    wrap=_Unrolled,
    backends=("numpy",),
)

KV_ATTENTION_STEP = Exercise(
    name="cached_attention_step",
    check="check_kv_attention_step",
    reference=_reference_kv_step,
    visible=lambda: _kv_cases(False),
    hidden=lambda: _kv_cases(True),
    mistakes=_kv_mistakes,
    output=Parts(_KV_LABELS),
    backends=("numpy",),
    then=(KV_UNROLLED,),
    doc="cached_attention_step(x_new, w_q, w_k, w_v, k_cache, v_cache) -> (out, k_cache, "
        "v_cache): x_new (d_model,), w_* (d_model, d_head), caches (t, d_head); the new "
        "token's query attends over the cached keys and its own (appended at the end); out "
        "(d_head,), caches (t + 1, d_head). Run from empty caches it equals causal attention.",
)

EXERCISES = [TEMPERATURE_PROBS, TOP_K, TOP_P, GREEDY_DECODE, KV_ATTENTION_STEP]
