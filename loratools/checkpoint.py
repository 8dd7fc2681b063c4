"""Lazy, tensor-by-tensor reader for base / fine-tuned checkpoints (DESIGN.md §3).

Accepts an HF model folder (``model.safetensors``, sharded ``model.safetensors.index.json``,
``pytorch_model.bin`` / its index, diffusers ``diffusion_pytorch_model.*``), a single
``.safetensors`` file, a ``.bin`` / ``.pt`` file, or a diffusers pipeline folder (``model_index.json`` and one
subfolder per component: its keys are ``<component>.<key inside the component>``). safetensors are memory-mapped and read one
tensor at a time; pickles are only ever opened with ``torch.load(weights_only=True, mmap=True)``.
"""

from __future__ import annotations

import json
import os
import re
import warnings
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, replace
from pathlib import Path
from types import SimpleNamespace

import torch
from safetensors import safe_open

from loratools.errors import LoraToolsError
from loratools.families.base import split_component
from loratools.families.sd import flatten_text_model, normalise_text_model
from loratools.quant import dequantize, quantization

SAFE_NAMES = ("model.safetensors", "diffusion_pytorch_model.safetensors")
BIN_NAMES = ("pytorch_model.bin", "diffusion_pytorch_model.bin", "model.bin", "model.pt")
DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
    "BOOL": torch.bool, "F8_E4M3": getattr(torch, "float8_e4m3fn", None), "F8_E5M2": getattr(torch, "float8_e5m2", None),
    "F8_E8M0": getattr(torch, "float8_e8m0fnu", None),
    "U16": getattr(torch, "uint16", None), "U32": getattr(torch, "uint32", None), "U64": getattr(torch, "uint64", None),
}


PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt")


def is_safetensors(path: Path) -> bool:
    """True for a ``.safetensors`` name, or for any other name whose bytes start like one.

    safetensors files begin with an 8-byte little-endian header length followed by a JSON object, so
    an output written without the extension (``-o merged``), or a safetensors file renamed ``.bin``, is
    still recognised and never handed to ``torch.load``. Pickles cannot match: a zip-based torch file
    starts with ``PK\\x03\\x04`` (ninth byte: a compression method, never ``{``), a legacy one with ``\\x80``.
    """
    if path.suffix == ".safetensors":
        return True
    try:
        with open(path, "rb") as fh:
            head = fh.read(9)
    except OSError:
        return False
    return len(head) == 9 and head[8:9] == b"{" and 0 < int.from_bytes(head[:8], "little") < path.stat().st_size


def open_safetensors(path: Path):
    """safe_open with a one-line error for a missing, truncated or corrupt file."""
    try:
        return safe_open(str(path), framework="pt")
    except FileNotFoundError:
        raise LoraToolsError(f"{path}: no such file") from None
    except Exception as exc:  # safetensors raises its own error types for bad headers
        raise LoraToolsError(f"{path}: not a readable safetensors file ({_one_line(exc)})") from None


def safe_load_pickle(path: Path) -> dict[str, torch.Tensor]:
    """Load a .bin/.pt state dict with ``weights_only=True`` (no code execution), mmap where possible."""
    try:
        with warnings.catch_warnings():  # torch's pickle-protocol warning would be a second stderr line
            warnings.simplefilter("ignore", UserWarning)
            try:
                obj = torch.load(str(path), map_location="cpu", weights_only=True, mmap=True)
            except RuntimeError as exc:
                if "mmap" not in str(exc):
                    raise
                obj = torch.load(str(path), map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise LoraToolsError(f"{path}: no such file") from None
    except Exception as exc:
        raise LoraToolsError(f"{path}: refused to load: {_refusal_reason(exc)}") from None
    if isinstance(obj, dict) and "state_dict" in obj and isinstance(obj["state_dict"], dict):
        obj = obj["state_dict"]
    if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise LoraToolsError(f"{path}: expected a dict of tensors, got {type(obj).__name__}")
    return obj


def _read_index(index: Path) -> dict[str, str]:
    """The ``weight_map`` of a shard index, checked: {tensor name → shard file name in the same folder}."""
    try:
        doc = json.loads(index.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise LoraToolsError(f"{index}: not a valid shard index (not JSON: {_one_line(exc)})") from None
    if not isinstance(doc, dict) or "weight_map" not in doc:
        raise LoraToolsError(f"{index}: not a valid shard index (no 'weight_map' object)")
    weight_map = doc["weight_map"]
    if not isinstance(weight_map, dict):
        raise LoraToolsError(f"{index}: 'weight_map' must be an object of tensor name → shard file, "
                             f"got {type(weight_map).__name__}")
    if not weight_map:
        raise LoraToolsError(f"{index}: 'weight_map' is empty")
    for key, shard in weight_map.items():
        if not isinstance(shard, str) or not shard or Path(shard).is_absolute() or ".." in Path(shard).parts:
            raise LoraToolsError(
                f"{index}: 'weight_map' entry {key!r} must name a shard file in the same folder, got {json.dumps(shard)[:80]}"
            )
    return weight_map


def _refusal_reason(exc: BaseException) -> str:
    """Why torch's safe unpickler refused a file, without torch's advice to reload it unsafely."""
    text = str(exc)
    found = re.search(r"GLOBAL ([\w.]+)", text)
    if found:
        return f"it holds a {found.group(1)} object, not only tensors, and unpickling it could execute code"
    if "Weights only load failed" in text:
        detail = re.search(r"WeightsUnpickler error:\s*(\S[^\n]*)", text)
        return ("not a plain tensor state dict, and unpickling anything else could execute code"
                + (f" (safe unpickler: {detail.group(1).strip()[:200]})" if detail else ""))
    return f"not a readable tensor state dict ({_one_line(exc)})"


def _one_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return text[0][:300] if text else type(exc).__name__


@dataclass(frozen=True)
class ModuleRef:
    """Where a module's weight lives in a checkpoint: tensor ``key``, its row slice ``rows`` (fused projections:
    OpenCLIP ``in_proj`` holds q, k, v), ``transpose`` where the tensor stores the weight transposed, ``row_order``
    where the module's rows are the tensor's row blocks in another order (Flux ``norm_out.linear``: halves swapped).

    A routed expert of a fused 3-D expert tensor (``families/moe.py``) has ``expert``, the index into the tensor's
    first dimension; the expert's 2-D slice is transposed first where stored ``[in, out]``, then ``rows`` (with
    ``step``: interleaved gate/up) select the module's output rows."""

    key: str
    rows: tuple[int, int] | None = None
    transpose: bool = False
    row_order: tuple[tuple[int, int], ...] | None = None
    expert: int | None = None
    step: int = 1

    def take(self, tensor: torch.Tensor) -> torch.Tensor:
        """The module's weight out of the whole stored tensor (a view; a copy where rows are reordered)."""
        if self.expert is not None:
            tensor = tensor[self.expert]
            tensor = tensor.T if self.transpose else tensor
            return tensor if self.rows is None else tensor[self.rows[0] : self.rows[1] : self.step]
        if self.row_order is not None:
            return torch.cat([tensor[a:b] for a, b in self.row_order], dim=0)
        if self.rows is not None:
            tensor = tensor[self.rows[0] : self.rows[1]]
        return tensor.T if self.transpose else tensor

    def put(self, tensor: torch.Tensor, value: torch.Tensor) -> None:
        """Write the module's weight ``value`` back into the whole stored ``tensor`` (in place)."""
        if self.row_order is not None:
            i = 0
            for a, b in self.row_order:
                tensor[a:b].copy_(value[i : i + b - a])
                i += b - a
            return
        self.take(tensor).copy_(value)

    @property
    def whole(self) -> bool:
        """Whether the module's weight is the stored tensor as it is (no row slice, order, transpose or expert)."""
        return self.rows is None and not self.transpose and self.row_order is None and self.expert is None

    def shape_in(self, stored: tuple[int, ...]) -> tuple[int, ...]:
        """The module's weight shape inside a stored tensor of shape ``stored``."""
        if self.expert is not None:
            stored = tuple(reversed(stored[1:])) if self.transpose else tuple(stored[1:])
            return stored if self.rows is None else (len(range(self.rows[0], self.rows[1], self.step)), *stored[1:])
        if self.rows is not None:
            stored = (self.rows[1] - self.rows[0], *stored[1:])
        return tuple(reversed(stored)) if self.transpose else tuple(stored)


class _Shapes(Mapping):
    """A checkpoint's keys, each mapped to an object with the tensor's ``.shape`` (read lazily from the header)."""

    def __init__(self, ckpt: Checkpoint) -> None:
        self.ckpt = ckpt

    def __getitem__(self, key: str):
        if key not in self.ckpt:
            raise KeyError(key)
        return SimpleNamespace(shape=self.ckpt.shape(key))

    def __iter__(self):
        return iter(self.ckpt.keys())

    def __len__(self) -> int:
        return len(self.ckpt.keys())


class Checkpoint:
    """Lazy view of a model's weights: ``keys()``, ``shape(key)``, ``dtype(key)``, ``get(key)``.

    Only the tensor asked for is read; safetensors shards are memory-mapped and opened on demand.
    """

    def __init__(self, path: str | os.PathLike) -> None:
        self.path = Path(path)
        if not self.path.exists():
            raise LoraToolsError(f"{self.path}: no such file or folder")
        self._where: dict[str, Path] = {}  # key -> file
        self._stored: dict[str, str] = {}  # key -> its name inside the file, where they differ (pipeline folders)
        self._prefix: dict[Path, str] = {}  # file -> what its stored keys get in front (``unet.``)
        #: pipeline folders: component -> its subfolder, in model_index.json's order (empty otherwise)
        self.components: dict[str, Path] = {}
        self._handles: dict[Path, object] = {}
        self._pickles: dict[Path, dict[str, torch.Tensor]] = {}
        self.files: list[Path] = []
        self.index_file: Path | None = None
        #: every shard index read (one per sharded component of a pipeline folder)
        self.index_files: list[Path] = []
        self._discover()
        if self.index_file is not None:
            self.index_files = [self.index_file]

    @property
    def is_pipeline(self) -> bool:
        """Whether this is a diffusers pipeline folder (``model_index.json`` + component subfolders)."""
        return bool(self.components)

    # ------------------------------------------------------------------ discovery
    def _discover(self) -> None:
        p = self.path
        if p.is_dir() and (p / "model_index.json").is_file():
            self._discover_pipeline()
            return
        if p.is_file():
            self.files = [p]
        else:
            index = next((p / n for n in (
                "model.safetensors.index.json", "diffusion_pytorch_model.safetensors.index.json",
                "pytorch_model.bin.index.json",
            ) if (p / n).is_file()), None)
            if index is not None:
                self.index_file = index
                weight_map = _read_index(index)
                missing = sorted({f for f in weight_map.values() if not (p / f).is_file()})
                if missing:
                    raise LoraToolsError(f"{index}: shard(s) missing: {', '.join(missing)}")
                self.files = sorted({p / f for f in weight_map.values()})
                self._where = {k: p / f for k, f in weight_map.items()}
                return
            names = [n for n in SAFE_NAMES + BIN_NAMES if (p / n).is_file()]
            if not names:
                found = sorted(x.name for x in p.glob("*.safetensors")) or sorted(x.name for x in p.glob("*.bin"))
                if len(found) == 1:
                    names = found
                else:
                    raise LoraToolsError(
                        f"{p}: no model weights found (expected model.safetensors, a *.index.json or pytorch_model.bin)"
                    )
            self.files = [p / names[0]]
        for f in self.files:
            for k in self._file_keys(f):
                self._where[k] = f

    def _discover_pipeline(self) -> None:
        """Each model component (a subfolder with a ``config.json``) read as a folder, its keys prefixed."""
        p = self.path
        index = p / "model_index.json"
        try:
            doc = json.loads(index.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise LoraToolsError(f"{index}: not valid JSON ({_one_line(exc)})") from None
        if not isinstance(doc, dict):
            raise LoraToolsError(f"{index}: expected an object of component → [library, class]")
        listed = [k for k, v in doc.items()
                  if not k.startswith("_") and isinstance(v, list) and len(v) == 2 and all(v)]
        absent = [c for c in listed if not (p / c).is_dir()]
        if absent:
            raise LoraToolsError(f"{p}: model_index.json lists component(s) with no folder: {', '.join(absent)}")
        comps = [c for c in listed if (p / c / "config.json").is_file()]
        if not comps:
            raise LoraToolsError(f"{p}: pipeline folder (model_index.json) with no model component "
                                 "(a subfolder with config.json and weights)")
        for comp in comps:
            try:
                sub = Checkpoint(p / comp)
            except LoraToolsError as exc:
                raise LoraToolsError(f"{p}: pipeline component {comp}: {exc}") from None
            self.components[comp] = sub.path
            for k, f in sub._where.items():
                self._where[f"{comp}.{k}"] = f
                self._stored[f"{comp}.{k}"] = k
            for f in sub.files:
                self._prefix[f] = f"{comp}."
            self.files += sub.files
            self.index_files += sub.index_files
            self._handles.update(sub._handles)
            self._pickles.update(sub._pickles)

    def _file_keys(self, f: Path) -> list[str]:
        if is_safetensors(f):
            return list(self._handle(f).keys())
        if f.suffix in PICKLE_SUFFIXES:
            return list(self._pickle(f).keys())
        raise LoraToolsError(f"{f}: unsupported checkpoint file type (expected .safetensors, .bin or .pt)")

    def _handle(self, f: Path):
        if f not in self._handles:
            self._handles[f] = open_safetensors(f)
        return self._handles[f]

    def _pickle(self, f: Path) -> dict[str, torch.Tensor]:
        if f not in self._pickles:
            self._pickles[f] = safe_load_pickle(f)
        return self._pickles[f]

    # ------------------------------------------------------------------ access
    def keys(self) -> list[str]:
        return list(self._where)

    def __contains__(self, key: str) -> bool:
        return key in self._where

    def file_of(self, key: str) -> Path:
        return self._where[key]

    def stored_key(self, key: str) -> str:
        """The name tensor ``key`` has inside its file (a pipeline folder's keys carry their component)."""
        return self._stored.get(key, key)

    def _check(self, key: str) -> tuple[Path, str]:
        if key not in self._where:
            raise LoraToolsError(f"{self.path}: no tensor named {key!r}")
        return self._where[key], self._stored.get(key, key)

    def shape(self, key: str) -> tuple[int, ...]:
        f, k = self._check(key)
        if is_safetensors(f):
            return tuple(self._handle(f).get_slice(k).get_shape())
        return tuple(self._pickle(f)[k].shape)

    def dtype(self, key: str) -> torch.dtype:
        f, k = self._check(key)
        if is_safetensors(f):
            return DTYPES.get(self._handle(f).get_slice(k).get_dtype(), torch.float32)
        return self._pickle(f)[k].dtype

    def get(self, key: str) -> torch.Tensor:
        """Tensor ``key``; an fp8 weight with a scale comes dequantized to float32 (:mod:`loratools.quant`)."""
        f, k = self._check(key)
        return dequantize(self, key, self.read_stored(f, k), self.get)

    @property
    def quant(self):
        """The checkpoint's fp8 scales and markers (:class:`loratools.quant.Quantization`, built on first use)."""
        return quantization(self)

    # ------------------------------------------------------------------ file by file (bake)
    def file_keys(self, f: Path) -> list[tuple[str, str]]:
        """``(key, stored key)`` of every tensor in weight file ``f`` (one of ``files``), in the file's order."""
        prefix = self._prefix.get(f, "")
        return [(prefix + k, k) for k in self._file_keys(f)]

    def file_metadata(self, f: Path) -> dict[str, str]:
        """The safetensors header metadata of weight file ``f`` ({} for pickles)."""
        return dict(self._handle(f).metadata() or {}) if is_safetensors(f) else {}

    def read_stored(self, f: Path, stored: str) -> torch.Tensor:
        """The tensor stored as ``stored`` in weight file ``f``."""
        if is_safetensors(f):
            try:
                return self._handle(f).get_tensor(stored)
            except Exception as exc:
                raise LoraToolsError(f"{f}: cannot read tensor {stored!r} ({_one_line(exc)})") from None
        return self._pickle(f)[stored]

    def release(self, f: Path) -> None:
        """Drop weight file ``f``'s open memory map / loaded pickle (reopened on the next read)."""
        self._handles.pop(f, None)
        self._pickles.pop(f, None)

    def items(self) -> Iterator[tuple[str, torch.Tensor]]:
        for k in self.keys():
            yield k, self.get(k)

    def metadata(self) -> dict[str, str]:
        return self.file_metadata(self.files[0])

    # ------------------------------------------------------------------ module view
    def family(self) -> tuple[str, str] | None:
        """``(family, layout)`` of a known model family (Stable Diffusion single files…), or None."""
        if not hasattr(self, "_family"):
            from loratools.families import detect_family

            self._family = detect_family(_Shapes(self))
        return self._family

    def naming(self):
        """The family's name maps built from this checkpoint's keys (original single-file layouts), or None."""
        if not hasattr(self, "_naming"):
            from loratools.families import naming_for

            fam = self.family()
            try:
                self._naming = naming_for(fam[0], _Shapes(self)) if fam and fam[1] != "diffusers" else None
            except ValueError:  # keys of the family's layout but not its structure (a Flux file under diffusion_model.)
                self._naming = None
        return self._naming

    def family_naming(self):
        """The family's name maps in this checkpoint's own structure: ``naming()`` for an original single file,
        generated from the components' configs for a pipeline folder; None otherwise (or if the configs are
        no family's)."""
        if not hasattr(self, "_family_naming"):
            self._family_naming = self.naming()
            fam = self.family()
            if self._family_naming is None and fam is not None and fam[1] == "diffusers" and not self.is_pipeline:
                from loratools.families import get_family, naming_for

                try:  # a DiT family's diffusers transformer file or folder: its canonical modules, from its keys
                    if hasattr(get_family(fam[0]), "naming_for_shapes"):
                        self._family_naming = naming_for(fam[0], _Shapes(self))
                except ValueError:
                    self._family_naming = None
            if self._family_naming is None and self.is_pipeline and fam is not None:
                from loratools.families import pipeline_naming

                configs = {}
                for comp, folder in self.components.items():
                    try:
                        configs[comp] = json.loads((folder / "config.json").read_text())
                    except (OSError, json.JSONDecodeError, UnicodeDecodeError):
                        pass
                try:
                    self._family_naming = pipeline_naming(fam[0], configs, _Shapes(self))
                except ValueError:
                    self._family_naming = None
        return self._family_naming

    def family_refs(self) -> dict[str, ModuleRef]:
        """The ``module_refs`` a model family adapts (canonical names), for an original single file or a pipeline
        folder of a known family; {} otherwise."""
        nm = self.family_naming()
        if nm is None:
            return {}
        return {m.canonical: ref for m in nm.modules if (ref := self.module_ref(m.canonical)) is not None}

    def module_refs(self) -> dict[str, ModuleRef]:
        """{module name → where its weight lives}: canonical names (``unet.down_blocks…``) with row slices of fused
        tensors (OpenCLIP ``in_proj``) for a family's original layout, else every 2-D+ ``*.weight`` by its path
        (a pipeline folder's text encoders saved without the ``text_model.`` level by their canonical name)."""
        if not hasattr(self, "_refs"):
            nm = self.naming()
            if nm is not None:
                self._refs = {m.canonical: ModuleRef(m.weight_key, m.rows, m.transpose,
                                                     row_order=getattr(m, "row_order", None))
                              for m in nm.modules if m.weight_key in self._where}
            elif self.is_pipeline:
                self._refs = {}
                for name, key in self.modules().items():
                    comp = split_component(name)[0] or ""
                    canon = normalise_text_model(name) if comp.startswith("text_encoder") else name
                    self._refs.setdefault(canon, ModuleRef(key))
            else:
                self._refs = {name: ModuleRef(key) for name, key in self.modules().items()}
                # routed experts by canonical name too (fused 3-D tensors; Mixtral's ``w1`` as ``gate_proj``)
                self._refs |= self.expert_refs()
        return self._refs

    def module_ref(self, name: str) -> ModuleRef | None:
        """Where module ``name`` lives, or None: tried as given, then without its pipeline component (a component
        folder), without the ``text_model.`` level (a transformers-5 text encoder folder), and in a pipeline folder
        under the one component that has it."""
        refs = self.module_refs()
        rest = split_component(name)[1]
        ref = refs.get(name) or refs.get(rest) or refs.get(flatten_text_model(rest))
        if ref is None and self.is_pipeline and split_component(name)[0] is None:
            found = [r for c in self.components if (r := refs.get(f"{c}.{name}")) is not None]
            ref = found[0] if len(found) == 1 else None
        return ref

    def module_shape(self, name: str) -> tuple[int, ...]:
        ref = self._ref(name)
        return ref.shape_in(tuple(self.shape(ref.key)))

    def module_weight(self, name: str) -> torch.Tensor:
        """The weight of module ``name`` (its rows of a fused tensor, transposed back where stored transposed)."""
        return self.read_ref(self._ref(name))

    def read_ref(self, ref: ModuleRef) -> torch.Tensor:
        """The weight ``ref`` points at; of a fused 3-D expert tensor only that expert's slice is read."""
        if ref.expert is None:
            return ref.take(self.get(ref.key))
        f, k = self._check(ref.key)
        if is_safetensors(f):
            try:
                part = self._handle(f).get_slice(k)[ref.expert : ref.expert + 1]
            except Exception as exc:
                raise LoraToolsError(f"{f}: cannot read expert {ref.expert} of {k!r} ({_one_line(exc)})") from None
        else:
            part = self._pickle(f)[k][ref.expert : ref.expert + 1]
        return replace(ref, expert=0).take(part)

    def expert_refs(self) -> dict[str, ModuleRef]:
        """{canonical expert module (``….experts.3.gate_proj``) → where its weight lives}, fused 3-D or per-expert
        tensors alike, the layout read from the architecture (``families/moe.py``), and each MoE router by its
        canonical name (``….mlp.gate``); {} without routed experts."""
        if not hasattr(self, "_expert_refs"):
            from loratools.families import moe

            keys = [k for k in self._where
                    if moe.FUSED_KEY.match(k) or moe.PER_EXPERT_KEY.match(k) or moe.ROUTER_KEY.match(k)]
            layout = moe.layout_for(moe.model_type(self.path)) if keys else None
            try:
                mods = moe.expert_modules(keys, {k: tuple(self.shape(k)) for k in keys}, layout)
            except ValueError as exc:
                raise LoraToolsError(f"{self.path}: {exc}") from None
            self._expert_refs = {m.name: ModuleRef(m.key, m.rows[:2] if m.rows else None, m.transpose,
                                                   expert=m.expert, step=m.rows[2] if m.rows else 1) for m in mods}
        return self._expert_refs

    def _ref(self, name: str) -> ModuleRef:
        ref = self.module_ref(name)
        if ref is None:
            raise LoraToolsError(f"{name}: no weight for this module in the base checkpoint {self.path}")
        return ref

    def modules(self) -> dict[str, str]:
        """{module path → weight key} for every ``*.weight`` tensor of 2 or more dimensions."""
        out = {}
        for k in self._where:
            if k.endswith(".weight") and len(self.shape(k)) >= 2:
                out[k[: -len(".weight")]] = k
        return out
