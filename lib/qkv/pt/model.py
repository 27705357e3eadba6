"""GPT: the pure functions of qkv.pt wrapped in nn.Modules, in GPT-2's layout, with switches
for the modern pieces (RMSNorm, RoPE, SwiGLU, grouped-query attention, QK-norm; see qkv.Arch).

Parameter names match Hugging Face's GPT-2 (transformer.wte, transformer.h[i].attn.c_attn, ...)
and linear weights are stored (d_in, d_out) like GPT-2's Conv1D, so GPT-2 weights load
without transposing. The sub-modules below a Block (Linear, LayerNorm, CausalSelfAttention, MLP)
only hold parameters under those names; Block.forward runs the pure ``decoder_block`` on them,
so the block is wired once, for training and for generation with a KV cache alike.
"""

import math
from dataclasses import dataclass

import torch
from torch import nn

from qkv._arch import GPT2, Arch, check_kv_heads, check_rope_dims, qkv_width
from qkv._checks import (
    GPT2_BLOCK_BUFFERS,
    check_gpt2_state_dict,
    check_min_ndim,
    check_n_head,
    check_token_ids,
    shape_of,
)
from qkv._kv_cache import KVCache, check_model_cache
from qkv._llama import EMBED, FINAL_NORM, HEAD, block_key, check_llama_state_dict

from .block import decoder_block, norm
from .embedding import embed
from .interp import run_with_cache, run_with_patches
from .loss import cross_entropy
from .rope import rope_table


@dataclass
class GPTConfig:
    """Sizes of a GPT.

    vocab_size: vocab;  context_length: the longest seq the model accepts (rows of wpe);
    n_layer: number of decoder blocks;  n_head: heads per block;  d_model: residual width
    (d_head = d_model // n_head, MLP width d_ff = 4 * d_model).
    dropout: probability of zeroing entries of the input embeddings (token + position) while
        training; the blocks are pure functions without dropout.
    bias: whether linear layers and layer norms have biases.
    fused: torch's fused kernels (scaled_dot_product_attention, layer_norm, gelu, linear,
        cross_entropy): the same math in fewer, faster kernels; False runs the naive path the
        book teaches.
    attention: None runs attention on the path ``fused`` picks; "flash" runs it through
        qkv.pt.flash_attention, the Triton kernel of chapter 15 (the other layers stay fused).
        Generation with a KV cache keeps the ``fused`` path.
    norm, position, mlp, n_kv_head, qk_norm, rope_theta, norm_eps: the architecture switches,
        as in qkv.Arch (the defaults are GPT-2's); ``arch`` hands them to the pure functions.
        With position "rope" there is no wpe; with norm "rms" the norms have no bias.
    d_ff: the MLP's hidden width; None: 4 * d_model for GELU, and for SwiGLU two thirds of
        that rounded up to a multiple of 8 (8/3 d_model: three matrices with the parameters
        of GELU's two).
    tie_embeddings: the unembedding is wte (GPT-2); False gives lm_head its own weight (Llama).
    """

    vocab_size: int
    context_length: int
    n_layer: int
    n_head: int
    d_model: int
    dropout: float = 0.0
    bias: bool = True
    fused: bool = True
    attention: str | None = None
    norm: str = "layer"
    position: str = "learned"
    mlp: str = "gelu"
    n_kv_head: int | None = None
    qk_norm: bool = False
    rope_theta: float = 10000.0
    norm_eps: float = 1e-5
    d_ff: int | None = None
    tie_embeddings: bool = True

    def __post_init__(self):
        check_n_head("GPTConfig", self.d_model, self.n_head)
        if self.attention not in (None, "flash"):
            raise ValueError(f'GPTConfig: attention must be None or "flash"; '
                             f"got {self.attention!r}")
        self.arch.kv_heads("GPTConfig", self.n_head)  # also checks every switch's value
        if self.position == "rope":
            check_rope_dims("GPTConfig", self.d_model // self.n_head)

    @property
    def kernels(self):
        """The ``fused`` argument the blocks pass down: "flash" selects the Triton attention."""
        return "flash" if self.attention == "flash" else self.fused

    @property
    def arch(self) -> Arch:
        """The architecture switches as the pure functions take them (``arch=``)."""
        return Arch(norm=self.norm, position=self.position, mlp=self.mlp,
                    n_kv_head=self.n_kv_head, qk_norm=self.qk_norm, rope_theta=self.rope_theta,
                    norm_eps=self.norm_eps)

    @property
    def hidden(self) -> int:
        """The MLP's hidden width d_ff (see d_ff)."""
        if self.d_ff is not None:
            return self.d_ff
        if self.mlp == "swiglu":
            return -(-(8 * self.d_model // 3) // 8) * 8  # 8/3 d_model, up to a multiple of 8
        return 4 * self.d_model


class Linear(nn.Module):
    """Holds a linear layer's weight, stored (d_in, d_out) (GPT-2's Conv1D layout), and bias."""

    def __init__(self, d_in: int, d_out: int, bias: bool = True):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(d_in, d_out))  # filled by GPT's init
        self.bias = nn.Parameter(torch.zeros(d_out)) if bias else None


class LayerNorm(nn.Module):
    """Holds layer_norm's learned scale (weight = gamma) and shift (bias = beta); rms_norm's
    scale alone (bias None)."""

    def __init__(self, d_model: int, bias: bool = True):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(d_model))
        self.bias = nn.Parameter(torch.zeros(d_model)) if bias else None


class CausalSelfAttention(nn.Module):
    """Holds c_attn (d_model -> 3*d_model, [Q | K | V]; with n_kv_head K/V heads,
    (n_head + 2*n_kv_head) * d_head columns) and c_proj (d_model -> d_model); with qk_norm also
    q_norm and k_norm, the (d_head,) scales of QK-norm."""

    def __init__(self, config: GPTConfig):
        super().__init__()
        n_kv = config.arch.kv_heads("GPTConfig", config.n_head)
        d_head = config.d_model // config.n_head
        self.c_attn = Linear(config.d_model, qkv_width(config.n_head, n_kv, d_head), config.bias)
        self.c_proj = Linear(config.d_model, config.d_model, config.bias)
        if config.qk_norm:
            self.q_norm, self.k_norm = LayerNorm(d_head, False), LayerNorm(d_head, False)


class MLP(nn.Module):
    """Holds c_fc (d_model -> d_ff; SwiGLU: d_model -> 2*d_ff, [gate | up]) and
    c_proj (d_ff -> d_model)."""

    def __init__(self, config: GPTConfig):
        super().__init__()
        d_ff = config.hidden
        width = 2 * d_ff if config.mlp == "swiglu" else d_ff
        self.c_fc = Linear(config.d_model, width, config.bias)
        self.c_proj = Linear(d_ff, config.d_model, config.bias)


class Block(nn.Module):
    """One decoder block: ln_1, attn, ln_2, mlp.

    forward runs the pure ``decoder_block`` on this block's parameters, so the block's wiring
    is written once, for training and for generation (``kv_cache``). Forward hooks therefore
    belong on the Block: its sub-modules hold the weights and have no forward of their own.
    """

    def __init__(self, config: GPTConfig):
        super().__init__()
        norm_bias = config.bias and config.norm == "layer"  # RMSNorm has no shift
        self.ln_1 = LayerNorm(config.d_model, norm_bias)
        self.attn = CausalSelfAttention(config)
        self.ln_2 = LayerNorm(config.d_model, norm_bias)
        self.mlp = MLP(config)
        self.config = config  # read at every call, so model.config.fused = False takes effect

    def params(self) -> dict:
        """This block's parameters under the names ``decoder_block`` expects."""
        extra = {}
        if self.config.qk_norm:
            extra = dict(q_norm_gamma=self.attn.q_norm.weight, k_norm_gamma=self.attn.k_norm.weight)
        return dict(
            ln1_gamma=self.ln_1.weight, ln1_beta=self.ln_1.bias,
            w_qkv=self.attn.c_attn.weight, b_qkv=self.attn.c_attn.bias,
            w_out=self.attn.c_proj.weight, b_out=self.attn.c_proj.bias,
            ln2_gamma=self.ln_2.weight, ln2_beta=self.ln_2.bias,
            w_fc=self.mlp.c_fc.weight, b_fc=self.mlp.c_fc.bias,
            w_proj=self.mlp.c_proj.weight, b_proj=self.mlp.c_proj.bias, **extra,
        )

    def forward(self, x, mask=None, kv_cache: dict | None = None, rope=None):
        """x (..., seq, d_model) -> (..., seq, d_model); kv_cache: this block's entry of a
        KVCache; rope: (cos, sin) for x's positions (see decoder_block)."""
        return decoder_block(x, self.params(), self.config.n_head, mask=mask,
                             fused=self._kernels(kv_cache), kv_cache=kv_cache,
                             arch=self.config.arch, rope=rope)

    def _kernels(self, kv_cache):
        # cached decoding (seq_q < seq_k) keeps the fused path; the flash kernel serves a
        # whole sequence at once
        return self.config.fused if kv_cache is not None else self.config.kernels


class GPT(nn.Module):
    """Decoder-only transformer: token ids (..., seq) -> logits (..., seq, vocab).

    Layout (GPT-2): transformer.wte (vocab, d_model), transformer.wpe (context, d_model),
    transformer.h[i] (Block), transformer.ln_f, and lm_head whose weight IS wte's (tied).
    Modern switches (GPTConfig): no wpe with RoPE; lm_head its own weight when
    tie_embeddings is False; see Block and its sub-modules for the rest.

    Weights start GPT-2 style: normal(0, 0.02), with the projections that write into the
    residual stream (the c_proj layers) at 0.02 / sqrt(2 * n_layer), so the stream's variance
    does not grow with depth; biases 0, layer-norm scales 1. Seed with ``torch.manual_seed``
    or pass a ``torch.Generator``.
    """

    def __init__(self, config: GPTConfig, *, generator: torch.Generator | None = None):
        super().__init__()
        self.config = config
        modules = dict(wte=nn.Embedding(config.vocab_size, config.d_model))
        if config.position == "learned":
            modules["wpe"] = nn.Embedding(config.context_length, config.d_model)
        self.transformer = nn.ModuleDict(dict(
            **modules,
            drop=nn.Dropout(config.dropout),
            h=nn.ModuleList([Block(config) for _ in range(config.n_layer)]),
            ln_f=LayerNorm(config.d_model, config.bias and config.norm == "layer"),
        ))
        # nn.Linear stores (vocab, d_model), the same shape as wte: share one parameter.
        self.lm_head = nn.Linear(config.d_model, config.vocab_size, bias=False)
        if config.tie_embeddings:
            self.lm_head.weight = self.transformer.wte.weight
        self._init_weights(generator)

    @torch.no_grad()
    def _init_weights(self, generator):
        residual_std = 0.02 / math.sqrt(2 * self.config.n_layer)
        for name, p in self.named_parameters():  # the tied weight appears once
            if name.endswith("c_proj.weight"):
                nn.init.normal_(p, 0.0, residual_std, generator=generator)
            elif p.ndim == 2:  # wte, wpe, c_attn, c_fc, an untied lm_head
                nn.init.normal_(p, 0.0, 0.02, generator=generator)

    def forward(self, token_ids: torch.Tensor, targets: torch.Tensor | None = None,
                kv_cache: KVCache | None = None):
        """token_ids (..., seq) -> logits (..., seq, vocab); with targets (..., seq) also the
        mean cross-entropy loss: returns (logits, loss). Targets equal to -1 are ignored.

        kv_cache: None, or a KVCache(n_layer) holding the keys and values of the kv_cache.pos
            tokens before these: token_ids then sit at positions pos .. pos + seq - 1, each block
            adds their keys and values to its entry, and pos advances by seq. Generation runs
            the prompt once, then one token per step, through this same forward.
        """
        cfg = self.config
        check_token_ids("GPT.forward", "token_ids", token_ids, vocab=cfg.vocab_size)
        check_min_ndim("GPT.forward", "token_ids", token_ids, 1, "(..., seq)")
        seq = token_ids.shape[-1]
        if seq > cfg.context_length:
            raise ValueError(f"GPT.forward: seq must be <= context_length {cfg.context_length}; "
                             f"got token_ids {shape_of(token_ids)}")
        start = 0 if kv_cache is None else check_model_cache(
            "GPT.forward", kv_cache, cfg.n_layer, seq, cfg.context_length)
        x = embed(token_ids, self.transformer.wte.weight)  # (..., seq, d_model)
        rope = None
        if cfg.position == "learned":  # token + learned position
            x = x + self.transformer.wpe.weight[start:start + seq]
        else:  # the positions enter inside attention, as rotations of q and k
            rope = rope_table(seq, cfg.d_model // cfg.n_head, cfg.rope_theta, start,
                              dtype=x.dtype, device=x.device)  # (seq, d_head/2) each
        x = self.transformer.drop(x)
        for i, block in enumerate(self.transformer.h):
            x = block(x, kv_cache=None if kv_cache is None else kv_cache.layers[i], rope=rope)
        if kv_cache is not None:
            kv_cache.pos += seq
        ln_f = self.transformer.ln_f
        x = norm(x, ln_f.weight, ln_f.bias, cfg.arch, fused=cfg.fused)
        logits = self.lm_head(x)  # (..., seq, vocab) = x @ wte.T
        if targets is None:
            return logits
        return logits, cross_entropy(logits, targets, ignore_index=-1, fused=cfg.fused)

    def run_with_cache(self, token_ids: torch.Tensor, names=None, patches: dict | None = None):
        """(logits (..., seq, vocab), cache): every intermediate activation by name, with
        optional patches; see qkv.pt.interp for the names."""
        return run_with_cache(self, token_ids, names=names, patches=patches)

    def run_with_patches(self, token_ids: torch.Tensor, patches: dict) -> torch.Tensor:
        """logits (..., seq, vocab) with the named activations patched (qkv.pt.interp)."""
        return run_with_patches(self, token_ids, patches)

    def numpy_params(self) -> dict:
        """All weights as float64 NumPy copies in the layout ``qkv.np.gpt_forward`` takes."""
        def a(t):
            return None if t is None else t.detach().cpu().to(torch.float64).numpy()

        T = self.transformer
        params = dict(
            wte=a(T.wte.weight),
            blocks=[{k: a(v) for k, v in block.params().items()} for block in T.h],
            lnf_gamma=a(T.ln_f.weight),
            lnf_beta=a(T.ln_f.bias),
        )
        if "wpe" in T:
            params["wpe"] = a(T.wpe.weight)
        if not self.config.tie_embeddings:
            params["w_unembed"] = a(self.lm_head.weight).T.copy()  # (d_model, vocab)
        return params

    @classmethod
    def from_gpt2_state_dict(cls, state_dict, config: GPTConfig | None = None, *,
                             n_head: int | None = None) -> "GPT":
        """A GPT holding the weights of a Hugging Face GPT-2 (GPT2LMHeadModel) state dict.

        state_dict: name -> tensor (or NumPy array) under GPT-2's names: transformer.wte.weight,
            transformer.wpe.weight, transformer.h.{i}.ln_1.weight, ....attn.c_attn.weight, ...,
            transformer.ln_f.{weight,bias}; lm_head.weight may be absent (it is wte, tied).
        config: the GPTConfig to build, checked against the weights' shapes. None: read
            vocab_size, context_length, n_layer and d_model off the shapes; n_head cannot be
            read off them, so pass ``n_head=`` (GPT2Config.n_head).
        returns: a GPT with the state dict's dtype and device, fused attention as GPTConfig's
            default.

        Missing or unexpected keys raise a KeyError listing them. Our modules carry GPT-2's names
        and its Conv1D (d_in, d_out) layout, so the weights load as they are.
        """
        fn = "GPT.from_gpt2_state_dict"
        n_layer = check_gpt2_state_dict(fn, state_dict)
        wte = torch.as_tensor(state_dict["transformer.wte.weight"])
        found = dict(vocab_size=wte.shape[0], d_model=wte.shape[1], n_layer=n_layer,
                     context_length=state_dict["transformer.wpe.weight"].shape[0])
        if config is None:
            if n_head is None:
                raise ValueError(f"{fn}: n_head cannot be read off the weights' shapes; "
                                 f"pass config= or n_head= (GPT2Config.n_head)")
            config = GPTConfig(n_head=n_head, **found)
        else:
            wrong = {k: v for k, v in found.items() if getattr(config, k) != v}
            if wrong or not config.bias or n_head not in (None, config.n_head):
                raise ValueError(f"{fn}: config does not match the state dict, which has {found} "
                                 f"and biases; got {config}" + (f" and n_head {n_head}"
                                                                if n_head is not None else ""))
        # The random init is overwritten at once; fork_rng keeps it from moving torch's global
        # random state, so seeded code after loading runs as it would without the load.
        with torch.random.fork_rng(devices=[]):
            model = cls(config).to(device=wte.device, dtype=wte.dtype)
        weights = {key: torch.as_tensor(state_dict[key]) for key in model.state_dict()
                   if key != "lm_head.weight"}
        weights["lm_head.weight"] = weights["transformer.wte.weight"]  # tied
        model.load_state_dict(weights)  # also checks every shape
        return model

    @classmethod
    def from_llama_state_dict(cls, state_dict, *, n_head: int, n_kv_head: int | None = None,
                              rope_theta: float = 10000.0, norm_eps: float = 1e-5,
                              context_length: int = 2048, fused: bool = True) -> "GPT":
        """A GPT holding the weights of a Hugging Face Llama (LlamaForCausalLM) state dict.

        state_dict: name -> tensor (or NumPy array) under Llama's names (see
            qkv.np.params_from_llama_state_dict).
        n_head, n_kv_head (None: n_head), rope_theta, norm_eps: the LlamaConfig values the
            weights cannot tell (num_attention_heads, num_key_value_heads, rope_theta,
            rms_norm_eps). context_length: the longest window generation keeps
            (max_position_embeddings; RoPE itself has no limit).
        returns: a GPT with norm "rms", position "rope", mlp "swiglu", no biases, the state
            dict's d_ff, dtype and device, and an untied lm_head unless lm_head.weight is
            absent or equals the embedding.

        KeyError for missing or unexpected keys; ValueError if n_head or n_kv_head do not fit
        the shapes. Llama's (d_out, d_in) matrices are transposed to qkv's (d_in, d_out).
        """
        fn = "GPT.from_llama_state_dict"
        n_layer, tied = check_llama_state_dict(fn, state_dict)

        def w(key):
            return torch.as_tensor(state_dict[key])

        wte = w(EMBED)
        vocab, d_model = wte.shape
        n_kv = n_head if n_kv_head is None else n_kv_head
        check_n_head(fn, d_model, n_head)
        check_kv_heads(fn, n_head, n_kv)
        k_rows = w(block_key(0, "k")).shape[0]
        if k_rows != n_kv * (d_model // n_head):
            raise ValueError(f"{fn}: k_proj has {k_rows} rows = n_kv_head * d_head; with "
                             f"d_model {d_model}, n_head {n_head} and n_kv_head {n_kv} it "
                             f"would have {n_kv * (d_model // n_head)}")
        config = GPTConfig(vocab_size=vocab, context_length=context_length, n_layer=n_layer,
                           n_head=n_head, d_model=d_model, bias=False, fused=fused, norm="rms",
                           position="rope", mlp="swiglu", n_kv_head=n_kv_head,
                           rope_theta=rope_theta, norm_eps=norm_eps,
                           d_ff=w(block_key(0, "down")).shape[1], tie_embeddings=tied)
        with torch.random.fork_rng(devices=[]):  # the random init is overwritten at once
            model = cls(config).to(device=wte.device, dtype=wte.dtype)
        weights = {"transformer.wte.weight": wte, "transformer.ln_f.weight": w(FINAL_NORM),
                   "lm_head.weight": wte if tied else w(HEAD)}
        for i in range(n_layer):
            h = f"transformer.h.{i}."
            weights[h + "ln_1.weight"] = w(block_key(i, "ln1"))
            weights[h + "ln_2.weight"] = w(block_key(i, "ln2"))
            weights[h + "attn.c_attn.weight"] = torch.cat(
                [w(block_key(i, part)).T for part in ("q", "k", "v")], dim=1)  # [Q | K | V]
            weights[h + "attn.c_proj.weight"] = w(block_key(i, "o")).T
            weights[h + "mlp.c_fc.weight"] = torch.cat(
                [w(block_key(i, part)).T for part in ("gate", "up")], dim=1)  # [gate | up]
            weights[h + "mlp.c_proj.weight"] = w(block_key(i, "down")).T
        model.load_state_dict(weights)  # also checks every shape
        return model

    def to_gpt2_state_dict(self) -> dict:
        """This model's weights under Hugging Face GPT-2's names, for
        GPT2LMHeadModel.load_state_dict (with a GPT2Config of the same sizes).

        The tensors share storage with the model (clone them to keep a snapshot). lm_head.weight
        is included, as in GPT2LMHeadModel's own state dict. GPT-2 always has biases: a model
        built with bias=False gets zero biases, which compute exactly the same function.
        ValueError for a model with modern switches, which GPT-2's layout cannot hold.
        """
        if self.config.arch != GPT2 or self.config.d_ff not in (None, 4 * self.config.d_model) \
                or not self.config.tie_embeddings:
            raise ValueError(f"to_gpt2_state_dict: GPT-2's layout holds the GPT-2 switches only "
                             f"(Arch() and tied embeddings); this model has {self.config.arch}")
        state = dict(self.state_dict())  # our names are already GPT-2's
        for name, module in self.named_modules():
            if isinstance(module, (Linear, LayerNorm)) and module.bias is None:
                w = module.weight  # Linear (d_in, d_out), LayerNorm (d_model,): bias is (d_out,)
                state[f"{name}.bias"] = torch.zeros(w.shape[-1], dtype=w.dtype, device=w.device)
        return state


def load_gpt2_weights(model: nn.Module, state_dict) -> nn.Module:
    """Copy a GPT-2-format state dict into any nn.Module that names its parameters GPT-2's way.

    The loader for a GPT written from scratch (chapter 12): ``model`` may be ``GPT`` or any
    module whose ``state_dict()`` keys are GPT-2's (transformer.wte.weight, ...,
    transformer.h.{i}.attn.c_attn.weight, ...), with linear weights stored (d_in, d_out).
    state_dict: name -> tensor (or NumPy array), e.g. ``GPT.to_gpt2_state_dict()`` or Hugging
        Face's GPT2LMHeadModel.state_dict(). lm_head.weight is copied only if the model has
        such a parameter (a tied model usually does not); the attention-mask buffers are skipped.
    returns: the model, its parameters overwritten in place (in the model's dtype and device).

    KeyError naming the missing and unexpected keys, ValueError naming a shape that differs.
    """
    fn = "load_gpt2_weights"
    n_layer = check_gpt2_state_dict(fn, state_dict)
    own = model.state_dict()
    wanted = {k for k in own if k != "lm_head.weight" or "lm_head.weight" in state_dict}
    buffers = {f"transformer.h.{i}.{b}" for i in range(n_layer) for b in GPT2_BLOCK_BUFFERS}
    given = {k for k in state_dict if k not in buffers and (k != "lm_head.weight" or k in own)}
    missing, unexpected = sorted(given - wanted), sorted(wanted - given)
    if missing or unexpected:
        raise KeyError(f"{fn}: the model's parameter names are not GPT-2's: the weights have "
                       f"{missing} that the model lacks, and the model has {unexpected} that "
                       f"the weights lack")
    weights = {}
    for key in given:
        w = torch.as_tensor(state_dict[key])
        if tuple(w.shape) != tuple(own[key].shape):
            raise ValueError(f"{fn}: {key} is {tuple(own[key].shape)} in the model but "
                             f"{tuple(w.shape)} in the weights (linear weights are stored "
                             f"(d_in, d_out), as GPT-2's Conv1D does)")
        weights[key] = w
    with torch.no_grad():
        for key, w in weights.items():
            own[key].copy_(w)  # state_dict() tensors share storage with the parameters
    return model
