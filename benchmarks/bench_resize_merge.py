"""Benchmark: loratools resize / svd-merge (exact, factored) vs the dense algorithm, in the same run.

Inputs: two LLM-shaped PEFT adapters (32 layers × q,k,v,o 4096×4096 and gate/up 11008×4096,
down 4096×11008; rank 64; fp16 files; alphas 128 and 32), with decaying random spectra.

* resize to rank 16, and svd-merge 0.6·A + 0.4·B to rank 32 — loratools (QR of the factors + a
  small SVD, every layer) vs dense (``up @ down`` then ``torch.linalg.svd(full_matrices=False)``,
  as sd-scripts' resize_lora.py / svd_merge_lora.py and PEFT's svd merge do; full_matrices=False
  is the faster, kinder baseline).
* The dense baseline takes minutes per large layer on a small CPU, so it is timed on a
  representative subset (``--dense-per-type`` layers of each shape) and extrapolated per layer type
  to the whole model; the output says so. Accuracy is the max over those layers of
  ‖ΔW_loratools − ΔW_dense‖_F / ‖ΔW_dense‖_F, with loratools' factors stored in fp16 (as written)
  and in fp32.
* Each phase runs in its own process so that its peak RSS (ru_maxrss) is its own.

Run: ``python benchmarks/bench_resize_merge.py [--small] [--device cpu|cuda|auto]``.
"""

from __future__ import annotations

import argparse
import json
import math
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from loratools.adapter import LoraLayer  # noqa: E402
from loratools.formats import load_adapter, save_adapter  # noqa: E402
from loratools.linalg import RankRule  # noqa: E402
from loratools.merge import merge_adapters  # noqa: E402
from loratools.resize import resize_adapter  # noqa: E402

RESIZE_RANK, MERGE_RANK, RANK = 16, 32, 64
WEIGHTS = (0.6, 0.4)
ALPHAS = (128.0, 32.0)


def shapes(small: bool) -> tuple[int, dict[str, tuple[int, int]]]:
    hidden, inter, layers = (1024, 2752, 4) if small else (4096, 11008, 32)
    proj = {"self_attn.q_proj": (hidden, hidden), "self_attn.k_proj": (hidden, hidden),
            "self_attn.v_proj": (hidden, hidden), "self_attn.o_proj": (hidden, hidden),
            "mlp.gate_proj": (inter, hidden), "mlp.up_proj": (inter, hidden), "mlp.down_proj": (hidden, inter)}
    return layers, proj


def layer_type(name: str, shape: tuple[int, int]) -> str:
    return f"{shape[0]}x{shape[1]}"


def peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def warm_up(device: str) -> None:
    """Load the BLAS/LAPACK kernels once so that no timing includes their first-call set-up."""
    x = torch.randn(512, 64, device=device)
    torch.linalg.qr(x)
    torch.linalg.svd(x @ x.T, full_matrices=False)
    sync(device)


# ----------------------------------------------------------------------------- phases
def phase_generate(args) -> dict:
    from safetensors.torch import save_file

    n_layers, proj = shapes(args.small)
    for idx, alpha in enumerate(ALPHAS):
        g = torch.Generator().manual_seed(100 + idx)
        decay = 0.95 ** torch.arange(RANK, dtype=torch.float32)
        sd = {}
        for i in range(n_layers):
            for p, (o, n) in proj.items():
                stem = f"base_model.model.model.layers.{i}.{p}"
                sd[stem + ".lora_A.weight"] = (torch.randn(RANK, n, generator=g) / math.sqrt(n)).half()
                sd[stem + ".lora_B.weight"] = (torch.randn(o, RANK, generator=g) * 0.02 * decay).half()
        d = Path(args.work) / f"adapter{idx}"
        d.mkdir()
        save_file(sd, str(d / "adapter_model.safetensors"), metadata={"format": "pt"})
        cfg = {"peft_type": "LORA", "r": RANK, "lora_alpha": alpha, "target_modules": sorted({p.split(".")[-1] for p in proj}),
               "use_rslora": False, "use_dora": False}
        (d / "adapter_config.json").write_text(json.dumps(cfg))
    return {"peak_rss_mib": peak_rss_mib()}


def subset(names_shapes: dict[str, tuple[int, int]], per_type: int) -> list[str]:
    chosen: dict[str, list[str]] = {}
    for name, shape in names_shapes.items():
        lst = chosen.setdefault(layer_type(name, shape), [])
        if len(lst) < per_type:
            lst.append(name)
    return [n for lst in chosen.values() for n in lst]


def to_fp32(ad):
    for layer in ad.layers.values():
        layer.down, layer.up = layer.down.float(), layer.up.float()
    return ad


def phase_loratools(args) -> dict:
    work = Path(args.work)
    warm_up(args.device)
    t0 = time.perf_counter()
    a, b = load_adapter(work / "adapter0"), load_adapter(work / "adapter1")
    t_load = time.perf_counter() - t0
    res: dict = {"layers": len(a.layers), "load_s": t_load}
    shapes_ = {n: layer.matrix_shape for n, layer in a.layers.items()}
    keep = subset(shapes_, args.dense_per_type)
    saved = {}
    for dtype_name, conv in (("fp16", lambda x: x), ("fp32", to_fp32)):
        ra = conv(load_adapter(work / "adapter0")) if dtype_name == "fp32" else a
        rb = conv(load_adapter(work / "adapter1")) if dtype_name == "fp32" else b
        sync(args.device)
        t0 = time.perf_counter()
        resized, _ = resize_adapter(ra, RankRule("rank", RESIZE_RANK))
        t_resize = time.perf_counter() - t0
        t0 = time.perf_counter()
        merged, report = merge_adapters([(ra, WEIGHTS[0]), (rb, WEIGHTS[1])], method="svd", rank=MERGE_RANK,
                                        device=args.device)
        sync(args.device)
        t_merge = time.perf_counter() - t0
        res[dtype_name] = {"resize_s": t_resize, "merge_s": t_merge,
                           "out_dtype": str(resized.layers[keep[0]].dtype).replace("torch.", "")}
        for n in keep:
            saved[(dtype_name, "resize", n)] = (resized.layers[n].up, resized.layers[n].down, resized.layers[n].scale)
            saved[(dtype_name, "merge", n)] = (merged.layers[n].up, merged.layers[n].down, merged.layers[n].scale)
        if dtype_name == "fp16":
            t0 = time.perf_counter()
            save_adapter(resized, work / "resized", "peft", force=True)
            save_adapter(merged, work / "merged", "peft", force=True)
            res["save_s"] = time.perf_counter() - t0
    torch.save({"|".join(k): v for k, v in saved.items()}, work / "ours.pt")
    res["subset"] = keep
    res["peak_rss_mib"] = peak_rss_mib()
    return res


def dense_truncate(w: torch.Tensor, k: int) -> torch.Tensor:
    u, s, vh = torch.linalg.svd(w, full_matrices=False)
    return (u[:, :k] * s[:k]) @ vh[:k]


def phase_dense(args) -> dict:
    work = Path(args.work)
    a, b = load_adapter(work / "adapter0"), load_adapter(work / "adapter1")
    ours = torch.load(work / "ours.pt", weights_only=True)
    keep = json.loads(args.subset)
    dev = torch.device(args.device)
    warm_up(args.device)
    times: dict[str, dict[str, list[float]]] = {"resize": {}, "merge": {}}
    errors: dict[str, dict[str, float]] = {"resize": {"fp16": 0.0, "fp32": 0.0}, "merge": {"fp16": 0.0, "fp32": 0.0}}

    def dense_of(layer: LoraLayer) -> torch.Tensor:
        return (layer.up.to(dev).float() @ layer.down.to(dev).float()) * layer.scale

    for name in keep:
        typ = layer_type(name, a.layers[name].matrix_shape)
        for op in ("resize", "merge"):
            sync(args.device)
            t0 = time.perf_counter()
            if op == "resize":
                ref = dense_truncate(dense_of(a.layers[name]), RESIZE_RANK)
            else:
                ref = dense_truncate(WEIGHTS[0] * dense_of(a.layers[name]) + WEIGHTS[1] * dense_of(b.layers[name]),
                                     MERGE_RANK)
            sync(args.device)
            times[op].setdefault(typ, []).append(time.perf_counter() - t0)
            for dt in ("fp16", "fp32"):
                up, down, scale = ours[f"{dt}|{op}|{name}"]
                mine = (up.to(dev).float() @ down.to(dev).float()) * scale
                err = float((mine.double() - ref.double()).norm() / ref.double().norm())
                errors[op][dt] = max(errors[op][dt], err)
            del ref
    return {"times": times, "errors": errors, "peak_rss_mib": peak_rss_mib()}


def run_phase(name: str, args, extra: list[str] | None = None) -> dict:
    cmd = [sys.executable, __file__, "--phase", name, "--work", args.work, "--device", args.device,
           "--dense-per-type", str(args.dense_per_type)] + (["--small"] if args.small else []) + (extra or [])
    out = subprocess.run(cmd, check=True, capture_output=True, text=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--small", action="store_true", help="4 layers, hidden 1024 (a quick smoke run)")
    ap.add_argument("--device", default="cpu", help="cpu, cuda or auto")
    ap.add_argument("--dense-per-type", type=int, default=1, help="dense baseline layers timed per layer shape")
    ap.add_argument("--phase", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--work", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--subset", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.device == "auto":
        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    if args.phase:
        fn = {"generate": phase_generate, "loratools": phase_loratools, "dense": phase_dense}[args.phase]
        print(json.dumps(fn(args)))
        return
    with tempfile.TemporaryDirectory(prefix="bench_resize_merge_") as tmp:
        args.work = tmp
        t0 = time.perf_counter()
        gen = run_phase("generate", args)
        n_layers, proj = shapes(args.small)
        print(f"inputs: 2 PEFT adapters, {n_layers} layers × {len(proj)} modules "
              f"({', '.join(sorted({f'{o}x{n}' for o, n in proj.values()}))}), rank {RANK}, fp16 files, "
              f"{sum(f.stat().st_size for f in Path(tmp).rglob('*.safetensors')) / 2**20 / 2:.0f} MiB each "
              f"(generated in {time.perf_counter() - t0:.1f} s); device {args.device}; torch threads {torch.get_num_threads()}")
        ours = run_phase("loratools", args)
        dense = run_phase("dense", args, ["--subset", json.dumps(ours["subset"])])
    counts: dict[str, int] = {}
    for o, n in proj.values():
        counts[f"{o}x{n}"] = counts.get(f"{o}x{n}", 0) + n_layers
    print(f"dense baseline: timed on {len(ours['subset'])} layer(s) ({args.dense_per_type} per shape), "
          "extrapolated per layer type to all layers:")
    rows = []
    for op, rank in (("resize", RESIZE_RANK), ("merge", MERGE_RANK)):
        per_type = {t: sum(v) / len(v) for t, v in dense["times"][op].items()}
        dense_total = sum(per_type[t] * c for t, c in counts.items())
        detail = ", ".join(f"{t}: {per_type[t]:.2f} s/layer × {counts[t]}" for t in counts)
        print(f"  {op:6s} {detail} -> {dense_total:.1f} s")
        for dt in ("fp16", "fp32"):
            mine = ours[dt][f"{op}_s"]
            rows.append((op, rank, dt, mine, dense_total, dense_total / mine, dense["errors"][op][dt]))
    print()
    print(f"{'operation':10s} {'rank':>4s} {'storage':>7s} {'loratools s':>12s} {'dense s (extrap.)':>18s} "
          f"{'speed-up':>9s} {'max rel. ΔW diff':>17s}")
    for op, rank, dt, mine, dense_total, ratio, err in rows:
        print(f"{op:10s} {rank:4d} {dt:>7s} {mine:12.2f} {dense_total:18.1f} {ratio:8.0f}× {err:17.2e}")
    print()
    print(f"loratools: load {ours['load_s']:.2f} s, save (fp16 resize + merge) {ours['save_s']:.2f} s, "
          f"peak RSS {ours['peak_rss_mib']:.0f} MiB (process: load 2 adapters, resize + merge in fp16 and fp32)")
    print(f"dense:     peak RSS {dense['peak_rss_mib']:.0f} MiB (subset only: one layer's dense ΔW + SVD at a time)")
    print(f"generate:  peak RSS {gen['peak_rss_mib']:.0f} MiB")


if __name__ == "__main__":
    main()
