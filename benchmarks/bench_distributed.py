"""Scaling of ``loratools extract`` under ``torchrun``, and the float32-Gram check of the randomized SVD.

Run by hand (not part of the test suite)::

    python benchmarks/bench_distributed.py                       # 1 Llama-7B block, 1 and 2 CPU processes
    python benchmarks/bench_distributed.py --blocks 2 --nproc 1,2,4
    python benchmarks/bench_distributed.py --device cuda --nproc 1,2,4,8   # one GPU per process
    python benchmarks/bench_distributed.py --gram                # float32 vs float64 Gram: error vs the optimum

Scaling: writes (or reuses) the Llama-7B-shaped synthetic pair of ``bench_extract.py`` (``--blocks`` blocks of q/k/v/o
4096×4096, gate/up 11008×4096, down 4096×11008, decaying spectrum over a noise floor), then runs
``extract --rank R --json`` once per process count: a plain process for 1, ``torchrun --standalone
--nproc-per-node P`` otherwise. On CPU each run gets the machine's cores split evenly (``OMP_NUM_THREADS`` =
cores / P), so the ratio measures the split, not extra cores. Prints wall time, speed-up, each rank's share
(layers, seconds) and whether the adapter bytes equal the 1-process run's (on CPU they do only when the threads
per process are equal: BLAS sums in a thread-count-dependent order).

Gram: for matrices with a decaying spectrum over a noise floor, a flat (noise-only) spectrum and an exactly
low-rank one, the rank-k error ‖A − Â_k‖_F of the randomized SVD with float64 and with float32 Grams, divided
by the optimum √(Σ_{i>k} σᵢ²) from the exact SVD, and the time of each.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path[:0] = [str(Path(__file__).resolve().parent), str(Path(__file__).resolve().parent.parent)]
from bench_extract import FULL, write_pair  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent


def run_extract(base: Path, tuned: str, out: Path, nproc: int, rank: int, device: str,
                threads: int | None = None) -> tuple[float, dict]:
    cores = os.cpu_count() or 1
    env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS=str(threads or max(1, cores // nproc)))
    args = ["-m", "loratools", "extract", "--base", str(base), "--tuned", str(tuned), "-o", str(out), "--rank",
            str(rank), "--device", device, "--json", "--quiet", "--force"]
    launch = ([] if nproc == 1 else ["-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(nproc)])
    t0 = time.perf_counter()
    proc = subprocess.run([sys.executable, *launch, *args], stdout=subprocess.PIPE, text=True, env=env, cwd=ROOT)
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
        sys.exit(f"extract with {nproc} process(es) failed (exit {proc.returncode})")
    return wall, json.loads(proc.stdout)


def scaling(args: argparse.Namespace) -> None:
    cfg = dict(FULL, blocks=args.blocks)
    root = Path(args.dir)
    base, tuned, size = write_pair(root / "pair", cfg)
    print(f"pair: {args.blocks} Llama-7B block(s), {size / 1e9:.2f} GB on disk; rank {args.rank}; "
          f"device {args.device}; {os.cpu_count()} cores; torch {torch.__version__}"
          + (f"; {torch.cuda.get_device_name()}" if args.device == "cuda" else ""))
    print(f"{'procs':>5} {'threads':>7} {'wall s':>8} {'speed-up':>8}  per rank (layers, s)  same bytes as first")
    ref = None
    t1 = None
    runs = [(int(x), None) for x in args.nproc.split(",")]
    if args.device == "cpu" and (os.cpu_count() or 1) > 1:
        runs.append((1, 1))  # control: one process with one thread, the threads each rank of the widest run gets
    for p, threads in runs:
        out = root / f"out-{p}-{threads}"
        wall, doc = run_extract(base, tuned, out, p, args.rank, args.device, threads)
        data = (out / "adapter_model.safetensors").read_bytes()
        ref = ref if ref is not None else data
        t1 = t1 or wall
        shares = ", ".join(f"{r['layers']}/{r['seconds']:.1f}" for r in doc["distributed"]["per_rank"])
        used = threads or max(1, (os.cpu_count() or 1) // p)
        print(f"{p:>5} {used:>7} {wall:>8.1f} {t1 / wall:>8.2f}  {shares:<20}  {data == ref}", flush=True)


def gram_check(args: argparse.Namespace) -> None:
    from loratools.linalg import randomized_svd

    g = torch.Generator().manual_seed(0)
    m, n = args.gram_shape
    cases = {}
    u, _ = torch.linalg.qr(torch.randn(m, 256, generator=g))
    v, _ = torch.linalg.qr(torch.randn(n, 256, generator=g))
    s = (torch.arange(256, dtype=torch.float32) + 1) ** -0.8
    noise = torch.randn(m, n, generator=g) * (0.005 / math.sqrt(max(m, n)))
    cases["decay+noise"] = noise + (u * s) @ v.T
    cases["flat noise"] = torch.randn(m, n, generator=g)
    cases["rank 40 exact"] = (u[:, :40] * s[:40]) @ v[:, :40].T
    cases["decay 1e-6 tail"] = (u * s * torch.where(torch.arange(256) < 24, 1.0, 1e-6)) @ v.T
    print(f"matrix {m}×{n}; error / optimum (Eckart–Young), or where the optimum is rounding level (< 1e-4·‖A‖) "
          "the excess (error − optimum)/‖A‖ marked +; time per call")
    print(f"{'case':<16} {'rank':>4} {'float64':>10} {'float32':>10} {'t64 s':>7} {'t32 s':>7}")
    worst, worst_excess = 0.0, 0.0
    for name, a in cases.items():
        sv = torch.linalg.svdvals(a.double())
        total = float(sv.square().sum().sqrt())
        for k in (16, 64):
            opt = float(sv[k:].square().sum().sqrt())
            times, scores = [], []
            for dt in (torch.float64, torch.float32):
                t0 = time.perf_counter()
                uu, ss, vh = randomized_svd(a, k, n_iter=6, seed=0, gram=dt)
                times.append(time.perf_counter() - t0)
                err = float((a.double() - (uu.double() * ss.double()) @ vh.double()).norm())
                scores.append(err / opt if opt > 1e-4 * total else (err - opt) / total)
            if opt > 1e-4 * total:
                worst = max(worst, scores[1])
                cells = [f"{x:>10.6f}" for x in scores]
            else:
                worst_excess = max(worst_excess, scores[1])
                cells = [f"{'+' + format(x, '.1e'):>10}" for x in scores]
            print(f"{name:<16} {k:>4} {cells[0]} {cells[1]} {times[0]:>7.3f} {times[1]:>7.3f}", flush=True)
    print(f"worst float32 error / optimum: {worst:.6f} (limit 1.005); worst excess at rounding level: "
          f"{worst_excess:.1e} of ‖A‖")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--blocks", type=int, default=1)
    ap.add_argument("--rank", type=int, default=64)
    ap.add_argument("--nproc", default="1,2")
    ap.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    ap.add_argument("--dir", default=os.path.join(tempfile.gettempdir(), "loratools-bench-distributed"))
    ap.add_argument("--gram", action="store_true", help="float32 vs float64 Gram check instead of the scaling run")
    ap.add_argument("--gram-shape", type=int, nargs=2, default=(2048, 1536), metavar=("M", "N"))
    args = ap.parse_args()
    gram_check(args) if args.gram else scaling(args)


if __name__ == "__main__":
    main()
