"""DoRA semantics of PEFT and LyCORIS, moving magnitudes between them, and folding DoRA into plain LoRA.

Both libraries rescale the adapted weight ``V = W + ΔW`` by a magnitude ``m`` over a norm of ``V``:

* PEFT (``lora_magnitude_vector``, ``tuners/lora/dora.py``): ``W' = m · V / ‖V‖``, ‖·‖ per **output row**
  (conv: over in·kh·kw), no eps.
* LyCORIS (``dora_scale``, ``functional/general.py::_weight_decompose``): ``W' = m · V / (‖V‖ + eps)`` with
  ``eps = finfo(dora_scale.dtype).eps`` added after the norm; ‖·‖ per output row (``wd_on_output``, shape
  ``[out, 1]``) or per **input column** (over out·kh·kw, shape ``[1, in]``).

So the two are the same map up to the eps: an output-axis magnitude moves exactly with
``m_peft = m_lyco · ‖V‖ / (‖V‖ + eps)`` (and back), which needs ``W`` (``--base``). An input-axis magnitude
has no PEFT form; :func:`fold` turns the whole effective change ``W' − W`` into a plain LoRA instead.
"""

from __future__ import annotations

import torch

from loratools.adapter import Layer

PEFT, LYCORIS = "peft", "lycoris"


def convention(layer: Layer) -> str:
    """Which library's DoRA formula a layer's magnitude follows (readers set ``meta["dora"]``)."""
    return layer.meta.get("dora", PEFT)


def lycoris_eps(dtype: torch.dtype | None) -> float:
    """LyCORIS adds ``finfo(dora_scale.dtype).eps`` to the norm (float32 when the dtype is not floating).

    LyCORIS's loader copies a file's ``dora_scale`` into a parameter created from the model's weight, so the
    runtime dtype is the base weight's: readers record it in ``meta["dora_dtype"]`` when ``--base`` is given,
    and the stored dtype otherwise.
    """
    if dtype is None or not dtype.is_floating_point:
        dtype = torch.float32
    return float(torch.finfo(dtype).eps)


def layer_eps(layer: Layer) -> float:
    """The eps in the denominator of ``layer``'s DoRA formula (0 for PEFT)."""
    if convention(layer) != LYCORIS:
        return 0.0
    return lycoris_eps(layer.meta.get("dora_dtype", layer.magnitude.dtype if layer.magnitude is not None else None))


def norms(v: torch.Tensor, axis: str) -> torch.Tensor:
    """‖V‖ per output row (``axis="out"``, over in·kh·kw) or per input column (over out·kh·kw), 1-D."""
    if axis == "out":
        return v.reshape(v.shape[0], -1).norm(dim=1)
    return v.transpose(0, 1).reshape(v.shape[1], -1).norm(dim=1)


def broadcast(x: torch.Tensor, shape: tuple[int, ...], axis: str) -> torch.Tensor:
    if axis == "out":
        return x.reshape(shape[0], *([1] * (len(shape) - 1)))
    return x.reshape(1, shape[1], *([1] * (len(shape) - 2)))


def dora_weight(w: torch.Tensor, delta: torch.Tensor, magnitude: torch.Tensor, axis: str, eps: float) -> torch.Tensor:
    """``W' = m · (W + ΔW) / (‖W + ΔW‖ + eps)`` with the norm along ``axis``."""
    v = w + delta.reshape(w.shape)
    n = norms(v, axis) + eps
    return v * broadcast(magnitude.reshape(-1).to(v.dtype) / n, tuple(v.shape), axis)


def effective_delta(layer: Layer, w: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """``W' − W`` as the layer's source library computes it (dense; ``w`` in the layer's shape)."""
    w = w.to(dtype).reshape(layer.shape)
    delta = layer.delta(dtype).reshape(layer.shape)
    if layer.magnitude is None:
        return delta
    return dora_weight(w, delta, layer.magnitude.to(dtype), layer.magnitude_axis, layer_eps(layer)) - w


def moved_magnitude(layer: Layer, w: torch.Tensor | None, target: str, out_dtype: torch.dtype,
                    eps_dtype: torch.dtype | None = None) -> torch.Tensor:
    """The magnitude that gives the same ``W'`` under ``target``'s formula (output axis only).

    ``m_target = m_source · (‖V‖ + eps_target) / (‖V‖ + eps_source)``; without ``w`` the magnitude is
    returned unchanged (the caller warns: the outputs then differ by about eps/‖V‖ relative).
    ``eps_dtype`` is the dtype LyCORIS will compute the norm in (default ``out_dtype``).
    """
    mag = layer.magnitude
    src_eps = layer_eps(layer)
    dst_eps = lycoris_eps(eps_dtype or out_dtype) if target == LYCORIS else 0.0
    if w is None or src_eps == dst_eps:
        return mag.to(out_dtype)
    dtype = torch.float64
    v = w.to(dtype).reshape(layer.shape) + layer.delta(dtype).reshape(layer.shape)
    n = norms(v, layer.magnitude_axis)
    return (mag.reshape(-1).to(dtype) * (n + dst_eps) / (n + src_eps)).to(out_dtype)
