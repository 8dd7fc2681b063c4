"""Benchmark ``extract`` from a scaled-fp8 checkpoint: streaming cost and exactness of the dequantized ΔW.

Run by hand (not part of the test suite)::

    python benchmarks/bench_fp8.py               # 2 Flux double-block-shaped blocks (8 layers, 226M params)
    python benchmarks/bench_fp8.py --blocks 4

Writes a bf16 base and two tuned copies (base + a rank-32 change of ``--delta`` relative size): one bf16, one ComfyUI
scaled fp8 (float8_e4m3fn, per-tensor ``scale_weight``, ``scaled_fp8`` marker). Runs ``loratools extract --rank R
--json`` on (base, bf16 tuned) and (base, fp8 tuned) in fresh child processes and reports wall time, peak RSS (the
child's ``VmHWM``), per-layer ``fro_norm`` against a float64 ‖deq(tuned) − base‖, and ``fp8_noise_floor``.
"""

from __future__ import annotations

import argparse
import json
import math
import subprocess
import sys
import time
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

ROOT = Path(__file__).resolve().parent.parent
SHAPES = {"img_attn.qkv": (9216, 3072), "img_attn.proj": (3072, 3072), "img_mlp.0": (12288, 3072),
          "img_mlp.2": (3072, 12288)}


def build(out: Path, blocks: int, delta: float) -> None:
    if (out / "tuned_fp8.safetensors").exists():
        return
    out.mkdir(parents=True, exist_ok=True)
    g = torch.Generator().manual_seed(0)
    base, t16, t8 = {}, {}, {}
    for b in range(blocks):
        for name, (m, n) in SHAPES.items():
            key = f"double_blocks.{b}.{name}.weight"
            w = torch.randn(m, n, generator=g) * 0.02
            u, v = torch.randn(m, 32, generator=g), torch.randn(n, 32, generator=g)
            d = u @ v.T
            tuned = w + d * (delta * float(w.norm()) / float(d.norm()))
            base[key] = w.to(torch.bfloat16)
            t16[key] = tuned.to(torch.bfloat16)
            s = tuned.abs().max() / torch.finfo(torch.float8_e4m3fn).max
            t8[key] = (tuned / s).to(torch.float8_e4m3fn)
            t8[key.replace(".weight", ".scale_weight")] = s.float().reshape(())
            t8[key.replace(".weight", ".scale_input")] = torch.ones(())
    t8["scaled_fp8"] = torch.empty(0, dtype=torch.float8_e4m3fn)
    save_file(base, out / "base.safetensors")
    save_file(t16, out / "tuned_bf16.safetensors")
    save_file(t8, out / "tuned_fp8.safetensors")


def run(base: Path, tuned: Path, out: Path, rank: int) -> tuple[float, float, dict]:
    code = (
        "import re, sys\n"
        "from loratools.cli import main\n"
        "try:\n    main(sys.argv[1:])\nexcept SystemExit:\n    pass\n"
        # VmHWM is this process image's own peak (ru_maxrss would include the parent's, inherited across fork+exec)
        "hwm = re.search(r'VmHWM:\\s+(\\d+)', open('/proc/self/status').read()).group(1)\n"
        "print('RSS', hwm, file=sys.stderr)\n"
    )
    t0 = time.perf_counter()
    proc = subprocess.run([sys.executable, "-c", code, "extract", "--base", str(base), "--tuned", str(tuned), "-o",
                           str(out), "--rank", str(rank), "--json", "--force", "--quiet", "--device", "cpu"],
                          capture_output=True, text=True, cwd=ROOT)
    wall = time.perf_counter() - t0
    rss = next(int(x.split()[1]) for x in proc.stderr.splitlines() if x.startswith("RSS")) / 1024
    if proc.returncode not in (0, None) and not proc.stdout:
        raise SystemExit(proc.stderr)
    return wall, rss, json.loads(proc.stdout)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--blocks", type=int, default=2)
    ap.add_argument("--rank", type=int, default=16)
    ap.add_argument("--delta", type=float, default=0.1, help="‖ΔW‖/‖W‖ of the synthetic change")
    ap.add_argument("--dir", type=Path, default=Path("/tmp/loratools-bench-fp8"))
    args = ap.parse_args()
    build(args.dir, args.blocks, args.delta)
    sizes = {p.name: p.stat().st_size / 2**20 for p in args.dir.glob("*.safetensors")}
    print("files (MiB):", {k: round(v, 1) for k, v in sizes.items()})
    for name in ("tuned_bf16", "tuned_fp8"):
        wall, rss, doc = run(args.dir / "base.safetensors", args.dir / f"{name}.safetensors",
                             args.dir / f"lora_{name}", args.rank)
        worst = 0.0
        with safe_open(args.dir / "base.safetensors", "pt") as fb, \
                safe_open(args.dir / f"{name}.safetensors", "pt") as ft:
            for row in doc["layers"]:
                key = row["key"]
                t = ft.get_tensor(key).double()
                if name == "tuned_fp8":
                    t = t * ft.get_tensor(key.replace(".weight", ".scale_weight")).double()
                ref = float((t - fb.get_tensor(key).double()).norm())
                worst = max(worst, abs(row["fro_norm"] - ref) / ref)
        floors = [r.get("fp8_noise_floor") for r in doc["layers"] if "fp8_noise_floor" in r]
        largest = max(SHAPES.values(), key=math.prod)
        print(f"{name}: {len(doc['layers'])} layers, {wall:.1f} s, peak RSS {rss:.0f} MiB "
              f"(largest layer float32: {math.prod(largest) * 4 / 2**20:.0f} MiB), "
              f"max |‖ΔW‖ − ‖ΔW‖₆₄|/‖ΔW‖₆₄ = {worst:.2e}, skipped {len(doc['skipped'])}, "
              f"fp8_noise_floor {min(floors):.3f}–{max(floors):.3f}" if floors else
              f"{name}: {len(doc['layers'])} layers, {wall:.1f} s, peak RSS {rss:.0f} MiB, "
              f"max |‖ΔW‖ − ‖ΔW‖₆₄|/‖ΔW‖₆₄ = {worst:.2e}, skipped {len(doc['skipped'])}")
        print("   mean relative error:", round(sum(r["relative_error"] for r in doc["layers"]) / len(doc["layers"]), 4),
              " warnings:", doc.get("warnings"))


if __name__ == "__main__":
    main()
