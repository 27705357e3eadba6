"""qkv.grading: the checkers that the exercise notebooks' test cells call.

Import it in the locked setup cell, before any learner code runs: the checkers capture trusted
references to the numeric functions at import time (see ``_trusted``), so a learner who later
rebinds ``np.allclose`` cannot make a wrong answer pass.

Each checker is ``check_xxx(fn, hidden=False, backend="auto")``: it runs the learner's ``fn``
on seeded inputs, compares with the reference in ``qkv.np`` and raises ``AssertionError`` naming
the most likely mistake. A correct function passes silently.
"""

# ruff: noqa: F401  (the old checkers are imported until every chapter is declared)
from . import _trusted
from .checks_attention import (  # softmax, attention, masking, norms, heads, blocks, loss
    check_attention,
    check_attention_scores,
    check_causal_mask,
    check_cross_entropy,
    check_decoder_block,
    check_gelu,
    check_layer_norm,
    check_multi_head_attention,
    check_shift_targets,
    check_softmax,
    check_softmax_temperature,
)
from .checks_model import (  # chapters 7-9
    check_attention_backward,
    check_count_parameters,
    check_cross_entropy_backward,
    check_gpt_forward,
    check_has_residuals,
    check_init_params,
    check_layer_norm_backward,
    check_linear_backward,
    check_mlp,
    check_next_token_probs,
    check_softmax_backward,
)
from .checks_tokens import (  # chapters 1, 2, 3 and 6
    check_add_positions,
    check_decode,
    check_embed,
    check_encode,
    check_linear,
    check_merge_heads,
    check_mha_param_count,
    check_multi_head_attention_torch,
    check_one_hot,
    check_permutation_equivariance,
    check_positional_encoding,
    check_query_design,
    check_score_table,
    check_similarity_matrix,
    check_soft_lookup,
    check_split_heads,
)
from .checks_training import (  # chapters 10-11
    check_adamw_step,
    check_greedy_decode,
    check_kv_attention_step,
    check_make_batch,
    check_temperature_probs,
    check_top_k,
    check_top_p,
    check_training_loop,
)

# Chapters already declared as exercises (qkv.grading.exercises) replace the old checkers.
from .exercises import CHECKERS as _CHECKERS  # noqa: E402

globals().update(_CHECKERS)
__all__ = sorted({name for name in globals() if name.startswith("check_")})

_trusted.seal()  # last: snapshot numpy, qkv (this package included) and builtins as they are now
