"""Benchmark ``loratools extract`` on a full-width Flux.1-shaped pair built on disk, across layouts.

Run by hand (not part of the test suite)::

    python benchmarks/bench_flux_extract.py --double 2 --single 4   # ≈ 2.6 GB per checkpoint, fits a small box
    python benchmarks/bench_flux_extract.py                         # full 19 + 38 blocks: 3 × 23.8 GB on disk

1. Builds, block by block (one block in memory at a time), a bf16 pair with hidden 3072 / MLP 12288, ``--double``
   double and ``--single`` single blocks plus the embedders and the final layer (shapes from diffusers'
   ``FluxTransformer2DModel`` on the meta device, ``bench_flux_fused.flux_shapes``):

   * ``base.safetensors``: BFL single file, every key under ``model.diffusion_model.`` (fused ``qkv`` / ``linear1``);
   * ``tuned_diffusers/``: diffusers transformer folder, one shard per block, ``config.json`` + index;
   * ``tuned_bfl.safetensors``: the same tuned weights as a ``model.diffusion_model.`` BFL single file.

   Every Linear weight of the tuned model is the base plus ``bench_extract.synthetic_delta`` (a decaying spectrum
   on random bases plus a full-rank noise floor, like a fine-tune), stored in bf16; biases and norms are unchanged.
2. Runs ``loratools extract --rank R --json`` in a fresh child for (BFL base, diffusers tuned) → comfy file and
   (BFL base, BFL tuned) → kohya file: wall time and peak RSS (the child's own ``VmHWM``).
3. Exactness: for ``--dense`` sample modules, the ΔW actually stored (bf16 tuned − bf16 base, float64) gets a dense
   float64 SVD; the Eckart–Young optimum at rank R is compared with the report's ``relative_error`` and with the
   error of the written factors. The outputs are loaded back with ``--base`` (``inspect``): every layer must
   resolve against the base, with its shape.
4. Per block type seconds (sum of the report's per-layer times) are extrapolated to 19 + 38 blocks.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import re
import shutil
import struct
import sys
import time
from pathlib import Path
from typing import BinaryIO

import torch
from safetensors import safe_open
from safetensors.torch import save_file

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT / "benchmarks"), str(ROOT)]  # this checkout's loratools, and the shared bench helpers
from bench_extract import synthetic_delta  # noqa: E402
from bench_flux_fused import flux_shapes, run_cli  # noqa: E402

from loratools.families import flux, get_family  # noqa: E402

PREFIX = "model.diffusion_model."
#: QK-norm scales (not LoRA modules, but in every real checkpoint): diffusers child → BFL child
NORMS = {"attn.norm_q.weight": "img_attn.norm.query_norm.scale", "attn.norm_k.weight": "img_attn.norm.key_norm.scale",
         "attn.norm_added_q.weight": "txt_attn.norm.query_norm.scale",
         "attn.norm_added_k.weight": "txt_attn.norm.key_norm.scale"}
SINGLE_NORMS = {"attn.norm_q.weight": "norm.query_norm.scale", "attn.norm_k.weight": "norm.key_norm.scale"}
#: dense-SVD sample: a q slice of a fused qkv and the MLP rows of a fused linear1 (float64 SVDs are slow on 2 cores)
DENSE = ("transformer_blocks.0.attn.to_q", "single_transformer_blocks.0.proj_mlp")


class StreamingSafetensors:
    """Writes one .safetensors file tensor by tensor: the header (names, dtypes, shapes) is known up front."""

    def __init__(self, path: Path, entries: list[tuple[str, tuple[int, ...]]]) -> None:
        header, off = {}, 0
        for name, shape in entries:
            n = 2 * math.prod(shape)  # bf16
            header[name] = {"dtype": "BF16", "shape": list(shape), "data_offsets": [off, off + n]}
            off += n
        raw = json.dumps(header, separators=(",", ":")).encode()
        raw += b" " * (-len(raw) % 8)
        self.order = [name for name, _ in entries]
        self.f: BinaryIO = open(path, "wb")  # noqa: SIM115 (closed in close())
        self.f.write(struct.pack("<Q", len(raw)) + raw)

    def write(self, name: str, t: torch.Tensor) -> None:
        expected = self.order.pop(0)
        assert name == expected, (name, expected)
        self.f.write(t.contiguous().view(torch.uint8).numpy().tobytes())

    def close(self) -> None:
        assert not self.order, self.order[:3]
        self.f.close()


def groups(shapes: dict[str, tuple[int, ...]]) -> list[tuple[str, list[str]]]:
    """Diffusers tensor names grouped as they are written: top-level modules, then one group per block."""
    out: dict[str, list[str]] = {}
    for k in shapes:
        m = re.match(r"((?:single_)?transformer_blocks\.\d+)\.", k)
        out.setdefault(m.group(1) if m else "top", []).append(k)
    return list(out.items())


def to_bfl(state: dict[str, torch.Tensor], nm: flux.FluxNaming) -> dict[str, torch.Tensor]:
    """One group of diffusers tensors in BFL layout (``PREFIX`` + BFL keys), fused rows placed by the family maps."""
    out: dict[str, torch.Tensor] = {}
    for m in nm.modules:
        for end in ("weight", "bias"):
            src = state.get(f"{m.path}.{end}")
            if src is None:
                continue
            key = PREFIX + m.weight_key.removesuffix(".weight") + "." + end
            if key not in out:
                rows = max(g.rows[1] for g in nm.by_original(m.original)) if m.fused else src.shape[0]
                out[key] = torch.empty((rows, *src.shape[1:]), dtype=src.dtype, device=src.device)
            flux.place_rows(m, src, out[key])
    for k, t in state.items():
        blk = re.match(r"(single_)?transformer_blocks\.(\d+)\.(.+)$", k)
        if blk and blk.group(3) in (SINGLE_NORMS if blk.group(1) else NORMS):
            name = (SINGLE_NORMS if blk.group(1) else NORMS)[blk.group(3)]
            out[f"{PREFIX}{'single' if blk.group(1) else 'double'}_blocks.{blk.group(2)}.{name}"] = t
    return out


def build(root: Path, double: int, single: int, signal: int) -> dict:
    """Write base.safetensors, tuned_diffusers/ and tuned_bfl.safetensors (or reuse a complete set)."""
    cfg = {"double": double, "single": single, "signal": signal}
    done = root / "complete.json"
    if done.is_file() and json.loads(done.read_text())["cfg"] == cfg:
        return json.loads(done.read_text())
    if root.exists():
        shutil.rmtree(root)
    (root / "tuned_diffusers").mkdir(parents=True)
    shapes, config = flux_shapes(double, single)
    meta = {k: torch.empty(s, dtype=torch.bfloat16, device="meta") for k, s in shapes.items()}
    nm = get_family("flux_dev").naming(meta)  # the structure of these keys (block counts)
    bfl_entries = [(k, tuple(t.shape)) for _, names in groups(shapes)
                   for k, t in to_bfl({n: meta[n] for n in names}, nm).items()]
    base_w = StreamingSafetensors(root / "base.safetensors", bfl_entries)
    tuned_w = StreamingSafetensors(root / "tuned_bfl.safetensors", bfl_entries)
    g = torch.Generator().manual_seed(0)
    weight_map, t0 = {}, time.perf_counter()
    gs = groups(shapes)
    for i, (gname, names) in enumerate(gs):
        base, tuned = {}, {}
        for k in names:
            shape = shapes[k]
            if k.endswith("norm_q.weight") or k.endswith("norm_k.weight") or "norm_added_" in k:
                base[k] = torch.ones(shape, dtype=torch.bfloat16)
                tuned[k] = base[k]
            elif len(shape) == 1:
                base[k] = (torch.randn(shape, generator=g) * 0.02).bfloat16()
                tuned[k] = base[k]
            else:
                w = torch.randn(shape, generator=g) / math.sqrt(shape[1])
                base[k] = w.bfloat16()
                tuned[k] = w.add_(synthetic_delta(*shape, min(signal, *shape), g)).bfloat16()
                del w
        shard = f"diffusion_pytorch_model-{i + 1:05d}-of-{len(gs):05d}.safetensors"
        save_file(tuned, str(root / "tuned_diffusers" / shard), metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(names, shard))
        for writer, state in ((base_w, base), (tuned_w, tuned)):
            for k, t in to_bfl(state, nm).items():
                writer.write(k, t)
        print(f"  wrote {gname} ({i + 1}/{len(gs)}, {time.perf_counter() - t0:.0f} s)", file=sys.stderr, flush=True)
    base_w.close()
    tuned_w.close()
    (root / "tuned_diffusers" / "diffusion_pytorch_model.safetensors.index.json").write_text(
        json.dumps({"metadata": {}, "weight_map": weight_map}))
    (root / "tuned_diffusers" / "config.json").write_text(
        json.dumps({"_class_name": "FluxTransformer2DModel", "_diffusers_version": "0.42.1", **config}))
    sizes = {p.name: sum(f.stat().st_size for f in ([p] if p.is_file() else p.glob("*.safetensors")))
             for p in (root / "base.safetensors", root / "tuned_diffusers", root / "tuned_bfl.safetensors")}
    doc = {"cfg": cfg, "bytes": sizes, "build_s": time.perf_counter() - t0,
           "linear_modules": len(nm.modules), "tensors": len(shapes)}
    done.write_text(json.dumps(doc))
    return doc


def run_extract(base: Path, tuned: Path, out: Path, rank: int, fmt: str) -> tuple[float, float, float, dict]:
    secs, rss, cpu, stdout = run_cli("extract", "--base", str(base), "--tuned", str(tuned), "-o", str(out), "--to", fmt,
                                     "--rank", str(rank), "--json", "--force", "--quiet", "--device", "cpu")
    return secs, rss, cpu, json.loads(stdout)


def block_type(name: str) -> str:
    if ".single_transformer_blocks." in f".{name}":
        return "single"
    return "double" if ".transformer_blocks." in f".{name}" else "top"


def per_block_seconds(doc: dict, double: int, single: int) -> dict:
    """Report seconds summed by block type, per block, and extrapolated to Flux.1's 19 + 38 blocks."""
    secs = {"top": 0.0, "double": 0.0, "single": 0.0}
    for r in doc["layers"]:
        secs[block_type(r["name"].removeprefix("transformer."))] += r.get("time_s", 0.0)
    per_double, per_single = secs["double"] / max(double, 1), secs["single"] / max(single, 1)
    return {"top_s": secs["top"], "per_double_block_s": per_double, "per_single_block_s": per_single,
            "layer_s_measured": sum(secs.values()),
            "layer_s_full_extrapolated": secs["top"] + 19 * per_double + 38 * per_single}


def optimum(root: Path, rank: int, modules: list[str]) -> dict[str, dict]:
    """Dense float64 SVD of the stored ΔW (bf16 tuned − bf16 base) of ``modules``: the Eckart–Young optimum."""
    nm = get_family("flux_dev").naming(safe_open(str(root / "base.safetensors"), "pt").keys())
    index = json.loads((root / "tuned_diffusers" / "diffusion_pytorch_model.safetensors.index.json").read_text())
    rows = {}
    with safe_open(str(root / "base.safetensors"), "pt") as base:
        for path in modules:
            m = nm.module(f"transformer.{path}")
            with safe_open(str(root / "tuned_diffusers" / index["weight_map"][f"{path}.weight"]), "pt") as tf:
                tuned = tf.get_tensor(f"{path}.weight").double()
            delta = tuned - flux.take_rows(m, base.get_tensor(m.weight_key)).double()
            t0 = time.perf_counter()
            e = torch.linalg.svdvals(delta).square()
            rows[path] = {"delta": delta, "shape": list(delta.shape), "dense_svd_s": time.perf_counter() - t0,
                          "optimal_error": math.sqrt(float(e[rank:].sum() / e.sum()))}
    return rows


def written_errors(out: Path, base: Path, dense: dict[str, dict], report: dict) -> list[dict]:
    """Per sampled module: the report's error and the written factors' error against the float64 optimum."""
    from loratools.formats import load_adapter

    adapter = load_adapter(out, base=base)
    by_name = {r["name"].removeprefix("transformer."): r for r in report["layers"]}
    rows = []
    for path, d in dense.items():
        got = adapter.layers[f"transformer.{path}"].delta(torch.float64)
        written = float((d["delta"] - got).norm() / d["delta"].norm())
        rep = by_name[path]["relative_error"]
        rows.append({"module": path, "shape": d["shape"], "optimal_error": d["optimal_error"], "report_error": rep,
                     "written_error": written, "report_over_optimal": rep / d["optimal_error"],
                     "written_over_optimal": written / d["optimal_error"]})
    return rows


def resolve_check(out: Path, base: Path, expected: int) -> dict:
    from loratools.inspect import inspect_adapter

    doc = inspect_adapter(out, base=base)
    bad = [w for w in doc["summary"].get("warnings", []) if "shape" in w]
    return {"layers": len(doc["layers"]), "expected": expected, "unmatched": len(doc["summary"]["unmatched"]),
            "shape_warnings": len(bad), "resolved_fraction": (len(doc["layers"]) - len(doc["summary"]["unmatched"]))
            / max(expected, 1)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--double", type=int, default=19, help="double blocks (Flux.1: 19)")
    ap.add_argument("--single", type=int, default=38, help="single blocks (Flux.1: 38)")
    ap.add_argument("--rank", type=int, default=16)
    ap.add_argument("--signal", type=int, default=256, help="rank of the decaying part of each synthetic ΔW")
    ap.add_argument("--dense", nargs="*", default=list(DENSE), help="modules (diffusers paths) given a dense SVD")
    ap.add_argument("--dir", type=Path, default=Path("/tmp/loratools-bench-flux-extract"))
    ap.add_argument("--keep", action="store_true", help="keep the checkpoints (default: delete them at the end)")
    args = ap.parse_args()
    try:
        made = build(args.dir, args.double, args.single, args.signal)
        print(f"pair: {args.double} double + {args.single} single blocks, {made['linear_modules']} Linear modules, "
              f"bytes {made['bytes']}, built in {made['build_s']:.0f} s", flush=True)
        base = args.dir / "base.safetensors"
        dense = optimum(args.dir, args.rank, args.dense)
        print("dense float64 SVD s:", {k: round(v["dense_svd_s"], 1) for k, v in dense.items()}, flush=True)
        results = {"pair": made, "rank": args.rank, "threads": torch.get_num_threads(), "runs": []}
        for label, tuned, fmt, out in (
            ("BFL (model.diffusion_model.) base, diffusers-folder tuned → comfy", args.dir / "tuned_diffusers",
             "comfy", args.dir / "cross.safetensors"),
            ("BFL base, BFL tuned → kohya", args.dir / "tuned_bfl.safetensors", "kohya", args.dir / "bfl.safetensors"),
        ):
            load = os.getloadavg()[0]
            wall, rss, cpu, doc = run_extract(base, tuned, out, args.rank, fmt)
            run = {"run": label, "wall_s": wall, "cpu_s": cpu, "loadavg_1min_before": load, "peak_rss_mib": rss,
                   "full_wall_s_extrapolated": 0.0, "layers": len(doc["layers"]),
                   "output_bytes": out.stat().st_size, "report_max_relative_error":
                   max(r["relative_error"] for r in doc["layers"]),
                   **per_block_seconds(doc, args.double, args.single),
                   "resolve": resolve_check(out, base, made["linear_modules"])}
            # the report's per-layer seconds overlap (reads run ahead of the SVDs): scale the wall time by their share
            run["full_wall_s_extrapolated"] = wall * run["layer_s_full_extrapolated"] / run["layer_s_measured"]
            run["dense"] = written_errors(out, base, dense, doc)
            results["runs"].append(run)
            print(json.dumps(run, indent=1), flush=True)
        (args.dir.parent / f"{args.dir.name}-results.json").write_text(json.dumps(results, indent=1))
    finally:
        if not args.keep and args.dir.exists():
            shutil.rmtree(args.dir)


if __name__ == "__main__":
    main()
