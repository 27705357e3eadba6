"""Chapter 11's sampling loop: temperature, top-k and top-p put together, drawing from a seeded
generator until the end token. The chapter explains the order of the steps in words; the
reference is ``qkv.np.generate``'s loop with the model given as a function."""

import numpy as np

from qkv.np import filter_top_k as _ref_top_k
from qkv.np import filter_top_p as _ref_top_p

from .. import _trusted as _t
from ..engine import Case, Mistake
from ..exercise import Exercise
from ..kinds import Value
from ..variants import plain_softmax

_NAMES = ("next_logits", "prompt_ids", "max_new_tokens", "temperature", "top_k", "top_p",
          "eos_id", "seed")


def _reference_sample(next_logits, prompt, max_new, temperature, top_k, top_p, eos_id, seed, *,
                      order="t-k-p", fresh_rng=False, stop=True, argmax=False):
    """The prompt plus sampled tokens; the keywords switch on one known mistake each."""
    ids = list(prompt)
    rng = _t.default_rng(seed)
    for _ in range(max_new):
        logits = np.asarray(next_logits(ids), dtype=np.float64)
        steps = {"t": lambda z: z / temperature,
                 "k": lambda z: z if top_k is None else _ref_top_k(z, top_k),
                 "p": lambda z: z if top_p is None else _ref_top_p(z, top_p)}
        for step in order.split("-"):
            logits = steps[step](logits)
        probs = plain_softmax(logits)
        if argmax:
            token = int(np.argmax(probs))
        else:
            draw = _t.default_rng(seed) if fresh_rng else rng
            token = int(draw.choice(len(probs), p=probs))
        ids.append(token)
        if stop and token == eos_id:
            break
    return ids


def _sample_mistakes(*args):
    def variant(**kw):
        return lambda *a: _reference_sample(*a, **kw)

    yield Mistake("{name} filters before dividing by the temperature: top-p then keeps a "
                  "different set. Divide the logits by the temperature first, then top-k, then "
                  "top-p.", variant(order="k-p-t"))
    yield Mistake("{name} applies top-p before top-k: first keep the k largest, then the "
                  "nucleus of what is left.", variant(order="t-p-k"))
    yield Mistake("{name} makes a new generator at every step, so every draw is the same "
                  "random number: make rng = np.random.default_rng(seed) once, before the loop.",
                  variant(fresh_rng=True))
    yield Mistake("{name} does not stop at the end token: when the drawn token is eos_id, "
                  "append it and stop.", variant(stop=False))
    yield Mistake("{name} takes the most likely token instead of drawing one: draw with "
                  "rng.choice(len(probs), p=probs).", variant(argmax=True))


class _Toy:
    """A toy model: logits from the last token and the length so far (vocab 12)."""

    def __init__(self, seed):
        rng = _t.default_rng(seed)
        self.by_last = rng.normal(size=(12, 12)) * 2.0
        self.by_length = rng.normal(size=(5, 12))

    def __call__(self, ids):
        ids = [int(i) for i in np.asarray(ids).reshape(-1)]
        return self.by_last[ids[-1]] + self.by_length[len(ids) % 5]

    def __repr__(self):
        return "a toy model (vocab 12)"


def _sample_cases(hidden: bool):
    if not hidden:
        return [Case((_Toy(73), [1, 2], 25, 1.5, 4, 0.7, 3, 0), _NAMES,
                     "temperature 1.5, top_k 4, top_p 0.7, end token 3."),
                Case((_Toy(71), [4], 20, 1.3, None, 0.7, None, 5), _NAMES,
                     "top_k is None (no top-k) and eos_id is None (no end token).")]
    return [Case((_Toy(170), [0], 30, 0.5, 3, None, 7, 11), _NAMES, "top_p is None here."),
            Case((_Toy(171), [9, 9], 0, 1.0, None, None, 2, 12), _NAMES,
                 "max_new_tokens is 0."),
            Case((_Toy(172), [5], 40, 2.0, 8, 0.95, 1, 13), _NAMES)]


SAMPLE_DECODE = Exercise(
    name="sample_decode",
    reference=_reference_sample,
    visible=lambda: _sample_cases(False),
    hidden=lambda: _sample_cases(True),
    mistakes=_sample_mistakes,
    output=Value("ids"),
    backends=("numpy",),
    doc="sample_decode(next_logits, prompt_ids, max_new_tokens, temperature, top_k, top_p, "
        "eos_id, seed) -> list of ids: one rng = np.random.default_rng(seed); each step divides "
        "the logits by the temperature, keeps the top k, then the top-p nucleus, and draws "
        "rng.choice(len(probs), p=probs); stops right after eos_id.",
)
