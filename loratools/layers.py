"""Structured canonical layers: LoHa, LoKr and Tucker LoCon (LyCORIS and PEFT), with exact factors.

Every layer hands out exact low-rank factors ``(L, R)`` with ``ΔW_2d = L @ R.T`` (``ΔW_2d`` is the
delta flattened to ``[out, in·kh·kw]``) without ever forming the ``m×n`` delta:

* **Tucker branch** (``lora_mid``, ``hada_t1/t2``, ``lokr_t2``): ``ΔW[o, c, k] = Σ_ij t[i, j, k] a[i, o] b[j, c]``
  is ``aᵀ · M`` with ``M[i, (c, k)] = Σ_j t[i, j, k] b[j, c]`` (r × in·kh·kw, contracted through the core),
  so ``L = aᵀ`` and ``R = Mᵀ``.
* **LoHa**: ``ΔW = s · (L₁R₁ᵀ) ⊙ (L₂R₂ᵀ) = s · (L₁ • L₂)(R₁ • R₂)ᵀ`` — the face-splitting identity, ``•`` the
  row-wise Khatri–Rao product (``(L₁ • L₂)[o, (i, j)] = L₁[o, i] L₂[o, j]``), so the structural rank is ≤ r₁r₂.
* **LoKr**: ``ΔW_2d = s · kron(W₁, W₂_2d)`` (LyCORIS's layout ``ΔW[a·out_k + b, c·in_n + d, …] = w1[a, c] w2[b, d, …]``
  is exactly the 2-D Kronecker product of ``W₁`` with ``W₂`` flattened to ``[out_k, in_n·kh·kw]``). With
  ``Wᵢ = Uᵢ Σᵢ Vᵢᵀ`` (thin SVDs of the two *small* factors), ``kron(W₁, W₂) = kron(U₁, U₂) kron(Σ₁, Σ₂) kron(V₁, V₂)ᵀ``
  is itself an SVD: the singular values are the products ``σᵢ(W₁)·σⱼ(W₂)``, and the factors are Kronecker
  products of the small ones (``m × r₁r₂``; ``kron(W₁, W₂)`` itself is never built).

``scale`` is always the scale the source library's *forward pass* applies (LyCORIS ``alpha/dim`` with the LoKr
both-full case at 1 and ``alpha = 0 → dim``; PEFT ``alpha/r`` from the config), already resolved by the reader.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import torch

from loratools.adapter import Layer
from loratools.errors import LoraToolsError
from loratools.linalg import (
    Svd,
    compute_dtype,
    factored_svd,
    factored_svdvals,
    gram_svd,
    khatri_rao_gram,
    kron_svd,
    svd,
    svdvals,
)

Factors = tuple[torch.Tensor, torch.Tensor]


def tucker_factors(core: torch.Tensor, a: torch.Tensor, b: torch.Tensor, dtype: torch.dtype) -> Factors:
    """Exact factors of a Tucker branch ``ΔW[o, c, k] = Σ_ij core[i, j, k] a[i, o] b[j, c]``.

    a: [r_i, out]; b: [r_j, in] (trailing 1x1 dims allowed); core: [r_i, r_j, *kernel].
    Returns ``L = aᵀ`` [out, r_i] and ``R`` [in·∏kernel, r_i] with ``R[(c, k), i] = Σ_j core[i, j, k] b[j, c]``.
    """
    a2 = a.reshape(a.shape[0], -1).to(dtype)
    b2 = b.reshape(b.shape[0], -1).to(dtype)
    m = torch.einsum("ij...,jc->ic...", core.to(dtype), b2)  # [r_i, in, *kernel]
    return a2.T, m.reshape(m.shape[0], -1).T


def khatri_rao_rows(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Row-wise Khatri–Rao (face-splitting) product: ``out[p, (i, j)] = x[p, i] · y[p, j]``."""
    return (x[:, :, None] * y[:, None, :]).reshape(x.shape[0], x.shape[1] * y.shape[1])


def _cap(k: int, shape: tuple[int, ...]) -> int:
    m, n = shape[0], math.prod(shape[1:])
    return min(k, m, n)


class _Structured(Layer):
    """Common behaviour of the structured layers: shape from the reader, dtype of the first factor."""

    out_shape: tuple[int, ...]
    scale: float
    alpha: float | None
    dim: int

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(self.out_shape)

    @property
    def dtype(self) -> torch.dtype:
        return next(iter(self.tensors().values())).dtype

    @property
    def effective_alpha(self) -> float | None:
        return self.alpha

    def set_shape(self, shape: tuple[int, ...]) -> None:
        """Give a flattened conv layer its kernel shape (known only from the base weight)."""
        shape = tuple(int(s) for s in shape)
        if math.prod(shape) != math.prod(self.out_shape) or shape[0] != self.out_shape[0]:
            raise LoraToolsError(f"layer shape {self.out_shape} does not fit base weight shape {shape}")
        self.out_shape = shape

    def svd(self, dtype: torch.dtype = torch.float32, keep: int | None = None) -> Svd:
        """Exact thin SVD of ΔW_2d from the factors (QR + small SVD); the top ``keep`` triplets."""
        u, s, vh = factored_svd(*self.factors(dtype))
        return (u, s, vh) if keep is None else (u[:, :keep], s[:keep], vh[:keep])

    def singular_values(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        return factored_svdvals(*self.factors(dtype))


@dataclass(eq=False)
class TuckerLoraLayer(_Structured):
    """LyCORIS LoCon with a Tucker core: ``ΔW = scale · Σ_ij mid[i, j, k] up[o, i] down[j, c]``.

    down: [r, in, 1, 1]; mid: [r, r, kh, kw]; up: [out, r, 1, 1].
    """

    down: torch.Tensor
    mid: torch.Tensor
    up: torch.Tensor
    scale: float = 1.0
    alpha: float | None = None
    magnitude: torch.Tensor | None = None
    magnitude_axis: str = "out"
    meta: dict[str, Any] = field(default_factory=dict)

    kind = "lora"

    def __post_init__(self) -> None:
        r = self.down.shape[0]
        if self.mid.dim() < 3 or tuple(self.mid.shape[:2]) != (self.up.shape[1], r):
            raise LoraToolsError(
                f"Tucker core lora_mid {tuple(self.mid.shape)} does not fit lora_up {tuple(self.up.shape)} "
                f"and lora_down {tuple(self.down.shape)} (expected [{self.up.shape[1]}, {r}, kh, kw])"
            )
        self.dim = int(r)
        self.out_shape = (int(self.up.shape[0]), int(self.down.shape[1]), *map(int, self.mid.shape[2:]))

    @property
    def rank(self) -> int:
        return _cap(int(self.up.shape[1]), self.shape)

    def factors(self, dtype: torch.dtype = torch.float32) -> Factors:
        # ΔW[o, c, k] = Σ_ij mid[i, j, k] up[o, i] down[j, c]: a Tucker branch with a = upᵀ
        up = self.up.reshape(self.up.shape[0], -1)
        left, right = tucker_factors(self.mid, up.T, self.down, dtype)
        return left * self.scale, right

    def tensors(self) -> dict[str, torch.Tensor]:
        out = {"lora_down": self.down, "lora_mid": self.mid, "lora_up": self.up}
        if self.magnitude is not None:
            out["magnitude"] = self.magnitude
        return out


@dataclass(eq=False)
class LohaLayer(_Structured):
    """LoHa: ``ΔW = scale · (w1a @ w1b) ⊙ (w2a @ w2b)`` (or the Hadamard product of two Tucker branches).

    Plain: w*a [out, r], w*b [r, in·kh·kw]. Tucker: t* [r, r, kh, kw], w*a [r, out], w*b [r, in].
    ``out_shape`` is the weight shape the delta is reshaped to (a flattened conv until resolved).
    """

    w1a: torch.Tensor
    w1b: torch.Tensor
    w2a: torch.Tensor
    w2b: torch.Tensor
    out_shape: tuple[int, ...]
    t1: torch.Tensor | None = None
    t2: torch.Tensor | None = None
    scale: float = 1.0
    alpha: float | None = None
    magnitude: torch.Tensor | None = None
    magnitude_axis: str = "out"
    meta: dict[str, Any] = field(default_factory=dict)

    kind = "loha"

    def __post_init__(self) -> None:
        self.dim = int(self.w1b.shape[0])

    @property
    def tucker(self) -> bool:
        return self.t1 is not None

    def _branches(self, dtype: torch.dtype) -> tuple[Factors, Factors]:
        if self.tucker:
            return (tucker_factors(self.t1, self.w1a, self.w1b, dtype),
                    tucker_factors(self.t2, self.w2a, self.w2b, dtype))
        return ((self.w1a.to(dtype), self.w1b.reshape(self.w1b.shape[0], -1).to(dtype).T),
                (self.w2a.to(dtype), self.w2b.reshape(self.w2b.shape[0], -1).to(dtype).T))

    @property
    def rank(self) -> int:
        r1 = self.w1b.shape[0]
        r2 = self.w2b.shape[0]
        return _cap(int(r1 * r2), self.shape)

    def factors(self, dtype: torch.dtype = torch.float32) -> Factors:
        (l1, r1), (l2, r2) = self._branches(dtype)
        return khatri_rao_rows(l1, l2) * self.scale, khatri_rao_rows(r1, r2)

    def _grams(self, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor] | None:
        """Float64 Grams of the two Khatri–Rao factors (None when r₁r₂ ≥ min(m, n): dense is cheaper)."""
        (l1, r1), (l2, r2) = self._branches(dtype)
        m, n = self.matrix_shape
        if l1.shape[1] * l2.shape[1] >= min(m, n):
            return None
        return khatri_rao_gram(l1, l2) * self.scale**2, khatri_rao_gram(r1, r2)

    def delta(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """Dense ΔW the way LyCORIS builds it: ``s · (L₁R₁ᵀ) ⊙ (L₂R₂ᵀ)`` (2·m·n·r flops, not m·n·r²)."""
        (l1, r1), (l2, r2) = self._branches(dtype)
        return ((l1 @ r1.T) * (l2 @ r2.T) * self.scale).reshape(self.shape)

    def svd(self, dtype: torch.dtype = torch.float32, keep: int | None = None) -> Svd:
        """Exact SVD of the r₁r₂-column Khatri–Rao factors through float64 Grams (:func:`linalg.gram_svd`)."""
        u, s, vh = gram_svd(*self.factors(dtype), grams=self._grams(dtype))
        return (u, s, vh) if keep is None else (u[:, :keep], s[:keep], vh[:keep])

    def singular_values(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        grams = self._grams(dtype)
        if grams is None:
            return gram_svd(*self.factors(dtype), compute_uv=False)
        return gram_svd(None, None, compute_uv=False, grams=grams).to(compute_dtype(dtype))

    def tensors(self) -> dict[str, torch.Tensor]:
        out = {"hada_w1_a": self.w1a, "hada_w1_b": self.w1b, "hada_w2_a": self.w2a, "hada_w2_b": self.w2b}
        if self.tucker:
            out.update(hada_t1=self.t1, hada_t2=self.t2)
        if self.magnitude is not None:
            out["magnitude"] = self.magnitude
        return out


@dataclass(eq=False)
class LokrLayer(_Structured):
    """LoKr: ``ΔW_2d = scale · kron(W₁, W₂_2d)``.

    W₁ = ``w1`` [out_l, in_m] or ``w1a @ w1b``; W₂ = ``w2`` [out_k, in_n(, kh, kw)], ``w2a @ w2b``
    ([out_k, r] @ [r, in_n·kh·kw]) or the Tucker branch ``t2`` [r, r, kh, kw], ``w2a`` [r, out_k], ``w2b`` [r, in_n].
    """

    out_shape: tuple[int, ...]
    w1: torch.Tensor | None = None
    w1a: torch.Tensor | None = None
    w1b: torch.Tensor | None = None
    w2: torch.Tensor | None = None
    w2a: torch.Tensor | None = None
    w2b: torch.Tensor | None = None
    t2: torch.Tensor | None = None
    scale: float = 1.0
    alpha: float | None = None
    dim: int = 0
    magnitude: torch.Tensor | None = None
    magnitude_axis: str = "out"
    meta: dict[str, Any] = field(default_factory=dict)

    kind = "lokr"

    def _w1_factors(self, dtype: torch.dtype) -> Factors | None:
        if self.w1 is not None:
            return None
        return self.w1a.to(dtype), self.w1b.to(dtype).T

    def _w2_factors(self, dtype: torch.dtype) -> Factors | None:
        if self.w2 is not None:
            return None
        if self.t2 is not None:
            return tucker_factors(self.t2, self.w2a, self.w2b, dtype)
        return self.w2a.to(dtype), self.w2b.reshape(self.w2b.shape[0], -1).to(dtype).T

    def _side_svd(self, dense: torch.Tensor | None, fac: Factors | None, dtype: torch.dtype) -> Svd:
        if fac is not None:
            u, s, vh = factored_svd(*fac)
        else:
            u, s, vh = svd(dense.reshape(dense.shape[0], -1).to(dtype))
        keep = int((s > 0).sum())
        return u[:, :keep].to(dtype), s[:keep].to(dtype), vh[:keep].to(dtype)

    def small_svds(self, dtype: torch.dtype = torch.float32) -> tuple[Svd, Svd]:
        """Thin SVDs of W₁ and W₂_2d (small matrices, or their factors)."""
        return (self._side_svd(self.w1, self._w1_factors(dtype), dtype),
                self._side_svd(self.w2, self._w2_factors(dtype), dtype))

    @property
    def rank(self) -> int:
        def side(dense: torch.Tensor | None, a: torch.Tensor | None, b: torch.Tensor | None, t=None) -> int:
            if dense is not None:
                return min(dense.shape[0], math.prod(dense.shape[1:]))
            return int(t.shape[0]) if t is not None else int(a.shape[1])

        return _cap(side(self.w1, self.w1a, self.w1b) * side(self.w2, self.w2a, self.w2b, self.t2), self.shape)

    def delta(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """Dense ΔW = s · kron(W₁, W₂_2d), reshaped to the weight shape."""
        w1 = self.w1.to(dtype) if self.w1 is not None else self.w1a.to(dtype) @ self.w1b.to(dtype)
        if self.w2 is not None:
            w2 = self.w2.reshape(self.w2.shape[0], -1).to(dtype)
        else:
            left, right = self._w2_factors(dtype)
            w2 = left @ right.T
        return (torch.kron(w1.contiguous(), w2.contiguous()) * self.scale).reshape(self.shape)

    def factors(self, dtype: torch.dtype = torch.float32) -> Factors:
        """``L = kron(U₁Σ₁, U₂Σ₂)·scale``, ``R = kron(V₁, V₂)``: exact, m × (r₁r₂)."""
        (u1, s1, vh1), (u2, s2, vh2) = self.small_svds(dtype)
        left = torch.kron((u1 * s1).contiguous(), (u2 * s2).contiguous()) * self.scale
        right = torch.kron(vh1.T.contiguous(), vh2.T.contiguous())
        return left, right

    def svd(self, dtype: torch.dtype = torch.float32, keep: int | None = None) -> Svd:
        """Exact SVD through the Kronecker identity; only the top ``keep`` triplets are built."""
        u, s, vh = kron_svd(*self.small_svds(dtype), keep=keep)
        if self.scale < 0:
            u = -u
        return u, s * abs(self.scale), vh

    def _side_values(self, dense: torch.Tensor | None, fac: Factors | None, dtype: torch.dtype) -> torch.Tensor:
        if fac is not None:
            return factored_svdvals(*fac)
        return svdvals(dense.reshape(dense.shape[0], -1).to(dtype))

    def singular_values(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        s1 = self._side_values(self.w1, self._w1_factors(dtype), dtype)
        s2 = self._side_values(self.w2, self._w2_factors(dtype), dtype)
        return torch.outer(s1, s2).reshape(-1).sort(descending=True).values * abs(self.scale)

    def tensors(self) -> dict[str, torch.Tensor]:
        names = {"lokr_w1": self.w1, "lokr_w1_a": self.w1a, "lokr_w1_b": self.w1b, "lokr_w2": self.w2,
                 "lokr_w2_a": self.w2a, "lokr_w2_b": self.w2b, "lokr_t2": self.t2, "magnitude": self.magnitude}
        return {k: v for k, v in names.items() if v is not None}


def exact_svd(layer: Layer, dtype: torch.dtype = torch.float32, keep: int | None = None) -> Svd:
    """Exact thin SVD of any layer's ΔW_2d without the dense delta (LoKr: only ``keep`` triplets built)."""
    if isinstance(layer, _Structured):
        return layer.svd(dtype, keep=keep)
    u, s, vh = factored_svd(*layer.factors(dtype))
    if keep is not None:
        u, s, vh = u[:, :keep], s[:keep], vh[:keep]
    return u, s, vh


def spectrum(layer: Layer, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Exact singular values of any layer (LoKr: products σᵢ(W₁)σⱼ(W₂), no big matrix at all)."""
    fn = getattr(layer, "singular_values", None)
    if fn is not None:
        return fn(dtype)
    return factored_svdvals(*layer.factors(dtype))
