"""Chapter 15, fast attention: one online-softmax step, the softmax streamed over blocks, and
tiled (flash) attention's forward pass in NumPy."""

import math

import numpy as np

import qkv.np.flash as _flash

from .. import _trusted as _t
from ..engine import Case, Mistake, _normal
from ..exercise import Exercise
from ..kinds import Parts

# Captured when qkv.grading is imported, before any learner code runs (see _trusted).
_ref_update = _flash.online_update
_ref_streaming_softmax = _flash.streaming_softmax
_ref_flash = _flash.flash_attention

_NOT_RESCALED = (
    "{name} does not rescale the running sum when the max changes: the old sum l was measured "
    "against the old max m, so multiply it by exp(m - m_new) before adding the block's "
    "exp(s - m_new).")


def _safe(m):
    """A row max to subtract: 0 where it is -inf (a row that has seen no finite score)."""
    return np.where(np.isneginf(m), 0.0, m)


# --- (a) one step of the online softmax ----------------------------------------------------------


def _reference_step(m, l, s):
    m_new, l_new, _, _ = _ref_update(m, l, s)
    return m_new, l_new


def _step(m, l, s, *, rescale="right", new_max="right", terms="new", guard=True):
    m_new = np.maximum(m, s.max(axis=-1)) if new_max == "right" else s.max(axis=-1)
    shift = _safe(m_new) if guard else m_new
    alpha = {"right": np.exp(m - shift), "none": 1.0, "inverted": np.exp(shift - m),
             "dropped": 0.0}[rescale]
    if terms == "raw":  # exp(s) * exp(-m_new): the same number until exp(s) overflows
        return m_new, alpha * l + np.exp(s).sum(axis=-1) * np.exp(-shift)
    against = shift if terms == "new" else (_safe(m) if guard else m)
    return m_new, alpha * l + np.exp(s - against[..., None]).sum(axis=-1)


def _step_mistakes(m, l, s):
    yield Mistake(_NOT_RESCALED, lambda m, l, s: _step(m, l, s, rescale="none"))
    yield Mistake(
        "{name} rescales the running sum by exp(m_new - m), which is >= 1; it must shrink it: "
        "exp(m - m_new) (the old terms were exp(x - m) and must become exp(x - m_new)).",
        lambda m, l, s: _step(m, l, s, rescale="inverted"))
    yield Mistake(
        "{name} takes the new max from the block alone; it is the max of everything seen so "
        "far: m_new = max(m, max of the block).",
        lambda m, l, s: _step(m, l, s, new_max="block"))
    yield Mistake(
        "{name} measures the block's terms against the old max: after rescaling the old sum, "
        "add exp(s - m_new), not exp(s - m).",
        lambda m, l, s: _step(m, l, s, terms="old"))
    yield Mistake(
        "{name} gives nan for a row that has seen only -inf so far: there m_new = -inf and "
        "(-inf) - (-inf) is nan. Subtract 0 instead of m_new on such rows (np.where); they keep "
        "m = -inf and l = 0.",
        lambda m, l, s: _step(m, l, s, guard=False))
    yield Mistake(
        "{name} drops the old sum: l_new is the old l rescaled, exp(m - m_new) * l, plus the "
        "block's terms, not the block's terms alone.",
        lambda m, l, s: _step(m, l, s, rescale="dropped"))
    yield Mistake(
        "{name} takes exp of the raw scores (exp(s) * exp(-m_new) is the right number only "
        "while exp(s) does not overflow): with scores in the hundreds exp(s) is inf, and "
        "inf * 0 is nan. Subtract inside exp: exp(s - m_new) <= 1.",
        lambda m, l, s: _step(m, l, s, terms="raw"))
    yield Mistake(
        "{name} returns the pair the wrong way round: return (m_new, l_new), the max first.",
        lambda m, l, s: _step(m, l, s)[::-1])


def _step_cases(hidden: bool):
    names = ("m", "l", "s")
    if not hidden:
        rng = _t.default_rng(15)
        first = _normal(rng, 3, 5)
        first[1] = -np.inf  # this row's keys are all blocked in this block
        return [
            Case((np.array([0.5, 2.0, -1.0, 1.0]), np.array([1.3, 2.1, 1.0, 1.5]),
                  _normal(rng, 4, 3, scale=1.5)), names,
                 "Some rows' max grows with this block, others' does not."),
            Case((np.full(3, -np.inf), np.zeros(3), first), names,
                 "The first block: m = -inf and l = 0 for every row; row 1 of s is all -inf, "
                 "so that row must keep m = -inf and l = 0."),
            Case((np.array([[3.0, 40.0, -2.0], [0.0, 1.0, 60.0]]), np.array([[1.0, 2.5, 1.2],
                  [1.1, 1.0, 1.4]]), _normal(rng, 2, 3, 4, scale=400.0)), names,
                 # scale 400: scores up to about 1000, and exp overflows above ~709
                 "Rows in a (2, 3) batch with scores in the hundreds: exp must never see a big "
                 "positive number."),
        ]
    rng = _t.default_rng(115)
    blocked = np.full((2, 3), -np.inf)
    return [
        Case((np.array([1.0, -np.inf]), np.array([2.0, 0.0]), blocked), names,
             "The block is all -inf here: a row with a max keeps m and l, a row without keeps "
             "-inf and 0."),
        Case((_normal(rng, 5, dtype=np.float32), (1 + rng.random(5)).astype(np.float32),
              _normal(rng, 5, 1, scale=2.0, dtype=np.float32)), names,
             "float32, and blocks of one column."),
        Case((_normal(rng, 2, 6), 1 + rng.random((2, 6)), _normal(rng, 2, 6, 16, scale=4.0)),
             names),
    ]


ONLINE_STEP = Exercise(
    name="online_step",
    reference=_reference_step,
    visible=lambda: _step_cases(False),
    hidden=lambda: _step_cases(True),
    mistakes=_step_mistakes,
    output=Parts(("m_new", "l_new")),
    backends=("numpy",),
    doc="online_step(m, l, s) -> (m_new, l_new): fold one block of scores s (..., block) into "
        "each row's running max m (...) and running sum l (...) of exp(score - m).",
)


# --- (b) the softmax streamed over blocks ---------------------------------------------------------


def _streamed(x, block, *, rescale=True, divide="once", local_max=False, guard=True):
    n = x.shape[-1]
    m = np.full(x.shape[:-1], -np.inf)
    l = np.zeros(x.shape[:-1])
    out = np.zeros_like(x)
    for start in range(0, n, block):
        s = x[..., start:start + block]
        m_new = np.maximum(m, s.max(axis=-1))
        alpha = np.exp(m - _safe(m_new)) if rescale else 1.0
        l = alpha * l + np.exp(s - _safe(m_new)[..., None]).sum(axis=-1)
        m = m_new
        if divide in ("per block", "kept"):  # first pass: exp against the max so far
            out[..., start:start + block] = np.exp(s - _safe(m)[..., None])
            if divide == "per block":  # one pass: divided by the sum so far
                out[..., start:start + block] /= np.where(l > 0, l, 1.0)[..., None]
    if divide == "per block":
        return out
    if divide == "kept":  # the first pass's exps, divided by the final sum
        return out / np.where(l > 0, l, 1.0)[..., None]
    for start in range(0, n, block):
        s = x[..., start:start + block]
        shift = s.max(axis=-1, keepdims=True) if local_max else m[..., None]
        if guard:
            out[..., start:start + block] = (np.exp(s - _safe(shift))
                                             / np.where(l > 0, l, 1.0)[..., None])
        else:
            out[..., start:start + block] = np.exp(s - shift) / l[..., None]
    return out


def _softmax_unshifted(x, block):
    e = np.exp(x)  # overflows to inf once a score passes ~709
    return e / e.sum(axis=-1, keepdims=True)


def _softmax_per_block(x, block):
    out = np.zeros_like(x)
    for start in range(0, x.shape[-1], block):
        out[..., start:start + block] = _t.ref_softmax(x[..., start:start + block])
    return out


def _streaming_mistakes(x, block):
    yield Mistake(
        "{name} divides each block by the running sum as it goes, in one pass: an early block "
        "is divided by a sum that does not yet include the later blocks (nor their larger max). "
        "Finish the first pass for the final m and l, then divide every block by that one l "
        "in a second pass.",
        lambda x, block: _streamed(x, block, divide="per block"))
    yield Mistake(_NOT_RESCALED, lambda x, block: _streamed(x, block, rescale=False))
    yield Mistake(
        "{name} subtracts each block's own max in the second pass; every block must use the "
        "row's final max m, the one the sum l was measured against: exp(x - m) / l.",
        lambda x, block: _streamed(x, block, local_max=True))
    yield Mistake(
        "{name} keeps each block's exp(x - m) from the first pass, measured against the max "
        "seen so far at that block, and divides it by the final l; a block seen before the max "
        "grew is then too large. Write every block in the second pass against the final m: "
        "exp(x - m) / l.",
        lambda x, block: _streamed(x, block, divide="kept"))
    yield Mistake(
        "{name} takes a separate softmax of each block, so every block sums to 1 on its own; "
        "the whole row must sum to 1.",
        _softmax_per_block)
    yield Mistake(
        "{name} gives nan for a row that is all -inf: its final m is -inf and (-inf) - (-inf) "
        "is nan. Subtract 0 instead of m on such rows (as in online_step); with l = 0 there, "
        "write zeros rather than dividing by l.",
        lambda x, block: _streamed(x, block, guard=False))
    yield Mistake(
        "{name} takes exp of the raw scores: with scores in the hundreds, exp overflows to inf "
        "and inf / inf is nan. Subtract the row's max m first: exp(x - m) / l.",
        lambda x, block: _softmax_unshifted(x, block))


def _blocked_rows(rng):
    x = _normal(rng, 3, 7)
    x[0, :3] = -np.inf
    x[1, :] = -np.inf
    return x


def _streaming_cases(hidden: bool):
    names = ("x", "block")
    if not hidden:
        rng = _t.default_rng(16)
        late = _normal(rng, 2, 2, 7, scale=2.0)
        late[..., 5] += 6.0  # the max arrives in the last block
        return [Case((_normal(rng, 3, 10, scale=2.0), 4), names,
                     "block = 4 does not divide the 10 columns: the last block has 2."),
                Case((late, 3), names, "A (2, 2, 7) batch whose max arrives in the last block."),
                # scale 400: the largest score is about 900, and exp overflows above ~709
                Case((_normal(rng, 2, 9, scale=400.0), 3), names,
                     "Large scores (hundreds): never exp a big positive number."),
                Case((_blocked_rows(rng), 2), names,
                     "-inf entries are blocked scores: row 0 starts with three of them, row 1 "
                     "is all -inf, so its softmax is all zeros (not nan).")]
    rng = _t.default_rng(116)
    masked = _normal(rng, 3, 8)
    masked[0, :5] = -np.inf
    masked[2, :] = -np.inf
    return [Case((_normal(rng, 4, 6), 1), names, "block = 1: one column at a time."),
            Case((_normal(rng, 2, 5), 8), names, "block = 8 is wider than the row."),
            Case((_normal(rng, 3, 11, scale=3.0, dtype=np.float32), 5), names,
                 "x is float32 here."),
            Case((masked, 3), names,
                 "Row 0 starts with -inf entries, row 2 is all -inf (its softmax is all zeros).")]


STREAMING_SOFTMAX = Exercise(
    name="streaming_softmax",
    reference=_ref_streaming_softmax,
    visible=lambda: _streaming_cases(False),
    hidden=lambda: _streaming_cases(True),
    mistakes=_streaming_mistakes,
    backends=("numpy",),
    doc="streaming_softmax(x, block) -> softmax of x (..., n) over its last axis, reading the "
        "columns block at a time: a pass for the running max and sum, a pass to write.",
)


# --- (c) tiled attention, forward ----------------------------------------------------------------


def _tiled(q, k, v, causal, block_q, block_k, *, rescale_l=True, acc="right", divide="once",
           stop="right", mask_diagonal=True, mask="global", scale="sqrt", carry_max=True,
           shift=True):
    seq, d_head = q.shape[-2:]
    lead = np.broadcast_shapes(q.shape[:-2], k.shape[:-2], v.shape[:-2])
    # The task promises every row sees key 0, so a learner needs no -inf guard; with the mask
    # inverted, rows miss key 0 and (-inf) - (-inf) gives that learner nan.
    safe = (lambda m: m) if mask == "inverted" else _safe
    out = np.zeros(lead + (seq, v.shape[-1]))
    for qs in range(0, seq, block_q):
        qe = min(qs + block_q, seq)
        qb = q[..., qs:qe, :] / {"sqrt": math.sqrt(d_head), "none": 1.0, "d": d_head}[scale]
        m = np.full(lead + (qe - qs,), -np.inf)
        l = np.zeros(lead + (qe - qs,))
        o = np.zeros(lead + (qe - qs, v.shape[-1]))
        end = {"right": qe, "off by one": qe - 1, "first row": qs + 1, "before diagonal": qs,
               # key tile i for query tile i, counted in tiles: right only if block_q <= block_k
               "tile index": min((qs // block_q + 1) * block_k, seq)}[stop] if causal else seq
        for ks in range(0, end, block_k):
            ke = min(ks + block_k, seq)
            s = qb @ np.swapaxes(k[..., ks:ke, :], -1, -2)
            if causal and mask_diagonal and (mask != "aligned only" or ks == qs):
                keys, queries = {"diagonal": (np.arange(ks, ke) + 1, np.arange(qs, qe)),
                                 "local": (np.arange(ke - ks), np.arange(qe - qs))}.get(
                                     mask, (np.arange(ks, ke), np.arange(qs, qe)))
                allowed = (keys[None, :] >= queries[:, None] if mask == "inverted"
                           else keys[None, :] <= queries[:, None])
                s = np.where(allowed, s, -np.inf)
            if divide == "tile softmax":  # each tile's own softmax, the results added
                o = o + _t.ref_softmax(s) @ v[..., ks:ke, :]
                continue
            m_new = np.maximum(m, s.max(axis=-1))
            if not shift:  # no running max at all: exp of the raw scores
                m_new = np.zeros_like(m_new)
            alpha = np.exp(m - safe(m_new)) if shift else np.ones_like(m)
            p = np.exp(s - safe(m_new)[..., None])
            l = (alpha if rescale_l else 1.0) * l + p.sum(axis=-1)
            if acc == "right":
                o = alpha[..., None] * o
            elif acc == "inverted":
                o = o / np.where(alpha > 0, alpha, 1.0)[..., None]
            pv = p @ v[..., ks:ke, :]
            if divide == "per block":
                pv = pv / np.where(l > 0, l, 1.0)[..., None]
            o = o + pv
            if carry_max:
                m = m_new
        if divide == "once":
            # with the diagonal blocked, query 0 sees no key (and with the walk stopped before
            # the diagonal, the first tile sees none): a learner's 0 / 0 gives nan there
            no_key = mask == "diagonal" or stop == "before diagonal"
            o = o / (l if no_key else np.where(l > 0, l, 1.0))[..., None]
        out[..., qs:qe, :] = o
    return out


def _tiled_mistakes(q, k, v, causal, block_q, block_k):
    def variant(**knobs):
        return lambda q, k, v, c, bq, bk: _tiled(q, k, v, c, bq, bk, **knobs)

    yield Mistake(_NOT_RESCALED, variant(rescale_l=False))
    yield Mistake(
        "{name} does not rescale the output accumulator when the max changes: it holds "
        "sum(exp(s - m) v) against the old max, so multiply it by the same exp(m - m_new) as "
        "the running sum before adding exp(s - m_new) @ v.",
        variant(acc="none"))
    yield Mistake(
        "{name} rescales the output accumulator by exp(m_new - m); it must be exp(m - m_new), "
        "the same factor as the running sum (it shrinks the old terms).",
        variant(acc="inverted"))
    yield Mistake(
        "{name} divides by the running sum block by block; an early block's sum does not know "
        "the later blocks. Accumulate exp(s - m) @ v and divide by l once, after the last "
        "block of keys.",
        variant(divide="per block"))
    yield Mistake(
        "{name} takes a separate softmax of each tile of keys and adds the results, so every "
        "tile's weights sum to 1 on their own; a row's weights must sum to 1 over all its keys. "
        "Carry m, l and acc across the tiles and divide by l once, at the end.",
        variant(divide="tile softmax"))
    yield Mistake(
        "{name} does not keep the new max for the next tile: m stays -inf, so alpha = "
        "exp(m - m_new) is 0 and every tile wipes out the ones before it. End each step with "
        "m = m_new.",
        variant(carry_max=False))
    if causal:
        yield Mistake(
            "{name}'s causal walk stops one key too early: the last query of a tile, "
            "q_stop - 1, may see key q_stop - 1 itself, so visit the key tiles that start "
            "before q_stop: range(0, q_stop, block_k), not range(0, q_stop - 1, block_k).",
            variant(stop="off by one"))
        yield Mistake(
            "{name}'s causal walk stops before the diagonal: it visits only the key tiles that "
            "start before q_start, so the first tile of queries sees no key at all (0 / 0 is "
            "nan) and no query sees itself. Visit the key tiles that start before q_stop: "
            "range(0, q_stop, block_k).",
            variant(stop="before diagonal"))
        yield Mistake(
            "{name}'s causal walk counts key tiles like query tiles (key tiles 0..i for query "
            "tile i). That reaches the diagonal only while block_q <= block_k; here block_q = "
            f"{block_q} > block_k = {block_k}, and the last queries of a tile miss their last "
            "keys. Walk by position: visit the key tiles that start before q_stop, "
            "range(0, q_stop, block_k).",
            variant(stop="tile index"))
        yield Mistake(
            "{name}'s causal walk stops after the tile's FIRST query's keys; the later queries "
            "of the tile see more. Stop after the last query's keys: range(0, q_stop, block_k).",
            variant(stop="first row"))
        yield Mistake(
            "{name} skips the tiles above the diagonal but does not mask inside the diagonal "
            "tiles: there key j must still be blocked (-inf) for query i < j.",
            variant(mask_diagonal=False))
        yield Mistake(
            "{name} masks only the key tile that starts where the query tile starts "
            "(k_start == q_start). With block_q != block_k the diagonal crosses other key tiles "
            "too: mask every tile you visit, blocking key j for query i when j > i.",
            variant(mask="aligned only"))
        yield Mistake(
            "{name} blocks the past instead of the future: query i may attend keys j <= i, so "
            "set the scores with j > i to -inf (not those with j < i).",
            variant(mask="inverted"))
        yield Mistake(
            "{name} builds the causal mask from positions inside the tile (0, 1, ... for both "
            "the tile's queries and its keys); compare positions in the whole sequence: key "
            "k_start + column is blocked for query q_start + row when it is larger.",
            variant(mask="local"))
        yield Mistake(
            "{name} blocks the diagonal too: query i may attend to key i itself. Block only the "
            "keys j > i.",
            variant(mask="diagonal"))
    yield Mistake(
        "{name} takes exp of the raw scores, without the running max: with large scores exp "
        "overflows to inf and inf / inf is nan. Subtract m_new inside exp, and rescale by "
        "alpha = exp(m - m_new) when it grows.",
        variant(shift=False))
    yield Mistake(
        f"{{name}} does not scale the scores: divide q @ k^T by sqrt(d_head) = "
        f"sqrt({q.shape[-1]}).",
        variant(scale="none"))
    yield Mistake(
        f"{{name}} divides q @ k^T by d_head = {q.shape[-1]}; the scale is 1 / sqrt(d_head) = "
        f"1 / sqrt({q.shape[-1]}).",
        variant(scale="d"))


def _tiled_case(rng, shape, causal, block_q, block_k, note="", scale=1.0, dtype=np.float64):
    q, k, v = (_normal(rng, *shape, scale=scale, dtype=dtype) for _ in range(3))
    return Case((q, k, v, causal, block_q, block_k),
                ("q", "k", "v", "causal", "block_q", "block_k"), note)


def _tiled_cases(hidden: bool):
    if not hidden:
        rng = _t.default_rng(17)
        return [_tiled_case(rng, (10, 4), False, 4, 3, "No mask; 10 rows in tiles of 4 and 3."),
                _tiled_case(rng, (9, 4), True, 3, 4, "Causal, block_q = 3, block_k = 4.",
                            scale=1.5),
                _tiled_case(rng, (2, 11, 8), True, 4, 3,
                            "Causal, a (2, 11, 8) batch: block_q = 4 is larger than block_k = 3, "
                            "and the last tiles are short.", scale=1.5),
                # scale 30: scores up to a few thousand; exp overflows above ~709
                _tiled_case(rng, (8, 4), False, 4, 3,
                            "Large scores (up to thousands): exp must only ever see s - m <= 0.",
                            scale=30.0)]
    rng = _t.default_rng(117)
    return [_tiled_case(rng, (1, 5), True, 4, 4, "seq = 1: one query, one key."),
            _tiled_case(rng, (7, 6), True, 16, 16, "Tiles wider than seq = 7."),
            _tiled_case(rng, (6, 3), True, 1, 1, "Tiles of one row and one key."),
            _tiled_case(rng, (2, 3, 13, 8), True, 4, 5, "Causal, (batch, n_head, seq, d_head).",
                        scale=2.0),
            _tiled_case(rng, (16, 8), False, 8, 4, "float32 here.", dtype=np.float32),
            _tiled_case(rng, (12, 4), True, 4, 4, "Causal, tiles aligned with the diagonal."),
            _tiled_case(rng, (3, 14, 4), True, 6, 4, "Causal, block_q = 6 > block_k = 4.")]


FLASH_ATTENTION = Exercise(
    name="flash_attention",
    reference=_ref_flash,
    visible=lambda: _tiled_cases(False),
    hidden=lambda: _tiled_cases(True),
    mistakes=_tiled_mistakes,
    backends=("numpy",),
    doc="flash_attention(q, k, v, causal, block_q, block_k) -> softmax(q k^T / sqrt(d_head)) v, "
        "tile by tile; q, k, v (..., seq, d_head), the same seq; causal: key j <= query i.",
)


EXERCISES = [ONLINE_STEP, STREAMING_SOFTMAX, FLASH_ATTENTION]
