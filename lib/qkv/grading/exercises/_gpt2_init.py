"""GPT-2's initialisation, judged by properties (chapter 8's init_params): a params dict of
random weights is right when its structure, its exact zeros and ones, the statistics of each
matrix, its seeding and the loss of the untrained model (about ln V) are."""

import math

from .. import _trusted as _t
from ..engine import Case, Spec, _as_array, _call, _describe, _kind_of_object, _shape, _with_note

_BLOCK_KEYS = ("ln1_gamma", "ln1_beta", "w_qkv", "b_qkv", "w_out", "b_out",
               "ln2_gamma", "ln2_beta", "w_fc", "b_fc", "w_proj", "b_proj")


def _quiet():
    return _t.errstate(all="ignore")


_INIT_STD = 0.02
_GPT_KEYS = ("wte", "wpe", "blocks", "lnf_gamma", "lnf_beta")


def _init_shapes(vocab, context, n_layer, d_model):
    d = d_model
    top = {"wte": ((vocab, d), "(vocab, d_model)"), "wpe": ((context, d), "(context, d_model)"),
           "lnf_gamma": ((d,), "(d_model,)"), "lnf_beta": ((d,), "(d_model,)")}
    block = {"ln1_gamma": ((d,), "(d_model,)"), "ln1_beta": ((d,), "(d_model,)"),
             "w_qkv": ((d, 3 * d), "(d_model, 3 * d_model)"), "b_qkv": ((3 * d,), "(3 * d_model,)"),
             "w_out": ((d, d), "(d_model, d_model)"), "b_out": ((d,), "(d_model,)"),
             "ln2_gamma": ((d,), "(d_model,)"), "ln2_beta": ((d,), "(d_model,)"),
             "w_fc": ((d, 4 * d), "(d_model, 4 * d_model)"), "b_fc": ((4 * d,), "(4 * d_model,)"),
             "w_proj": ((4 * d, d), "(4 * d_model, d_model)"), "b_proj": ((d,), "(d_model,)")}
    return top, block


def _init_read(name, out, case):
    """The learner's params as {label: ndarray} (labels like "params['blocks'][1]['w_fc']"),
    after checking the structure; AssertionError saying what is missing or misshapen."""
    vocab, context, n_layer, d_model, _ = case.args
    top, block = _init_shapes(vocab, context, n_layer, d_model)
    where = _describe(case)
    if _t.type_(out) is not dict:
        raise AssertionError(f"{name} returned {_kind_of_object(out)} for {where}; it should "
                             f"return a dict with the keys {', '.join(_GPT_KEYS)}.")
    keys = [k for k in out if _t.type_(k) is str]
    if _t.len_(keys) != _t.len_(out) or set(keys) != set(_GPT_KEYS):
        missing = [k for k in _GPT_KEYS if k not in keys]
        extra = [repr(k) for k in out if not (_t.type_(k) is str and k in _GPT_KEYS)]
        raise AssertionError(
            f"{name} returned a dict with the wrong keys for {where}"
            + (f": missing {', '.join(missing)}" if missing else "")
            + (f"; unexpected {', '.join(extra)}" if extra else "")
            + f". The params dict of gpt_forward has exactly {', '.join(_GPT_KEYS)}.")
    blocks = out["blocks"]
    if not (_t.type_(blocks) is list or _t.type_(blocks) is tuple):
        raise AssertionError(f"{name} returned params['blocks'] as {_kind_of_object(blocks)} for "
                             f"{where}; it should be a list of n_layer = {n_layer} dicts.")
    if _t.len_(blocks) != n_layer:
        raise AssertionError(f"{name} returned {_t.len_(blocks)} blocks for {where}; there should "
                             f"be n_layer = {n_layer}.")
    arrays = {}
    for key, (shape, text) in top.items():
        arrays[f"params[{key!r}]"] = (out[key], shape, text)
    for i, b in enumerate(blocks):
        if _t.type_(b) is not dict:
            raise AssertionError(f"{name} returned params['blocks'][{i}] as {_kind_of_object(b)} "
                                 f"for {where}; each block is a dict of 12 arrays.")
        bkeys = [k for k in b if _t.type_(k) is str]
        if _t.len_(bkeys) != _t.len_(b) or set(bkeys) != set(_BLOCK_KEYS):
            missing = [k for k in _BLOCK_KEYS if k not in bkeys]
            raise AssertionError(
                f"{name} returned params['blocks'][{i}] with the wrong keys for {where}"
                + (f" (missing {', '.join(missing)})" if missing else "")
                + f"; a block has exactly {', '.join(_BLOCK_KEYS)}.")
        for key, (shape, text) in block.items():
            arrays[f"params['blocks'][{i}][{key!r}]"] = (b[key], shape, text)
    spec = Spec(name, None, None)
    result = {}
    for label, (value, shape, text) in arrays.items():
        arr = _as_array(spec, value, label, "float", case)
        if arr.shape != shape:
            raise AssertionError(f"{name} returned {label} with shape {_shape(arr)} for {where}; "
                                 f"expected {text} = {shape}.")
        result[label] = arr
    return result


def _init_target(label: str, n_layer: int):
    """(the intended standard deviation, how the matrix is described) of a weight matrix."""
    if label.endswith("['w_out']") or label.endswith("['w_proj']"):
        return _INIT_STD / math.sqrt(2 * n_layer), "0.02 / sqrt(2 * n_layer)"
    return _INIT_STD, "0.02"


def _init_problem(name, arrays, case):
    """What is wrong with a structurally sound params dict, in words; None if nothing is."""
    vocab, context, n_layer, d_model, seed = case.args
    where = _describe(case)
    # exact ones and zeros
    for label, a in arrays.items():
        key = label.rsplit("[", 1)[-1].strip("]'")
        if key.endswith("gamma") and not _t.equal(a, 1.0).all():
            return (f"{name} returned {label} with values other than 1 for {where}; every layer "
                    f"norm starts with gamma = 1 (np.ones(d_model)), so it starts as a plain "
                    f"normalisation.")
        if (key.endswith("beta") or key.startswith("b_")) and not _t.equal(a, 0.0).all():
            return (f"{name} returned {label} with values other than 0 for {where}; GPT-2 starts "
                    f"every bias and every layer-norm beta at 0 (np.zeros(...)).")
    # one block's arrays reused for another
    matrices = {label: a for label, a in arrays.items()
                if a.ndim == 2}
    seen = {}
    for label, a in matrices.items():
        for other, b in seen.items():
            if a.shape == b.shape and (a is b or _t.identical(a, b)):
                return (f"{name} returned the same numbers in {other} and {label} for {where}. "
                        f"Every matrix needs its own random draw: build a new dict for each "
                        f"block ([block] * n_layer, or reusing one dict, repeats the same arrays).")
        seen[label] = a
    # the statistics of each matrix
    for label, a in matrices.items():
        target, formula = _init_target(label, n_layer)
        n = a.size
        mean = float(a.mean())
        std = float(a.std())
        residual = formula != "0.02"
        if residual and abs(std / _INIT_STD - 1.0) < 0.12 and n_layer > 0:
            return (f"{name} returned {label} with standard deviation {std:.4f} for {where}; the "
                    f"two matrices that write into the residual stream, w_out and w_proj, start "
                    f"smaller: 0.02 / sqrt(2 * n_layer) = {target:.4f} here, so that the 2 * "
                    f"n_layer branches added to the stream do not make it grow with depth.")
        if residual and abs(std / (_INIT_STD / math.sqrt(n_layer)) - 1.0) < 0.12 and n_layer > 1:
            return (f"{name} returned {label} with standard deviation {std:.4f} for {where}: it "
                    f"divides 0.02 by sqrt(n_layer); divide by sqrt(2 * n_layer) (two residual "
                    f"branches per block), giving {target:.4f} here.")
        if not residual and n_layer > 0 and \
                abs(std / (_INIT_STD / math.sqrt(2 * n_layer)) - 1.0) < 0.12:
            return (f"{name} returned {label} with standard deviation {std:.4f} for {where}; only "
                    f"w_out and w_proj are scaled by 1 / sqrt(2 * n_layer). This matrix starts at "
                    f"0.02.")
        if abs(std - 1.0) < 0.12:
            return (f"{name} returned {label} with standard deviation {std:.3f} for {where}: a "
                    f"standard normal. GPT-2 draws its weights with standard deviation 0.02: "
                    f"rng.normal(0.0, {formula}, size=...).")
        if abs(std / target**2 - 1.0) < 0.12:
            return (f"{name} returned {label} with standard deviation {std:.2g} for {where}: it "
                    f"passes the variance ({target:.4g}**2) where rng.normal wants the standard "
                    f"deviation, scale={formula}.")
        if abs(mean) > 6.0 * target / math.sqrt(n) + 1e-3 * target:
            return (f"{name} returned {label} with mean {mean:.4f} for {where}; the weights "
                    f"should be centred on 0: rng.normal(0.0, {formula}, size=...) (rng.random "
                    f"draws from [0, 1) instead).")
        if abs(std / target - 1.0) > 0.12:
            return (f"{name} returned {label} with standard deviation {std:.4f} for {where}; "
                    f"expected {formula}" + (f" = {target:.4f}" if residual else "")
                    + " (GPT-2's initialisation: rng.normal(0.0, std, size=...)).")
        inside = float(_t.less_equal(_t.absolute(a - mean), target).mean())
        if n >= 2048 and not 0.62 <= inside <= 0.75:
            return (f"{name} returned {label} whose entries are not normally distributed for "
                    f"{where}: {100 * inside:.0f}% of them lie within one standard deviation of "
                    f"the mean, where a normal distribution has 68%. Draw them with "
                    f"rng.normal(0.0, {formula}, size=...).")
    return None


def _init_loss(arrays, case):
    """The mean next-token loss of the model on seeded random tokens, and what it should be."""
    vocab, context, n_layer, d_model, seed = case.args
    params = {"blocks": [{} for _ in range(n_layer)]}
    for label, a in arrays.items():
        parts = [p.strip("]'") for p in label[len("params["):].split("][")]
        a = _t.asarray(a, dtype=_t.float64)
        if parts[0] == "blocks":
            params["blocks"][int(parts[1])][parts[2]] = a
        else:
            params[parts[0]] = a
    rng = _t.default_rng(seed + 1000)
    ids = rng.integers(0, vocab, size=(4, min(context, 32) + 1))
    with _quiet():
        logits = _t.ref_gpt_forward(ids[:, :-1], params, 4 if d_model % 4 == 0 else 1)
        loss = float(_t.ref_cross_entropy(logits, ids[:, 1:]))
    return loss, math.log(vocab) + 0.5 * _INIT_STD**2 * d_model


def init_cases(hidden: bool):
    names = ("vocab", "context", "n_layer", "d_model", "seed")
    if not hidden:
        return [Case((100, 64, 2, 64, 0), names), Case((64, 48, 1, 48, 1), names)]
    # Other seeds and sizes only: the task text says nothing about n_layer = 0 (where
    # 0.02 / sqrt(2 * n_layer) is undefined), so no hidden case asks for it (finding 6).
    return [Case((200, 32, 3, 64, 7), names), Case((50, 64, 4, 64, 3), names),
            Case((300, 48, 1, 32, 11), names)]


def judge_init(ex, learner, cases) -> None:
    """Structure, exact zeros and ones, statistics, seeding, and the untrained loss."""
    name = ex.name
    spec = Spec(name, None, None)
    with _t.pristine():
        for case in cases:
            arrays = _init_read(name, _call(spec, learner, case), case)
            problem = _init_problem(name, arrays, case)
            if problem is not None:
                raise AssertionError(_with_note(problem, case))
            vocab, context, n_layer, d_model, seed = case.args
            again = _init_read(name, _call(spec, learner, case), case)
            if any(not _t.identical(again[k], arrays[k]) for k in arrays):
                raise AssertionError(
                    f"{name} gave different weights in two calls with seed = {seed}. Draw "
                    f"everything from rng = np.random.default_rng(seed), not from np.random.normal "
                    f"(a global generator) or an unseeded default_rng().")
            other = Case(case.args[:4] + (seed + 1,), case.names, case.note)
            different = _init_read(name, _call(spec, learner, other), other)
            if all(_t.identical(different[k], arrays[k]) for k in arrays):
                raise AssertionError(
                    f"{name} ignores its seed: seed = {seed} and seed = {seed + 1} gave the same "
                    f"weights. Make rng = np.random.default_rng(seed) and draw from it.")
            loss, expected = _init_loss(arrays, case)
            if not abs(loss - expected) < 0.1:
                raise AssertionError(
                    f"With the weights of {name} for {_describe(case)}, the untrained model's "
                    f"loss on random tokens is {loss:.3f}; it should be about ln V + "
                    f"0.5 * 0.02**2 * d_model = {expected:.3f}.")


