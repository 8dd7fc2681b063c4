"""Regenerate the bundled samples deterministically: ``python samples/make_samples.py``.

Writes, next to this script, with plain torch + safetensors (no loratools code, so the samples are
an independent reference):

* ``base/``            tiny Llama-architecture HF folder (config.json + model.safetensors, fp32)
* ``peft_lora/``       PEFT LoRA for it (q,k,v,o,gate,up,down; r=8, alpha=16; v_proj r=4 via rank_pattern)
* ``kohya_lora.safetensors``  the same adapter in kohya layout (fp16, ``lora_unet_`` stems, ss_* metadata)
* ``peft_dora/``       PEFT DoRA adapter (q,v; r=4) with magnitudes derived from the base weights
* ``unet_base.safetensors``   a tiny UNet-like single-file checkpoint (convs + attention linears)
* ``locon.safetensors``       a kohya LoCon adapter for it (3x3 and 1x1 convs + linears)
* ``lycoris.safetensors``     a LyCORIS file for it: LoHa (plain and Tucker), LoKr (factored and both-full),
  Tucker LoCon, a full diff and an output-axis ``dora_scale`` (fp16, LyCORIS key names)
* ``tuned/``           a "full fine-tune" of base/ (for ``extract`` / ``spectrum``): every projection moved
  by the peft_lora delta plus small full-rank noise, the final norm changed, embeddings untouched

Factors have decaying spectra so that ``inspect`` shows realistic effective ranks.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import torch
from safetensors.torch import save_file

HERE = Path(__file__).resolve().parent
HIDDEN, INTER, LAYERS, VOCAB, HEADS, KV_HEADS = 64, 128, 2, 256, 4, 2
KV = HIDDEN // HEADS * KV_HEADS
PROJ = {
    "self_attn.q_proj": (HIDDEN, HIDDEN), "self_attn.k_proj": (KV, HIDDEN), "self_attn.v_proj": (KV, HIDDEN),
    "self_attn.o_proj": (HIDDEN, HIDDEN), "mlp.gate_proj": (INTER, HIDDEN), "mlp.up_proj": (INTER, HIDDEN),
    "mlp.down_proj": (HIDDEN, INTER),
}


def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def base_state() -> dict[str, torch.Tensor]:
    g = gen(0)
    sd = {"model.embed_tokens.weight": torch.randn(VOCAB, HIDDEN, generator=g) * 0.02}
    for i in range(LAYERS):
        for name, (o, n) in PROJ.items():
            sd[f"model.layers.{i}.{name}.weight"] = torch.randn(o, n, generator=g) / math.sqrt(n)
        sd[f"model.layers.{i}.input_layernorm.weight"] = torch.ones(HIDDEN)
        sd[f"model.layers.{i}.post_attention_layernorm.weight"] = torch.ones(HIDDEN)
    sd["model.norm.weight"] = torch.ones(HIDDEN)
    sd["lm_head.weight"] = torch.randn(VOCAB, HIDDEN, generator=g) / math.sqrt(HIDDEN)
    return sd


def lora_pair(g: torch.Generator, out: int, inp: int, r: int, kernel: tuple[int, ...] = ()) -> tuple[torch.Tensor, torch.Tensor]:
    """down [r, inp, *kernel], up [out, r, 1...] with a decaying spectrum (σᵢ ∝ 0.6^i)."""
    decay = 0.6 ** torch.arange(r, dtype=torch.float32)
    fan_in = inp * math.prod(kernel)
    down = torch.randn(r, fan_in, generator=g) / math.sqrt(fan_in)
    up = torch.randn(out, r, generator=g) * 0.05 * decay
    return down.reshape(r, inp, *kernel), up.reshape(out, r, *([1] * len(kernel)))


def write_base() -> dict[str, torch.Tensor]:
    d = HERE / "base"
    d.mkdir(exist_ok=True)
    sd = base_state()
    save_file(sd, str(d / "model.safetensors"), metadata={"format": "pt"})
    config = {
        "architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": HIDDEN,
        "intermediate_size": INTER, "num_hidden_layers": LAYERS, "num_attention_heads": HEADS,
        "num_key_value_heads": KV_HEADS, "vocab_size": VOCAB, "max_position_embeddings": 128,
        "rms_norm_eps": 1e-6, "hidden_act": "silu", "tie_word_embeddings": False, "torch_dtype": "float32",
        "bos_token_id": 1, "eos_token_id": 2, "rope_theta": 10000.0,
    }
    (d / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    return sd


def peft_config(r: int, alpha: int, targets: list[str], **extra) -> dict:
    return {
        "peft_type": "LORA", "task_type": "CAUSAL_LM", "base_model_name_or_path": "samples/base",
        "r": r, "lora_alpha": alpha, "target_modules": targets, "lora_dropout": 0.0, "bias": "none",
        "fan_in_fan_out": False, "inference_mode": True, "init_lora_weights": True, "modules_to_save": None,
        "rank_pattern": {}, "alpha_pattern": {}, "use_rslora": False, "use_dora": False, **extra,
    }


def write_lora() -> None:
    g = gen(1)
    peft_sd, kohya_sd = {}, {}
    for i in range(LAYERS):
        for name, (o, n) in PROJ.items():
            r = 4 if name.endswith("v_proj") else 8
            down, up = lora_pair(g, o, n, r)
            mod = f"model.layers.{i}.{name}"
            peft_sd[f"base_model.model.{mod}.lora_A.weight"] = down
            peft_sd[f"base_model.model.{mod}.lora_B.weight"] = up
            stem = "lora_unet_" + mod.replace(".", "_")
            kohya_sd[f"{stem}.lora_down.weight"] = down.half()
            kohya_sd[f"{stem}.lora_up.weight"] = up.half()
            kohya_sd[f"{stem}.alpha"] = torch.tensor(16.0 if r == 8 else 8.0).half()
    d = HERE / "peft_lora"
    d.mkdir(exist_ok=True)
    save_file(peft_sd, str(d / "adapter_model.safetensors"), metadata={"format": "pt"})
    cfg = peft_config(8, 16, [p.split(".")[-1] for p in PROJ], rank_pattern={"v_proj": 4}, alpha_pattern={"v_proj": 8})
    (d / "adapter_config.json").write_text(json.dumps(cfg, indent=2) + "\n")
    meta = {
        "ss_network_module": "networks.lora", "ss_network_dim": "8", "ss_network_alpha": "16",
        "ss_output_name": "kohya_lora", "ss_training_comment": "loratools sample (synthetic)",
        "ss_learning_rate": "0.0001", "ss_num_train_images": "0", "ss_base_model_version": "llama_tiny",
    }
    save_file(kohya_sd, str(HERE / "kohya_lora.safetensors"), metadata=meta)


def write_dora(base: dict[str, torch.Tensor]) -> None:
    g = gen(2)
    sd = {}
    r, alpha = 4, 8
    for i in range(LAYERS):
        for name in ("self_attn.q_proj", "self_attn.v_proj"):
            o, n = PROJ[name]
            down, up = lora_pair(g, o, n, r)
            mod = f"model.layers.{i}.{name}"
            w = base[f"{mod}.weight"] + (alpha / r) * up @ down
            sd[f"base_model.model.{mod}.lora_A.weight"] = down
            sd[f"base_model.model.{mod}.lora_B.weight"] = up
            sd[f"base_model.model.{mod}.lora_magnitude_vector"] = w.norm(dim=1) * (1 + 0.1 * torch.randn(o, generator=g))
    d = HERE / "peft_dora"
    d.mkdir(exist_ok=True)
    save_file(sd, str(d / "adapter_model.safetensors"), metadata={"format": "pt"})
    cfg = peft_config(r, alpha, ["q_proj", "v_proj"], use_dora=True)
    (d / "adapter_config.json").write_text(json.dumps(cfg, indent=2) + "\n")


UNET_CONVS = {  # module → (out, in, k)
    "conv_in": (32, 4, 3),
    "down_blocks.0.resnets.0.conv1": (32, 32, 3),
    "down_blocks.0.resnets.0.conv2": (32, 32, 3),
    "down_blocks.0.attentions.0.proj_in": (32, 32, 1),
    "down_blocks.0.attentions.0.proj_out": (32, 32, 1),
    "conv_out": (4, 32, 3),
}
UNET_LINEARS = {
    f"down_blocks.0.attentions.0.transformer_blocks.0.attn1.{p}": (32, 32) for p in ("to_q", "to_k", "to_v", "to_out.0")
}


def write_locon() -> None:
    g = gen(3)
    base = {f"{m}.weight": torch.randn(o, i, k, k, generator=g) * 0.1 for m, (o, i, k) in UNET_CONVS.items()}
    base.update({f"{m}.weight": torch.randn(o, i, generator=g) * 0.1 for m, (o, i) in UNET_LINEARS.items()})
    base.update({f"{m}.bias": torch.zeros(s[0]) for m, s in {**UNET_CONVS, **UNET_LINEARS}.items()})
    save_file(base, str(HERE / "unet_base.safetensors"), metadata={"format": "pt"})
    sd = {}
    for m, (o, i, k) in UNET_CONVS.items():
        r = 4
        down, up = lora_pair(g, o, i, r, (k, k))
        stem = "lora_unet_" + m.replace(".", "_")
        sd[f"{stem}.lora_down.weight"], sd[f"{stem}.lora_up.weight"] = down.half(), up.half()
        sd[f"{stem}.alpha"] = torch.tensor(2.0).half()
    for m, (o, i) in UNET_LINEARS.items():
        down, up = lora_pair(g, o, i, 8)
        stem = "lora_unet_" + m.replace(".", "_")
        sd[f"{stem}.lora_down.weight"], sd[f"{stem}.lora_up.weight"] = down.half(), up.half()
        sd[f"{stem}.alpha"] = torch.tensor(4.0).half()
    meta = {
        "ss_network_module": "networks.lora", "ss_network_dim": "8", "ss_network_alpha": "4",
        "ss_network_args": json.dumps({"conv_dim": "4", "conv_alpha": "2"}), "ss_output_name": "locon",
        "ss_base_model_version": "sd_v1",
    }
    save_file(sd, str(HERE / "locon.safetensors"), metadata=meta)


def write_lycoris() -> None:
    """LyCORIS 4.x key layouts on the UNet-like base (see loratools/formats/lycoris.py for the math)."""
    from safetensors.torch import load_file

    base = load_file(str(HERE / "unet_base.safetensors"))
    g = gen(4)
    attn = "down_blocks.0.attentions.0.transformer_blocks.0.attn1."
    sd: dict[str, torch.Tensor] = {}

    def put(mod: str, **tensors: torch.Tensor) -> None:
        for k, v in tensors.items():
            sd[f"lora_unet_{mod.replace('.', '_')}.{k}"] = v.half()

    def rnd(*shape: int, s: float = 0.2) -> torch.Tensor:
        return torch.randn(*shape, generator=g) * s

    for p in ("to_q", "to_k"):  # LoHa r=4, alpha 2
        put(attn + p, hada_w1_a=rnd(32, 4), hada_w1_b=rnd(4, 32), hada_w2_a=rnd(32, 4), hada_w2_b=rnd(4, 32),
            alpha=torch.tensor(2.0))
    put(attn + "to_v", lokr_w1=rnd(4, 4), lokr_w2_a=rnd(8, 2), lokr_w2_b=rnd(2, 8), alpha=torch.tensor(1.0))
    down, up = rnd(4, 32), rnd(32, 4)
    w = base[attn + "to_out.0.weight"] + 0.5 * up @ down
    put(attn + "to_out.0", **{"lora_down.weight": down, "lora_up.weight": up, "alpha": torch.tensor(2.0),
                              "dora_scale": (w.norm(dim=1) * (1 + 0.1 * torch.rand(32, generator=g)))[:, None]})
    put("down_blocks.0.resnets.0.conv1", hada_t1=rnd(4, 4, 3, 3), hada_w1_a=rnd(4, 32), hada_w1_b=rnd(4, 32),
        hada_t2=rnd(4, 4, 3, 3), hada_w2_a=rnd(4, 32), hada_w2_b=rnd(4, 32), alpha=torch.tensor(4.0))
    put("down_blocks.0.resnets.0.conv2", **{"lora_down.weight": rnd(4, 32, 1, 1), "lora_mid.weight": rnd(4, 4, 3, 3),
                                            "lora_up.weight": rnd(32, 4, 1, 1), "alpha": torch.tensor(4.0)})
    put("down_blocks.0.attentions.0.proj_in", lokr_w1=rnd(4, 4), lokr_w2=rnd(8, 8, 1, 1), alpha=torch.tensor(4.0))
    put("down_blocks.0.attentions.0.proj_out", diff=rnd(32, 32, 1, 1, s=0.01))
    meta = {"ss_network_module": "lycoris.kohya", "ss_network_dim": "4", "ss_network_alpha": "2",
            "ss_network_args": json.dumps({"algo": "loha", "conv_dim": "4", "conv_alpha": "4"}),
            "ss_output_name": "lycoris_sample"}
    save_file(sd, str(HERE / "lycoris.safetensors"), metadata=meta)


def write_tuned(base: dict[str, torch.Tensor]) -> None:
    """base + the peft_lora deltas (scale alpha/r) + 1e-3-relative full-rank noise; model.norm changed."""
    g = gen(4)
    lora = {}
    g_lora = gen(1)  # replay write_lora's draws to get the same factors
    for i in range(LAYERS):
        for name, (o, n) in PROJ.items():
            r = 4 if name.endswith("v_proj") else 8
            lora[f"model.layers.{i}.{name}"] = lora_pair(g_lora, o, n, r)
    sd = {}
    for k, w in base.items():
        mod = k[: -len(".weight")]
        if mod in lora:
            down, up = lora[mod]
            w = w + 2.0 * up @ down + 1e-3 * w.std() * torch.randn(w.shape, generator=g)
        elif mod == "model.norm":
            w = w + 0.01 * torch.randn(w.shape, generator=g)
        sd[k] = w.contiguous()
    d = HERE / "tuned"
    d.mkdir(exist_ok=True)
    save_file(sd, str(d / "model.safetensors"), metadata={"format": "pt"})
    (d / "config.json").write_text((HERE / "base" / "config.json").read_text())


def main() -> None:
    base = write_base()
    write_lora()
    write_dora(base)
    write_locon()
    write_lycoris()
    write_tuned(base)


if __name__ == "__main__":
    main()
