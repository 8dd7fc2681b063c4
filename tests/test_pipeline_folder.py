"""diffusers pipeline folders (``model_index.json`` + ``unet/``, ``text_encoder/``, ``text_encoder_2/``, ``vae/``…) as
checkpoints: the same canonical modules as the original-layout single file of the same models, adapters of every
convention resolved against both alike, ``bake`` writing the pipeline's own layout, ``extract`` between two folders
giving the adapter extracted between the two single files.

The folders are written by the real libraries (diffusers ``save_pretrained``, transformers 5 ``save_pretrained``,
whose ``CLIPTextModel`` has no ``text_model.`` level); the single files by inverting diffusers' single-file
conversion (``tests/sd_models.py``). SD1.5 gets a sharded UNet (``diffusion_pytorch_model.safetensors.index.json``).
"""

from __future__ import annotations

import copy
import json
import re
from pathlib import Path

import pytest
import torch
from diffusers import UNet2DConditionModel
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from sd_models import (
    CHECKPOINTS,
    VAE,
    clip_to_original,
    kohya_lora,
    open_clip_to_original,
    text_state_dict,
    unet_to_original,
)
from transformers import CLIPTextModel

from loratools.checkpoint import Checkpoint
from loratools.extract import ExtractOptions, extract
from loratools.families.sd import flatten_text_model
from loratools.formats import load_adapter
from loratools.linalg import RankRule

CONFIG_FILES = {
    "tokenizer/vocab.json": '{"a": 0, "b": 1}\n',
    "tokenizer/tokenizer_config.json": '{"model_max_length": 7}\n',
    "scheduler/scheduler_config.json": '{"_class_name": "PNDMScheduler", "num_train_timesteps": 1000}\n',
    "vae/config.json": '{"_class_name": "AutoencoderKL", "latent_channels": 4}\n',
    "feature_extractor/preprocessor_config.json": '{"size": 8}\n',
}
VAE_TENSORS = {k.removeprefix("first_stage_model."): v for k, v in VAE.items()}


def write_pipeline(root: Path, family: str, unet, tes: dict, shard: bool) -> Path:
    """A diffusers pipeline folder of these models, written by diffusers / transformers themselves."""
    root.mkdir(parents=True)
    unet.save_pretrained(root / "unet", **({"max_shard_size": "100KB"} if shard else {}))
    index = {"_class_name": "StableDiffusionXLPipeline" if family == "sdxl" else "StableDiffusionPipeline",
             "_diffusers_version": "0.42.1", "unet": ["diffusers", "UNet2DConditionModel"],
             "vae": ["diffusers", "AutoencoderKL"], "scheduler": ["diffusers", "PNDMScheduler"],
             "tokenizer": ["transformers", "CLIPTokenizer"], "safety_checker": [None, None],
             "feature_extractor": ["transformers", "CLIPImageProcessor"]}
    for comp, model in tes.items():
        model.save_pretrained(root / comp)
        index[comp] = ["transformers", type(model).__name__]
    for rel, text in CONFIG_FILES.items():
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_text(text)
    save_file(VAE_TENSORS, str(root / "vae" / "diffusion_pytorch_model.safetensors"))
    (root / "model_index.json").write_text(json.dumps(index, indent=2))
    return root


def original_file(tiny, unet, tes: dict) -> dict[str, torch.Tensor]:
    """The original-layout single file of these models (as ``sd_models`` writes it)."""
    nm = tiny.naming
    out = unet_to_original(unet.state_dict(), nm)
    for spec in nm.structure.text_encoders:
        state = text_state_dict(tes[spec.component])
        write = clip_to_original if spec.kind == "clip" else open_clip_to_original
        out.update(write(state, nm, spec.component))
    return {**{k: v.contiguous() for k, v in out.items()}, **VAE}


@pytest.fixture(scope="module", params=["sd15", "sdxl"])
def sd(request, tmp_path_factory):
    """The tiny models as a pipeline folder and as a single file, and a kohya LoRA on every adaptable module."""
    fam = request.param
    root = tmp_path_factory.mktemp(fam)
    tiny = CHECKPOINTS[fam](0)
    single = root / "base.safetensors"
    state = original_file(tiny, tiny.unet, tiny.text_encoders)
    assert state.keys() == tiny.ckpt.keys()
    save_file(state, str(single))
    folder = write_pipeline(root / "pipe", fam, tiny.unet, tiny.text_encoders, shard=fam == "sd15")
    src = root / "lora.safetensors"
    save_file(kohya_lora(tiny, seed=1, ranks=(2, 3, 4), alpha_cycle=4), str(src))
    return {"root": root, "single": single, "folder": folder, "src": src, "tiny": tiny, "family": fam}


def same_layers(a, b) -> None:
    assert set(a.layers) == set(b.layers)
    for name, la in a.layers.items():
        lb = b.layers[name]
        assert torch.equal(la.down, lb.down) and torch.equal(la.up, lb.up), name
        assert la.scale == lb.scale, name


# ------------------------------------------------------------------------------------------ the checkpoint
def test_folder_modules_are_the_single_files_canonical_modules(sd):
    folder, single = Checkpoint(sd["folder"]), Checkpoint(sd["single"])
    assert folder.is_pipeline and set(folder.components) == {"unet", "vae", *sd["tiny"].text_encoders}
    assert folder.family() == (sd["family"], "diffusers")
    if sd["family"] == "sd15":
        assert folder.index_files == [sd["folder"] / "unet" / "diffusion_pytorch_model.safetensors.index.json"]
        assert len([f for f in folder.files if f.parent.name == "unet"]) > 1
    assert "unet.down_blocks.1.attentions.0.proj_in.weight" in folder.keys()
    assert "vae.encoder.conv_in.weight" in folder.keys()
    # transformers 5 saves CLIPTextModel without text_model.: get() uses the real key, modules the canonical name
    q = "text_encoder.text_model.encoder.layers.0.self_attn.q_proj"
    assert folder.module_ref(q).key == "text_encoder." + flatten_text_model("text_model.encoder.layers.0."
                                                                             "self_attn.q_proj.weight")
    assert folder.stored_key(folder.module_ref(q).key) == "encoder.layers.0.self_attn.q_proj.weight"
    refs = folder.family_refs()
    assert set(refs) == set(single.module_refs()) == {m.canonical for m in sd["tiny"].naming.modules}
    assert set(refs) <= set(folder.module_refs())
    for name in refs:
        assert torch.equal(folder.module_weight(name), single.module_weight(name)), name


def test_single_component_folder_keeps_its_own_paths(sd):
    unet = Checkpoint(sd["folder"] / "unet")
    assert not unet.is_pipeline
    assert "down_blocks.1.attentions.0.proj_in" in unet.module_refs()
    ref = unet.module_ref("unet.down_blocks.1.attentions.0.proj_in")
    assert ref is not None and ref.key == "down_blocks.1.attentions.0.proj_in.weight"


# ------------------------------------------------------------------------------------------ resolution
def test_kohya_resolves_against_folder_as_against_single_file(sd):
    on_folder = load_adapter(sd["src"], base=sd["folder"])
    on_single = load_adapter(sd["src"], base=sd["single"])
    assert on_folder.family == on_single.family == sd["family"]
    assert set(on_folder.layers) == {m.canonical for m in sd["tiny"].naming.modules}
    assert not any("match no module" in w for w in on_folder.warnings)
    same_layers(on_folder, on_single)


@pytest.mark.parametrize("to", ["kohya-original", "comfy", "diffusers"])
def test_every_convention_resolves_against_the_folder(cli, sd, tmp_path, to):
    mid = tmp_path / "mid.safetensors"
    args = ["--to", "kohya", "--kohya-style", "original"] if to == "kohya-original" else ["--to", to]
    cli.ok("convert", sd["src"], *args, "--family", sd["family"], "-o", mid)
    on_folder = load_adapter(mid, base=sd["folder"])
    assert on_folder.resolved and not any("match no module" in w for w in on_folder.warnings)
    same_layers(on_folder, load_adapter(sd["src"], base=sd["single"]))
    out = tmp_path / "back.safetensors"
    cli.ok("convert", mid, "--to", "kohya", "--kohya-style", "diffusers", "--base", sd["folder"], "-o", out)
    src, back = load_file(str(sd["src"])), load_file(str(out))
    assert src.keys() == back.keys() and all(torch.equal(v, back[k]) for k, v in src.items())


def test_peft_and_cli_commands_against_the_folder(cli, sd, tmp_path):
    unet_only = tmp_path / "unet.safetensors"
    save_file({k: v for k, v in load_file(str(sd["src"])).items() if k.startswith("lora_unet_")}, str(unet_only))
    cli.ok("convert", unet_only, "--to", "peft", "-o", tmp_path / "p")
    peft = load_adapter(tmp_path / "p", base=sd["folder"])
    assert all(n.startswith("unet.") for n in peft.layers) and peft.family == sd["family"]
    same_layers(peft, load_adapter(unet_only, base=sd["single"]))
    res = cli.ok("inspect", sd["src"], "--base", sd["folder"], "--json")
    assert "match no module" not in res.output
    cli.ok("resize", sd["src"], "--rank", "1", "--base", sd["folder"], "-o", tmp_path / "r.safetensors")
    cli.ok("merge", sd["src"], unet_only, "--base", sd["folder"], "-o", tmp_path / "m.safetensors")
    assert set(load_adapter(tmp_path / "r.safetensors", base=sd["folder"]).layers) == set(peft.layers) | {
        n for n in load_adapter(sd["src"]).layers}


# ------------------------------------------------------------------------------------------ bake
def _files(root: Path) -> dict[str, Path]:
    return {p.relative_to(root).as_posix(): p for p in root.rglob("*") if p.is_file()}


def test_bake_into_folder_equals_bake_into_single_file(cli, sd, tmp_path):
    out_f, out_s = tmp_path / "baked", tmp_path / "baked.safetensors"
    cli.ok("bake", sd["src"], "--base", sd["folder"], "-o", out_f)
    cli.ok("bake", sd["src"], "--base", sd["single"], "-o", out_s)
    base, baked, baked_single = Checkpoint(sd["folder"]), Checkpoint(out_f), Checkpoint(out_s)
    refs = base.family_refs()
    adapted = {r.key for r in refs.values()}
    for name in refs:  # adapted modules: the same values as baked into the single file
        w = baked.module_weight(name)
        assert torch.equal(w, baked_single.module_weight(name)), name
        assert not torch.equal(w, base.module_weight(name)), name
    assert baked.keys() == base.keys()
    for k in base.keys():  # everything else byte for byte
        if k not in adapted:
            a, b = base.get(k), baked.get(k)
            assert a.dtype == b.dtype and torch.equal(a, b), k
    src, dst = _files(sd["folder"]), _files(out_f)
    assert src.keys() == dst.keys()
    weights = {f.relative_to(sd["folder"]).as_posix() for f in base.files}
    for rel, path in src.items():
        if rel in weights:  # the component's own, unprefixed keys
            with safe_open(str(path), "pt") as a, safe_open(str(dst[rel]), "pt") as b:
                assert set(a.keys()) == set(b.keys()) and not any(k.startswith("unet.") for k in b.keys())
        elif rel.endswith(".index.json"):
            a, b = json.loads(path.read_text()), json.loads(dst[rel].read_text())
            assert a["weight_map"] == b["weight_map"]
            assert b["metadata"]["total_size"] == a["metadata"]["total_size"]
        else:
            assert path.read_bytes() == dst[rel].read_bytes(), rel
    cli.fails("bake", sd["src"], "--base", sd["folder"], "-o", out_f, match="--force")
    cli.ok("bake", sd["src"], "--base", sd["folder"], "-o", out_f, "--force")  # replaces its own pipeline output
    assert _files(out_f).keys() == src.keys()
    (out_f / "unet" / "text_encoder").mkdir()  # a component name, but not where the pipeline has it: not ours
    cli.fails("bake", sd["src"], "--base", sd["folder"], "-o", out_f, "--force", match="subfolder unet/text_encoder")
    (out_f / "unet" / "text_encoder").rmdir()
    # the libraries load the baked components
    unet = UNet2DConditionModel.from_pretrained(out_f / "unet")
    for k, v in unet.state_dict().items():
        assert torch.equal(v, baked.get(f"unet.{k}")), k
    if sd["family"] == "sd15":
        te = CLIPTextModel.from_pretrained(out_f / "text_encoder")
        q = "text_encoder.text_model.encoder.layers.0.self_attn.q_proj"
        assert torch.equal(te.state_dict()[flatten_text_model(q.split(".", 1)[1]) + ".weight"],
                           baked_single.module_weight(q))


# ------------------------------------------------------------------------------------------ extract
TARGETS = [
    r"unet\.down_blocks\.\d\.attentions\.0\.transformer_blocks\.0\.attn1\.to_q",
    r"unet\.down_blocks\.\d\.resnets\.0\.conv1",
    r"unet\.mid_block\.attentions\.0\.proj_in",
    r"text_encoder\.text_model\.encoder\.layers\.0\.self_attn\.q_proj",
    r"text_encoder_2\.text_model\.encoder\.layers\.0\.self_attn\.v_proj",  # SDXL: rows of the fused in_proj
    r"text_encoder_2\.text_projection",  # SDXL: stored transposed in the single file
]


@pytest.fixture(scope="module")
def tuned(sd):
    """TUNED models (rank-2 deltas on a few modules) as a pipeline folder and as a single file."""
    tiny = sd["tiny"]
    unet, tes = copy.deepcopy(tiny.unet), {c: copy.deepcopy(m) for c, m in tiny.text_encoders.items()}
    names = [m.canonical for m in tiny.naming.modules]
    found = [[n for n in names if re.fullmatch(p, n)] for p in TARGETS]
    targets = [ns[0] for ns in found if ns]  # the first module of each pattern this family has
    g = torch.Generator().manual_seed(7)
    with torch.no_grad():
        for name in targets:
            comp, path = name.split(".", 1)
            model = unet if comp == "unet" else tes[comp]
            params = dict(model.named_parameters())
            p = params.get(path + ".weight")
            p = p if p is not None else params[flatten_text_model(path) + ".weight"]
            delta = 0.05 * torch.randn(p.shape[0], 2, generator=g) @ torch.randn(2, p[0].numel(), generator=g)
            p.add_(delta.reshape(p.shape))
    single = sd["root"] / "tuned.safetensors"
    save_file(original_file(tiny, unet, tes), str(single))
    folder = write_pipeline(sd["root"] / "tuned", sd["family"], unet, tes, shard=False)
    return {"single": single, "folder": folder, "targets": set(targets)}


def test_extract_between_folders_equals_extract_between_single_files(sd, tuned):
    opt = ExtractOptions(rule=RankRule("rank", 2))
    from_folders = extract(sd["folder"], tuned["folder"], opt)
    from_files = extract(sd["single"], tuned["single"], opt)
    a, b = from_folders.adapter, from_files.adapter
    assert a.family == b.family == sd["family"]
    assert set(a.layers) == set(b.layers) == tuned["targets"]
    for name, la in a.layers.items():
        lb = b.layers[name]
        assert la.shape == lb.shape and la.alpha == lb.alpha, name
        da, db = la.up.flatten(1) @ la.down.flatten(1), lb.up.flatten(1) @ lb.down.flatten(1)
        assert torch.allclose(da, db, rtol=1e-5, atol=1e-6), name
    skipped = {s["name"]: s["reason"] for s in from_folders.skipped}
    assert skipped["vae.encoder.conv_in.weight"] == "VAE: not part of a LoRA"


def test_extract_from_folders_writes_diffusers_style_kohya_stems(cli, sd, tuned, tmp_path):
    out = tmp_path / "x.safetensors"
    cli.ok("extract", "--base", sd["folder"], "--tuned", tuned["folder"], "--to", "kohya", "--rank", "2", "-o", out)
    stems = {k.split(".")[0] for k in load_file(str(out))}
    te = "lora_te1" if sd["family"] == "sdxl" else "lora_te"
    assert f"{te}_text_model_encoder_layers_0_self_attn_q_proj" in stems
    assert stems == {sd["tiny"].naming.kohya_stem(n, "diffusers") for n in tuned["targets"]}
    assert all(s.startswith(("lora_unet_down_blocks_", "lora_unet_mid_block_", "lora_te")) for s in stems)


def test_extract_between_a_folder_and_a_single_file_is_refused(cli, sd, tuned, tmp_path):
    cli.fails("extract", "--base", sd["folder"], "--tuned", tuned["single"], "--rank", "2",
              "-o", tmp_path / "x.safetensors", match="same family and layout")


# ------------------------------------------------------------------------------------------ bad folders
def _copy_folder(src: Path, dst: Path) -> Path:
    import shutil

    shutil.copytree(src, dst)
    return dst


def test_component_without_weights_is_a_one_line_error(cli, sd, tmp_path):
    bad = _copy_folder(sd["folder"], tmp_path / "bad")
    (bad / "text_encoder" / "model.safetensors").unlink()
    cli.fails("inspect", sd["src"], "--base", bad, match="pipeline component text_encoder")
    cli.fails("bake", sd["src"], "--base", bad, "-o", tmp_path / "out", match="no model weights")


def test_listed_component_without_folder_is_a_one_line_error(cli, sd, tmp_path):
    import shutil

    bad = _copy_folder(sd["folder"], tmp_path / "bad")
    shutil.rmtree(bad / "unet")
    cli.fails("inspect", sd["src"], "--base", bad, match="lists component(s) with no folder: unet")


def test_pipeline_family_sd2_by_its_cross_attention_width():
    from types import SimpleNamespace

    from loratools.families import detect_family

    def keys(width: int) -> dict:
        return {"unet.down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_k.weight": SimpleNamespace(
            shape=(320, width)), "text_encoder.text_model.encoder.layers.0.mlp.fc1.weight": SimpleNamespace(shape=(4, 4))}

    assert detect_family(keys(1024)) == ("sd2", "diffusers")
    assert detect_family(keys(768)) == ("sd15", "diffusers")


def test_kohya_prefix_keeps_its_component_against_a_pipeline(cli, sd, tmp_path):
    """Without a unet in the pipeline, lora_unet_conv_in must not land on vae.encoder.conv_in by its suffix."""
    import json

    bad = _copy_folder(sd["folder"], tmp_path / "nounet")
    index = json.loads((bad / "model_index.json").read_text())
    index["unet"] = [None, None]
    (bad / "model_index.json").write_text(json.dumps(index))
    lora = tmp_path / "conv_in.safetensors"
    g = torch.Generator().manual_seed(0)
    save_file({"lora_unet_conv_in.lora_down.weight": torch.randn(2, 3, 3, 3, generator=g),
               "lora_unet_conv_in.lora_up.weight": torch.randn(2, 2, 1, 1, generator=g)}, str(lora))
    cli.fails("inspect", lora, "--base", bad, match="matches a module of the base")
