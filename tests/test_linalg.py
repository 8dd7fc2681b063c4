"""linalg: factored SVD and rank rules against dense float64 SVD."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from loratools.adapter import LoraLayer
from loratools.errors import LoraToolsError
from loratools.linalg import RankRule, factored_svd, lora_from_factors, lora_from_svd, randomized_svd


def dense_sv(left: torch.Tensor, right: torch.Tensor) -> torch.Tensor:
    return torch.linalg.svdvals(left.double() @ right.double().T)


def check(left, right, rtol=1e-5):
    u, s, vh = factored_svd(left, right)
    ref = dense_sv(left, right)
    k = min(s.numel(), ref.numel())
    scale = float(ref[0]) if ref.numel() and float(ref[0]) > 0 else 1.0
    assert torch.allclose(s[:k].double(), ref[:k], atol=rtol * scale * 10, rtol=rtol)
    assert float(ref[k:].abs().max()) <= rtol * scale * 10 if ref.numel() > k else True
    recon = (u.double() * s.double()) @ vh.double()
    prod = left.double() @ right.double().T
    assert float((recon - prod).norm()) <= 1e-5 * max(float(prod.norm()), 1e-30) + 1e-30
    # orthonormal columns where σ > 0
    nz = int((s > 1e-6 * scale).sum())
    eye = torch.eye(nz, dtype=torch.float64)
    assert torch.allclose(u[:, :nz].double().T @ u[:, :nz].double(), eye, atol=1e-4)
    assert torch.allclose(vh[:nz].double() @ vh[:nz].double().T, eye, atol=1e-4)


@pytest.mark.parametrize("m,n,r", [(64, 48, 8), (48, 64, 8), (300, 200, 16), (10, 12, 30), (5, 7, 5), (128, 1, 4)])
def test_factored_svd_random(m, n, r):
    g = torch.Generator().manual_seed(m * n + r)
    check(torch.randn(m, r, generator=g), torch.randn(n, r, generator=g))


def test_factored_svd_rank_deficient_and_zero():
    g = torch.Generator().manual_seed(0)
    base = torch.randn(80, 2, generator=g)
    left = torch.cat([base, base @ torch.randn(2, 6, generator=g)], 1)  # rank 2 of 8 columns
    right = torch.randn(60, 8, generator=g)
    u, s, vh = factored_svd(left, right)
    ref = dense_sv(left, right)
    assert torch.allclose(s.double(), ref[: s.numel()], atol=1e-4 * float(ref[0]))
    assert float(s[2]) <= 1e-5 * float(s[0])
    _, s0, _ = factored_svd(torch.zeros(30, 4), torch.randn(20, 4, generator=g))
    assert float(s0.abs().max()) == 0.0


@pytest.mark.parametrize("scale", [1e-20, 1e-8, 1.0, 1e8, 1e18])
def test_factored_svd_extreme_scales(scale):
    g = torch.Generator().manual_seed(1)
    left, right = torch.randn(50, 6, generator=g) * scale, torch.randn(40, 6, generator=g)
    _, s, _ = factored_svd(left, right)
    ref = dense_sv(left, right)
    assert torch.allclose(s.double(), ref[:6], rtol=1e-4)


def test_factored_svd_conv_layer():
    g = torch.Generator().manual_seed(2)
    layer = LoraLayer(down=torch.randn(4, 8, 3, 3, generator=g), up=torch.randn(16, 4, 1, 1, generator=g), alpha=2.0)
    dense = layer.delta(torch.float64)
    assert dense.shape == (16, 8, 3, 3)
    ref = torch.linalg.svdvals(dense.reshape(16, -1))
    _, s, _ = factored_svd(*layer.factors())
    assert torch.allclose(s.double(), ref[:4], rtol=1e-5)
    conv = torch.nn.functional.conv2d
    x = torch.randn(1, 8, 5, 5, generator=g, dtype=torch.float64)
    two_step = conv(conv(x, layer.down.double()), layer.up.double()) * layer.scale
    assert torch.allclose(conv(x, dense), two_step, atol=1e-9)


@settings(max_examples=40, deadline=None)
@given(m=st.integers(1, 40), n=st.integers(1, 40), r=st.integers(1, 12), seed=st.integers(0, 10_000))
def test_factored_svd_property(m, n, r, seed):
    g = torch.Generator().manual_seed(seed)
    check(torch.randn(m, r, generator=g, dtype=torch.float64), torch.randn(n, r, generator=g, dtype=torch.float64), 1e-9)


def test_randomized_svd_matches_exact_on_decaying_spectrum():
    g = torch.Generator().manual_seed(3)
    u, _ = torch.linalg.qr(torch.randn(400, 400, generator=g))
    v, _ = torch.linalg.qr(torch.randn(300, 300, generator=g))
    s = 0.8 ** torch.arange(300, dtype=torch.float32)
    a = (u[:, :300] * s) @ v.T
    _, sr, _ = randomized_svd(a, 20, seed=0)
    assert torch.allclose(sr, s[:20], rtol=1e-3)
    _, sr2, _ = randomized_svd(a, 20, seed=0)
    assert torch.equal(sr, sr2)  # seeded: deterministic


def test_rank_rules():
    s = torch.tensor([4.0, 2.0, 1.0, 0.5, 0.0])
    total = float((s**2).sum())  # 21.25
    assert RankRule("rank", 2).choose(s) == 2
    assert RankRule("rank", 10).choose(s) == 5
    assert RankRule("energy", 16 / 21.25).choose(s) == 1
    assert RankRule("energy", 16.01 / 21.25).choose(s) == 2
    assert RankRule("energy", 1.0).choose(s) == 4  # the zero is not kept
    # a float32 SVD's round-off values and Σσ² a few ulps short of the exact ‖A‖²: τ = 1 still stops at the signal
    noisy = torch.tensor([4.0, 2.0, 1.0, 0.5, 3e-8, 2e-8])
    assert RankRule("energy", 1.0).choose(noisy, total_energy=total * (1 + 1e-7)) == 4
    # against an exact total larger than the truncated spectrum's energy
    assert RankRule("energy", 0.9).choose(s[:2], total_energy=total * 2) == 2
    assert RankRule("ratio", 4).choose(s) == 3
    assert RankRule("threshold", 0.5).choose(s) == 4
    assert RankRule("full").choose(s) == 4
    assert RankRule("energy", 0.99, max_rank=2).choose(s) == 2
    assert RankRule("rank", 3).choose(torch.zeros(4)) == 0
    with pytest.raises(LoraToolsError):
        RankRule("energy", 1.5)
    with pytest.raises(LoraToolsError):
        RankRule("rank", 0)


@pytest.mark.parametrize("alpha,rslora", [(None, False), (16.0, False), (8.0, True)])
def test_lora_from_svd_reproduces_truncation(alpha, rslora):
    g = torch.Generator().manual_seed(4)
    a = torch.randn(30, 20, generator=g, dtype=torch.float64)
    u, s, vh = torch.linalg.svd(a, full_matrices=False)
    layer = lora_from_svd(u[:, :5], s[:5], vh[:5], (30, 20), torch.float64, alpha=alpha, rslora=rslora)
    assert layer.rank == 5
    assert torch.allclose(layer.delta(torch.float64), (u[:, :5] * s[:5]) @ vh[:5], atol=1e-12)
    # balanced split: both factors carry √σ
    assert torch.allclose(layer.up.norm(dim=0), layer.down.norm(dim=1), rtol=1e-9)


def _spectrum_matrix(kind: str, m: int = 800, n: int = 600, sig: int = 300) -> torch.Tensor:
    """A float32 matrix with a chosen spectrum on random bases plus a noise floor."""
    g = torch.Generator().manual_seed(1)
    u, _ = torch.linalg.qr(torch.randn(m, sig, generator=g, dtype=torch.float64))
    v, _ = torch.linalg.qr(torch.randn(n, sig, generator=g, dtype=torch.float64))
    i = torch.arange(sig, dtype=torch.float64)
    s = {"power": (i + 1) ** -0.8, "slow": (i + 1) ** -0.3, "geom": 0.97**i, "flat": torch.full((sig,), 0.1),
         "gap": torch.where(i < 32, 1.0, 0.3) * (i + 1) ** -0.2, "noise": torch.zeros(sig)}[kind]
    noise = {"noise": 1.0, "flat": 0.04}.get(kind, 0.005) / max(m, n) ** 0.5
    return ((u * s) @ v.T + torch.randn(m, n, generator=g, dtype=torch.float64) * noise).float()


@pytest.mark.parametrize("kind", ["power", "slow", "geom", "gap", "flat", "noise"])
def test_randomized_svd_convergence_stop(kind):
    """The tol stop keeps the rank-32 error within 0.2 % of Eckart–Young on easy and hard spectra, stops early
    where the spectrum has a gap, and keeps iterating where it is flat."""
    a = _spectrum_matrix(kind)
    sv = torch.linalg.svdvals(a.double())
    optimum = float(sv[32:].square().sum()) ** 0.5
    info: dict = {}
    u, s, vh = randomized_svd(a, 32, n_iter=6, tol=0.005, info=info)
    err = float((a.double() - (u.double() * s.double()) @ vh.double()).norm())
    assert err <= 1.002 * optimum
    if kind == "gap":
        assert info["power_iters"] <= 2
    if kind in ("flat", "noise"):
        assert info["power_iters"] >= 4
    fixed: dict = {}
    randomized_svd(a, 32, n_iter=3, info=fixed)
    assert fixed["power_iters"] == 3


@pytest.mark.parametrize("where", ["5 rows", "3 cols", "5 rows float64"])
def test_randomized_svd_when_the_range_is_captured_early(where):
    """A ΔW with a few changed rows (an embedding where few tokens moved) or columns: the Krylov space holds the
    whole range after one block; later blocks must not repeat it (the basis stays orthonormal, σ exact)."""
    g = torch.Generator().manual_seed(1)
    dtype = torch.float64 if "float64" in where else torch.float32
    a = torch.zeros(1200, 1000, dtype=dtype)
    if "rows" in where:
        a[[3, 100, 500, 900, 1100]] = torch.randn(5, 1000, generator=g, dtype=dtype)
    else:
        a[:, :3] = torch.randn(1200, 3, generator=g, dtype=dtype)
    ref = torch.linalg.svdvals(a.double())[:16]
    for tol in (0.0, 0.005):
        u, s, vh = randomized_svd(a, 16, n_iter=4, tol=tol)
        assert u.shape == (1200, 16) and s.shape == (16,) and vh.shape == (16, 1000)
        assert torch.allclose(u.double().T @ u.double(), torch.eye(16, dtype=torch.float64), atol=1e-5)
        assert torch.allclose(s.double(), ref, atol=1e-5 * float(ref[0]))
        recon = (u.double() * s.double()) @ vh.double()
        assert float((recon - a.double()).norm()) <= 1e-5 * float(a.double().norm())


def test_randomized_svd_keeps_small_real_directions():
    """A row changed 3e-6 times less than another (a rarely seen token) is a real direction, not rounding noise:
    it is reproduced, σ₂ exact, even though the Krylov space captures the range in its first block."""
    g = torch.Generator().manual_seed(0)
    a = torch.zeros(1200, 1000)
    a[3] = torch.randn(1000, generator=g)
    a[100] = 3e-6 * torch.randn(1000, generator=g)
    ref = torch.linalg.svdvals(a.double())
    for n_iter in (0, 4):
        u, s, vh = randomized_svd(a, 16, n_iter=n_iter)
        assert float(s[1]) == pytest.approx(float(ref[1]), rel=1e-4)
        row = ((u.double() * s.double()) @ vh.double())[100]
        assert float((row - a[100].double()).norm() / a[100].double().norm()) < 1e-4


def test_truncated_svd_exact_fallback_runs_once(monkeypatch):
    """Where the Krylov space does not fit, the energy rule's doubling loop takes one complete exact SVD."""
    import loratools.linalg as la

    calls = []
    real = la.svd
    monkeypatch.setattr(la, "svd", lambda m: calls.append(1) or real(m))
    a = torch.randn(1000, 800, generator=torch.Generator().manual_seed(1))
    _, s, _, total = la.truncated_svd(a, RankRule("energy", 0.99))
    assert len(calls) == 1
    assert float(s.double().square().sum()) >= 0.99 * total * (1 - 1e-6)


@pytest.mark.parametrize("rank", [200, 300, 500])
def test_randomized_svd_mid_size_ranks_stay_accurate(rank):
    """Where the Krylov space cannot hold two iterations (4·(rank+10) > min(m, n)) the exact SVD is used, never
    a bare sketch; between those, fewer iterations but still near the optimum."""
    g = torch.Generator().manual_seed(3)
    u0, _ = torch.linalg.qr(torch.randn(1024, 1024, generator=g))
    v0, _ = torch.linalg.qr(torch.randn(1024, 1024, generator=g))
    a = (u0 * (1 + torch.arange(1024.0)) ** -0.5) @ v0.T
    sv = torch.linalg.svdvals(a.double())
    u, s, vh = randomized_svd(a, rank)
    err = float((a.double() - (u.double() * s.double()) @ vh.double()).norm())
    assert s.numel() == rank and err <= 1.005 * float(sv[rank:].norm())
    u, s, vh = randomized_svd(a, 0)
    assert u.shape == (1024, 0) and s.numel() == 0 and vh.shape == (0, 1024)


def test_lora_from_factors_exact_balanced_and_fp16_safe():
    g = torch.Generator().manual_seed(6)
    # wildly unbalanced columns: left ~1e5, right ~1e-5 (their product is O(1)); one zero column
    left = torch.randn(24, 6, generator=g, dtype=torch.float64) * 1e5
    right = torch.randn(18, 6, generator=g, dtype=torch.float64) * 1e-5
    left[:, 2] = 0
    ref = left @ right.T
    layer = lora_from_factors(left, right, (24, 2, 3, 3), torch.float64)
    assert layer.rank == 6 and layer.scale == 1.0 and tuple(layer.down.shape) == (6, 2, 3, 3)
    assert torch.allclose(layer.delta(torch.float64).reshape(24, 18), ref, atol=1e-12)
    up, down = layer.up.reshape(24, 6), layer.down.reshape(6, 18)
    live = [0, 1, 3, 4, 5]
    assert torch.allclose(up.norm(dim=0)[live], down.norm(dim=1)[live], rtol=1e-9)
    # stored in fp16 the balanced factors keep the product; the unbalanced ones overflow / underflow
    tol = 2e-3 * float(ref.abs().max())
    half = lora_from_factors(left.float(), right.float(), (24, 18), torch.float16)
    assert float((half.delta(torch.float64) - ref).abs().max()) < tol
    naive = left.half().double() @ right.half().double().T  # the same factors stored unbalanced
    assert not bool(torch.isfinite(naive).all()) or float((naive - ref).abs().max()) > tol


@pytest.mark.parametrize("rule", [RankRule("rank", 12), RankRule("energy", 0.95), RankRule("ratio", 50.0),
                                  RankRule("threshold", 0.05), RankRule("energy", 0.999, max_rank=40)])
def test_truncated_svd_randomized_matches_exact_rule(rule):
    from loratools.linalg import truncated_svd

    g = torch.Generator().manual_seed(5)
    u, _ = torch.linalg.qr(torch.randn(600, 400, generator=g))
    v, _ = torch.linalg.qr(torch.randn(500, 400, generator=g))
    s = 0.9 ** torch.arange(400, dtype=torch.float32)
    a = (u * s) @ v.T + 1e-4 * torch.randn(600, 500, generator=g)
    _, se, _, total_e = truncated_svd(a, rule, exact=True)
    ur, sr, vhr, total_r = truncated_svd(a, rule, seed=0, start_rank=8)
    assert total_e == pytest.approx(total_r, rel=1e-9)
    assert sr.numel() == se.numel()
    err_opt = float(se.double().square().sum())
    err_r = float(((ur * sr) @ vhr).double().square().sum())
    assert err_r == pytest.approx(err_opt, rel=5e-3)
