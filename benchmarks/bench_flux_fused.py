"""Benchmark fused ↔ split conversion of a full-size Flux.1 LoRA (19 double + 38 single blocks, hidden 3072).

Run by hand (not part of the test suite)::

    python benchmarks/bench_flux_fused.py [--rank 16] [--dir /tmp/flux_bench]

1. Writes a diffusers-format Flux LoRA (every Linear of ``FluxTransformer2DModel``'s blocks, bf16, rank ``--rank``,
   random factors) to ``--dir``.
2. In fresh child processes (peak RSS = that child's own ``VmHWM``; CPU seconds), times
   ``loratools convert … --to kohya`` (split → fused: block-diagonal stacks), ``--to diffusers`` back (fused →
   split) and ``--to comfy --rank R`` (the fused ΔW truncated optimally).
3. Checks exactness: the split → fused → split ΔW of every module against the source (max relative Frobenius
   error, float64), and prints times, peak RSS and file sizes.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

import torch
from safetensors.torch import save_file

from loratools.families import get_family

#: Flux.1-dev's ``FluxTransformer2DModel`` config (diffusers' defaults plus the guidance embedder)
FLUX_DEV = {"num_layers": 19, "num_single_layers": 38, "guidance_embeds": True}


def flux_shapes(double: int = 19, single: int = 38) -> tuple[dict[str, tuple[int, ...]], dict]:
    """Every tensor of a full-width Flux.1-dev transformer with ``double`` / ``single`` blocks: diffusers names and
    shapes, from diffusers' own class built on the meta device; plus its config (for a ``config.json``)."""
    from diffusers import FluxTransformer2DModel

    with torch.device("meta"):
        model = FluxTransformer2DModel(**dict(FLUX_DEV, num_layers=double, num_single_layers=single))
    config = {k: v for k, v in dict(model.config).items() if not k.startswith("_")}
    return {k: tuple(v.shape) for k, v in model.state_dict().items()}, config


def write_source(path: Path, rank: int) -> int:
    """A diffusers Flux LoRA on every block Linear of the full-size structure; returns the module count."""
    nm = get_family("flux_dev").naming()
    shapes, _ = flux_shapes()
    g = torch.Generator().manual_seed(0)
    tensors = {}
    for m in nm.modules:
        if "blocks." not in m.canonical:
            continue
        out, inp = shapes[f"{m.path}.weight"]
        tensors[f"{m.canonical}.lora_A.weight"] = (torch.randn(rank, inp, generator=g) * 0.02).bfloat16()
        tensors[f"{m.canonical}.lora_B.weight"] = (torch.randn(out, rank, generator=g) * 0.02).bfloat16()
    path.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(path / "pytorch_lora_weights.safetensors"))
    return len(tensors) // 2


ROOT = Path(__file__).resolve().parent.parent
CHILD = """
import os, re, sys, time
from loratools.cli import main
t = time.perf_counter()
try:
    main(sys.argv[1:], standalone_mode=False)
finally:
    # VmHWM is this process image's own peak (ru_maxrss would include the parent's, inherited across fork+exec)
    hwm = re.search(r"VmHWM:\\s+(\\d+)", open("/proc/self/status").read()).group(1)
    c = os.times()
    print("BENCH", time.perf_counter() - t, hwm, c.user + c.system, file=sys.stderr)
"""


def run_cli(*args: str) -> tuple[float, float, float, str]:
    """``loratools ARGS`` in a fresh child (this checkout): (seconds, peak RSS MiB, CPU seconds, stdout)."""
    res = subprocess.run([sys.executable, "-c", CHILD, *args], capture_output=True, text=True, cwd=ROOT)
    line = [x for x in res.stderr.splitlines() if x.startswith("BENCH")]
    if res.returncode or not line:
        raise SystemExit(f"loratools {' '.join(args)} failed ({res.returncode}): {res.stderr[-2000:]}")
    _, secs, rss, cpu = line[-1].split()
    return float(secs), int(rss) / 1024, float(cpu), res.stdout


def max_rel(a_path: Path, b_path: Path) -> float:
    from loratools.formats import load_adapter

    a, b = load_adapter(a_path), load_adapter(b_path)
    worst = 0.0
    for n, la in a.layers.items():
        da, db = la.delta(torch.float64), b.layers[n].delta(torch.float64)
        worst = max(worst, float((da - db).norm() / da.norm()))
    return worst


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--rank", type=int, default=16)
    p.add_argument("--dir", type=Path, default=Path("/tmp/flux_bench"))
    args = p.parse_args()
    src = args.dir / "src"
    t = time.perf_counter()
    n = write_source(src, args.rank)
    print(f"source: {n} modules, rank {args.rank}, bf16, written in {time.perf_counter() - t:.1f} s")
    rows = []
    for label, cmd in (
        ("split → fused (kohya)", ["convert", str(src), "--to", "kohya", "-o", str(args.dir / "k.safetensors")]),
        ("fused → split (diffusers)", ["convert", str(args.dir / "k.safetensors"), "--to", "diffusers",
                                        "-o", str(args.dir / "back")]),
        (f"split → fused, --rank {args.rank} (comfy)", ["convert", str(src), "--to", "comfy", "--rank",
                                                       str(args.rank), "-o", str(args.dir / "c.safetensors")]),
    ):
        secs, rss, cpu, _ = run_cli(*cmd, "-q", "--force")
        rows.append({"step": label, "seconds": round(secs, 2), "cpu_s": round(cpu, 2), "peak_rss_mib": round(rss)})
    err = max_rel(src, args.dir / "back")
    sizes = {f.name: f.stat().st_size for f in [src / "pytorch_lora_weights.safetensors", args.dir / "k.safetensors",
                                                 args.dir / "c.safetensors"]}
    print(json.dumps({"rows": rows, "split_fused_split_max_rel_error": err, "bytes": sizes}, indent=1))


if __name__ == "__main__":
    main()
