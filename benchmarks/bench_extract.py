"""Benchmark ``loratools extract`` against the dense baseline (full ``torch.linalg.svd`` of each ΔW).

Run by hand (not part of the test suite)::

    python benchmarks/bench_extract.py --small          # quick smoke run (~1 min)
    python benchmarks/bench_extract.py                  # LLM-shaped, ≈ 8.1 GB pair on disk
    python benchmarks/bench_extract.py --device cuda    # same on a GPU
    python benchmarks/bench_extract.py --cold           # pair evicted from the page cache before each run

What it does, in one run:

1. Writes a synthetic base/tuned pair of sharded HF-style folders (fp32): ``--blocks`` Llama-7B-shaped
   blocks of q/k/v/o 4096×4096, gate/up 11008×4096 and down 4096×11008 projections. Each ΔW has
   a decaying spectrum, σᵢ = c·(i+1)^-0.8 for i < 512 on random orthonormal bases, plus i.i.d. noise
   (a realistic fine-tune: a low-rank signal over a full-rank floor). Skipped if already there.
2. Runs ``loratools extract --rank R`` in a fresh child process and records its wall time, its
   report and its peak RSS (``ru_maxrss`` of that process alone).
3. Runs the dense baseline (what sd-scripts' and mergekit's extractors do: diff in float32, thin
   ``torch.linalg.svd``, keep the top R) on ``--dense-layers`` layers of each shape, in another
   child, and extrapolates its total by shape: a full dense run takes hours on a small CPU.
   Each of those layers is also extracted by loratools right before and after its dense SVD in the
   same process ("paired" timing: on a shared machine both then see the same load).
4. Prints the time ratio (paired per layer, and end to end), the error ratio of loratools vs the optimal
   (Eckart–Young, from the dense SVD) error on the layers both ran, and peak RSS vs pair size.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

import torch
from safetensors.torch import save_file

ROOT = Path(__file__).resolve().parent.parent
FULL = {"hidden": 4096, "inter": 11008, "blocks": 5, "rank": 64, "signal": 512}
SMALL = {"hidden": 512, "inter": 1376, "blocks": 2, "rank": 16, "signal": 128}


def shapes(hidden: int, inter: int) -> dict[str, tuple[int, int]]:
    return {
        "self_attn.q_proj": (hidden, hidden), "self_attn.k_proj": (hidden, hidden),
        "self_attn.v_proj": (hidden, hidden), "self_attn.o_proj": (hidden, hidden),
        "mlp.gate_proj": (inter, hidden), "mlp.up_proj": (inter, hidden), "mlp.down_proj": (hidden, inter),
    }


def synthetic_delta(m: int, n: int, signal: int, g: torch.Generator) -> torch.Tensor:
    """Decaying spectrum on random orthonormal bases plus a full-rank noise floor."""
    u, _ = torch.linalg.qr(torch.randn(m, signal, generator=g))
    v, _ = torch.linalg.qr(torch.randn(n, signal, generator=g))
    s = 0.5 * (torch.arange(signal, dtype=torch.float32) + 1) ** -0.8
    noise = torch.randn(m, n, generator=g) * (0.005 / math.sqrt(max(m, n)))  # noise σ₁ ≈ 0.005·(1 + √(min/max))
    noise.addmm_(u * s, v.T)
    return noise


def write_pair(root: Path, cfg: dict, seed: int = 0) -> tuple[Path, Path, int]:
    """Write (or reuse) base/ and tuned/ folders, one shard per block. Returns (base, tuned, bytes)."""
    base, tuned = root / "base", root / "tuned"
    done = root / "complete.json"
    if done.is_file() and json.loads(done.read_text()) == cfg:
        return base, tuned, sum(f.stat().st_size for d in (base, tuned) for f in d.glob("*.safetensors"))
    for d in (base, tuned):
        d.mkdir(parents=True, exist_ok=True)
    g = torch.Generator().manual_seed(seed)
    weight_map = {}
    t0 = time.perf_counter()
    for b in range(cfg["blocks"]):
        shard = f"model-{b + 1:05d}-of-{cfg['blocks']:05d}.safetensors"
        sb, st = {}, {}
        for name, (m, n) in shapes(cfg["hidden"], cfg["inter"]).items():
            key = f"model.layers.{b}.{name}.weight"
            w = torch.randn(m, n, generator=g) / math.sqrt(n)
            sb[key] = w
            st[key] = w + synthetic_delta(m, n, cfg["signal"], g)
            weight_map[key] = shard
        norm = f"model.layers.{b}.input_layernorm.weight"
        sb[norm], st[norm] = torch.ones(cfg["hidden"]), 1 + 0.01 * torch.randn(cfg["hidden"], generator=g)
        weight_map[norm] = shard
        save_file(sb, str(base / shard), metadata={"format": "pt"})
        del sb
        save_file(st, str(tuned / shard), metadata={"format": "pt"})
        del st
        print(f"  wrote block {b + 1}/{cfg['blocks']} ({time.perf_counter() - t0:.0f} s)", file=sys.stderr, flush=True)
    for d in (base, tuned):
        (d / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
        (d / "config.json").write_text(json.dumps({"architectures": ["LlamaForCausalLM"], "model_type": "llama"}))
    done.write_text(json.dumps(cfg))
    return base, tuned, sum(f.stat().st_size for d in (base, tuned) for f in d.glob("*.safetensors"))


def child(cmd: list[str]) -> dict:
    """Run ``cmd`` (this script in a child mode) and parse the JSON it prints last."""
    env = dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    proc = subprocess.run([sys.executable, __file__, *cmd], stdout=subprocess.PIPE, text=True, env=env)
    if proc.returncode != 0:
        sys.exit(f"child {cmd[1]} failed (exit {proc.returncode})")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def evict(*folders: str) -> None:
    """Drop the folders' safetensors files from the page cache (clean pages only; no root needed)."""
    for folder in folders:
        for f in Path(folder).glob("*.safetensors"):
            fd = os.open(f, os.O_RDONLY)
            try:
                os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
            finally:
                os.close(fd)


def peak_rss_bytes() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def run_loratools(base: str, tuned: str, out: str, rank: int, device: str) -> None:
    """Child: the library call the CLI makes, plus the write; prints timings, report and own peak RSS."""
    from loratools.extract import ExtractOptions, extract, output_size
    from loratools.formats import save_adapter
    from loratools.linalg import RankRule

    t0, c0 = time.perf_counter(), time.process_time()
    res = extract(base, tuned, ExtractOptions(rule=RankRule("rank", rank), device=device))
    save_adapter(res.adapter, Path(out), "peft", force=True)
    wall, cpu = time.perf_counter() - t0, time.process_time() - c0
    print(json.dumps({"wall_s": wall, "cpu_s": cpu, "extract_s": res.summary["wall_time_s"], "rss": peak_rss_bytes(),
                      "size": output_size(Path(out)), "layers": res.layers}))


def run_dense(base: str, tuned: str, rank: int, device: str, per_shape: int) -> None:
    """Child: the dense baseline on ``per_shape`` layers of each shape; prints per-layer time and optimum."""
    from loratools.checkpoint import Checkpoint
    from loratools.extract import ExtractOptions, TensorStream, extract
    from loratools.linalg import RankRule

    bck, tck = Checkpoint(base), Checkpoint(tuned)
    bs, ts = TensorStream(bck), TensorStream(tck)

    def loratools_layer(key: str) -> float:
        t = time.perf_counter()
        extract(bck, tck, ExtractOptions(rule=RankRule("rank", rank), device=device, include=[key]))
        return time.perf_counter() - t

    dev = torch.device("cuda" if device == "cuda" else "cpu")
    count: dict[tuple, int] = {}
    rows = []
    for key in tck.keys():
        shape = tuple(tck.shape(key))
        if len(shape) != 2 or count.get(shape, 0) >= per_shape:
            continue
        count[shape] = count.get(shape, 0) + 1
        # paired timing: loratools on the same layer right before and after the dense SVD, so both see
        # the same machine load (shared CPUs make run-to-run times drift)
        paired = loratools_layer(key)
        t0, c0 = time.perf_counter(), time.process_time()
        diff = ts.read(key).to(dev, torch.float32) - bs.read(key).to(dev, torch.float32)
        u, s, vh = torch.linalg.svd(diff, full_matrices=False)  # the baseline: thin dense SVD
        up, down = (u[:, :rank] * s[:rank]).cpu(), vh[:rank].cpu()
        if dev.type == "cuda":
            torch.cuda.synchronize()
        elapsed, cpu = time.perf_counter() - t0, time.process_time() - c0
        e = s.double().square()
        paired = min(paired, loratools_layer(key))
        rows.append({"key": key, "shape": list(shape), "time_s": elapsed, "cpu_s": cpu, "paired_loratools_s": paired,
                     "optimal_error": math.sqrt(float(e[rank:].sum() / e.sum())), "factors": up.numel() + down.numel()})
    print(json.dumps({"rows": rows, "rss": peak_rss_bytes()}))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--small", action="store_true", help="small shapes for a quick smoke run")
    ap.add_argument("--dir", default="/tmp/loratools_bench_extract", help="where the synthetic pair is written")
    ap.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    ap.add_argument("--rank", type=int, default=None)
    ap.add_argument("--blocks", type=int, default=None)
    ap.add_argument("--dense-layers", type=int, default=1, help="dense-baseline layers per shape (extrapolated)")
    ap.add_argument("--cold", action="store_true", help="evict the pair from the page cache before each child run")
    ap.add_argument("--child", nargs="+", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        mode, *rest = args.child
        if mode == "write":
            cfg = json.loads(rest[1])
            base, tuned, size = write_pair(Path(rest[0]), cfg)
            print(json.dumps({"base": str(base), "tuned": str(tuned), "bytes": size, "threads": torch.get_num_threads()}))
        elif mode == "loratools":
            run_loratools(rest[0], rest[1], rest[2], int(rest[3]), rest[4])
        else:
            run_dense(rest[0], rest[1], int(rest[2]), rest[3], int(rest[4]))
        return

    cfg = dict(SMALL if args.small else FULL)
    if args.blocks:
        cfg["blocks"] = args.blocks
    rank = args.rank or cfg["rank"]
    root = Path(args.dir) / ("small" if args.small else "full")
    print(f"writing / reusing synthetic pair under {root} ...", flush=True)
    # every computation runs in a child: idle OpenMP workers of a parent that computed slow children down
    made = child(["--child", "write", str(root), json.dumps(cfg)])
    base, tuned, pair_bytes = made["base"], made["tuned"], made["bytes"]
    n_layers = 7 * cfg["blocks"]
    print(f"pair: {pair_bytes / 1e9:.2f} GB on disk, {n_layers} matrices; rank {rank}; device {args.device}; "
          f"torch threads {made['threads']}; page cache {'evicted before each run' if args.cold else 'as left'}",
          flush=True)

    if args.cold:
        evict(base, tuned)
    lt = child(["--child", "loratools", str(base), str(tuned), str(root / "adapter"), str(rank), args.device])
    if args.cold:
        evict(base, tuned)
    dense = child(["--child", "dense", str(base), str(tuned), str(rank), args.device, str(args.dense_layers)])

    by_key = {r["key"]: r for r in lt["layers"]}
    dense_by_shape: dict[tuple, list[float]] = {}
    dense_cpu_by_shape: dict[tuple, list[float]] = {}
    err_ratios, lt_times, dn_times = [], [], []
    print(f"\n{'layer':34} {'shape':>11} {'dense s':>8} {'loratools s':>12} {'paired s':>9} {'speed-up':>9} "
          f"{'err/opt':>9}")
    for d in dense["rows"]:
        r = by_key[d["key"]]
        dense_by_shape.setdefault(tuple(d["shape"]), []).append(d["time_s"])
        dense_cpu_by_shape.setdefault(tuple(d["shape"]), []).append(d["cpu_s"])
        ratio = r["relative_error"] / d["optimal_error"]
        err_ratios.append(ratio)
        lt_times.append(d["paired_loratools_s"])
        dn_times.append(d["time_s"])
        print(f"{d['key'][:34]:34} {'×'.join(map(str, d['shape'])):>11} {d['time_s']:8.2f} {r['time_s']:12.3f} "
              f"{d['paired_loratools_s']:9.3f} {d['time_s'] / d['paired_loratools_s']:8.1f}× {ratio:9.5f}")
    def extrapolate(by_shape: dict[tuple, list[float]]) -> float:
        return sum(sum(by_shape[tuple(r["shape"])]) / len(by_shape[tuple(r["shape"])]) for r in lt["layers"])

    dense_total, dense_cpu = extrapolate(dense_by_shape), extrapolate(dense_cpu_by_shape)
    measured = len(dense["rows"]) == len(lt["layers"])
    summary = {
        "pair_gb": pair_bytes / 1e9, "layers": len(lt["layers"]), "rank": rank, "device": args.device,
        "cold_cache": args.cold, "power_iters": sorted({r["power_iters"] for r in lt["layers"]}),
        "loratools_wall_s": lt["wall_s"], "loratools_extract_s": lt["extract_s"],
        "dense_total_s": dense_total, "dense_total": "measured" if measured else
        f"extrapolated from {len(dense['rows'])} layer(s) ({args.dense_layers} per shape)",
        "speedup_end_to_end": dense_total / lt["wall_s"],
        "loratools_cpu_s": lt["cpu_s"], "dense_cpu_s": dense_cpu, "speedup_cpu_time": dense_cpu / lt["cpu_s"],
        "speedup_per_layer_paired_min": min(d / t for d, t in zip(dn_times, lt_times, strict=True)),
        "speedup_per_layer_paired_total": sum(dn_times) / sum(lt_times),
        "error_ratio_max": max(err_ratios), "error_ratio_mean": sum(err_ratios) / len(err_ratios),
        "loratools_peak_rss_gb": lt["rss"] / 1e9, "dense_peak_rss_gb": dense["rss"] / 1e9,
        "rss_vs_pair": lt["rss"] / pair_bytes, "adapter_mb": lt["size"] / 1e6,
        "mean_retained_energy": sum(r["retained_energy"] for r in lt["layers"]) / len(lt["layers"]),
    }
    print("\n" + json.dumps(summary, indent=2))
    print(f"\nloratools: {lt['wall_s']:.1f} s for {len(lt['layers'])} layers (peak RSS {lt['rss'] / 1e9:.2f} GB "
          f"on a {pair_bytes / 1e9:.2f} GB pair); dense baseline: {dense_total:.0f} s ({summary['dense_total']}); "
          f"speed-up {summary['speedup_end_to_end']:.1f}× end to end, {summary['speedup_per_layer_paired_total']:.1f}× "
          f"on the paired layers (min {summary['speedup_per_layer_paired_min']:.1f}×); error ≤ {summary['error_ratio_max']:.5f}× optimal")


if __name__ == "__main__":
    main()
