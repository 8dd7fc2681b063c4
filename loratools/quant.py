"""fp8 checkpoints read exactly: scaled fp8 (ComfyUI, musubi-tuner), compressed-tensors / vLLM fp8, block fp8.

Conventions, as the code that writes or loads each one has them (facts only):

* **ComfyUI "scaled fp8"** (``*_fp8_scaled.safetensors``): ``<module>.weight`` in float8_e4m3fn (the marker's dtype
  names the format; e5m2 also seen) with ``<module>.scale_weight`` (float32, one element), and a marker tensor
  ``scaled_fp8`` under the model prefix (``model.diffusion_model.scaled_fp8``, or bare): empty, or 2 elements for
  "full precision matmul". ``<module>.scale_input`` is the activation scale of fp8 matmuls (1.0 when unused).
  ComfyUI's loader (``comfy/utils.py`` ``convert_old_quants``) renames them ``weight_scale`` / ``input_scale`` and
  dequantizes ``weight.to(dtype) * weight_scale``.
* **ComfyUI mixed precision** (current): ``<module>.weight`` fp8 + ``<module>.weight_scale`` (+ ``input_scale``), the
  layer's config as JSON bytes in a uint8 ``<module>.comfy_quant`` tensor (or ``_quantization_metadata`` in the header).
* **musubi-tuner** (``modules/fp8_optimization_utils.py``): ``<module>.scale_weight`` float32 of shape ``[1]`` (per
  tensor), ``[out, 1]`` (per output channel) or ``[out, in/B, 1]`` (per block of B input columns, B = 64 by default)
  with then a per-tensor ``<module>.scale_weight_tensor``: ``W = q · scale_weight · scale_weight_tensor``.
* **compressed-tensors / vLLM / FBGEMM fp8**: ``<module>.weight_scale`` of shape ``[]``/``[1]`` (per tensor) or
  ``[out, 1]`` (per channel), ``W = q · weight_scale``; ``input_scale`` (static activations), ``k_scale``/``v_scale``
  (KV cache) are activation scales.
* **block fp8** (DeepSeek-V3/Kimi-K2, Qwen3-FP8; transformers ``integrations/finegrained_fp8.py``,
  ``_dequantize_fp8_weight``): ``<module>.weight_scale_inv`` of shape [⌈out/bo⌉, ⌈in/bi⌉] (float32, or
  float8_e8m0fnu powers of two), ``[bo, bi]`` from config.json ``quantization_config.weight_block_size``
  (compressed-tensors: ``config_groups.*.weights.block_structure``), default 128×128. Despite its name it
  **multiplies**: ``W[i, j] = q[i, j] · s[i // bo, j // bi]``, the last block row / column partial.

Reading (:class:`Quantization`, one per :class:`~loratools.checkpoint.Checkpoint`): every weight read — ``get``,
``module_weight``, extract's streaming reads, bake's base reads — returns ``float32(q) · float32(s)`` (one float32
rounding per element; more exact than the loaders, which multiply in bf16) for an fp8 tensor with a scale, tensor by
tensor. Scale tensors, activation scales and markers are no modules: extract / spectrum skip them with a reason.

**A missing scale is an error** wherever the checkpoint shows it is scaled (any scale key, a ``scaled_fp8`` marker,
``comfy_quant`` configs or a ``quantization_config`` in config.json): reading such a weight unscaled gives a wrong
ΔW silently. An fp8 checkpoint with *no* sign of scaling anywhere (``flux1-dev-fp8``-style plain casts) is read
as stored, as ComfyUI and diffusers load it (their weights are the plain cast too), with a warning in extract's
report: refusing it would refuse the model users actually run, and there is no scale that could be missing.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from loratools.errors import LoraToolsError

if TYPE_CHECKING:
    from loratools.checkpoint import Checkpoint

#: fp8 weight formats this module dequantizes
FP8_DTYPES = tuple(d for d in (getattr(torch, n, None) for n in (
    "float8_e4m3fn", "float8_e5m2", "float8_e4m3fnuz", "float8_e5m2fnuz")) if d is not None)
#: suffixes (after ``<module>.``) of a weight's scale, in the order they are looked for
WEIGHT_SCALES = ("scale_weight", "weight_scale", "weight_scale_inv")
#: musubi-tuner's second, per-tensor factor of a block-scaled weight
TENSOR_SCALE = "scale_weight_tensor"
#: suffixes of activation scales (fp8 matmul inputs, KV cache): not weights, never modules
ACTIVATION_SCALES = ("scale_input", "input_scale", "k_scale", "v_scale", "q_scale", "output_scale")
MARKER = "scaled_fp8"
COMFY_QUANT = "comfy_quant"
DEFAULT_BLOCK = (128, 128)

Read = Callable[[str], torch.Tensor]


def _name(dtype: torch.dtype) -> str:
    return str(dtype).replace("torch.", "")


def _split(key: str) -> tuple[str, str]:
    """``a.b.scale_weight`` → (``a.b``, ``scale_weight``)."""
    return (key.rsplit(".", 1)[0], key.rsplit(".", 1)[1]) if "." in key else ("", key)


class Quantization:
    """What a checkpoint's keys say about fp8 quantization, and the dequantizing read.

    ``scales``: {fp8 weight key → its scale key(s)}; ``aux``: {scale / marker key → why it is no module};
    ``scaled``: whether anything in the checkpoint says it is scaled; ``notes``: warnings for reports.
    Built from the headers only (no tensor data besides ``comfy_quant`` configs); raises for fp8 weights whose
    scale is missing in a scaled checkpoint, and for scales beside weights that are not fp8.
    """

    def __init__(self, ckpt: Checkpoint) -> None:
        self.ckpt = ckpt
        self.scales: dict[str, tuple[str, ...]] = {}
        self.aux: dict[str, str] = {}
        self.notes: list[str] = []
        self._configs: dict[Path, dict] = {}
        keys = ckpt.keys()
        present = set(keys)
        fp8 = {k for k in keys if ckpt.dtype(k) in FP8_DTYPES}
        for k in keys:
            mod, last = _split(k)
            if last in WEIGHT_SCALES or last == TENSOR_SCALE:
                self.aux[k] = f"fp8 scale of {mod}.weight: not a module"
            elif last in ACTIVATION_SCALES:
                self.aux[k] = f"activation scale ({last}): not a module"
            elif last == COMFY_QUANT:
                self.aux[k] = "ComfyUI quantization config (comfy_quant): not a module"
            elif last == MARKER:
                self.aux[k] = "scaled-fp8 marker: not a module"
        self.scaled = bool(self.aux) or any(self._quant_config(f) for f in ckpt.files) or any(
            "_quantization_metadata" in ckpt.file_metadata(f) for f in ckpt.files)
        for k in keys:
            if k in self.aux:
                continue
            mod = _split(k)[0] if k.endswith(".weight") else None
            found = [f"{mod}.{s}" for s in WEIGHT_SCALES if mod is not None and f"{mod}.{s}" in present]
            if len(found) > 1:
                raise LoraToolsError(f"{ckpt.file_of(k)}: weight {k} has more than one scale beside it "
                                     f"({', '.join(found)}); refusing to guess which one applies")
            if found:
                if k not in fp8:
                    raise LoraToolsError(
                        f"{ckpt.file_of(k)}: {_name(ckpt.dtype(k))} weight {k} {list(ckpt.shape(k))} has a scale "
                        f"({found[0]}) beside it; only fp8 weights are dequantized (unsupported quantization)")
                extra = f"{mod}.{TENSOR_SCALE}"
                self.scales[k] = (found[0], extra) if extra in present else (found[0],)
        plain = sorted(k for k in fp8 if k not in self.scales and k not in self.aux)
        if plain and self.scaled:
            k = plain[0]
            more = f" (and {len(plain) - 1} more)" if len(plain) > 1 else ""
            raise LoraToolsError(
                f"{ckpt.file_of(k)}: {_name(ckpt.dtype(k))} weight without a scale_weight/weight_scale/"
                f"weight_scale_inv beside it: {k} {list(ckpt.shape(k))}{more}; the checkpoint is scaled fp8, "
                "so reading it unscaled would be wrong (incomplete or corrupt file?)")
        if plain:
            kinds = sorted({_name(ckpt.dtype(k)) for k in plain})
            self.notes.append(
                f"{ckpt.path}: {len(plain)} {'/'.join(kinds)} tensor(s) and no scale anywhere (no scale keys, no "
                "scaled_fp8 marker, no quantization_config): read as plain fp8 casts, as ComfyUI and diffusers "
                "load them")

    # ------------------------------------------------------------------ facts
    def reason(self, key: str) -> str | None:
        """Why ``key`` is no module (a scale, an activation scale, a marker), or None."""
        return self.aux.get(key)

    def is_scaled(self, key: str) -> bool:
        return key in self.scales

    def fp8_dtype(self, key: str) -> torch.dtype | None:
        """The fp8 format ``key`` is stored in (scaled or plain), or None (also for a tensor the checkpoint does not
        hold as such: a 3-D expert tensor assembled from per-expert ones)."""
        if key not in self.ckpt:
            return None
        dt = self.ckpt.dtype(key)
        return dt if dt in FP8_DTYPES and key not in self.aux else None

    def _quant_config(self, f: Path) -> dict:
        """``quantization_config`` of the config.json beside weight file ``f`` ({} if none; read once)."""
        cfg = f.parent / "config.json"
        if cfg not in self._configs:
            try:
                q = json.loads(cfg.read_text()).get("quantization_config") if cfg.is_file() else None
            except (OSError, json.JSONDecodeError, UnicodeDecodeError, AttributeError):
                q = None
            self._configs[cfg] = q if isinstance(q, dict) else {}
        return self._configs[cfg]

    def block(self, key: str) -> tuple[int, int]:
        """``[bo, bi]`` of a block-scaled weight: config.json's ``weight_block_size`` (or compressed-tensors'
        ``block_structure``), else 128×128."""
        q = self._quant_config(self.ckpt.file_of(key))
        size = q.get("weight_block_size")
        for group in (q.get("config_groups") or {}).values() if size is None else ():
            size = size or ((group or {}).get("weights") or {}).get("block_structure")
        if isinstance(size, list) and len(size) == 2 and all(isinstance(x, int) and x > 0 for x in size):
            return size[0], size[1]
        return DEFAULT_BLOCK

    # ------------------------------------------------------------------ reading
    def dequantize(self, key: str, tensor: torch.Tensor, read: Read) -> torch.Tensor:
        """``tensor`` (as stored under ``key``) dequantized to float32 where it has a scale; else unchanged.
        ``read`` reads another tensor of the checkpoint as stored (the scales)."""
        if key not in self.scales:
            return tensor
        return self.apply(key, tensor.to(torch.float32), read, divide=False)

    def apply(self, key: str, w: torch.Tensor, read: Read, divide: bool, start: int = 0) -> torch.Tensor:
        """Multiply (or with ``divide``, divide) float32 ``w`` by ``key``'s scale, in place: ``w`` is the whole
        weight, or its rows from ``start`` on (a row block, contiguous)."""
        names = self.scales[key]
        scale = read(names[0]).to(torch.float32)
        for extra in names[1:]:
            scale = scale * read(extra).to(torch.float32)
        op = torch.Tensor.div_ if divide else torch.Tensor.mul_
        shape = tuple(self.ckpt.shape(key))
        out = shape[0] if shape else 1
        n = w.shape[0] if w.dim() else 1
        if scale.numel() == 1:
            return op(w, scale.reshape(()))
        if scale.shape[0] == out and scale.numel() == out:  # per output channel: [out], [out, 1], [out, 1, 1…]
            return op(w, scale.reshape(out, *([1] * (w.dim() - 1)))[start : start + n])
        if w.dim() == 2 and scale.dim() == 3 and scale.shape[0] == out and scale.shape[2] == 1 \
                and w.shape[1] % scale.shape[1] == 0:  # musubi: [out, in/B, 1]
            op(w.view(n, scale.shape[1], -1), scale[start : start + n])
            return w
        if w.dim() == 2 and scale.dim() == 2:
            bo, bi = self.block(key)
            if tuple(scale.shape) == (math.ceil(out / bo), math.ceil(w.shape[1] / bi)):
                # [rows, ⌈in/bi⌉]: never a weight-sized scale
                rows = scale.repeat_interleave(bo, dim=0)[start : start + n]
                full = w.shape[1] // bi
                op(w[:, : full * bi].unflatten(1, (full, bi)), rows[:, :full, None])
                if full < rows.shape[1]:
                    op(w[:, full * bi :], rows[:, full:])
                return w
            raise LoraToolsError(
                f"{self.ckpt.file_of(key)}: block scale {names[0]} {list(scale.shape)} does not fit weight {key} "
                f"{list(shape)} in {bo}×{bi} blocks (weight_block_size from config.json, default 128×128)")
        raise LoraToolsError(f"{self.ckpt.file_of(key)}: scale {names[0]} {list(scale.shape)} does not fit weight "
                             f"{key} {list(shape)} (expected one value, one per output row, or blocks)")

    # ------------------------------------------------------------------ quantization noise
    def noise_sq(self, key: str, w: torch.Tensor, read: Read) -> torch.Tensor | None:
        """Per output row, Σ step²/12 over the row (float64): the variance of round-to-nearest on ``key``'s fp8
        grid, whose spacing ``step`` at each stored value is taken in weight units (``w`` is the weight as read:
        dequantized, or plain fp8); None if ``key`` is not fp8. Row block by row block (bounded temporaries)."""
        dt = self.fp8_dtype(key)
        if dt is None:
            return None
        info = torch.finfo(dt)
        emin, mant = round(math.log2(info.tiny)), round(-math.log2(info.eps))
        mat = w.reshape(w.shape[0], -1) if w.dim() else w.reshape(1, 1)
        out = torch.empty(mat.shape[0], dtype=torch.float64)
        for start, block in _row_blocks(mat):
            q = block.to(torch.float32, copy=True)
            if key in self.scales:
                self.apply(key, q.view(-1, *w.shape[1:]), read, divide=True, start=start)
            exp = (torch.frexp(q)[1] - 1).clamp_(min=emin).masked_fill_(q == 0, emin)  # ⌊log2|q|⌋, subnormals: emin
            step = torch.ldexp(torch.ones_like(q), exp - mant)
            if key in self.scales:
                self.apply(key, step.view(-1, *w.shape[1:]), read, divide=False, start=start)
            out[start : start + block.shape[0]] = step.double().square_().sum(1) / 12
        return out

    def requantized(self, key: str, other: torch.Tensor, w: torch.Tensor, read: Read) -> bool:
        """Whether the scaled fp8 ``w`` of ``key`` is exactly ``other`` quantized with ``key``'s scale (round to
        nearest, saturated): then their difference is quantization noise, not a change."""
        if key not in self.scales or w.dim() == 0:
            return False
        dt = self.ckpt.dtype(key)
        fmax = torch.finfo(dt).max
        mat, oth = w.reshape(w.shape[0], -1), other.reshape(w.shape[0], -1)
        for start, block in _row_blocks(mat):
            view = (-1, *w.shape[1:])
            q = self.apply(key, block.to(torch.float32, copy=True).view(view), read, divide=True, start=start)
            x = self.apply(key, oth[start : start + block.shape[0]].to(torch.float32, copy=True).view(view), read,
                           divide=True, start=start)
            if not torch.equal(x.clamp_(-fmax, fmax).to(dt).to(torch.float32), q.to(dt).to(torch.float32)):
                return False
        return True


#: elements per row block of the noise analysis (its temporaries are a few of these, not layer-sized)
BLOCK_ELEMS = 1 << 22


class Dequantized(Quantization):
    """The quantization of a view whose reads are already dequantized (:class:`loratools.relayout.FamilyView`): no
    scales, no markers, no fp8 noise analysis (its keys name another checkpoint's tensors)."""

    def __init__(self, ckpt) -> None:
        self.ckpt, self.scales, self.aux, self.notes, self.scaled, self._configs = ckpt, {}, {}, [], False, {}

    def fp8_dtype(self, key: str) -> torch.dtype | None:
        return None


def _row_blocks(mat: torch.Tensor):
    """``(first row, rows)`` blocks of about ``BLOCK_ELEMS`` elements of a 2-D tensor."""
    rows = max(1, BLOCK_ELEMS // max(mat.shape[1], 1))
    for start in range(0, mat.shape[0], rows):
        yield start, mat[start : start + rows]


def dequantize(ckpt: Checkpoint, key: str, tensor: torch.Tensor, read: Read) -> torch.Tensor:
    """:meth:`Quantization.dequantize` for a tensor as read; other dtypes return at once (the scales of a checkpoint
    are only looked at once an fp8 tensor is read: a sharded bf16 model keeps opening only the shards read)."""
    return quantization(ckpt).dequantize(key, tensor, read) if tensor.dtype in FP8_DTYPES else tensor


def quantization(ckpt: Checkpoint) -> Quantization:
    """The checkpoint's :class:`Quantization` (built once)."""
    q = getattr(ckpt, "_quantization", None)
    if q is None:
        q = ckpt._quantization = Quantization(ckpt)
    return q


def noise_only(base: Checkpoint, tuned: Checkpoint, key: str, w_base: torch.Tensor, w_tuned: torch.Tensor,
               read_base: Read, read_tuned: Read) -> str | None:
    """Why a pair whose ΔW is only fp8 quantization noise is unchanged, or None: TUNED is BASE quantized with
    TUNED's scale, or BASE is TUNED quantized with BASE's scale (the scaled-fp8 analogue of
    :func:`loratools.extract.rounding_only`)."""
    qt, qb = quantization(tuned), quantization(base)
    if qt.requantized(key, w_base, w_tuned, read_tuned):
        return f"unchanged (the base quantized to {_name(tuned.dtype(key))} with the tuned scale)"
    if qb.requantized(key, w_tuned, w_base, read_base):
        return f"unchanged (the tuned weight quantized to {_name(base.dtype(key))} with the base scale)"
    return None


def noise_floor_sq(base: Checkpoint, tuned: Checkpoint, key: str, w_base: torch.Tensor, w_tuned: torch.Tensor,
                   read_base: Read, read_tuned: Read) -> torch.Tensor | None:
    """Per output row, the expected squared fp8 rounding error in ΔW (Σ step²/12 over the fp8 sides: the variance
    of round-to-nearest), float64 of length ``out``; None when neither side is fp8."""
    total = None
    for ckpt, w, read in ((base, w_base, read_base), (tuned, w_tuned, read_tuned)):
        rows = quantization(ckpt).noise_sq(key, w, read)
        if rows is not None:
            total = rows if total is None else total + rows
    return total


def lora_dtype(base: Checkpoint, tuned: Checkpoint, key: str) -> torch.dtype:
    """The dtype of extracted factors by default: TUNED's, unless 8-bit (then BASE's, unless 8-bit too: bfloat16,
    whose rounding is far below the fp8 noise of the weights themselves)."""
    for dt in (ck.dtype(key) for ck in (tuned, base) if key in ck):
        if dt.is_floating_point and dt.itemsize > 1:
            return dt
    return torch.bfloat16


def unit_noise(floor_sq: torch.Tensor | None, rows: tuple[int, int] | None, total: float) -> dict:
    """``{"fp8_noise_floor": √(noise² / ‖ΔW‖²)}`` for a report row (the module's ``rows`` of the tensor), or {}."""
    if floor_sq is None or total <= 0:
        return {}
    part = floor_sq[rows[0] : rows[1]] if rows is not None else floor_sq
    return {"fp8_noise_floor": math.sqrt(float(part.sum()) / total)}


def noise_warnings(rows: list[dict]) -> list[str]:
    """A warning when some layers' ΔW is no larger than the fp8 rounding noise of the inputs."""
    low = [r["name"] for r in rows if r.get("fp8_noise_floor", 0.0) >= 1.0]
    if not low:
        return []
    return [f"{len(low)} layer(s) change no more than the fp8 rounding noise of the inputs (fp8_noise_floor ≥ 1, "
            f"e.g. {low[0]}): their LoRA is mostly quantization noise; compare checkpoints of higher precision"]
