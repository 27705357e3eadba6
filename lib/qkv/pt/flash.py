"""Flash attention as Triton kernels: the tiled algorithm of qkv.np.flash on a GPU.

One program (a block of GPU threads) owns BLOCK_M rows of q for one (batch, head), walks the
keys BLOCK_N at a time keeping the running max m, sum l and output accumulator in registers,
and writes each output row and its logsumexp once (Dao et al. 2022; Dao 2023; Tillet et al.
2019 for Triton). The backward pass is two kernels: one per block of keys accumulates dk and
dv over the queries, one per block of queries accumulates dq over the keys; both recompute the
weights from the saved logsumexp.

Without a CUDA GPU the kernels run in Triton's interpreter (TRITON_INTERPRET=1), which executes
the same Python kernel with NumPy on the CPU: slow, but exact enough to test against PyTorch.
Triton reads TRITON_INTERPRET when it is imported (its own library functions, tl.max, tl.sum,
are kernels too), when it decorates a kernel, and while the interpreter runs one. So, with no
GPU, this module sets the variable around its import of triton, its kernel definitions and its
launches only, and restores it afterwards: nothing else in the process or its children sees it.
That needs triton not imported yet (torch._dynamo and transformers import it); if it was,
without the variable, importing this module raises ImportError saying so.
"""

import math
import os
import sys
from contextlib import contextmanager

import torch

from qkv._checks import check_float, check_min_ndim, check_same, shape_of

INTERPRETED = not torch.cuda.is_available()  # True: the kernels run on the CPU, in NumPy


@contextmanager
def _interpreter_without_cuda():
    """TRITON_INTERPRET=1 inside the block when there is no CUDA GPU; as before afterwards."""
    old = os.environ.get("TRITON_INTERPRET")
    if INTERPRETED:
        os.environ["TRITON_INTERPRET"] = "1"
    try:
        yield
    finally:
        if old is None:
            os.environ.pop("TRITON_INTERPRET", None)
        else:
            os.environ["TRITON_INTERPRET"] = old


LOG2E = 1.4426950408889634  # exp(x) = exp2(x * log2(e)): exp2 is the GPU's native instruction
DTYPES = (torch.float32, torch.float16, torch.bfloat16)
D_HEADS = (16, 32, 64, 128)  # tl.dot needs tiles of at least 16; one tile row must fit on chip

def _imported_compiled() -> bool:
    """True if triton was already imported for compiling (no interpreter) by someone else."""
    if "triton" not in sys.modules:
        return False
    from triton.runtime.jit import JITFunction

    return isinstance(sys.modules["triton"].language.standard.max, JITFunction)


if INTERPRETED and _imported_compiled():
    raise ImportError("qkv.pt.flash: there is no CUDA GPU, so the kernels need Triton's "
                      "interpreter, but triton was already imported without it; import "
                      "qkv.pt.flash before torch._dynamo or transformers, or set "
                      "TRITON_INTERPRET=1 before starting Python")

with _interpreter_without_cuda():
    import triton
    import triton.language as tl

    @triton.jit
    def _dot(a, b, PRECISION: tl.constexpr, WIDEN: tl.constexpr):
        # a @ b with float32 accumulation. WIDEN (interpreter and bfloat16 only): triton 3.9's
        # interpreter multiplies bfloat16 tiles as their raw 16-bit patterns, so widen them to
        # float32 first, which is exact; the GPU multiplies bfloat16 on its tensor cores.
        if WIDEN:
            return tl.dot(a.to(tl.float32), b.to(tl.float32), input_precision="ieee")
        return tl.dot(a, b, input_precision=PRECISION)

    @triton.jit
    def _flash_fwd(Q, K, V, O, LSE, seq_q, seq_k, qk_scale,
                   CAUSAL: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                   D_HEAD: tl.constexpr, PRECISION: tl.constexpr,
                   WIDEN: tl.constexpr):
        # Program (pid_m, bh): rows pid_m*BLOCK_M ... of head bh. Q, K, V, O are contiguous
        # (batch*n_head, seq, d_head); LSE is (batch*n_head, seq_q), base 2 (see below).
        pid_m = tl.program_id(0)
        bh = tl.program_id(1)
        offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)  # this program's query rows
        offs_n = tl.arange(0, BLOCK_N)  # key columns within one tile
        offs_d = tl.arange(0, D_HEAD)
        row_ok = offs_m < seq_q  # the last tile may stick out past seq_q
        q = tl.load(Q + bh * seq_q * D_HEAD + offs_m[:, None] * D_HEAD + offs_d[None, :],
                    mask=row_ok[:, None], other=0.0)  # (BLOCK_M, D_HEAD), stays in registers
        m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)  # running max (base-2 units)
        l_i = tl.zeros([BLOCK_M], tl.float32)  # running sum of exp2(s - m_i)
        acc = tl.zeros([BLOCK_M, D_HEAD], tl.float32)  # running sum of p @ v
        offset = seq_k - seq_q  # causal, bottom-right: query i sees keys <= i + offset
        end = seq_k
        if CAUSAL:  # skip every tile after the last key this program's last row sees
            end = tl.minimum(seq_k, (pid_m + 1) * BLOCK_M + offset)
        for start_n in range(0, end, BLOCK_N):
            cols = start_n + offs_n
            kv_ok = cols < seq_k
            k = tl.load(K + bh * seq_k * D_HEAD + cols[None, :] * D_HEAD + offs_d[:, None],
                        mask=kv_ok[None, :], other=0.0)  # (D_HEAD, BLOCK_N): k transposed
            s = _dot(q, k, PRECISION, WIDEN) * qk_scale  # (BLOCK_M, BLOCK_N)
            ok = kv_ok[None, :]
            if CAUSAL:
                ok = ok & (cols[None, :] <= offs_m[:, None] + offset)
            s = tl.where(ok, s, float("-inf"))
            m_new = tl.maximum(m_i, tl.max(s, 1))
            shift = tl.where(m_new == float("-inf"), 0.0, m_new)  # rows with no key so far
            p = tl.exp2(s - shift[:, None])  # this tile's weights against the new max
            alpha = tl.exp2(m_i - shift)  # rescales what was summed against the old max
            l_i = l_i * alpha + tl.sum(p, 1)
            v = tl.load(V + bh * seq_k * D_HEAD + cols[:, None] * D_HEAD + offs_d[None, :],
                        mask=kv_ok[:, None], other=0.0)  # (BLOCK_N, D_HEAD)
            acc = acc * alpha[:, None] + _dot(p.to(v.dtype), v, PRECISION, WIDEN)
            m_i = m_new
        seen = l_i > 0  # rows that saw at least one key; the others output zeros
        out = acc / tl.where(seen, l_i, 1.0)[:, None]  # divide once, at the end
        tl.store(O + bh * seq_q * D_HEAD + offs_m[:, None] * D_HEAD + offs_d[None, :],
                 out.to(O.dtype.element_ty), mask=row_ok[:, None])
        # +inf for a row with no key, so the backward's exp2(s - lse) is 0 there, not NaN.
        tl.store(LSE + bh * seq_q + offs_m, tl.where(seen, m_i + tl.log2(tl.where(seen, l_i, 1.0)),
                                                    float("inf")),
                 mask=row_ok)

    @triton.jit
    def _flash_bwd_dkdv(Q, K, V, DO, LSE, DELTA, DK, DV, seq_q, seq_k, qk_scale, sm_scale,
                        CAUSAL: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                        D_HEAD: tl.constexpr, PRECISION: tl.constexpr,
                        WIDEN: tl.constexpr):
        # Program (pid_n, bh): keys pid_n*BLOCK_N ... of head bh; loops over blocks of queries.
        pid_n = tl.program_id(0)
        bh = tl.program_id(1)
        offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        offs_m = tl.arange(0, BLOCK_M)
        offs_d = tl.arange(0, D_HEAD)
        kv_ok = offs_n < seq_k
        k = tl.load(K + bh * seq_k * D_HEAD + offs_n[:, None] * D_HEAD + offs_d[None, :],
                    mask=kv_ok[:, None], other=0.0)  # (BLOCK_N, D_HEAD)
        v = tl.load(V + bh * seq_k * D_HEAD + offs_n[:, None] * D_HEAD + offs_d[None, :],
                    mask=kv_ok[:, None], other=0.0)
        dk = tl.zeros([BLOCK_N, D_HEAD], tl.float32)
        dv = tl.zeros([BLOCK_N, D_HEAD], tl.float32)
        offset = seq_k - seq_q
        start = 0
        if CAUSAL:  # queries before (first key - offset) see none of these keys: skip them
            start = tl.maximum(pid_n * BLOCK_N - offset, 0) // BLOCK_M * BLOCK_M
        for start_m in range(start, seq_q, BLOCK_M):
            rows = start_m + offs_m
            row_ok = rows < seq_q
            q = tl.load(Q + bh * seq_q * D_HEAD + rows[:, None] * D_HEAD + offs_d[None, :],
                        mask=row_ok[:, None], other=0.0)  # (BLOCK_M, D_HEAD)
            do = tl.load(DO + bh * seq_q * D_HEAD + rows[:, None] * D_HEAD + offs_d[None, :],
                         mask=row_ok[:, None], other=0.0)
            lse = tl.load(LSE + bh * seq_q + rows, mask=row_ok, other=float("inf"))
            delta = tl.load(DELTA + bh * seq_q + rows, mask=row_ok, other=0.0)
            # Transposed tile (BLOCK_N, BLOCK_M), so dk and dv come out with keys as rows.
            s_t = _dot(k, tl.trans(q), PRECISION, WIDEN) * qk_scale
            p_t = tl.exp2(s_t - lse[None, :])  # the weights, recomputed: 0 where lse = +inf
            ok = kv_ok[:, None] & row_ok[None, :]
            if CAUSAL:
                ok = ok & (offs_n[:, None] <= rows[None, :] + offset)
            p_t = tl.where(ok, p_t, 0.0)
            dv += _dot(p_t.to(do.dtype), do, PRECISION, WIDEN)  # dv = p^T dout
            dp_t = _dot(v, tl.trans(do), PRECISION, WIDEN)  # (dout v^T)^T
            ds_t = p_t * (dp_t - delta[None, :])  # softmax backward with D = rowsum(dout*out)
            dk += _dot(ds_t.to(q.dtype), q, PRECISION, WIDEN)  # dk = ds^T q
        tl.store(DK + bh * seq_k * D_HEAD + offs_n[:, None] * D_HEAD + offs_d[None, :],
                 (dk * sm_scale).to(DK.dtype.element_ty), mask=kv_ok[:, None])
        tl.store(DV + bh * seq_k * D_HEAD + offs_n[:, None] * D_HEAD + offs_d[None, :],
                 dv.to(DV.dtype.element_ty), mask=kv_ok[:, None])

    @triton.jit
    def _flash_bwd_dq(Q, K, V, DO, LSE, DELTA, DQ, seq_q, seq_k, qk_scale, sm_scale,
                      CAUSAL: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                      D_HEAD: tl.constexpr, PRECISION: tl.constexpr,
                      WIDEN: tl.constexpr):
        # Program (pid_m, bh): the same walk over keys as the forward, accumulating dq.
        pid_m = tl.program_id(0)
        bh = tl.program_id(1)
        offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        offs_n = tl.arange(0, BLOCK_N)
        offs_d = tl.arange(0, D_HEAD)
        row_ok = offs_m < seq_q
        q = tl.load(Q + bh * seq_q * D_HEAD + offs_m[:, None] * D_HEAD + offs_d[None, :],
                    mask=row_ok[:, None], other=0.0)
        do = tl.load(DO + bh * seq_q * D_HEAD + offs_m[:, None] * D_HEAD + offs_d[None, :],
                     mask=row_ok[:, None], other=0.0)
        lse = tl.load(LSE + bh * seq_q + offs_m, mask=row_ok, other=float("inf"))
        delta = tl.load(DELTA + bh * seq_q + offs_m, mask=row_ok, other=0.0)
        dq = tl.zeros([BLOCK_M, D_HEAD], tl.float32)
        offset = seq_k - seq_q
        end = seq_k
        if CAUSAL:
            end = tl.minimum(seq_k, (pid_m + 1) * BLOCK_M + offset)
        for start_n in range(0, end, BLOCK_N):
            cols = start_n + offs_n
            kv_ok = cols < seq_k
            k = tl.load(K + bh * seq_k * D_HEAD + cols[:, None] * D_HEAD + offs_d[None, :],
                        mask=kv_ok[:, None], other=0.0)  # (BLOCK_N, D_HEAD)
            v = tl.load(V + bh * seq_k * D_HEAD + cols[:, None] * D_HEAD + offs_d[None, :],
                        mask=kv_ok[:, None], other=0.0)
            s = _dot(q, tl.trans(k), PRECISION, WIDEN) * qk_scale
            ok = kv_ok[None, :] & row_ok[:, None]
            if CAUSAL:
                ok = ok & (cols[None, :] <= offs_m[:, None] + offset)
            p = tl.where(ok, tl.exp2(s - lse[:, None]), 0.0)  # (BLOCK_M, BLOCK_N)
            dp = _dot(do, tl.trans(v), PRECISION, WIDEN)
            ds = p * (dp - delta[:, None])
            dq += _dot(ds.to(k.dtype), k, PRECISION, WIDEN)  # dq = ds k
        tl.store(DQ + bh * seq_q * D_HEAD + offs_m[:, None] * D_HEAD + offs_d[None, :],
                 (dq * sm_scale).to(DQ.dtype.element_ty), mask=row_ok[:, None])


def _check(q, k, v, block_q, block_k):
    """All input checks of flash_attention; returns (lead dims, seq_q, seq_k, d_head)."""
    fn = "flash_attention"
    for name, t in (("q", q), ("k", k), ("v", v)):
        check_float(fn, name, t)
        if t.dtype not in DTYPES:
            raise ValueError(f"{fn}: {name} must be float32, float16 or bfloat16 (the kernel's "
                             f"dtypes); got dtype {t.dtype}")
    check_min_ndim(fn, "q", q, 2, "(..., seq_q, d_head)")
    check_min_ndim(fn, "k", k, 2, "(..., seq_k, d_head)")
    check_min_ndim(fn, "v", v, 2, "(..., seq_k, d_head)")
    check_same(fn, "d_head", "q", q, -1, "k", k, -1)
    check_same(fn, "d_head", "k", k, -1, "v", v, -1)
    check_same(fn, "seq_k", "k", k, -2, "v", v, -2)
    if not (q.dtype == k.dtype == v.dtype and q.device == k.device == v.device):
        raise ValueError(f"{fn}: q, k and v must share one dtype and device; got "
                         f"{q.dtype}/{q.device}, {k.dtype}/{k.device}, {v.dtype}/{v.device}")
    if not (shape_of(q)[:-2] == shape_of(k)[:-2] == shape_of(v)[:-2]):
        raise ValueError(f"{fn}: q, k and v must have the same leading (batch, n_head) dims; "
                         f"got q {shape_of(q)}, k {shape_of(k)} and v {shape_of(v)}")
    d_head = q.shape[-1]
    if d_head not in D_HEADS:
        raise ValueError(f"{fn}: d_head must be one of {D_HEADS}; got q {shape_of(q)}")
    for name, block in (("block_q", block_q), ("block_k", block_k)):
        if (isinstance(block, bool) or not isinstance(block, int) or block < 16
                or block & (block - 1)):
            raise ValueError(f"{fn}: {name} must be a power of two >= 16 (a Triton tile); "
                             f"got {block!r}")
    if q.device.type != "cuda" and not INTERPRETED:
        raise ValueError(f"{fn}: with a CUDA GPU present the kernel runs on CUDA tensors; "
                         f"got q on {q.device}")
    return shape_of(q)[:-2], q.shape[-2], k.shape[-2], d_head


class FlashAttention(torch.autograd.Function):
    """Autograd wrapper: forward launches _flash_fwd, backward _flash_bwd_dkdv and _flash_bwd_dq.

    Tensors inside are (batch*n_head, seq, d_head), contiguous.
    """

    @staticmethod
    def forward(ctx, q, k, v, causal, block_q, block_k):
        bh, seq_q, d_head = q.shape
        seq_k = k.shape[1]
        out = torch.empty_like(q)
        lse = torch.empty(bh, seq_q, device=q.device, dtype=torch.float32)
        precision = "ieee" if q.dtype == torch.float32 else "tf32"  # float32 stays float32
        widen = INTERPRETED and q.dtype == torch.bfloat16
        scale = 1.0 / math.sqrt(d_head)
        grid = (triton.cdiv(seq_q, block_q), bh)
        with _interpreter_without_cuda():
            _flash_fwd[grid](q, k, v, out, lse, seq_q, seq_k, scale * LOG2E, CAUSAL=causal,
                             BLOCK_M=block_q, BLOCK_N=block_k, D_HEAD=d_head,
                             PRECISION=precision, WIDEN=widen)
        ctx.save_for_backward(q, k, v, out, lse)
        ctx.meta = (causal, block_q, block_k, precision, widen)
        return out

    @staticmethod
    def backward(ctx, dout):
        q, k, v, out, lse = ctx.saved_tensors
        causal, block_q, block_k, precision, widen = ctx.meta
        bh, seq_q, d_head = q.shape
        seq_k = k.shape[1]
        dout = dout.contiguous()
        # D = rowsum(dout * out) = rowsum(dp * p): the softmax backward's row sum, in one pass.
        delta = (dout.float() * out.float()).sum(-1)  # (batch*n_head, seq_q)
        dq, dk, dv = torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)
        scale = 1.0 / math.sqrt(d_head)
        meta = dict(CAUSAL=causal, BLOCK_M=block_q, BLOCK_N=block_k, D_HEAD=d_head,
                    PRECISION=precision, WIDEN=widen)
        with _interpreter_without_cuda():
            _flash_bwd_dkdv[(triton.cdiv(seq_k, block_k), bh)](
                q, k, v, dout, lse, delta, dk, dv, seq_q, seq_k, scale * LOG2E, scale, **meta)
            _flash_bwd_dq[(triton.cdiv(seq_q, block_q), bh)](
                q, k, v, dout, lse, delta, dq, seq_q, seq_k, scale * LOG2E, scale, **meta)
        return dq, dk, dv, None, None, None


def flash_attention(q, k, v, causal=False, block_q=64, block_k=64):
    """softmax(q k^T / sqrt(d_head)) @ v by the Triton flash-attention kernels, differentiable.

    q: (..., seq_q, d_head), k: (..., seq_k, d_head), v: (..., seq_k, d_head)
    causal: bottom-right aligned, as qkv's causal_mask (for seq_q == seq_k the usual one)
    block_q, block_k: tile sizes, powers of two >= 16
    returns: out (..., seq_q, d_head), dtype and device of q

    Same leading dims for q, k and v (no broadcasting); dtype float32, float16 or bfloat16;
    d_head 16, 32, 64 or 128. On CUDA tensors with a GPU; on the CPU through Triton's
    interpreter when no GPU is present (for tests: tiny shapes, it is slow). A query that sees no
    key gets zeros. Equal to qkv.np.flash_attention and to scaled_dot_product_attention.
    """
    lead, seq_q, seq_k, d_head = _check(q, k, v, block_q, block_k)

    def flat(t, seq):  # (..., seq, d_head) -> (batch*n_head, seq, d_head), contiguous
        return t.reshape(-1, seq, d_head).contiguous()

    out = FlashAttention.apply(flat(q, seq_q), flat(k, seq_k), flat(v, seq_k), bool(causal),
                               block_q, block_k)
    return out.reshape(*lead, seq_q, d_head)  # (..., seq_q, d_head)
