"""Library side of ``bake``: write base + Σ wᵢ·ΔWᵢ as a full checkpoint in the base's own layout.

Streaming: the base is read one weight file (shard) at a time, through memory maps; each shard is
rewritten with the same keys, order and header metadata, and freed before the next. Tensors no
adapter touches are copied unchanged; touched ones are updated in float32 (float64 for float64
weights) and cast back to the base dtype (or ``dtype``). A sharded base gets the same shard names
and a rewritten ``*.index.json`` (``total_size`` recomputed); every other top-level file (config,
tokenizer, generation config, ...) is copied. A diffusers pipeline folder is baked the same way, component by
component: each weight file keeps its own (unprefixed) keys and its path under the folder, each sharded
component's index is rewritten, and ``model_index.json`` and every component's other files are copied.

Adapters are applied in the order given, as PEFT's ``merge_and_unload`` merges active adapters:
plain layers add ``w·ΔW``; a DoRA layer follows the formula of the library it came from, with the
weight where that library puts it (``w = 1`` reproduces either library exactly):

* PEFT (magnitude per output row): ``W' = m ⊙ V / ‖V‖``, ``V = W + w·ΔW`` (the weight scales ΔW);
* LyCORIS (``dora_scale`` per output row or input column): ``V = W + ΔW``, ``s = m / (‖V‖ + eps)``,
  ``W' = V ⊙ (w·(s − 1) + 1)`` (the multiplier scales the rescale, not ΔW — LyCORIS's forward pass).
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Callable, Collection, Iterable
from contextlib import ExitStack
from pathlib import Path

import torch

from loratools import dora
from loratools.adapter import EXTRA_PREFIX, Adapter, FullLayer, Layer
from loratools.checkpoint import Checkpoint, ModuleRef, is_safetensors
from loratools.device import resolve_device
from loratools.distributed import current, parallel_map, world
from loratools.errors import LoraToolsError
from loratools.formats import load_adapter
from loratools.formats.common import atomic_path, check_output, save_safetensors

Progress = Callable[[Iterable, int], Iterable]
#: weight files of any framework: bake writes only the ones it read and baked
OTHER_WEIGHTS = (".safetensors", ".bin", ".pt", ".pth", ".ckpt", ".msgpack", ".h5", ".gguf", ".onnx")
DTYPE_NAMES = {torch.float32: "float32", torch.float16: "float16", torch.bfloat16: "bfloat16", torch.float64: "float64"}


Plan = dict[str, list[tuple[Layer, float, ModuleRef]]]


def plan_bake(ckpt: Checkpoint, adapters: list[tuple[Adapter, float]], labels: list[str]) -> Plan:
    """{base tensor key → [(layer, weight, where in the tensor), ...]}; refuses anything that would not apply
    cleanly. A module stored in rows of a fused tensor (OpenCLIP ``in_proj``) patches those rows only."""
    plan: Plan = {}
    for (ad, w), label in zip(adapters, labels):
        for k, t in ad.extra_tensors.items():
            layer, ref = _saved_tensor(ckpt, k, t, label)
            plan.setdefault(ref.key, []).append((layer, w, ref))
        for name, layer in ad.layers.items():
            ref = ckpt.module_ref(name)
            if ref is None:
                hint = " (kohya names that did not resolve)" if layer.meta.get("kohya_stem") == name else ""
                raise LoraToolsError(f"{label}: layer {name}{hint} matches no weight of base {ckpt.path}")
            shape = ckpt.module_shape(name)
            if shape != tuple(layer.shape):
                raise LoraToolsError(
                    f"{label}: layer {name} has shape {'×'.join(map(str, layer.shape))} but base {ref.key} is "
                    f"{'×'.join(map(str, shape))}; adapter for another base model?"
                )
            if layer.magnitude is not None:
                if getattr(layer, "embedding", False):
                    raise LoraToolsError(f"{label}: DoRA on embedding {name} is not supported by bake; "
                                         "refusing rather than guessing its normalisation")
            plan.setdefault(ref.key, []).append((layer, w, ref))
    return plan


def _saved_tensor(ckpt: Checkpoint, key: str, value: torch.Tensor, label: str) -> tuple[FullLayer, ModuleRef]:
    """A ``modules_to_save`` tensor as the full difference it makes to its base parameter (PEFT's
    ``merge_and_unload`` puts the saved copy in place of the parameter: at weight w, ``W + w·(saved − W)``)."""
    param = key.removeprefix(EXTRA_PREFIX)
    module, _, leaf = param.rpartition(".")
    ref = ckpt.module_ref(module) if leaf == "weight" else None
    if ref is None and param in ckpt:
        ref = ModuleRef(param)
    if ref is None:
        raise LoraToolsError(f"{label}: saved tensor {key} {list(value.shape)} (modules_to_save) matches no parameter "
                             f"of base {ckpt.path}")
    base = ckpt.read_ref(ref)
    if tuple(base.shape) != tuple(value.shape):
        raise LoraToolsError(f"{label}: saved tensor {key} has shape {list(value.shape)} but base {ref.key} is "
                             f"{list(base.shape)}; adapter for another base model?")
    work = torch.float64 if torch.float64 in (value.dtype, base.dtype) else torch.float32
    return FullLayer(diff=value.to(work) - base.to(work)), ref


def apply_layers(weight: torch.Tensor, items: list[tuple[Layer, float, ModuleRef]]) -> torch.Tensor:
    """``weight`` with each (layer, w) applied in order to its module's part of the tensor (DoRA layers
    renormalise; see module doc)."""
    work = torch.float64 if weight.dtype == torch.float64 else torch.float32
    current = weight.to(work, copy=True)
    for layer, w, ref in items:
        ref.put(current, apply_layer(ref.take(current), layer, w))
    return current


def apply_layer(current: torch.Tensor, layer: Layer, w: float) -> torch.Tensor:
    """One module's weight with ``w``·ΔW of ``layer`` applied (DoRA: the source library's formula)."""
    if isinstance(layer, FullLayer):  # dense already: no product with an identity factor
        delta = layer.delta(current.dtype).to(current.device).reshape(current.shape)
    else:
        left, right = (f.to(current.device) for f in layer.factors(current.dtype))
        delta = (left @ right.T).reshape(current.shape)
    if layer.magnitude is None:
        return current + w * delta
    axis, mag = layer.magnitude_axis, layer.magnitude.to(current.device, current.dtype).reshape(-1)
    if dora.convention(layer) == dora.LYCORIS:
        v = current + delta
        s = w * (mag / (dora.norms(v, axis) + dora.layer_eps(layer)) - 1) + 1
    else:
        v = current + w * delta
        s = mag / dora.norms(v, axis)
    return v * dora.broadcast(s, tuple(v.shape), axis)


def bake(
    base: str | Path,
    adapters: list[tuple[str | Path, float]],
    out: str | Path,
    dtype: torch.dtype | None = None,
    force: bool = False,
    progress: Progress | None = None,
    allow_nonfinite: bool = False,
    family: str | None = None,
    device: str = "cpu",
) -> dict:
    """Write ``base + Σ wᵢ ΔWᵢ`` to ``out`` (file for a single-file base, folder for an HF folder); ``device``: where
    the touched tensors are updated. Under torchrun each rank bakes its share of the weight files (by bytes)."""
    base_path = Path(base)
    # names an existing output folder may hold to be replaced with --force (a pipeline's: its subfolders too)
    known = sorted(e.relative_to(base_path).as_posix() for e in base_path.rglob("*")) if base_path.is_dir() else []
    out = check_output(out, force, [base, *(p for p, _ in adapters)], is_dir=base_path.is_dir(), known_names=known)
    if base_path.is_dir() and Path(out).suffix.lower() in OTHER_WEIGHTS:
        raise LoraToolsError(f"{out}: a folder base ({base_path}) bakes into a folder, but -o ends in "
                             f"{Path(out).suffix!r}; name the output folder without a weight-file suffix")
    ckpt = Checkpoint(base)
    quant = ckpt.quant
    if quant.scales and dtype is None:
        first = next(iter(quant.scales))
        raise LoraToolsError(
            f"{base}: scaled-fp8 checkpoint ({len(quant.scales)} fp8 weights with scales, e.g. {first}): bake writes "
            "them dequantized, never fp8 with a stale scale; pass --dtype bf16 (or fp16 / fp32)")
    loaded = [(load_adapter(p, base=ckpt, allow_nonfinite=allow_nonfinite, family=family), float(w))
              for p, w in adapters]
    labels = [str(p) for p, _ in adapters]
    plan = plan_bake(ckpt, loaded, labels)
    fp8 = [k for k in plan if ckpt.dtype(k).itemsize == 1 and ckpt.dtype(k).is_floating_point]
    if fp8 and dtype is None:
        raise LoraToolsError(
            f"{base}: {len(fp8)} adapted weight(s) are stored in {str(ckpt.dtype(fp8[0])).removeprefix('torch.')} "
            f"(e.g. {fp8[0]}): written back in fp8, most of a LoRA's ΔW rounds away; pass --dtype bf16 "
            "(or fp16 / fp32)")
    is_dir = ckpt.path.is_dir()
    modified = 0
    sizes: dict[Path, int] = {}  # weight file → bytes written
    tensors_written = 0
    left_out: list[str] = []
    dropped: set[tuple[Path, str]] = set()  # (file, stored key) of the scales / markers of a dequantized base
    dev = resolve_device(device)
    w = world()
    files = list(ckpt.files)
    with ExitStack() as stack:
        # rank 0 owns the temporary output; every rank writes the shards it was given (into the journal, to survive
        # a kill, when there is one), rank 0 moves them in and writes the index
        tmp = w.from_main(lambda: stack.enter_context(atomic_path(out, force, is_dir=is_dir, known_names=known)))
        journal = current().journal
        scratch = journal.files if journal is not None else None

        def bake_file(f: Path) -> dict:
            rel = f.relative_to(ckpt.path) if is_dir else Path(f.name)
            dest = (scratch or tmp) / rel if (is_dir or scratch is not None) else tmp
            meta = ckpt.file_metadata(f)
            if quant.scales:  # dequantized: the scales, markers and quantization configs go
                meta.pop("_quantization_metadata", None)
            tensors: dict[str, torch.Tensor] = {}
            done = {"rel": rel.as_posix(), "size": 0, "modified": 0, "tensors": 0, "dropped": []}
            for key, stored in ckpt.file_keys(f):
                if quant.scales and quant.reason(key):
                    done["dropped"].append(stored)
                    continue
                t = quant.dequantize(key, ckpt.read_stored(f, stored), ckpt.get)
                target = dtype if (dtype is not None and t.is_floating_point()) else t.dtype
                if key in plan:
                    t = apply_layers(t.to(dev), plan[key]).cpu()
                    done["modified"] += 1
                tensors[stored] = t.to(target)
                done["size"] += tensors[stored].numel() * tensors[stored].element_size()
                done["tensors"] += 1
            dest.parent.mkdir(parents=True, exist_ok=True)
            if is_safetensors(f):
                save_safetensors(tensors, dest, meta)
            else:
                try:
                    torch.save(tensors, dest)
                except RuntimeError as exc:  # torch reports a failed write (disk full) as a RuntimeError
                    raise LoraToolsError(f"{out}: cannot write: {str(exc).splitlines()[0]}; nothing was written") from None
            del tensors
            ckpt.release(f)
            return done

        results = parallel_map(files, bake_file, [float(f.stat().st_size) for f in files],
                               [f.relative_to(ckpt.path).as_posix() if is_dir else f.name for f in files],
                               progress=progress, files_of=lambda r: [r["rel"]] if scratch is not None else [])
        for f, r in zip(files, results):
            sizes[f] = r["size"]
            modified += r["modified"]
            tensors_written += r["tensors"]
            dropped.update((f, stored) for stored in r["dropped"])
            if scratch is not None and w.is_main:
                dest = tmp / r["rel"] if is_dir else tmp
                dest.parent.mkdir(parents=True, exist_ok=True)
                os.replace(scratch / r["rel"], dest)
        if is_dir and w.is_main:
            left_out = _copy_folder_files(ckpt, tmp, sizes, dtype, dropped)
    warnings = [w for ad, _ in loaded for w in ad.warnings]
    if left_out:
        warnings.append(f"left out {len(left_out)} weight file(s) of the base that bake does not read: "
                        f"{', '.join(left_out)}")
    return {
        "base": str(base), "output": str(out), "files": len(ckpt.files), "tensors": tensors_written,
        "modified": modified, "layers": sum(len(v) for v in plan.values()),
        "adapters": [{"path": p, "weight": w, "format": ad.format, "layers": len(ad.layers)}
                     for p, (ad, w) in zip(labels, loaded)],
        "dtype": DTYPE_NAMES.get(dtype, str(dtype)) if dtype is not None else "kept",
        "warnings": warnings,
    }


def _folder_files(ckpt: Checkpoint) -> list[Path]:
    """The files of a folder checkpoint besides its weights: top-level ones, and for a pipeline folder those of
    every subfolder (component configs, scheduler, tokenizer…; hidden folders such as ``.cache`` skipped)."""
    if not ckpt.is_pipeline:
        return sorted(p for p in ckpt.path.iterdir() if p.is_file())
    return sorted(p for p in ckpt.path.rglob("*") if p.is_file()
                  and not any(part.startswith(".") for part in p.relative_to(ckpt.path).parts[:-1]))


def _copy_folder_files(ckpt: Checkpoint, tmp: Path, sizes: dict[Path, int], dtype: torch.dtype | None,
                       dropped: Collection[tuple[Path, str]] = ()) -> list[str]:
    """Copy the non-weight files; rewrite the shard indexes and (with --dtype) each config.json's dtype. A
    dequantized fp8 base (``dropped``: the (file, key) of its scales and markers) loses those keys from the
    indexes and its ``quantization_config``.

    Weight files bake did not read (a ``pytorch_model.bin`` next to the ``model.safetensors`` it baked,
    other frameworks' weights, their indexes) are not copied: they would hold the un-baked weights.
    Returns their paths (relative to the folder).
    """
    weights = set(ckpt.files)
    indexes = set(ckpt.index_files)
    left_out = []
    for src in _folder_files(ckpt):
        rel = src.relative_to(ckpt.path)
        if src in weights:
            continue
        if src not in indexes and (src.name.endswith(OTHER_WEIGHTS) or src.name.endswith(".index.json")):
            left_out.append(rel.as_posix())
            continue
        dest = tmp / rel
        dest.parent.mkdir(parents=True, exist_ok=True)
        if src in indexes:
            index = json.loads(src.read_text())
            index["weight_map"] = {k: v for k, v in index["weight_map"].items() if (src.parent / v, k) not in dropped}
            shards = {src.parent / name for name in index["weight_map"].values()}
            index.setdefault("metadata", {})["total_size"] = sum(sizes.get(f, 0) for f in shards)
            dest.write_text(json.dumps(index, indent=2) + "\n")
        elif src.name == "config.json" and dtype is not None:
            cfg = json.loads(src.read_text())
            for key in ("torch_dtype", "dtype"):
                if key in cfg:
                    cfg[key] = DTYPE_NAMES.get(dtype, cfg[key])
            if dropped:
                cfg.pop("quantization_config", None)
            dest.write_text(json.dumps(cfg, indent=2) + "\n")
        else:
            shutil.copy2(src, dest)
    return left_out
