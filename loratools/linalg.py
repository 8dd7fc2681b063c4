"""All singular value decompositions of loratools live here (DESIGN.md §4).

* :func:`factored_svd` — exact SVD of ``L @ R.T`` from the thin factors, never forming the product:
  ``L = Q_L R_L``, ``R = Q_R R_R`` (thin QR), ``C = R_L R_Rᵀ`` (k×k), ``C = U_c Σ V_cᵀ``, so
  ``L Rᵀ = (Q_L U_c) Σ (Q_R V_c)ᵀ``. Cost O((m+n)k² + k³) instead of O(mn·min(m, n)).
* :func:`randomized_svd` — randomized block Krylov SVD (Halko, Martinsson & Tropp 2011), for dense differences.
* :class:`RankRule` — the rank rules shared by extract, resize, merge and convert.
* :func:`lora_from_svd` — turns truncated ``U Σ Vᵀ`` back into a LoRA layer (balanced √Σ split).
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable
from dataclasses import dataclass

import torch

from loratools.adapter import LoraLayer, lora_scale
from loratools.errors import LoraToolsError

Svd = tuple[torch.Tensor, torch.Tensor, torch.Tensor]


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """SVD kernels exist for float32/float64 only: upcast half precision, keep float64."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def svd(matrix: torch.Tensor) -> Svd:
    """Thin exact SVD (never ``full_matrices=True``), upcast to float32 or better."""
    a = matrix.to(compute_dtype(matrix.dtype))
    return torch.linalg.svd(a, full_matrices=False)


def factored_norm2(left: torch.Tensor, right: torch.Tensor) -> float:
    """‖L Rᵀ‖_F² = Σ (LᵀL) ⊙ (RᵀR), in float64, without forming the m×n product."""
    left, right = left.double(), right.double()
    return max(float(((left.T @ left) * (right.T @ right)).sum()), 0.0)


def factored_svd(left: torch.Tensor, right: torch.Tensor) -> Svd:
    """Exact thin SVD of ``left @ right.T`` without forming it.

    Args:
        left: [m, k]; right: [n, k]. Any k, including k > min(m, n) and rank-deficient factors.

    Returns:
        ``U`` [m, p], ``S`` [p] (descending), ``Vh`` [p, n] with p = min(m, n, k) and
        ``left @ right.T == U @ diag(S) @ Vh`` to working precision.
    """
    m, k = left.shape
    n = right.shape[0]
    if right.shape[1] != k:
        raise LoraToolsError(f"factor inner dimensions differ: left {tuple(left.shape)}, right {tuple(right.shape)}")
    if k >= min(m, n):
        # the factors are no thinner than the matrix: the dense product is the cheaper route
        return svd(left @ right.T)
    q_l, r_l = torch.linalg.qr(left)
    q_r, r_r = torch.linalg.qr(right)
    u_c, s, vh_c = torch.linalg.svd(r_l @ r_r.T, full_matrices=False)
    return q_l @ u_c, s, vh_c @ q_r.T


def svdvals(matrix: torch.Tensor) -> torch.Tensor:
    """Singular values only (no vectors), upcast to float32 or better."""
    return torch.linalg.svdvals(matrix.to(compute_dtype(matrix.dtype)))


def factored_svdvals(left: torch.Tensor, right: torch.Tensor) -> torch.Tensor:
    """Singular values of ``left @ right.T`` only: triangular QR factors (no Q formed) + small ``svdvals``.

    ``L = Q_L R_L``, ``R = Q_R R_R`` ⇒ ``L Rᵀ = Q_L (R_L R_Rᵀ) Q_Rᵀ`` has the singular values of the k×k
    ``R_L R_Rᵀ``. Falls back to the dense product when k ≥ min(m, n).
    """
    m, k = left.shape
    n = right.shape[0]
    if right.shape[1] != k:
        raise LoraToolsError(f"factor inner dimensions differ: left {tuple(left.shape)}, right {tuple(right.shape)}")
    if k >= min(m, n):
        return torch.linalg.svdvals((left @ right.T).to(compute_dtype(left.dtype)))
    r_l = torch.linalg.qr(left, mode="r")[1]
    r_r = torch.linalg.qr(right, mode="r")[1]
    return torch.linalg.svdvals(r_l @ r_r.T)


def _gram_root(gram: torch.Tensor) -> tuple[torch.Tensor, Callable[[torch.Tensor], torch.Tensor]]:
    """``S`` (p×k) with ``G = SᵀS`` and ``x ↦ S⁺x``: Cholesky, or eigh with null directions dropped."""
    k = gram.shape[0]
    c, info = torch.linalg.cholesky_ex(gram)
    d = c.diagonal()
    if int(info) == 0 and k and float(d.min()) > float(d.max()) * 1e-6:
        s = c.T
        return s, lambda x: torch.linalg.solve_triangular(s, x, upper=True)
    lam, v = torch.linalg.eigh(gram)
    keep = lam > float(lam.max().clamp_min(0)) * k * torch.finfo(gram.dtype).eps
    v, root = v[:, keep], lam[keep].sqrt()
    return (v * root).T, lambda x: v @ (x / root[:, None])


def khatri_rao_gram(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Gram ``KᵀK`` (float64) of the row-wise Khatri–Rao product ``K[o, (i, j)] = x[o, i] y[o, j]`` without K.

    ``(KᵀK)[(i, j), (k, l)] = Σ_o (x[o, i] x[o, k]) (y[o, j] y[o, l]) = Pᵀ Q`` over the symmetric pairs
    ``i ≤ k`` and ``j ≤ l`` only, so one GEMM of ``m × r(r+1)/2`` matrices (≈ ¼ of ``m r⁴``) then a gather.
    """
    x, y = x.double(), y.double()
    rx, ry = x.shape[1], y.shape[1]
    ix, kx = torch.triu_indices(rx, rx)
    jy, ly = torch.triu_indices(ry, ry)
    g = (x[:, ix] * x[:, kx]).T @ (y[:, jy] * y[:, ly])  # [pairs_x, pairs_y]
    px = torch.zeros(rx, rx, dtype=torch.long)
    px[ix, kx] = torch.arange(ix.numel())
    px[kx, ix] = torch.arange(ix.numel())
    py = torch.zeros(ry, ry, dtype=torch.long)
    py[jy, ly] = torch.arange(jy.numel())
    py[ly, jy] = torch.arange(jy.numel())
    full = g[px[:, None, :, None], py[None, :, None, :]]  # [i, j, k, l]
    return full.reshape(rx * ry, rx * ry)


def gram_svd(left: torch.Tensor | None, right: torch.Tensor | None, compute_uv: bool = True,
             grams: tuple[torch.Tensor, torch.Tensor] | None = None,
             shape: tuple[int, int] | None = None) -> Svd | torch.Tensor:
    """Exact thin SVD of ``left @ right.T`` through float64 Gram matrices (Cholesky–QR).

    ``LᵀL = SᵀS`` (Cholesky, float64) ⇒ ``L = Q S`` with ``Q = L S⁻¹`` orthonormal; likewise ``R = P T``, so
    ``L Rᵀ = Q (S Tᵀ) Pᵀ`` and the k×k core ``S Tᵀ`` carries the singular values. The Grams are one GEMM
    each (``m k²`` flops, much faster than a Householder QR of a tall m×k matrix); forming them in float64
    keeps the squared condition number harmless for float32 data. Rank-deficient Grams fall back to an
    eigendecomposition with the null directions dropped. Use when k is large (LoHa's r₁r₂ columns).

    ``grams`` (``LᵀL``, ``RᵀR`` in float64, e.g. from :func:`khatri_rao_gram`) may be given; singular values
    alone then never touch the m×k factors (pass ``None`` for them and ``shape=(m, n)``).

    Returns ``(U, S, Vh)`` as :func:`factored_svd`, or only ``S`` with ``compute_uv=False``.
    """
    if left is not None:
        (m, k), n = left.shape, right.shape[0]
        if right.shape[1] != k:
            raise LoraToolsError(f"factor inner dimensions differ: left {tuple(left.shape)}, right {tuple(right.shape)}")
        out_dtype = compute_dtype(left.dtype)
        if k >= min(m, n):
            dense = (left @ right.T).to(out_dtype)
            return svd(dense) if compute_uv else torch.linalg.svdvals(dense)
    else:
        out_dtype = torch.float32
    if grams is None:
        l64, r64 = left.double(), right.double()
        grams = (l64.T @ l64, r64.T @ r64)
    s_l, inv_l = _gram_root(grams[0])
    s_r, inv_r = _gram_root(grams[1])
    core = s_l @ s_r.T
    if not compute_uv:
        return torch.linalg.svdvals(core.to(out_dtype))
    u_c, sv, vh_c = torch.linalg.svd(core.to(out_dtype), full_matrices=False)  # float32 data: float32 core SVD
    u = left @ inv_l(u_c.double()).to(left.dtype)
    v = right @ inv_r(vh_c.T.double()).to(right.dtype)
    return u.to(out_dtype), sv.to(out_dtype), v.T.to(out_dtype)


def kron_svd(svd1: Svd, svd2: Svd, keep: int | None = None) -> Svd:
    """Thin SVD of ``kron(A₁, A₂)`` from thin SVDs ``Aᵢ = Uᵢ Σᵢ Vhᵢ`` of the two small matrices.

    ``kron(U₁Σ₁Vh₁, U₂Σ₂Vh₂) = kron(U₁, U₂) kron(Σ₁, Σ₂) kron(Vh₁, Vh₂)`` and Kronecker products of
    orthonormal columns are orthonormal, so this *is* an SVD once the products σᵢσⱼ are sorted. Only the
    top ``keep`` (default: all) triplets are built, column by column: ``U[:, t] = kron(U₁[:, i], U₂[:, j])``,
    never the Kronecker product of the full matrices.
    """
    u1, s1, vh1 = svd1
    u2, s2, vh2 = svd2
    prod = torch.outer(s1, s2).reshape(-1)
    order = torch.argsort(prod, descending=True, stable=True)
    if keep is not None:
        order = order[:keep]
    i, j = order // s2.numel(), order % s2.numel()
    u = (u1[:, i][:, None, :] * u2[:, j][None, :, :]).reshape(u1.shape[0] * u2.shape[0], -1)
    vh = (vh1[i][:, :, None] * vh2[j][:, None, :]).reshape(-1, vh1.shape[1] * vh2.shape[1])
    return u, prod[order], vh


def randomized_svd(
    matrix: torch.Tensor,
    rank: int,
    oversample: int = 10,
    n_iter: int = 4,
    seed: int = 0,
    tol: float = 0.0,
    total_energy: float | None = None,
    info: dict | None = None,
    gram: torch.dtype | None = None,
) -> Svd:
    """Randomized truncated SVD by block Krylov iteration (Halko, Martinsson & Tropp 2011 §4.5;
    Musco & Musco 2015), seeded and deterministic.

    A Gaussian sketch ``Y₀ = A Ω`` with ``l = rank + oversample`` columns starts the Krylov space
    ``K = span[Y₀, (AAᵀ)Y₀, …, (AAᵀ)^q Y₀]``; each of the ``q`` power iterations adds one block of ``l``
    columns, orthonormalized against the blocks before it (two rounds, so the basis stays orthonormal to
    working precision). Every block ``Qᵢ`` is multiplied by ``Aᵀ`` once, ``Zᵢ = Aᵀ Qᵢ`` — that product is
    both the next power step and the block ``Qᵢᵀ A`` of ``B = Kᵀ A`` — so the final Rayleigh–Ritz step on the
    whole Krylov space costs no extra pass over ``A``: the same ``2q + 2`` products of an ``m×n`` matrix with
    ``l`` columns as plain subspace iteration, which keeps only the last block. Keeping all of them makes
    the polynomial filter far sharper: on a decaying spectrum plus a noise floor, two iterations give about
    the error of four subspace iterations.

    Ω is drawn from a CPU generator seeded with ``seed``, so results do not depend on the device or on
    global RNG state. The Krylov space is kept within half of min(m, n) (fewer iterations where needed);
    matrices too small for two iterations (or for the ``n_iter`` asked, if fewer) get the exact SVD.

    Convergence: the Krylov spaces are nested, so the captured rank-``rank`` energy ``Eᵢ`` (top eigenvalues
    of the float64 Gram ``BBᵀ``, kept up to date block by block) never decreases. With ``tol > 0`` the
    iterations stop once one of them gained ``Eᵢ − Eᵢ₋₁ ≤ tol · (‖A‖² − Eᵢ)``, i.e. improved the squared
    error by less than the fraction ``tol`` (at least one iteration always runs). ``tol = 0`` runs ``n_iter``.

    Args:
        matrix: [m, n], float32/float64, on any device.
        rank: number of singular triplets returned (≤ min(m, n)).
        oversample: extra sketch columns per block; 8–16 is plenty.
        n_iter: (maximum) power iterations; more help flat spectra at the cost of 2 matmuls each.
        seed: seed of the Gaussian test matrix.
        tol: convergence tolerance on the squared error (see above); 0 = fixed ``n_iter``.
        total_energy: ‖A‖_F² if the caller has it (computed here when ``tol > 0`` and it is missing).
        info: if given, receives ``power_iters``, the number of power iterations run.
        gram: precision of the small Gram matrices (orthonormalization, Rayleigh–Ritz); default
            :func:`gram_dtype` (float64 on CPU; float32 with a reorthogonalization pass on CUDA, where float64
            runs at 1/32–1/64 of the float32 rate on consumer GPUs).
    """
    m, n = matrix.shape
    g = gram or gram_dtype(matrix.device)
    rank = min(rank, m, n)
    if info is not None:
        info["power_iters"] = 0
    if rank <= 0:
        return matrix.new_zeros(m, 0), matrix.new_zeros(0), matrix.new_zeros(0, n)
    width = min(rank + oversample, m, n)
    if not krylov_fits(m, n, rank, oversample, n_iter):  # the exact SVD is the better deal
        u, s, vh = svd(matrix)
        return u[:, :rank], s[:rank], vh[:rank]
    n_iter = min(n_iter, min(m, n) // (2 * width) - 1)  # the Krylov space stays within half of min(m, n)
    a = matrix
    gen = torch.Generator(device="cpu").manual_seed(seed)
    omega = torch.randn(n, width, generator=gen, dtype=a.dtype).to(a.device)
    total = frobenius_sq(a) if tol > 0 and total_energy is None else total_energy
    y = a @ omega
    basis = a.new_empty(m, 0)
    zs = a.new_empty(n, 0, dtype=g)  # Kᵀ A, transposed, in the Gram's precision
    gram = torch.empty(0, 0, dtype=g, device=a.device)
    captured = None
    for i in range(n_iter + 1):
        q = _orthonormal_against(y, basis, gen, g)
        basis = torch.cat([basis, q], 1)
        z = a.T @ q
        z64 = z.to(g)
        cross = zs.T @ z64
        gram = torch.cat([torch.cat([gram, cross], 1), torch.cat([cross.T, z64.T @ z64], 1)], 0)
        zs = torch.cat([zs, z64], 1)
        if i == n_iter:
            break
        if tol > 0:
            now = float(torch.linalg.eigvalsh(gram)[-rank:].clamp_min(0).sum())
            if captured is not None and now - captured <= tol * max(total - now, 0.0):
                break
            captured = now
        y = a @ _orthonormal(z, g)
    if info is not None:
        info["power_iters"] = i
    # Rayleigh–Ritz on K: the top-``rank`` eigenvectors P of BBᵀ, then the exact SVD of the rank × n matrix PᵀB
    _, vecs = torch.linalg.eigh(gram)
    top = vecs[:, -rank:].flip(1)
    uc, s, vh = torch.linalg.svd((zs @ top).T.to(a.dtype), full_matrices=False)
    return basis @ (top.to(a.dtype) @ uc), s, vh


def krylov_fits(m: int, n: int, rank: int, oversample: int = 10, n_iter: int = 4) -> bool:
    """Whether :func:`randomized_svd` sketches an m×n matrix (else it computes the exact SVD): the Krylov space of
    two iterations (or of ``n_iter``, if fewer) must fit within half of min(m, n)."""
    width = min(rank + oversample, m, n)
    return min(m, n) // (2 * width) >= min(n_iter, 2) + 1


def gram_dtype(device: torch.device) -> torch.dtype:
    """Precision of the randomized SVD's small Grams: float64 on CPU (as exact, and cheap there); float32 on CUDA.

    float32 Grams square the condition number in float32, so they are used with Cholesky–QR *twice*
    (CholeskyQR2: the second pass restores orthogonality to working precision) and a Householder QR wherever a
    block is too ill-conditioned for it. Measured (``benchmarks/bench_distributed.py --gram``): the rank-k error
    stays within 1.0001× of float64's, far inside the 1.005× of the optimum kept by the tests.
    ``LORATOOLS_GRAM_DTYPE=float32|float64`` overrides the choice."""
    name = os.environ.get("LORATOOLS_GRAM_DTYPE")
    if name in ("float32", "float64"):
        return getattr(torch, name)
    return torch.float32 if device.type == "cuda" else torch.float64


def _orthonormal(x: torch.Tensor, gram: torch.dtype = torch.float64) -> torch.Tensor:
    """Orthonormal basis of the columns of a tall ``x``: Cholesky–QR (:func:`_cholesky_qr`), Householder QR when
    ``x`` is too ill-conditioned for it. Used where only the span's conditioning matters (the next power step);
    see :func:`_orthonormal_against`."""
    x64 = x.to(gram)
    q = _cholesky_qr(x64, x64.T @ x64)
    if q is not None and gram != torch.float64:  # CholeskyQR2: a second pass restores orthogonality
        q = _cholesky_qr(q, q.T @ q)
    return torch.linalg.qr(x)[0] if q is None else q.to(x.dtype)


def _cholesky_qr(x64: torch.Tensor, gram: torch.Tensor, min_sq: float = 0.0) -> torch.Tensor | None:
    """``x R⁻¹`` with ``R`` the Cholesky factor of the float64 Gram ``xᵀx`` (one small GEMM: much faster than a
    Householder QR of a tall matrix), or None where ``x`` is too ill-conditioned for it (or empty), or where a
    column's remaining squared length (a diagonal of R, squared) is ≤ ``min_sq``."""
    r, bad = torch.linalg.cholesky_ex(gram, upper=True)
    d = r.diagonal()
    worst = 1e-5 if gram.dtype == torch.float64 else 3e-3  # condition² must stay well inside 1/eps
    if int(bad) or not x64.shape[1] or float(d.min()) <= float(d.max()) * worst or float(d.min()) ** 2 <= min_sq:
        return None
    return torch.linalg.solve_triangular(r, x64, upper=True, left=False)


def _orthonormal_against(y: torch.Tensor, basis: torch.Tensor, gen: torch.Generator,
                         gram: torch.dtype = torch.float64) -> torch.Tensor:
    """``y.shape[1]`` orthonormal columns, orthogonal to ``basis``, spanning ``y`` with ``basis`` projected out.

    Two rounds of project-then-orthonormalize (twice is enough). Directions of ``y`` that lie in ``basis``'s span
    up to rounding — the Krylov space has captured the whole range of A, e.g. a ΔW with only a few changed rows —
    carry no information: they show up in round 2 as unit vectors that lose most of their length to the basis,
    are dropped (eigendecomposition of the float64 Gram) and replaced by seeded random directions, so the basis
    stays orthonormal and full width and the Rayleigh–Ritz step stays exact.
    """
    width = y.shape[1]
    # round 1 keeps every direction the float64 Gram can resolve, however small (a row changed by 1e-6 is real);
    # round 2 sees unit columns: whatever then loses over half its norm to the basis was rounding noise
    for threshold in (0.0, 0.25):
        if basis.shape[1]:
            y = y - basis @ (basis.T @ y)
        y = _orthonormal_kept(y, threshold, gram)
    missing = width - y.shape[1]
    if missing:
        fill = torch.randn(basis.shape[0], missing, generator=gen, dtype=y.dtype).to(y.device)
        done = torch.cat([basis, y], 1)
        for _ in range(2):
            fill = _orthonormal(fill - done @ (done.T @ fill), gram)
        y = torch.cat([y, fill], 1)
    return y


def _orthonormal_kept(x: torch.Tensor, threshold: float, gram: torch.dtype = torch.float64) -> torch.Tensor:
    """Orthonormal basis of the directions of ``x`` whose squared length exceeds ``threshold`` (Cholesky–QR on
    the float64 Gram when ``x`` is well conditioned and above it, else its eigendecomposition)."""
    if not x.shape[1]:
        return x
    x64 = x.to(gram)
    g = x64.T @ x64
    q = _cholesky_qr(x64, g, threshold)
    if q is not None:
        return (q if gram == torch.float64 else _orthonormal(q, gram)).to(x.dtype)
    lam, vecs = torch.linalg.eigh(g)
    # float64 eigh resolves ~1e-16·λmax, float32 ~1e-7·λmax
    keep = lam > max(threshold, float(lam.max().clamp_min(0)) * (1e-14 if gram == torch.float64 else 1e-5))
    q = x64 @ (vecs[:, keep] / lam[keep].sqrt())
    return (q if gram == torch.float64 else _orthonormal(q, gram)).to(x.dtype)


def frobenius_sq(matrix: torch.Tensor, chunk: int = 1 << 16) -> float:
    """‖A‖_F², summed over ``chunk``-element blocks and accumulated in float64.

    Each block's Σx² is taken in the tensor's own precision (torch's cascaded float32 sum: relative
    error ~1e-9 at this block size); the block sums are accumulated in Python floats (float64). A
    float64 copy of the whole matrix would double the memory of the largest layer and is 2× slower.
    """
    flat = matrix.reshape(-1)
    wide = flat.dtype in (torch.float32, torch.float64)
    return sum(float((c if wide else c.float()).square().sum())
               for c in (flat[i : i + chunk] for i in range(0, flat.numel(), chunk)))


RULE_KINDS = ("rank", "energy", "ratio", "threshold", "full")
FLOAT32_EPS = float(torch.finfo(torch.float32).eps)


@dataclass(frozen=True)
class RankRule:
    """How many singular values to keep.

    * ``rank``: a fixed k.
    * ``energy``: the smallest k with Σ_{i≤k} σᵢ² ≥ τ·‖ΔW‖_F², measured against the exact total
      energy (never against a truncated spectrum).
    * ``ratio``: σᵢ ≥ σ₁ / ρ.
    * ``threshold``: σᵢ ≥ t.
    * ``full``: every singular value above round-off (exact, structural rank).

    All rules are capped by ``max_rank`` and by the number of available singular values.
    """

    kind: str = "full"
    value: float = 0.0
    max_rank: int | None = None

    def __post_init__(self) -> None:
        if self.kind not in RULE_KINDS:
            raise LoraToolsError(f"unknown rank rule {self.kind!r}; expected one of {', '.join(RULE_KINDS)}")
        if not math.isfinite(self.value):
            raise LoraToolsError(f"--{self.kind} must be a finite number, got {self.value}")
        if self.kind == "rank" and (self.value < 1 or self.value != int(self.value)):
            raise LoraToolsError(f"--rank must be a positive integer, got {self.value}")
        if self.kind == "energy" and not 0 < self.value <= 1:
            raise LoraToolsError(f"--energy must be in (0, 1], got {self.value}")
        if self.kind == "ratio" and self.value < 1:
            raise LoraToolsError(f"--ratio must be ≥ 1, got {self.value}")
        if self.kind == "threshold" and self.value < 0:
            raise LoraToolsError(f"--threshold must be ≥ 0, got {self.value}")
        if self.max_rank is not None and self.max_rank < 1:
            raise LoraToolsError(f"--max-rank must be ≥ 1, got {self.max_rank}")

    def describe(self) -> str:
        text = "exact (structural rank)" if self.kind == "full" else f"{self.kind}={self.value:g}"
        return text + (f", max rank {self.max_rank}" if self.max_rank else "")

    def choose(self, s: torch.Tensor, total_energy: float | None = None, complete: bool | None = None) -> int:
        """Rank to keep given descending singular values ``s`` (possibly a truncated spectrum).

        ``total_energy`` is ‖ΔW‖_F²; it defaults to Σ s². ``complete`` says whether ``s`` holds every singular value
        (default: when no ``total_energy`` is given). The energy rule compares what it would *discard* — the tail
        Σ_{i>k} σᵢ², summed from the small end, plus for a truncated spectrum the energy beyond it, ‖ΔW‖² − Σ s² —
        with (1 − τ)·‖ΔW‖². Comparing cumulative sums from the top instead loses the tail in the rounding of the
        large values: σ² below ~1e-7·‖ΔW‖² (bf16 rounding directions, say) were cut at τ = 1.
        """
        s = s.double().cpu()
        if s.numel() == 0 or float(s[0]) <= 0:
            return 0
        energy = s.square()
        captured = float(energy.sum())
        total = captured if total_energy is None else float(total_energy)
        if complete is None:
            complete = total_energy is None
        # numerical rank at float32 round-off (numpy's matrix_rank tolerance for float32): adapters are fp16/fp32
        nonzero = int((s > float(s[0]) * max(s.numel(), 1) * FLOAT32_EPS).sum())
        if self.kind == "full":
            k = nonzero
        elif self.kind == "rank":
            k = int(self.value)
        elif self.kind == "energy":
            k = min(_first_within(discarded_energy(energy, total, complete), (1 - self.value) * total), nonzero)
        elif self.kind == "ratio":
            k = int((s >= float(s[0]) / self.value).sum())
        else:
            k = int((s >= self.value).sum())
        if self.max_rank is not None:
            k = min(k, self.max_rank)
        return max(0, min(k, s.numel()))

    def satisfied_by(self, s: torch.Tensor, total_energy: float, cap: int) -> bool:
        """Whether a truncated spectrum ``s`` already decides the rule (used to grow a sketch)."""
        k = self.choose(s, total_energy, complete=False)
        return k < s.numel() or s.numel() >= cap


def discarded_energy(energy: torch.Tensor, total: float, complete: bool) -> torch.Tensor:
    """``d[k]`` = energy left out when keeping the first k of the squared singular values ``energy`` (k = 0…K).

    The tail sums run from the small end (no cancellation against the large values); a truncated spectrum
    (``complete=False``) adds what lies beyond it, ``max(total − Σ energy, 0)``.
    """
    tail = torch.cat([torch.flip(torch.cumsum(torch.flip(energy.double(), (0,)), 0), (0,)), energy.new_zeros(1)])
    return tail + (0.0 if complete else max(total - float(energy.sum()), 0.0))


def _first_within(discarded: torch.Tensor, budget: float) -> int:
    """Smallest k with ``discarded[k] ≤ budget`` (the last index if none)."""
    ok = (discarded <= budget).nonzero()
    return int(ok[0]) if ok.numel() else discarded.numel() - 1


def truncated_svd(
    matrix: torch.Tensor,
    rule: RankRule,
    seed: int = 0,
    exact: bool = False,
    oversample: int = 10,
    n_iter: int = 4,
    tol: float = 0.0,
    start_rank: int = 32,
    exact_below: int = 256,
    total_energy: float | None = None,
    info: dict | None = None,
    gram: torch.dtype | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, float]:
    """Truncated SVD of a dense matrix under a rank rule; returns ``(U, S, Vh, ‖A‖_F²)``.

    ``‖A‖_F²`` is computed exactly from the matrix, so energy rules and retained-energy reports
    never depend on a truncated spectrum. Small matrices (min(m, n) ≤ ``exact_below``) or
    ``exact=True`` use the exact thin SVD. Otherwise a randomized sketch of ``start_rank`` (or the
    fixed rank) columns is grown by doubling until the rule is decided inside the computed spectrum
    or the cap (``max_rank``, min(m, n)) is reached. ``total_energy`` passes in an ‖A‖_F² the caller
    already computed exactly, saving a pass over the matrix. ``n_iter`` and ``tol`` are
    :func:`randomized_svd`'s (maximum) power iterations and convergence tolerance; ``info`` receives its
    ``power_iters`` of the last sketch (0 for an exact SVD) and ``discarded_energy``, ‖A‖² minus the energy of the
    kept triplets: the tail of an exact spectrum summed from its small end, or ‖A‖² − Σσ̃² for a sketch (its kept
    triplets are an orthogonal projection of A, so that is their exact squared error up to rounding).
    """
    a = matrix.to(compute_dtype(matrix.dtype))
    m, n = a.shape
    total = frobenius_sq(a) if total_energy is None else float(total_energy)
    cap = min(m, n, rule.max_rank or min(m, n))
    if info is not None:
        info["power_iters"] = 0  # exact SVD; a randomized sketch sets its own
    complete = exact or min(m, n) <= exact_below
    if complete:
        u, s, vh = svd(a)
    else:
        k = min(int(rule.value) if rule.kind == "rank" else start_rank, cap)
        while True:
            if not krylov_fits(m, n, k, oversample, n_iter):  # randomized_svd would go exact: once, completely
                u, s, vh = svd(a)
                complete = True
                if info is not None:
                    info["power_iters"] = 0  # an earlier, smaller sketch may have set it
                break
            u, s, vh = randomized_svd(a, k, oversample=oversample, n_iter=n_iter, seed=seed, tol=tol, total_energy=total,
                                     info=info, gram=gram)
            if rule.kind == "rank" or k >= cap or rule.satisfied_by(s, total, cap):
                break
            k = min(2 * k, cap)
    keep = rule.choose(s, total, complete=complete)
    if info is not None:
        info["discarded_energy"] = float(discarded_energy(s.square(), total, complete)[keep])
    return u[:, :keep], s[:keep], vh[:keep], total


def lora_from_svd(
    u: torch.Tensor,
    s: torch.Tensor,
    vh: torch.Tensor,
    shape: tuple[int, ...],
    dtype: torch.dtype,
    alpha: float | None = None,
    rslora: bool = False,
) -> LoraLayer:
    """LoRA layer reproducing ``U diag(S) Vh`` (reshaped to ``shape``) under PEFT/kohya scaling.

    Σ is split evenly: up = U·√(Σ/scale), down = √(Σ/scale)·Vh. The balanced split keeps both
    factors at the magnitude √σ, which is what keeps fp16 storage safe: an unbalanced U·Σ can
    overflow 65504 (or lose σ's small digits) where √σ cannot. ``alpha`` defaults to the new rank
    (scale 1); another alpha is honoured by dividing the scale out of the factors.
    """
    k = int(s.numel())
    if k == 0:
        raise LoraToolsError("cannot build a LoRA layer of rank 0")
    if alpha is None:
        alpha = math.sqrt(k) if rslora else float(k)
    scale = lora_scale(alpha, k, rslora)
    root = torch.sqrt(s.clamp_min(0) / scale)
    return _lora_layer(u * root, root[:, None] * vh, shape, dtype, alpha, rslora)


def lora_from_factors(left: torch.Tensor, right: torch.Tensor, shape: tuple[int, ...], dtype: torch.dtype) -> LoraLayer:
    """Scale-1 LoRA layer (alpha = rank) holding ``left @ right.T`` exactly, without any SVD.

    Each rank-one term ``lᵢ rᵢᵀ`` is rescaled to ``(c lᵢ)(rᵢ / c)ᵀ`` with ``c = √(‖rᵢ‖/‖lᵢ‖)``, so both factors
    have column norm ``√(‖lᵢ‖‖rᵢ‖)``: the same fp16 safety as :func:`lora_from_svd`'s √Σ split. The rank is the
    number of columns (the structural rank); the factors are not orthogonal.
    """
    k = int(left.shape[1])
    ln, rn = left.norm(dim=0), right.norm(dim=0)
    live = (ln > 0) & (rn > 0)
    if not bool(live.any()):
        raise LoraToolsError(f"layer {tuple(shape)} has a zero delta; nothing to keep at rank 0")
    c = torch.where(live, torch.sqrt(rn / ln.clamp_min(torch.finfo(ln.dtype).tiny)), torch.ones_like(ln))
    return _lora_layer(left * c, (right / c).T, shape, dtype, float(k), False)


def _lora_layer(up: torch.Tensor, down: torch.Tensor, shape: tuple[int, ...], dtype: torch.dtype, alpha: float,
                rslora: bool) -> LoraLayer:
    """``up`` [out, k] and ``down`` [k, in·kh·kw] reshaped to the weight layout and cast to ``dtype``."""
    k = int(down.shape[0])
    if len(shape) > 2:
        down = down.reshape(k, *shape[1:])
        up = up.reshape(shape[0], k, *([1] * (len(shape) - 2)))
    return LoraLayer(down=down.to(dtype).contiguous(), up=up.to(dtype).contiguous(), alpha=float(alpha), rslora=rslora)
