"""float32 Grams (the GPU default) in the block Krylov SVD: the rank-k error stays within 1.005× of the optimum."""

from __future__ import annotations

import math

import pytest
import torch

from loratools.linalg import gram_dtype, randomized_svd


def _cases(m: int = 768, n: int = 512) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    u, _ = torch.linalg.qr(torch.randn(m, 128, generator=g))
    v, _ = torch.linalg.qr(torch.randn(n, 128, generator=g))
    s = (torch.arange(128, dtype=torch.float32) + 1) ** -0.8
    return {"decay+noise": torch.randn(m, n, generator=g) * (0.005 / math.sqrt(m)) + (u * s) @ v.T,
            "flat": torch.randn(m, n, generator=g)}


def _ratio(a: torch.Tensor, k: int, gram: torch.dtype, device: str = "cpu") -> float:
    sv = torch.linalg.svdvals(a.double())
    u, s, vh = randomized_svd(a.to(device), k, n_iter=6, seed=0, gram=gram)
    err = (a.double() - (u.double().cpu() * s.double().cpu()) @ vh.double().cpu()).norm()
    return float(err) / float(sv[k:].square().sum().sqrt())


@pytest.mark.parametrize("k", [16, 32])
def test_float32_gram_error_within_optimum(k):
    for name, a in _cases().items():
        r32, r64 = _ratio(a, k, torch.float32), _ratio(a, k, torch.float64)
        assert r32 <= 1.005, (name, r32)
        assert abs(r32 - r64) <= 1e-4, (name, r32, r64)  # as good as the float64 Gram


def test_gram_dtype_choice(monkeypatch):
    monkeypatch.delenv("LORATOOLS_GRAM_DTYPE", raising=False)
    assert gram_dtype(torch.device("cpu")) == torch.float64  # the CPU default is unchanged
    assert gram_dtype(torch.device("cuda", 0)) == torch.float32
    monkeypatch.setenv("LORATOOLS_GRAM_DTYPE", "float32")
    assert gram_dtype(torch.device("cpu")) == torch.float32


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_cuda_default_gram_error_within_optimum():
    for a in _cases().values():
        assert _ratio(a, 32, None, "cuda") <= 1.005
