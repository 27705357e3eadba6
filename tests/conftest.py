"""Shared pytest setup for the qkv library tests.

- ``@pytest.mark.cuda`` tests (and the "cuda" value of the ``device`` fixture) are skipped with
  a clear reason when torch sees no CUDA GPU, so the suite passes on CPU-only machines.
- ``device``: runs a test once on "cpu" and once on "cuda".
- ``block_params``: a factory for random decoder-block weights (NumPy float64), with non-trivial
  biases and layer-norm scales so every parameter matters in a comparison; ``torchify`` turns
  such a (nested) dict into torch tensors.
- ``backend`` (qkv.np, qkv.pt) and ``impl`` (qkv.np, qkv.pt naive, qkv.pt fused): run one test
  body on each, through the small ``Backend`` adapter.
"""

import numpy as np
import pytest
import torch

CUDA = torch.cuda.is_available()
DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.cuda)]


def pytest_runtest_setup(item):
    if item.get_closest_marker("cuda") is not None and not CUDA:
        pytest.skip("needs a CUDA GPU: torch.cuda.is_available() is False")


@pytest.fixture(params=DEVICES)
def device(request):
    return torch.device(request.param)


def random_block_params(rng: np.random.Generator, d_model: int, d_ff: int | None = None) -> dict:
    """Random float64 parameters for one decoder block (keys as qkv's decoder_block expects)."""
    d_ff = 4 * d_model if d_ff is None else d_ff

    def w(*shape, scale=None):
        return rng.normal(0.0, scale or 1.0 / np.sqrt(shape[0]), size=shape)

    return dict(
        ln1_gamma=1.0 + 0.1 * rng.normal(size=d_model), ln1_beta=0.1 * rng.normal(size=d_model),
        w_qkv=w(d_model, 3 * d_model), b_qkv=0.1 * rng.normal(size=3 * d_model),
        w_out=w(d_model, d_model), b_out=0.1 * rng.normal(size=d_model),
        ln2_gamma=1.0 + 0.1 * rng.normal(size=d_model), ln2_beta=0.1 * rng.normal(size=d_model),
        w_fc=w(d_model, d_ff), b_fc=0.1 * rng.normal(size=d_ff),
        w_proj=w(d_ff, d_model), b_proj=0.1 * rng.normal(size=d_model),
    )


@pytest.fixture
def block_params():
    return random_block_params


def to_torch(params, dtype=torch.float64, device="cpu"):
    """A (nested) dict/list of NumPy arrays -> the same structure of torch tensors."""
    if isinstance(params, dict):
        return {k: to_torch(v, dtype, device) for k, v in params.items()}
    if isinstance(params, list):
        return [to_torch(v, dtype, device) for v in params]
    return None if params is None else torch.as_tensor(params, dtype=dtype, device=device)


@pytest.fixture
def torchify():
    return to_torch


class Backend:
    """One of qkv's two backends plus the glue a test needs to feed it and read it back.

    ``kw`` holds the extra keyword for attention functions: {"fused": ...} for qkv.pt.
    """

    def __init__(self, name, fused=False):
        import qkv.np
        import qkv.pt

        self.name, self.fused = name, fused
        self.lib = qkv.np if name == "np" else qkv.pt
        self.kw = {} if name == "np" else {"fused": fused}

    def array(self, x, dtype=None):
        """A nested list / NumPy array -> this backend's array (same dtype unless told)."""
        a = np.asarray(x)
        if dtype is not None:
            a = a.astype(dtype)
        return a if self.name == "np" else torch.from_numpy(a)

    def numpy(self, x):
        return np.asarray(x) if self.name == "np" else x.detach().cpu().numpy()


@pytest.fixture(params=["np", "pt"])
def backend(request):
    """Each backend once (qkv.pt on its naive path)."""
    return Backend(request.param)


@pytest.fixture(params=[("np", False), ("pt", False), ("pt", True)],
                ids=["np", "pt-naive", "pt-fused"])
def impl(request):
    """qkv.np, qkv.pt's naive path and qkv.pt's fused path."""
    return Backend(*request.param)
