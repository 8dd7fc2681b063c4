"""Regenerate the bundled Stable Diffusion samples deterministically: ``python samples/make_sd_samples.py``.

Writes, next to this script (needs the test extra: diffusers + transformers):

* ``sd15_base.safetensors``   a tiny SD1.5 *original-layout* single file (``model.diffusion_model.*``,
  ``cond_stage_model.transformer.text_model.*``, two VAE tensors), fp16: a diffusers ``UNet2DConditionModel`` in
  the SD1.5 block layout and a ``CLIPTextModel``, laid out by inverting diffusers' own single-file conversion
  (``tests/sd_models.py``; ``tests/test_families_sd.py`` checks diffusers converts it back exactly)
* ``sd15_tuned.safetensors``  a "fine-tune" of it: rank-4 changes to the attention projections of the first
  down block and the mid block, a resnet conv, and the text encoder's first q_proj/fc1; one VAE tensor changed
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch
from safetensors.torch import save_file

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent / "tests"))

from sd_models import sd15_checkpoint  # noqa: E402

CHANGED = (
    "model.diffusion_model.input_blocks.1.1.transformer_blocks.0.attn1.to_q.weight",
    "model.diffusion_model.input_blocks.1.1.transformer_blocks.0.attn1.to_v.weight",
    "model.diffusion_model.input_blocks.1.1.transformer_blocks.0.attn2.to_k.weight",
    "model.diffusion_model.input_blocks.1.1.proj_in.weight",
    "model.diffusion_model.middle_block.1.transformer_blocks.0.attn1.to_out.0.weight",
    "model.diffusion_model.middle_block.1.transformer_blocks.0.ff.net.0.proj.weight",
    "model.diffusion_model.input_blocks.2.0.in_layers.2.weight",
    "cond_stage_model.transformer.text_model.encoder.layers.0.self_attn.q_proj.weight",
    "cond_stage_model.transformer.text_model.encoder.layers.0.mlp.fc1.weight",
)


def main() -> None:
    base = {k: v.to(torch.float16).contiguous() for k, v in sd15_checkpoint(0).ckpt.items()}
    g = torch.Generator().manual_seed(7)
    tuned = dict(base)
    for key in CHANGED:
        w = base[key].float()
        m, n = w.shape[0], w[0].numel()
        delta = (torch.randn(m, 4, generator=g) @ torch.randn(4, n, generator=g)) * 0.02
        tuned[key] = (w + delta.reshape(w.shape)).to(torch.float16)
    vae = "first_stage_model.encoder.conv_in.weight"
    tuned[vae] = (base[vae].float() + 0.1).to(torch.float16)
    save_file(base, str(HERE / "sd15_base.safetensors"))
    save_file(tuned, str(HERE / "sd15_tuned.safetensors"))


if __name__ == "__main__":
    main()
