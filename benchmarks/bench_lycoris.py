"""Benchmark: exact LoHa / LoKr spectra and conversion to LoRA from the structure vs the dense route.

For each layer (LoHa dim 32; LoKr factor 8 dim 32, i.e. W₁ 8×8 full and W₂ a rank-32 product; LoKr with
both factors full, the LyCORIS default for dim ≥ half the factor size) on 4096×4096 and 11008×4096:

* ``inspect``: our exact spectrum (``loratools.stats.layer_spectrum``: float64 Grams of the Khatri–Rao factors +
  Cholesky–QR for LoHa, products σᵢ(W₁)σⱼ(W₂) for LoKr) vs the dense route (build ΔW, full thin
  ``torch.linalg.svd``) and, for reference, the cheapest dense spectrum (``torch.linalg.svdvals``);
* ``convert``: our exact conversion to plain LoRA (``loratools.convert._to_lora``, structural rank) vs the
  dense route (build ΔW, full thin ``torch.linalg.svd``, keep the structural rank, split √Σ);

Each route runs in its own subprocess so that peak RSS (``ru_maxrss``) is per route. Reports time ratios,
the max singular-value difference relative to σ₁ and the max relative delta error of both conversions.

    python benchmarks/bench_lycoris.py            # LLM shapes (minutes on 2 CPU cores)
    python benchmarks/bench_lycoris.py --small    # 1024×1024 and 2752×1024 smoke run
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from loratools.convert import _to_lora  # noqa: E402
from loratools.layers import LohaLayer, LokrLayer  # noqa: E402
from loratools.linalg import lora_from_svd  # noqa: E402
from loratools.stats import layer_spectrum  # noqa: E402


def factorization(dim: int, factor: int) -> tuple[int, int]:
    """LyCORIS's split of a dimension into (small, large) with small ≤ factor (most square otherwise)."""
    if factor > 0 and dim % factor == 0:
        return min(factor, dim // factor), max(factor, dim // factor)
    best = (1, dim)
    for a in range(1, int(dim**0.5) + 1):
        if dim % a == 0 and (factor <= 0 or a <= factor):
            best = (a, dim // a)
    return best


def make_layer(kind: str, m: int, n: int, seed: int = 0):
    g = torch.Generator().manual_seed(seed)

    def rnd(*shape: int, s: float = 1.0) -> torch.Tensor:
        return torch.randn(*shape, generator=g) * s

    if kind == "loha32":
        r = 32
        return LohaLayer(w1a=rnd(m, r, s=0.1), w1b=rnd(r, n), w2a=rnd(m, r, s=0.1), w2b=rnd(r, n),
                         out_shape=(m, n), scale=1.0, alpha=32.0)
    if kind == "lokr8":
        (ol, ok), (im, in_) = factorization(m, 8), factorization(n, 8)
        return LokrLayer(out_shape=(m, n), w1=rnd(ol, im), w2a=rnd(ok, 32, s=0.1), w2b=rnd(32, in_), scale=0.5,
                         alpha=16.0, dim=32)
    if kind == "lokr_full":
        (ol, ok), (im, in_) = factorization(m, -1), factorization(n, -1)
        return LokrLayer(out_shape=(m, n), w1=rnd(ol, im), w2=rnd(ok, in_, s=0.01), scale=1.0, dim=32)
    raise ValueError(kind)


def run_one(kind: str, m: int, n: int, route: str, task: str, out: Path, threads: int) -> dict:
    torch.set_num_threads(threads)
    layer = make_layer(kind, m, n)
    t0 = time.perf_counter()
    if route == "ours":
        if task == "inspect":
            s = layer_spectrum(layer)
        else:
            lora, _, _ = _to_lora(layer, None)
            s = None
    elif route == "dense_vals":  # the cheapest dense spectrum: singular values only
        s = torch.linalg.svdvals(layer.delta().reshape(m, n))
    else:
        delta = layer.delta().reshape(m, n)
        if task == "inspect":
            s = torch.linalg.svd(delta, full_matrices=False)[1]
        else:
            u, s_full, vh = torch.linalg.svd(delta, full_matrices=False)
            k = layer.rank
            lora = lora_from_svd(u[:, :k], s_full[:k], vh[:k], (m, n), torch.float32)
            del u, vh, delta
            s = None
    elapsed = time.perf_counter() - t0
    rec = {"time_s": elapsed, "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}
    if s is not None:
        torch.save(s, out)
    else:
        # delta error of the conversion, measured densely outside the timed region
        ref = layer.delta().reshape(m, n).double()
        err = float((lora.delta().reshape(m, n).double() - ref).norm() / ref.norm())
        rec.update(rank=lora.rank, rel_error=err)
    return rec


def child(kind: str, m: int, n: int, route: str, task: str, threads: int) -> dict:
    with tempfile.TemporaryDirectory() as d:
        f = Path(d) / "s.pt"
        cmd = [sys.executable, __file__, "--child", kind, str(m), str(n), route, task, str(f), str(threads)]
        rec = json.loads(subprocess.run(cmd, check=True, capture_output=True, text=True).stdout.splitlines()[-1])
        if f.exists():
            rec["s"] = torch.load(f)
    return rec


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--small", action="store_true", help="1024×1024 and 2752×1024 (quick smoke run)")
    ap.add_argument("--threads", type=int, default=1, help="torch threads per route (default 1: stable timings)")
    ap.add_argument("--kinds", default="loha32,lokr8,lokr_full", help="comma-separated layer kinds")
    ap.add_argument("--child", nargs=7, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        kind, m, n, route, task, out, threads = args.child
        print(json.dumps(run_one(kind, int(m), int(n), route, task, Path(out), int(threads))))
        return
    shapes = [(1024, 1024), (2752, 1024)] if args.small else [(4096, 4096), (11008, 4096)]
    print(f"torch {torch.__version__}, {args.threads} thread(s) per route, float32, CPU")
    header = f"{'layer':<10} {'shape':<11} {'task':<8} {'rank':>5} {'ours s':>9} {'dense s':>9} {'ratio':>8} " \
             f"{'max|Δσ|/σ₁':>11} {'err ours':>9} {'err dense':>9} {'RSS ours':>9} {'RSS dense':>9}  svdvals only"
    print(header)
    for kind in args.kinds.split(","):
        for m, n in shapes:
            for task in ("inspect", "convert"):
                ours = child(kind, m, n, "ours", task, args.threads)
                dense = child(kind, m, n, "dense", task, args.threads)
                ratio = dense["time_s"] / ours["time_s"]
                vals = ""
                if task == "inspect":
                    dv = child(kind, m, n, "dense_vals", task, args.threads)
                    vals = f"{dv['time_s']:.2f}s ({dv['time_s'] / ours['time_s']:.0f}x)"
                if task == "inspect":
                    a, b = ours["s"].double(), dense["s"].double()
                    k = min(a.numel(), b.numel())
                    diff = float((a[:k] - b[:k]).abs().max() / b[0])
                    rank, e1, e2 = k, "", ""
                else:
                    diff, rank = float("nan"), ours["rank"]
                    e1, e2 = f"{ours['rel_error']:.1e}", f"{dense['rel_error']:.1e}"
                print(f"{kind:<10} {m}x{n:<6} {task:<8} {rank:>5} {ours['time_s']:>9.3f} {dense['time_s']:>9.2f} "
                      f"{ratio:>7.0f}x {diff:>11.1e} {e1:>9} {e2:>9} {ours['peak_rss_mb']:>7.0f}MB "
                      f"{dense['peak_rss_mb']:>7.0f}MB  {vals}", flush=True)


if __name__ == "__main__":
    main()
