"""Canonical in-memory adapter model (DESIGN.md §2).

Every format reader produces an :class:`Adapter` of :class:`Layer` objects keyed by module name, and
every operation works on those layers only. A layer of any kind can hand out its exact low-rank
factors ``(L, R)`` with ``ΔW = L @ R.T`` (``ΔW`` flattened to 2-D for conv layers), which is all the
linear algebra needs to know about it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import torch

from loratools.errors import LoraToolsError


class Layer:
    """Base class of canonical layers. Subclasses define ``shape``, ``factors`` and ``rank``."""

    kind = "layer"
    #: DoRA magnitude (per output row when ``magnitude_axis == "out"``, per input column for "in").
    magnitude: torch.Tensor | None = None
    magnitude_axis: str = "out"
    #: format-specific details that a writer of the same format may use to round-trip exactly
    meta: dict[str, Any]

    @property
    def shape(self) -> tuple[int, ...]:  # pragma: no cover - abstract
        raise NotImplementedError

    @property
    def rank(self) -> int:  # pragma: no cover - abstract
        raise NotImplementedError

    @property
    def is_conv(self) -> bool:
        return len(self.shape) > 2

    @property
    def matrix_shape(self) -> tuple[int, int]:
        """(out, in·kh·kw): the shape of the 2-D matrix the SVD sees."""
        s = self.shape
        return s[0], math.prod(s[1:])

    @property
    def dtype(self) -> torch.dtype:  # pragma: no cover - abstract
        raise NotImplementedError

    def factors(self, dtype: torch.dtype = torch.float32) -> tuple[torch.Tensor, torch.Tensor]:
        """Exact factors (L [m, k], R [n, k]) with ΔW_2d = L @ R.T, scale folded in."""
        raise NotImplementedError  # pragma: no cover

    def delta(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """Dense ΔW in the base weight's shape (forms the full matrix: only for small layers)."""
        left, right = self.factors(dtype)
        return (left @ right.T).reshape(self.shape)

    def tensors(self) -> dict[str, torch.Tensor]:
        """Named tensors of the layer (for NaN checks and parameter counts)."""
        raise NotImplementedError  # pragma: no cover

    @property
    def num_params(self) -> int:
        return sum(t.numel() for t in self.tensors().values())


@dataclass(eq=False)
class LoraLayer(Layer):
    """A plain LoRA layer: ``ΔW = scale · up @ down``.

    down: [r, in] (conv: [r, in, kh, kw]); up: [out, r] (conv: [out, r, 1, 1]).
    alpha: None means "no alpha stored" (scale 1); otherwise scale = alpha / r, or alpha / √r with rsLoRA.
    embedding: the layer patches an nn.Embedding (PEFT stores it transposed as lora_embedding_A/B).
    """

    down: torch.Tensor
    up: torch.Tensor
    alpha: float | None = None
    rslora: bool = False
    magnitude: torch.Tensor | None = None
    magnitude_axis: str = "out"
    embedding: bool = False
    meta: dict[str, Any] = field(default_factory=dict)

    kind = "lora"

    def __post_init__(self) -> None:
        d, u = self.down, self.up
        if d.dim() < 2 or u.dim() < 2:
            raise LoraToolsError(f"LoRA factors must be at least 2-D, got down {tuple(d.shape)}, up {tuple(u.shape)}")
        if d.shape[0] != u.shape[1]:
            raise LoraToolsError(
                f"rank mismatch: down {tuple(d.shape)} has rank {d.shape[0]}, up {tuple(u.shape)} has rank {u.shape[1]}"
            )
        if d.dim() != u.dim():
            raise LoraToolsError(
                f"conv/linear mix-up: down {tuple(d.shape)} is {d.dim()}-D but up {tuple(u.shape)} is {u.dim()}-D"
            )
        if u.dim() > 2 and any(k != 1 for k in u.shape[2:]):
            raise LoraToolsError(f"conv up factor must have a 1x1 kernel, got {tuple(u.shape)}")

    @property
    def rank(self) -> int:
        return int(self.down.shape[0])

    @property
    def shape(self) -> tuple[int, ...]:
        return (int(self.up.shape[0]), *map(int, self.down.shape[1:]))

    @property
    def dtype(self) -> torch.dtype:
        return self.down.dtype

    @property
    def scale(self) -> float:
        return lora_scale(self.alpha, self.rank, self.rslora)

    @property
    def effective_alpha(self) -> float:
        return float(self.rank) if self.alpha is None else float(self.alpha)

    def factors(self, dtype: torch.dtype = torch.float32) -> tuple[torch.Tensor, torch.Tensor]:
        up = self.up.reshape(self.up.shape[0], -1).to(dtype)
        down = self.down.reshape(self.rank, -1).to(dtype)
        return up * self.scale, down.T

    def tensors(self) -> dict[str, torch.Tensor]:
        out = {"down": self.down, "up": self.up}
        if self.magnitude is not None:
            out["magnitude"] = self.magnitude
        return out


@dataclass(eq=False)
class FullLayer(Layer):
    """A full-weight difference ``ΔW = diff`` (LyCORIS ``diff``, or a dense delta before factoring)."""

    diff: torch.Tensor
    magnitude: torch.Tensor | None = None
    magnitude_axis: str = "out"
    meta: dict[str, Any] = field(default_factory=dict)

    kind = "full"

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(int(s) for s in self.diff.shape)

    @property
    def rank(self) -> int:
        m, n = self.matrix_shape
        return min(m, n)

    @property
    def dtype(self) -> torch.dtype:
        return self.diff.dtype

    def factors(self, dtype: torch.dtype = torch.float32) -> tuple[torch.Tensor, torch.Tensor]:
        m, n = self.matrix_shape
        d = self.diff.reshape(m, n).to(dtype)
        if m <= n:
            return torch.eye(m, dtype=dtype), d.T
        return d, torch.eye(n, dtype=dtype)

    def delta(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        return self.diff.to(dtype)

    def tensors(self) -> dict[str, torch.Tensor]:
        out = {"diff": self.diff}
        if self.magnitude is not None:
            out["magnitude"] = self.magnitude
        return out


#: prefix of ``Adapter.extra_tensors`` keys before the parameter name (PEFT's own key of a ``modules_to_save`` tensor)
EXTRA_PREFIX = "base_model.model."


def lora_scale(alpha: float | None, rank: int, rslora: bool = False) -> float:
    """PEFT / kohya scale: alpha / r (alpha / √r with rsLoRA); no alpha means scale 1."""
    if rank == 0:
        return 0.0
    if alpha is None:
        return 1.0
    return float(alpha) / (math.sqrt(rank) if rslora else rank)


@dataclass
class Adapter:
    """An ordered {module name → layer} map plus what the source file said about itself.

    ``resolved`` is False when layer names are a format's mangled names (kohya ``lora_unet_a_b_c``)
    that could not be mapped back to module paths (no ``--base``).
    """

    layers: dict[str, Layer]
    format: str
    metadata: dict[str, str] = field(default_factory=dict)
    config: dict[str, Any] = field(default_factory=dict)
    #: full tensors that replace model parameters (PEFT ``modules_to_save``), keyed ``EXTRA_PREFIX + parameter name``
    extra_tensors: dict[str, torch.Tensor] = field(default_factory=dict)
    warnings: list[str] = field(default_factory=list)
    resolved: bool = True
    source: str = ""
    #: True when ``config`` was synthesized by loratools rather than written by PEFT itself
    config_generated: bool = False
    #: where the adapter came from, for writers to describe in their own metadata: ``base_model`` (path or name),
    #: ``task_type`` (PEFT task), ``comment``, ``output_name``, ``family`` (model family, e.g. sdxl)
    provenance: dict[str, Any] = field(default_factory=dict)
    #: the model family whose canonical names the layers carry (``sd15``, ``sdxl``…; see loratools.families), if any
    family: str | None = None

    @property
    def num_params(self) -> int:
        return sum(layer.num_params for layer in self.layers.values())

    def check_finite(self, allow: bool = False) -> None:
        """Raise (or warn, with ``allow``) on NaN/Inf anywhere in the adapter's tensors."""
        for name, layer in self.layers.items():
            for tname, t in layer.tensors().items():
                if t.is_floating_point() and not bool(torch.isfinite(t).all()):
                    bad = int((~torch.isfinite(t)).sum())
                    msg = f"{self.source}: layer {name} {tname} {tuple(t.shape)} has {bad} non-finite values (NaN/Inf)"
                    if not allow:
                        raise LoraToolsError(msg + "; pass --allow-nonfinite to continue anyway")
                    self.warnings.append(msg)
