"""Regenerate the bundled tiny Flux.1 samples deterministically: ``python samples/make_flux_samples.py``.

Writes, next to this script (needs the test extra: diffusers):

* ``flux_base.safetensors``  a tiny Flux.1-dev *BFL-layout* single file as ComfyUI saves it
  (``model.diffusion_model.double_blocks.0.img_attn.qkv.weight`` …, fused q/k/v and ``linear1``), fp16: a diffusers
  ``FluxTransformer2DModel`` (1 double + 1 single block, hidden 16) laid out with the family's own maps
  (``tests/test_families_flux.py`` checks diffusers' single-file converter turns such a file back exactly)
* ``flux_tuned/``            a "fine-tune" of it as a diffusers transformer folder (``config.json`` +
  ``diffusion_pytorch_model.safetensors``): rank-2 changes to the double block's image q/k/v and the single block's
  ``linear1`` modules and ``proj_out``
* ``flux_kohya_lora.safetensors``  an sd-scripts-style Flux LoRA on the same tiny model: one rank-4 LoRA per BFL
  tensor (``lora_unet_double_blocks_0_img_attn_qkv``: shared ``lora_down``, ``lora_up`` over q, k and v), alpha 2
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch
from diffusers import FluxTransformer2DModel
from safetensors.torch import save_file

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent / "tests"))

from test_families_flux import to_bfl  # noqa: E402

from loratools.families import get_family  # noqa: E402

CONFIG = dict(patch_size=1, in_channels=8, num_layers=1, num_single_layers=1, attention_head_dim=8,
              num_attention_heads=2, joint_attention_dim=16, pooled_projection_dim=16, guidance_embeds=True,
              axes_dims_rope=(2, 2, 4))
CHANGED = ("transformer_blocks.0.attn.to_q", "transformer_blocks.0.attn.to_k", "transformer_blocks.0.attn.to_v",
           "single_transformer_blocks.0.attn.to_q", "single_transformer_blocks.0.proj_mlp",
           "single_transformer_blocks.0.proj_out")


def main() -> None:
    torch.manual_seed(0)
    base = FluxTransformer2DModel(**CONFIG).eval()
    nm = get_family("flux_dev").naming(base.state_dict())
    state = {k: v.to(torch.float16) for k, v in base.state_dict().items()}
    bfl = to_bfl({k: v.float() for k, v in state.items()}, nm, "model.diffusion_model.")
    save_file({k: v.to(torch.float16).contiguous() for k, v in bfl.items()}, str(HERE / "flux_base.safetensors"))
    g = torch.Generator().manual_seed(7)
    tuned = FluxTransformer2DModel(**CONFIG).eval()
    new = dict(state)
    for mod in CHANGED:
        w = state[mod + ".weight"].float()
        delta = torch.randn(w.shape[0], 2, generator=g) @ torch.randn(2, w.shape[1], generator=g) * 0.05
        new[mod + ".weight"] = (w + delta).to(torch.float16)
    tuned.load_state_dict({k: v.float() for k, v in new.items()})
    tuned.to(torch.float16).save_pretrained(HERE / "flux_tuned")
    lora: dict[str, torch.Tensor] = {}
    shapes = {k: v.shape for k, v in state.items()}
    for m in nm.modules:
        if "blocks." not in m.canonical:
            continue
        stem = nm.kohya_stem(m.canonical, "original")
        if stem + ".alpha" in lora:
            continue
        rows = sum(shapes[x.path + ".weight"][0] for x in nm.by_original(m.original))
        lora[stem + ".lora_down.weight"] = (torch.randn(4, shapes[m.path + ".weight"][1], generator=g) * 0.1).half()
        lora[stem + ".lora_up.weight"] = (torch.randn(rows, 4, generator=g) * 0.1).half()
        lora[stem + ".alpha"] = torch.tensor(2.0, dtype=torch.float16)
    save_file(lora, str(HERE / "flux_kohya_lora.safetensors"),
              {"ss_network_module": "networks.lora_flux", "ss_network_dim": "4", "ss_network_alpha": "2"})


if __name__ == "__main__":
    main()
