"""Chapter 3, queries, keys and values: the linear projection, the score table Q K^T, a soft
lookup for one query, and a query matrix chosen by hand. In this chapter the scores are the
plain dot products (chapter 4 divides them by sqrt(d_head)); the chapter's printed numbers, its
text and these checkers all agree on that."""

import math

import numpy as np

from .. import _trusted as _t
from ..engine import Case, Mistake, Spec, _call, _kind_of_object, _normal, _shape
from ..exercise import Exercise
from ..kinds import Judged

# --- chapter 3: linear ----------------------------------------------------------------------------


def _linear_mistakes(x, w, b):
    bias = 0.0 if b is None else b
    yield Mistake(
        "{name} applies w transposed (x @ w.T). The weight is stored (d_in, d_out), as in the "
        "math X W, so the product is x @ w.",
        lambda x, w, b: x @ w.T + bias)
    yield Mistake("{name} multiplies in the wrong order (w @ x); the input comes first: x @ w.",
                  lambda x, w, b: w @ x + bias)
    if b is not None:
        yield Mistake("{name} leaves out the bias: return x @ w + b.", lambda x, w, b: x @ w)
        yield Mistake("{name} adds the bias before multiplying ((x + b) @ w); add it to the "
                      "product: x @ w + b.", lambda x, w, b: (x + b) @ w)
        yield Mistake("{name} subtracts the bias; add it: x @ w + b.", lambda x, w, b: x @ w - b)


def _linear_cases(hidden: bool):
    names = ("x", "w", "b")
    if not hidden:
        rng = _t.default_rng(31)
        return [Case((_normal(rng, 4, 4), _normal(rng, 4, 4), _normal(rng, 4)), names),
                Case((_normal(rng, 5, 6), _normal(rng, 6, 3), _normal(rng, 3)), names,
                     "w is stored (d_in, d_out) = (6, 3): the product is x @ w."),
                Case((_normal(rng, 2, 3, 6), _normal(rng, 6, 2), None), names,
                     "b is None here: no bias. x is (batch, seq, d_in) = (2, 3, 6).",
                     on_error="b is None here: no bias, so add nothing (check `if b is None`).")]
    rng = _t.default_rng(131)
    return [Case((_normal(rng, 6), _normal(rng, 6, 4), _normal(rng, 4)), names,
                 "x is a single vector of shape (d_in,) = (6,) here."),
            Case((_normal(rng, 3, 5, dtype=np.float32), _normal(rng, 5, 5, dtype=np.float32),
                  None), names, "x and w are float32 and b is None here.",
                 on_error="b is None here: no bias, so add nothing (check `if b is None`)."),
            Case((_normal(rng, 1, 1), _normal(rng, 1, 1), _normal(rng, 1)), names),
            Case((_normal(rng, 2, 2, 3, 8), _normal(rng, 8, 8), _normal(rng, 8)), names)]


LINEAR = Exercise(
    name="linear",
    reference=_t.ref_linear,
    visible=lambda: _linear_cases(False),
    hidden=lambda: _linear_cases(True),
    mistakes=_linear_mistakes,
    doc='linear(x, w, b=None) = x @ w + b: x (..., d_in), w (d_in, d_out), b (d_out,) or None.',
)


# --- chapter 3: the score table Q K^T -------------------------------------------------------------


def _reference_score_table(x, w_q, w_k):
    return (x @ w_q) @ np.swapaxes(x @ w_k, -1, -2)


def _score_table_mistakes(x, w_q, w_k):
    d_head = w_q.shape[-1]

    def table(a, b):
        return a @ np.swapaxes(b, -1, -2)

    yield Mistake(
        f"{{name}} divides by sqrt(d_head) = sqrt({d_head}). In this chapter the score is the "
        "plain dot product q_i . k_j; chapter 4 adds the scaling.",
        lambda x, wq, wk: table(x @ wq, x @ wk) / math.sqrt(d_head))
    yield Mistake(
        "{name} is transposed (K Q^T, or w_q and w_k swapped): row i belongs to query i, "
        "scores[i, j] = q_i . k_j, so compute Q @ K^T with Q = x @ w_q and K = x @ w_k.",
        lambda x, wq, wk: table(x @ wk, x @ wq))
    yield Mistake(
        "{name} compares the rows of x directly (x @ x^T); project them first: Q = x @ w_q, "
        "K = x @ w_k, then Q @ K^T.",
        lambda x, wq, wk: table(x, x))
    yield Mistake("{name} uses w_q for the keys too (Q @ Q^T); the keys are K = x @ w_k.",
                  lambda x, wq, wk: table(x @ wq, x @ wq))
    yield Mistake("{name} uses w_k for the queries too (K @ K^T); the queries are Q = x @ w_q.",
                  lambda x, wq, wk: table(x @ wk, x @ wk))


def _score_table_cases(hidden: bool):
    names = ("x", "w_q", "w_k")
    batched = ("x is a batch here, (batch, seq, d_model): transpose only the last two axes of K, "
               "with np.swapaxes(K, -1, -2) (K.T reverses every axis).")
    if not hidden:
        rng = _t.default_rng(32)
        return [Case((_normal(rng, 5, 6), _normal(rng, 6, 3), _normal(rng, 6, 3)), names),
                Case((_normal(rng, 2, 4, 6), _normal(rng, 6, 2), _normal(rng, 6, 2)), names,
                     batched, on_error=batched)]
    rng = _t.default_rng(132)
    return [Case((_normal(rng, 1, 3), _normal(rng, 3, 1), _normal(rng, 3, 1)), names),
            Case((_normal(rng, 6, 8, dtype=np.float32), _normal(rng, 8, 4, dtype=np.float32),
                  _normal(rng, 8, 4, dtype=np.float32)), names, "Everything is float32 here."),
            Case((_normal(rng, 3, 5, 4), _normal(rng, 4, 4), _normal(rng, 4, 4)), names, batched,
                 on_error=batched),
            Case((_normal(rng, 7, 8), _normal(rng, 8, 8), _normal(rng, 8, 8)), names)]


SCORE_TABLE = Exercise(
    name="score_table",
    reference=_reference_score_table,
    visible=lambda: _score_table_cases(False),
    hidden=lambda: _score_table_cases(True),
    mistakes=_score_table_mistakes,
    doc='score_table(x, w_q, w_k) = (x @ w_q) @ (x @ w_k)^T, unscaled: (..., seq, seq).',
)


# --- chapter 3: one query, a soft lookup ----------------------------------------------------------


def _reference_soft_lookup(query, keys, values):
    return _t.ref_softmax(keys @ query) @ values


def _soft_lookup_mistakes(query, keys, values):
    d_head = query.shape[-1]
    yield Mistake(
        f"{{name}} divides the scores by sqrt(d_head) = sqrt({d_head}); in this chapter the "
        "weights are softmax(keys @ query), with no scaling (chapter 4 adds it).",
        lambda q, k, v: _t.ref_softmax(k @ q / math.sqrt(d_head)) @ v)
    yield Mistake(
        "{name} returns the value of the best-matching key only, like a dictionary (a hard "
        "lookup). Attention blends ALL the values: weights = softmax(keys @ query), then "
        "weights @ values.",
        lambda q, k, v: v[np.argmax(k @ q)])
    yield Mistake(
        "{name} uses the raw scores as weights; turn them into weights with a softmax first, so "
        "they are positive and sum to 1.",
        lambda q, k, v: (k @ q) @ v)
    yield Mistake(
        "{name} divides the scores by their sum without exponentiating; the weights are "
        "exp(s) / sum(exp(s)).",
        lambda q, k, v: ((k @ q) / np.sum(k @ q)) @ v)
    yield Mistake(
        "{name} blends the keys; the answer is a blend of the VALUES: weights @ values.",
        lambda q, k, v: _t.ref_softmax(k @ q) @ k)
    yield Mistake(
        "{name} returns the weights; return the blend of the values they give: weights @ values.",
        lambda q, k, v: _t.ref_softmax(k @ q))
    yield Mistake(
        "{name} averages all the values equally; weight each value by softmax(keys @ query).",
        lambda q, k, v: np.mean(v, axis=0))


def _soft_lookup_cases(hidden: bool):
    names = ("query", "keys", "values")
    if not hidden:
        rng = _t.default_rng(33)
        keys = np.array([[2.0, 0.0], [1.4, 1.4], [0.0, 2.0], [-2.0, 0.0]])
        return [Case((np.array([2.0, 0.6]), keys, np.array([[100.0], [200.0], [300.0],
                                                             [400.0]])), names,
                     "This is the chapter's example: one query, four keys, one number per value."),
                Case((_normal(rng, 4), _normal(rng, 6, 4), _normal(rng, 6, 3)), names),
                Case((_normal(rng, 3), _normal(rng, 5, 3), _normal(rng, 5, 3)), names)]
    rng = _t.default_rng(133)
    return [Case((_normal(rng, 4), _normal(rng, 1, 4), _normal(rng, 1, 2)), names,
                 "A single key: all the weight goes to it."),
            Case((_normal(rng, 8, dtype=np.float32), _normal(rng, 7, 8, dtype=np.float32),
                  _normal(rng, 7, 8, dtype=np.float32)), names, "Everything is float32 here."),
            Case((_normal(rng, 4, scale=3.0), _normal(rng, 9, 4, scale=3.0), _normal(rng, 9, 5)),
                 names, "The scores here are larger (up to about 40)."),
            Case((_normal(rng, 2), _normal(rng, 3, 2), _normal(rng, 3, 1)), names)]


SOFT_LOOKUP = Exercise(
    name="soft_lookup",
    reference=_reference_soft_lookup,
    visible=lambda: _soft_lookup_cases(False),
    hidden=lambda: _soft_lookup_cases(True),
    mistakes=_soft_lookup_mistakes,
    doc='soft_lookup(query, keys, values) = softmax(keys @ query) @ values (no scaling). query '
        '(d_head,), keys (seq_k, d_head), values (seq_k, d_v) -> (d_v,).',
)


# --- chapter 3: a hand-picked W_Q -----------------------------------------------------------------

# The chapter's features and key matrix: a key says what a token IS (person, place, action).
QUERY_FEATURES = ("person", "place", "action", "name")
QUERY_W_K = 2.0 * np.array([[1.0, 0.0, 0.0], [0.0, 1.0, 0.0], [0.0, 0.0, 1.0], [0.0, 0.0, 0.0]])
QUERY_GOAL = {"person": "action", "action": "place", "place": "person"}  # who looks for what
QUERY_MIN_WEIGHT = 0.9

_ROLE = {"person": (1, 0, 0), "place": (0, 1, 0), "action": (0, 0, 1)}
_QUERY_SENTENCES = {  # word: (role, has a name)
    False: [[("jane", "person", 1), ("visits", "action", 0), ("africa", "place", 1)]],
    True: [[("the city", "place", 0), ("welcomes", "action", 0), ("her", "person", 0)],
           [("africa", "place", 1), ("greets", "action", 0), ("bob", "person", 1)],
           [("she", "person", 0), ("visits", "action", 0), ("peru", "place", 1)],
           [("lima", "place", 1), ("tom", "person", 1), ("runs", "action", 0)]],
}


def _sentence_x(sentence) -> np.ndarray:
    return np.array([list(_ROLE[role]) + [float(named)] for _, role, named in sentence],
                    dtype=np.float64)


def _query_weights(w_q, sentence) -> np.ndarray:
    x = _sentence_x(sentence)
    return _t.ref_softmax((x @ w_q) @ (x @ QUERY_W_K).T)  # (T, T): row i = word i's weights


def _read_w_q(name: str, out) -> np.ndarray:
    torch = _t.torch_refs()
    if torch is not None and _t.type_(out) is torch.Tensor:
        out = torch.numpy(torch.cpu(torch.detach(out)))
    if _t.type_(out) is list:
        try:
            out = _t.asarray(out)
        except Exception:
            raise AssertionError(f"{name} returned a list that is not a table of numbers; return "
                                 f"a NumPy array of shape (4, 3).") from None
    if _t.type_(out) is not _t.ndarray:
        raise AssertionError(f"{name} returned {_kind_of_object(out)}; it should return W_Q, a "
                             f"NumPy array of shape (d_model, d_head) = (4, 3).")
    if _t.kind_of(out) not in "iuf":
        raise AssertionError(f"{name} returned an array of dtype {out.dtype}; W_Q holds numbers.")
    if out.shape == (3, 4):
        raise AssertionError(
            f"{name} returned an array of shape (3, 4), W_Q transposed: it is (d_model, d_head) = "
            f"(4, 3), one ROW per feature ({', '.join(QUERY_FEATURES)}) and one column per key "
            f"feature (person, place, action).")
    if out.shape != (4, 3):
        raise AssertionError(f"{name} returned an array of shape {_shape(out)}; W_Q has shape "
                             f"(d_model, d_head) = (4, 3).")
    w_q = _t.asarray(out, dtype=_t.float64)
    if not _t.isfinite(w_q).all():
        raise AssertionError(f"{name} returned a W_Q with inf or nan in it; use ordinary numbers.")
    return w_q


def _query_problem(name: str, w_q, sentence):
    """What is wrong with ``w_q`` on ``sentence``, in words, or None if every word attends well."""
    words = [word for word, _, _ in sentence]
    roles = [role for _, role, _ in sentence]
    weights = _query_weights(w_q, sentence)
    text = " ".join(words)
    self_pick = all(int(np.argmax(weights[i])) == i for i in range(len(words)))
    for i, role in enumerate(roles):
        target = roles.index(QUERY_GOAL[role])
        got = float(weights[i, target])
        if got >= QUERY_MIN_WEIGHT:
            continue
        shown = ", ".join(f"{w} {p:.2f}" for w, p in zip(words, weights[i], strict=True))
        head = (f"In \"{text}\", '{words[i]}' (a {role}) should look at '{words[target]}' (the "
                f"{QUERY_GOAL[role]}) with weight at least {QUERY_MIN_WEIGHT}, but its weights "
                f"are: {shown}.")
        if self_pick:
            return (head + " Every word looks mostly at itself: your W_Q asks for what a word IS "
                    "(like W_K). Row f of W_Q says what a word with feature f LOOKS FOR.")
        if int(np.argmax(weights[i])) == target:
            return (head + " The right word gets the most weight, but not enough: make the "
                    "matching entries of W_Q larger (the softmax picks a clearer winner when "
                    "the scores are further apart).")
        row = QUERY_FEATURES.index(role)
        column = ("person", "place", "action").index(QUERY_GOAL[role])
        named = " (its 'name' feature is 1 too, so row 3 adds to its query)" \
            if sentence[i][2] else ""
        return (head + f" Row {row} of W_Q (the '{role}' feature) decides what a {role} looks "
                f"for{named}; key column {column} means '{QUERY_GOAL[role]}'.")
    return None


def _judge_query(ex, learner, cases) -> None:
    """Every person, action and place of every sentence attends where it should."""
    name = ex.name
    with _t.pristine():
        w_q = _read_w_q(name, _call(Spec(name, None, None), learner, cases[0]))
        for case in cases[1:]:
            problem = _query_problem(name, w_q, case.args[0])
            if problem is not None:
                raise AssertionError(problem)


def _query_cases(hidden: bool):
    """The call (no arguments), then one case per sentence the matrix is tried on."""
    return [Case((), ())] + [Case((s,), ("sentence",)) for s in _QUERY_SENTENCES[bool(hidden)]]


QUERY_DESIGN = Exercise(
    name="make_w_q",
    check="check_query_design",
    reference=None,
    visible=lambda: _query_cases(False),
    hidden=lambda: _query_cases(True),
    output=Judged(_judge_query, "makes every word attend where it should"),
    backends=("numpy",),
    passed="makes every word of the chapter's sentences attend where it should (weight >= 0.9)",
    doc="make_w_q() -> W_Q (4, 3) such that, with the chapter's W_K and no mask, every person "
        "looks at the action, every action at the place and every place at the person (weight "
        ">= 0.9). Weights: softmax((X W_Q)(X W_K)^T) over each row, no scaling.",
)


EXERCISES = [LINEAR, SCORE_TABLE, SOFT_LOOKUP, QUERY_DESIGN]
