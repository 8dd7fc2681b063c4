"""One checkpoint seen in another's layout, through their model family (extract / spectrum across layouts).

A model family names every adaptable module canonically in each of its layouts (DESIGN.md §8), so two checkpoints of
the same family pair by canonical module even when one is an original single file (a BFL Flux file, with or without
``model.diffusion_model.``) and the other a diffusers folder. :class:`FamilyView` shows TUNED under BASE's tensor
keys: each of BASE's module tensors is assembled from TUNED's weights of the same modules (their rows of a fused
tensor, in the family's row order), so the extraction code pairs, splits and reports exactly as within one layout.
Tensors that are no family module (biases, norms) are paired only where both files name them alike.
"""

from __future__ import annotations

from pathlib import Path

import torch

from loratools.checkpoint import Checkpoint, ModuleRef
from loratools.quant import Dequantized


class FamilyView:
    """TUNED's module weights under BASE's keys: ``keys``, ``shape``, ``dtype``, ``get`` like a Checkpoint."""

    def __init__(self, base: Checkpoint, tuned: Checkpoint) -> None:
        self.base, self.tuned, self.path = base, tuned, tuned.path
        self.is_pipeline = False
        groups: dict[str, list[tuple[str, ModuleRef]]] = {}
        for name, ref in base.family_refs().items():
            groups.setdefault(ref.key, []).append((name, ref))
        # a base tensor is shown only when TUNED has every module it holds (else its rows would be invented)
        self._mods = {key: mods for key, mods in groups.items()
                      if all(tuned.module_ref(name) is not None for name, _ in mods)}
        same = [k for k in tuned.keys() if k in base and k not in self._mods]
        self._plain = {k: k for k in same}
        self._quantization = Dequantized(self)  # TUNED's reads dequantize its fp8 weights already

    @property
    def quant(self) -> Dequantized:
        return self._quantization

    def expert_refs(self) -> dict[str, ModuleRef]:
        """No routed experts: DiT families have none (MoE layouts pair through :mod:`loratools.moe`)."""
        return {}

    def keys(self) -> list[str]:
        return [*self._mods, *self._plain]

    def __contains__(self, key: str) -> bool:
        return key in self._mods or key in self._plain

    def family(self) -> tuple[str, str] | None:
        return self.base.family()

    def shape(self, key: str) -> tuple[int, ...]:
        return self.base.shape(key) if key in self._mods else self.tuned.shape(key)

    def dtype(self, key: str) -> torch.dtype:
        if key in self._mods:
            return self.tuned.dtype(self.tuned.module_ref(self._mods[key][0][0]).key)
        return self.tuned.dtype(key)

    def file_of(self, key: str) -> Path:
        """A name for error messages (never a safetensors file: readers then ask :meth:`get`)."""
        if key in self._mods:
            return Path(f"{self.tuned.path} [{self.tuned.module_ref(self._mods[key][0][0]).key}]")
        return Path(f"{self.tuned.file_of(key)} [{key}]")

    def get(self, key: str) -> torch.Tensor:
        if key not in self._mods:
            return self.tuned.get(key)
        dt = self.dtype(key)  # an fp8 module is read dequantized: assembled in float32, never cast back to fp8
        out = torch.empty(self.base.shape(key), dtype=torch.float32 if dt.itemsize == 1 else dt)
        for name, ref in self._mods[key]:
            ref.put(out, self.tuned.module_weight(name).to(out.dtype))
        return out


def in_base_layout(base: Checkpoint, tuned: Checkpoint) -> Checkpoint | FamilyView:
    """TUNED as it is, or — same DiT family as BASE (Flux), another layout, BASE naming the family's modules — a
    :class:`FamilyView` of it in BASE's layout."""
    bf, tf = base.family(), tuned.family()
    if bf is None or tf is None or bf == tf or bf[0] != tf[0] or not base.family_refs():
        return tuned
    if not hasattr(base.family_naming(), "lookup_group"):  # DiT families only (SD across layouts: not checked yet)
        return tuned
    return FamilyView(base, tuned)
