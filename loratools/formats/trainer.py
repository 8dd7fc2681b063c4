"""Which trainer (or tool) most likely wrote an adapter, from its metadata and the naming convention of its layers.

Small and best-effort (``inspect`` reports it; nothing depends on it): ai-toolkit names itself in its metadata
(``software``); sd-scripts writes ``ss_*`` keys; OneTrainer's Flux/DiT stems are ``lora_transformer_…`` (kohya
"diffusers" style); SimpleTuner's LyCORIS files use LyCORIS's own ``lycoris_`` prefix; ComfyUI-native keys
(``diffusion_model.…``) come from ComfyUI's own savers; diffusers / PEFT files from those libraries (or from any
trainer built on them: they do not say which).
"""

from __future__ import annotations

from collections import Counter

from loratools.adapter import Adapter

#: ``ss_*`` keys only sd-scripts' training writes (loratools' own kohya writer keeps or sets dim/alpha/module only)
SD_SCRIPTS_TRAINING = ("ss_training_started_at", "ss_session_id", "ss_learning_rate", "ss_num_train_images",
                       "ss_max_train_steps", "ss_steps")
#: layer convention (as name resolution records it) → what writes it
BY_CONVENTION = {"kohya_diffusers": "OneTrainer", "lycoris": "SimpleTuner (LyCORIS)", "comfy": "ComfyUI-native"}
#: adapter format → what writes it, where the convention says nothing more
BY_FORMAT = {"peft": "PEFT", "diffusers": "diffusers / PEFT"}


def guess_trainer(adapter: Adapter) -> str | None:
    """A short name of the trainer that wrote ``adapter``, or None where neither metadata nor names tell."""
    meta = adapter.metadata or {}
    if "ai-toolkit" in str(meta.get("software", "")) or "ai-toolkit" in str(meta.get("training_info", "")):
        return "ai-toolkit"
    if any(k in meta for k in SD_SCRIPTS_TRAINING):
        return "sd-scripts (kohya)"
    conventions = Counter(c for la in adapter.layers.values() if (c := la.meta.get("convention")))
    main = conventions.most_common(1)[0][0] if conventions else None
    if main in BY_CONVENTION:
        return BY_CONVENTION[main]
    if main == "kohya_original":
        return "sd-scripts style (kohya)"
    return BY_FORMAT.get(adapter.format)
