"""Chapter 3's exercises: linear, the score table, a soft lookup, a hand-picked W_Q.

Besides the meta-tests: the chapter's printed numbers, its text and the soft-lookup checker
agree (issue 12, finding 1): the chapter prints plain dot products and the weights softmax of
exactly those, and its soft lookup is the one the checker accepts.
"""

import re
from pathlib import Path

import numpy as np
import torch
from grading_meta import Declared, meta_tests, run
from test_checkers import comparisons_patched_to_true, failure

import qkv.np as qnp
from qkv.grading import check_linear, check_query_design, check_score_table, check_soft_lookup

ROOT = Path(__file__).resolve().parents[2]


def softmax(x):
    e = np.exp(x - x.max(axis=-1, keepdims=True))
    return e / e.sum(axis=-1, keepdims=True)


def linear(x, w, b=None):
    return x @ w if b is None else x @ w + b


def score_table(x, w_q, w_k):
    return linear(x, w_q) @ np.swapaxes(linear(x, w_k), -1, -2)


def soft_lookup(query, keys, values):
    scores = keys @ query
    e = np.exp(scores - scores.max())
    return (e / e.sum()) @ values


def soft_lookup_loop(query, keys, values):
    weights = [np.exp(np.dot(query, k)) for k in keys]
    total = sum(weights)
    return sum(w / total * v for w, v in zip(weights, values, strict=True))


def make_w_q():
    return 3.0 * np.array([[0, 0, 1], [1, 0, 0], [0, 1, 0], [0, 0, 0]])


def _soft(q, k, v, *, scale=1.0, hard=False, keys=False):
    if hard:
        return v[np.argmax(k @ q)]
    s = k @ q / scale
    w = np.exp(s) / np.exp(s).sum()
    return w @ (k if keys else v)


DECLARED = [
    Declared(check_linear, mistakes=[
            (lambda x, w, b=None: x @ w.T + (0 if b is None else b), "w transposed"),
            (lambda x, w, b=None: x @ w, "leaves out the bias"),
            (lambda x, w, b=None: (x + b) @ w if b is not None else x @ w,
     "before multiplying"),
            (lambda x, w, b=None: x @ w + b, "b is None here"),
    ], alternatives=[linear, qnp.linear,
                     lambda x, w, b=None: np.einsum("...i,io->...o", x, w) + (0.0 if b is None
                                                                             else b),
                     lambda x, w, b=None: torch.nn.functional.linear(x, w.T, b)]),
    Declared(check_score_table, mistakes=[
            (lambda x, wq, wk: score_table(x, wq, wk) / np.sqrt(wq.shape[1]),
     "chapter 4 adds the scaling"),
            (lambda x, wq, wk: score_table(x, wk, wq), "transposed"),
            (lambda x, wq, wk: x @ np.swapaxes(x, -1, -2), "x @ x^T"),
            (lambda x, wq, wk: (x @ wq) @ (x @ wk).T, "np.swapaxes(K, -1, -2)"),
    ], alternatives=[score_table,
                     lambda x, wq, wk: np.einsum("...qd,...kd->...qk", x @ wq, x @ wk),
                     lambda x, wq, wk: (x @ wq) @ np.moveaxis(x @ wk, -1, -2)]),
    Declared(check_soft_lookup, mistakes=[
            (lambda q, k, v: _soft(q, k, v, scale=np.sqrt(len(q))), "chapter 4 adds it"),
            (lambda q, k, v: _soft(q, k, v, hard=True), "hard lookup"),
            (lambda q, k, v: (k @ q) @ v, "raw scores"),
            (lambda q, k, v: _soft(q, k, v, keys=True), "blends the keys"),
            (lambda q, k, v: v.mean(axis=0), "averages all the values equally"),
    ], alternatives=[soft_lookup, soft_lookup_loop,
                     lambda q, k, v: torch.softmax(k @ q, dim=0) @ v]),
    Declared(check_query_design, reference=make_w_q, mistakes=[
            (lambda: 2.0 * np.array([[1, 0, 0], [0, 1, 0], [0, 0, 1], [0, 0, 0]]),
     "looks mostly at itself"),
            (lambda: 0.25 * make_w_q(), "not enough"),
            (lambda: make_w_q().T, "transposed"),
            (lambda: 3.0 * np.array([[0, 1, 0], [1, 0, 0], [0, 1, 0], [0, 0, 0]]),
     "Row 0 of W_Q (the 'person' feature)"),
            (lambda: 3.0 * np.array([[0, 0, 0], [2, 0, -1], [0, 1, 0], [0, 0, 1]]),
     "'her' (a person) should look at 'welcomes'"),
    ], alternatives=[make_w_q, lambda: (2 * make_w_q()).tolist(),
                     lambda: torch.tensor(4.0 * make_w_q())]),
]

globals().update(meta_tests(DECLARED))


def test_allclose_patched_to_true_does_not_pass_a_wrong_answer():
    with comparisons_patched_to_true():
        assert "w transposed" in failure(
            check_linear, lambda x, w, b=None: x @ w.T + (0 if b is None else b))
        assert "hard lookup" in failure(check_soft_lookup, lambda q, k, v: _soft(q, k, v,
                                                                                hard=True))
        assert "looks mostly at itself" in failure(
            check_query_design,
            lambda: 2.0 * np.array([[1, 0, 0], [0, 1, 0], [0, 0, 1], [0, 0, 0]]))


# --- finding 1: the chapter, its numbers and the checker agree --------------------------------


def _chapter_namespace():
    """Run the chapter's code cells (not the hidden-input plotting ones); return their variables
    as they were right after the compass example, and at the end."""
    text = (ROOT / "book" / "03-queries-keys-values.md").read_text()
    cells = re.findall(r"```\{code-cell\} ipython3\n(.*?)```", text, re.S)
    space, compass = {}, None
    for cell in cells:
        if cell.startswith(":tags: [hide-input]"):
            continue
        exec(compile(cell, "03-queries-keys-values.md", "exec"), space)
        if compass is None and "hard" in space:
            compass = dict(space)
    return compass, space


def test_finding_1_chapter_numbers_text_and_checker_agree(capsys):
    compass, space = _chapter_namespace()
    capsys.readouterr()
    query, keys, values = compass["query"], compass["keys"], compass["values"]
    # what the chapter prints: the dot products, and weights that are softmax of exactly those
    np.testing.assert_allclose(compass["scores"], query @ keys.T)
    np.testing.assert_allclose(compass["weights"], softmax(compass["scores"]), rtol=1e-12)
    # its blend is what the checker's reference soft lookup gives on the same inputs
    np.testing.assert_allclose(compass["out"][0], soft_lookup(query[0], keys, values),
                               rtol=1e-12)
    # the worked example's weights, causal or not, are softmax of the printed Q K^T
    scores = space["Q"] @ space["K"].T
    np.testing.assert_allclose(space["w_all"], softmax(scores), rtol=1e-12)
    blocked = np.where(np.tril(np.ones(scores.shape, dtype=bool)), scores, -np.inf)
    np.testing.assert_allclose(space["w"], softmax(blocked), rtol=1e-12)
    # and the chapter's attention, used for one query, passes the exercise's checker
    attend = space["attend"]
    message, _, _ = run(check_soft_lookup, lambda q, k, v: attend(q[None], k, v)[0][0])
    assert message is None, message
