"""Shared data types of the model-family descriptions (leaf module: imports nothing from loratools)."""

from __future__ import annotations

from dataclasses import dataclass

#: diffusers pipeline components a module path may start with
COMPONENTS = ("unet", "text_encoder", "text_encoder_2", "text_encoder_3", "transformer")


def split_component(name: str) -> tuple[str | None, str]:
    """``unet.down_blocks.0…`` → (``unet``, ``down_blocks.0…``); (None, name) without a component."""
    head, _, rest = name.partition(".")
    if head in COMPONENTS and rest:
        return head, rest
    return None, name


# Layouts of a full checkpoint's key set, as returned by ``detect``.
LAYOUTS = ("original", "original_unprefixed", "diffusers")


@dataclass(frozen=True)
class ModuleMap:
    """One adaptable module (a Linear or Conv2d weight) of a model family.

    ``canonical`` is the diffusers pipeline path with its component, e.g.
    ``"unet.down_blocks.0.attentions.0.proj_in"`` or
    ``"text_encoder_2.text_model.encoder.layers.0.self_attn.q_proj"`` (text encoders always keep the
    ``text_model.`` level, as every LoRA file format does; see ``sd.flatten_text_model`` for
    transformers-5's flattened ``CLIPTextModel``).

    ``original`` is the module key of the original single-file checkpoint (the weight key minus
    ``.weight``), e.g. ``"model.diffusion_model.input_blocks.1.1.proj_in"``; for a fused OpenCLIP
    attention it is ``"….attn.in_proj"`` and three ModuleMaps (q, k, v) share it.

    ``weight_key`` is the checkpoint tensor holding the weight (``original + ".weight"``, or
    ``"….attn.in_proj_weight"``, or ``"….text_projection"``). ``rows`` is the row slice
    ``[start, stop)`` of that tensor for fused originals, else None. ``transpose`` is True where the
    original stores the transpose of the canonical weight (OpenCLIP ``text_projection``).
    """

    canonical: str
    original: str
    rows: tuple[int, int] | None
    weight_key: str
    transpose: bool = False

    @property
    def component(self) -> str:
        """The pipeline component: ``"unet"``, ``"text_encoder"`` or ``"text_encoder_2"``."""
        return self.canonical.split(".", 1)[0]

    @property
    def path(self) -> str:
        """The module path inside its component (canonical without the component)."""
        return self.canonical.split(".", 1)[1]
