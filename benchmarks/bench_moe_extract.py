"""Benchmark ``loratools extract`` on fused 3-D MoE expert tensors against the dense per-expert route.

Run by hand (not part of the test suite)::

    python benchmarks/bench_moe_extract.py --small      # quick smoke run (16 experts of 256×128)
    python benchmarks/bench_moe_extract.py              # Qwen3-30B-A3B-shaped: 128 experts of 768×2048, 2 layers
    python benchmarks/bench_moe_extract.py --layers 3   # a third layer

What it does, in one run (every measurement in a fresh child process, so each peak RSS is that route's alone):

1. Writes a synthetic BASE/TUNED pair twice, bf16 safetensors, one shard per layer: **fused** as transformers 5
   holds Qwen3-MoE (``mlp.experts.gate_up_proj`` [E, 2I, H], ``mlp.experts.down_proj`` [E, H, I],
   ``config.json`` model_type ``qwen3_moe``) and **per expert** as the original checkpoints
   (``mlp.experts.N.gate_proj.weight`` …). Each expert's ΔW (gate, up, down) has a decaying spectrum,
   σᵢ = c·(i+1)^-0.8 for i < ``signal`` on random orthonormal bases, plus an i.i.d. noise floor.
2. ``fused``: ``extract --expert-rank R`` on the fused pair (one 3-D tensor read at a time, its E experts
   decomposed one by one).
3. ``per-expert``: the same call on the per-expert pair (the existing 2-D path, one tensor per expert).
4. ``dense``: the dense per-expert route: each per-expert ΔW read, thin ``torch.linalg.svd``, top R kept (what
   a per-matrix extractor does); its error is the Eckart–Young optimum each loratools error is compared with.
5. Prints wall time, error / optimum (max, mean over every expert module) and peak RSS of each, and their ratios.
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
FULL = {"experts": 128, "hidden": 2048, "inter": 768, "layers": 2, "rank": 16, "signal": 64}
SMALL = {"experts": 16, "hidden": 256, "inter": 128, "layers": 2, "rank": 8, "signal": 32}
PROJ = ("gate_proj", "up_proj", "down_proj")


def synthetic_delta(m: int, n: int, signal: int, g: torch.Generator) -> torch.Tensor:
    """Decaying spectrum on random orthonormal bases plus a full-rank noise floor."""
    u, _ = torch.linalg.qr(torch.randn(m, signal, generator=g))
    v, _ = torch.linalg.qr(torch.randn(n, signal, generator=g))
    s = 0.5 * (torch.arange(signal, dtype=torch.float32) + 1) ** -0.8
    noise = torch.randn(m, n, generator=g) * (0.005 / math.sqrt(max(m, n)))
    return noise.addmm_(u * s, v.T)


def write_pairs(root: Path, cfg: dict, seed: int = 0) -> dict:
    """Write (or reuse) fused and per-expert BASE/TUNED folders; returns their paths and sizes."""
    dirs = {f"{lay}_{side}": root / f"{lay}_{side}" for lay in ("fused", "per_expert") for side in ("base", "tuned")}
    done = root / "complete.json"
    if not (done.is_file() and json.loads(done.read_text()) == cfg):
        for d in dirs.values():
            d.mkdir(parents=True, exist_ok=True)
        g = torch.Generator().manual_seed(seed)
        E, H, INTER, L = cfg["experts"], cfg["hidden"], cfg["inter"], cfg["layers"]
        maps: dict[str, dict[str, str]] = {k: {} for k in dirs}
        t0 = time.perf_counter()
        for li in range(L):
            shard = f"model-{li + 1:05d}-of-{L:05d}.safetensors"
            pre = f"model.layers.{li}.mlp"
            gate_up = torch.randn(E, 2 * INTER, H, generator=g) / math.sqrt(H)
            down = torch.randn(E, H, INTER, generator=g) / math.sqrt(INTER)
            router = torch.randn(E, H, generator=g) / math.sqrt(H)
            sides = {"base": (gate_up, down, router)}
            tg, td = gate_up.clone(), down.clone()
            for e in range(E):
                tg[e, :INTER] += synthetic_delta(INTER, H, cfg["signal"], g)
                tg[e, INTER:] += synthetic_delta(INTER, H, cfg["signal"], g)
                td[e] += synthetic_delta(H, INTER, cfg["signal"], g)
            sides["tuned"] = (tg, td, router + 0.01 * torch.randn(E, H, generator=g))
            for side, (gu, dn, rt) in sides.items():
                gu, dn, rt = gu.bfloat16(), dn.bfloat16(), rt.bfloat16()
                fused = {f"{pre}.experts.gate_up_proj": gu, f"{pre}.experts.down_proj": dn, f"{pre}.gate.weight": rt}
                per = {f"{pre}.gate.weight": rt}
                for e in range(E):
                    per[f"{pre}.experts.{e}.gate_proj.weight"] = gu[e, :INTER].clone()
                    per[f"{pre}.experts.{e}.up_proj.weight"] = gu[e, INTER:].clone()
                    per[f"{pre}.experts.{e}.down_proj.weight"] = dn[e].clone()
                for lay, tensors in (("fused", fused), ("per_expert", per)):
                    save_file(tensors, str(dirs[f"{lay}_{side}"] / shard), metadata={"format": "pt"})
                    maps[f"{lay}_{side}"].update({k: shard for k in tensors})
            del sides, gate_up, down, tg, td
            print(f"  wrote layer {li + 1}/{L} ({time.perf_counter() - t0:.0f} s)", file=sys.stderr, flush=True)
        config = {"architectures": ["Qwen3MoeForCausalLM"], "model_type": "qwen3_moe", "num_experts": E,
                  "hidden_size": H, "moe_intermediate_size": INTER, "num_hidden_layers": L}
        for k, d in dirs.items():
            (d / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": maps[k]}))
            (d / "config.json").write_text(json.dumps(config))
        done.write_text(json.dumps(cfg))
    sizes = {k: sum(f.stat().st_size for f in d.glob("*.safetensors")) for k, d in dirs.items()}
    return {"dirs": {k: str(d) for k, d in dirs.items()}, "bytes": sizes}


def child(cmd: list[str], threads: int | None = None) -> dict:
    """Run this script in a child mode (``threads``: its OpenMP/torch threads) and parse the JSON it prints last."""
    env = dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    if threads:
        env["OMP_NUM_THREADS"] = str(threads)
    proc = subprocess.run([sys.executable, __file__, *cmd], stdout=subprocess.PIPE, text=True, env=env)
    if proc.returncode != 0:
        sys.exit(f"child {cmd[1]} failed (exit {proc.returncode})")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def peak_rss_bytes() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def run_loratools(base: str, tuned: str, out: str, rank: int) -> None:
    """Child: extract (the CLI's library call) + write; per-expert errors, wall time, own peak RSS."""
    from loratools.extract import ExtractOptions, extract
    from loratools.formats import save_adapter
    from loratools.linalg import RankRule

    rss0, t0 = peak_rss_bytes(), time.perf_counter()
    res = extract(base, tuned, ExtractOptions(rule=RankRule("rank", rank), expert_rule=RankRule("rank", rank),
                                              device="cpu"))
    save_adapter(res.adapter, Path(out), "peft", force=True)
    errors = {r["name"]: r["relative_error"] for r in res.layers if r["kind"] == "expert"}
    print(json.dumps({"wall_s": time.perf_counter() - t0, "rss": peak_rss_bytes(), "rss_start": rss0, "errors": errors,
                      "threads": torch.get_num_threads(),
                      "experts": res.summary["experts"]}))


def run_dense(base: str, tuned: str, rank: int) -> None:
    """Child: the dense per-expert route: each per-expert ΔW, thin SVD, top ``rank``; the optimal errors."""
    from loratools.checkpoint import Checkpoint
    from loratools.extract import TensorStream

    bck, tck = Checkpoint(base), Checkpoint(tuned)
    bs, ts = TensorStream(bck), TensorStream(tck)
    rss0, t0 = peak_rss_bytes(), time.perf_counter()
    optimum, factors = {}, {}
    for key in tck.keys():
        if ".experts." not in key:
            continue
        diff = ts.read(key).float() - bs.read(key).float()
        u, s, vh = torch.linalg.svd(diff, full_matrices=False)
        factors[key] = ((u[:, :rank] * s[:rank]).bfloat16(), vh[:rank].bfloat16())
        e = s.double().square()
        optimum[key[: -len(".weight")]] = math.sqrt(float(e[rank:].sum() / e.sum()))
    print(json.dumps({"wall_s": time.perf_counter() - t0, "rss": peak_rss_bytes(), "rss_start": rss0,
                      "optimum": optimum}))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--small", action="store_true", help="small shapes for a quick smoke run")
    ap.add_argument("--dir", default="/tmp/loratools_bench_moe", help="where the synthetic pairs are written")
    ap.add_argument("--rank", type=int, default=None)
    ap.add_argument("--layers", type=int, default=None)
    ap.add_argument("--threads", type=int, default=None,
                    help="torch threads of every measured child (1 on a loaded shared machine: spinning OpenMP "
                         "workers then slow small SVDs by orders of magnitude)")
    ap.add_argument("--child", nargs="+", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        mode, *rest = args.child
        if mode == "write":
            print(json.dumps(write_pairs(Path(rest[0]), json.loads(rest[1]))))
        elif mode == "loratools":
            run_loratools(rest[0], rest[1], rest[2], int(rest[3]))
        else:
            run_dense(rest[0], rest[1], int(rest[2]))
        return

    cfg = dict(SMALL if args.small else FULL)
    if args.layers:
        cfg["layers"] = args.layers
    rank = args.rank or cfg["rank"]
    root = Path(args.dir) / ("small" if args.small else "full")
    print(f"writing / reusing synthetic pairs under {root} ...", flush=True)
    made = child(["--child", "write", str(root), json.dumps(cfg)])
    d, size = made["dirs"], made["bytes"]
    E, H, INTER = cfg["experts"], cfg["hidden"], cfg["inter"]
    gate_up_bytes = E * 2 * INTER * H * 2  # the largest single expert tensor (bf16)
    modules = 3 * E * cfg["layers"]
    print(f"{cfg['layers']} layers × {E} experts × (gate, up {INTER}×{H}, down {H}×{INTER}) = {modules} expert "
          f"matrices; fused pair {(size['fused_base'] + size['fused_tuned']) / 1e9:.2f} GB on disk; rank {rank}", flush=True)

    t = args.threads
    fused = child(["--child", "loratools", d["fused_base"], d["fused_tuned"], str(root / "adapter_fused"), str(rank)], t)
    per = child(["--child", "loratools", d["per_expert_base"], d["per_expert_tuned"], str(root / "adapter_per"),
                 str(rank)], t)
    dense = child(["--child", "dense", d["per_expert_base"], d["per_expert_tuned"], str(rank)], t)

    opt = dense["optimum"]
    def ratios(run: dict) -> list[float]:
        assert set(run["errors"]) == set(opt), "the routes extracted different expert modules"
        return [run["errors"][k] / opt[k] for k in opt]

    rf, rp = ratios(fused), ratios(per)
    summary = {
        "config": cfg, "rank": rank, "expert_modules": len(opt), "torch_threads": fused["threads"],
        "fused_pair_gb": (size["fused_base"] + size["fused_tuned"]) / 1e9,
        "largest_expert_tensor_gb": gate_up_bytes / 1e9,
        "layer_stack_gb_one_side": size["fused_base"] / 1e9,
        "wall_s": {"fused": fused["wall_s"], "per_expert": per["wall_s"], "dense": dense["wall_s"]},
        "speedup_fused_vs_dense": dense["wall_s"] / fused["wall_s"],
        "speedup_fused_vs_per_expert": per["wall_s"] / fused["wall_s"],
        "error_over_optimum": {"fused_max": max(rf), "fused_mean": sum(rf) / len(rf),
                               "per_expert_max": max(rp), "per_expert_mean": sum(rp) / len(rp)},
        "peak_rss_gb": {"fused": fused["rss"] / 1e9, "per_expert": per["rss"] / 1e9, "dense": dense["rss"] / 1e9},
        "rss_growth_gb": {k: (r["rss"] - r["rss_start"]) / 1e9
                          for k, r in (("fused", fused), ("per_expert", per), ("dense", dense))},
        "rss_fused_over_largest_tensor": fused["rss"] / gate_up_bytes,
        "rss_fused_over_layer_stack_one_side": fused["rss"] / size["fused_base"],
        "rss_fused_over_dense": fused["rss"] / dense["rss"],
        "experts_report": fused["experts"],
    }
    print("\n" + json.dumps(summary, indent=2))
    print(f"\nfused 3-D route: {fused['wall_s']:.1f} s, error ≤ {max(rf):.4f}× optimum (mean {sum(rf) / len(rf):.4f}), "
          f"peak RSS {fused['rss'] / 1e9:.2f} GB ({fused['rss'] / gate_up_bytes:.2f}× the largest expert tensor, "
          f"{fused['rss'] / size['fused_base']:.2f}× one side's layer stack)\n"
          f"per-expert 2-D route: {per['wall_s']:.1f} s, error ≤ {max(rp):.4f}× optimum, peak RSS {per['rss'] / 1e9:.2f} GB\n"
          f"dense per-expert SVD: {dense['wall_s']:.1f} s, peak RSS {dense['rss'] / 1e9:.2f} GB; "
          f"speed-up fused vs dense {summary['speedup_fused_vs_dense']:.1f}×")


if __name__ == "__main__":
    main()
