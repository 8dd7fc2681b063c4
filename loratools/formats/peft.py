"""PEFT LoRA folders: ``adapter_config.json`` + ``adapter_model.safetensors`` (or ``.bin``).

Keys (PEFT's ``get_peft_model_state_dict``): ``base_model.model.<module>.lora_A.weight`` (down),
``.lora_B.weight`` (up), ``.lora_magnitude_vector`` (DoRA), ``.lora_embedding_A`` [r, vocab] and
``.lora_embedding_B`` [dim, r] for embeddings (stored transposed relative to the weight); anything
else (``modules_to_save`` copies, saved embedding base layers) is carried along untouched.
Scale = lora_alpha / r (or / √r with ``use_rslora``), per module through ``rank_pattern`` /
``alpha_pattern`` matched like PEFT's ``get_pattern_key``.
"""

from __future__ import annotations

import json
import re
from collections import Counter
from dataclasses import replace
from pathlib import Path

import torch

from loratools.adapter import Adapter, Layer, LoraLayer
from loratools.errors import LoraToolsError
from loratools.formats import experts
from loratools.formats.common import (
    GENERATED_KEY,
    PEFT_CONFIG_KEY,
    alpha_for,
    atomic_path,
    check_factor,
    check_resolved,
    json_dumps,
    read_tensors,
    save_safetensors,
)
from loratools.formats.naming import pattern_key, split_component
from loratools.formats.spec import AdapterFormat, WriteOptions

PREFIX = "base_model.model."
WEIGHT_FILES = ("adapter_model.safetensors", "adapter_model.bin")
_KEY = re.compile(
    r"^(?P<mod>.+?)\.(?:(?P<ab>lora_A|lora_B)(?:\.[A-Za-z0-9_]+)?\.weight"
    r"|lora_embedding_(?P<emb>[AB])(?:\.[A-Za-z0-9_]+)?"
    r"|(?P<mag>lora_magnitude_vector)(?:\.[A-Za-z0-9_]+)?(?:\.weight)?)$"
)
_DEFAULT_CONFIG = {
    "peft_type": "LORA", "task_type": None, "bias": "none", "lora_dropout": 0.0, "fan_in_fan_out": False,
    "inference_mode": True, "init_lora_weights": True, "modules_to_save": None, "base_model_name_or_path": None,
}


def detect(path: Path) -> bool:
    return path.is_dir() and (path / "adapter_config.json").is_file()


def _targets(config: dict, module: str) -> bool:
    tm = config.get("target_modules")
    if isinstance(tm, str):
        return re.fullmatch(tm, module) is not None
    if not tm:
        return False
    return any(module == t or module.endswith("." + t) for t in tm)


def _is_number(v: object) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def _is_rank(v: object) -> bool:
    return isinstance(v, int) and not isinstance(v, bool) and v > 0


def _flag(v: object) -> bool:
    return v is None or isinstance(v, bool)


def _str_list(v: object) -> bool:
    return isinstance(v, list) and all(isinstance(x, str) for x in v)


#: adapter_config.json fields loratools reads: (check, what the field must be)
_FIELDS = {
    "peft_type": (lambda v: isinstance(v, str), "a string"),
    "r": (_is_rank, "a positive integer"),
    "lora_alpha": (_is_number, "a number"),
    "alpha": (_is_number, "a number"),
    "use_rslora": (_flag, "true or false"),
    "use_dora": (_flag, "true or false"),
    "fan_in_fan_out": (_flag, "true or false"),
    "target_modules": (lambda v: v is None or isinstance(v, str) or _str_list(v), "a list of module names or a regex string"),
    "modules_to_save": (lambda v: v is None or _str_list(v), "a list of module names or null"),
    "rank_pattern": (lambda v: v is None or (isinstance(v, dict) and all(_is_rank(x) for x in v.values())),
                     "an object mapping patterns to positive integer ranks"),
    "alpha_pattern": (lambda v: v is None or (isinstance(v, dict) and all(_is_number(x) for x in v.values())),
                      "an object mapping patterns to numbers"),
}


def check_config(config: dict, cfg_path: Path | str) -> None:
    """One line naming the file and the field for a badly typed adapter_config.json field that loratools reads."""
    for key, (ok, what) in _FIELDS.items():
        if key in config and not ok(config[key]):
            raise LoraToolsError(f"{cfg_path}: field {key!r} must be {what}, got {json.dumps(config[key])[:80]}")
    for key in ("rank_pattern", "alpha_pattern"):
        for pattern in config.get(key) or {}:
            try:
                re.compile(pattern)
            except re.error as exc:
                raise LoraToolsError(f"{cfg_path}: field {key!r}: pattern {pattern!r} is not a valid regex ({exc})") from None
    if isinstance(config.get("target_modules"), str):
        try:
            re.compile(config["target_modules"])
        except re.error as exc:
            raise LoraToolsError(f"{cfg_path}: field 'target_modules' is not a valid regex ({exc})") from None


def read(path: Path) -> Adapter:
    cfg_path = path / "adapter_config.json"
    try:
        config = json.loads(cfg_path.read_text())
    except json.JSONDecodeError as exc:
        raise LoraToolsError(f"{cfg_path}: invalid JSON ({exc.msg} at line {exc.lineno} column {exc.colno})") from None
    if not isinstance(config, dict):
        raise LoraToolsError(f"{cfg_path}: expected a JSON object")
    check_config(config, cfg_path)
    ptype = str(config.get("peft_type", "LORA")).upper()
    if ptype not in ("LORA", "LOHA", "LOKR"):
        raise LoraToolsError(f"{cfg_path}: peft_type {ptype} is not supported (expected LORA, LOHA or LOKR)")
    if config.get("fan_in_fan_out"):
        raise LoraToolsError(f"{cfg_path}: fan_in_fan_out=true (GPT-2 Conv1D) adapters are not supported")
    wfile = next((path / n for n in WEIGHT_FILES if (path / n).is_file()), None)
    if wfile is None:
        raise LoraToolsError(f"{path}: adapter_config.json found but no adapter_model.safetensors or adapter_model.bin")
    tensors, metadata = read_tensors(wfile)
    metadata.pop("format", None)
    generated = metadata.pop(GENERATED_KEY, None) == "1"
    if ptype != "LORA":
        return _read_lycoris_type(tensors, metadata, config, wfile, path)

    parts: dict[str, dict[str, torch.Tensor]] = {}
    extra: dict[str, torch.Tensor] = {}
    for key, t in tensors.items():
        m = _KEY.match(key)
        if m is None:
            extra[key] = t
            continue
        mod = m["mod"][len(PREFIX):] if m["mod"].startswith(PREFIX) else m["mod"]
        slot = m["ab"] or (f"emb_{m['emb']}" if m["emb"] else "mag")
        parts.setdefault(mod, {})[slot] = t

    r_default = int(config.get("r", 8))
    alpha_default = float(config.get("lora_alpha", r_default))
    rank_pattern = config.get("rank_pattern") or {}
    alpha_pattern = config.get("alpha_pattern") or {}
    rslora = bool(config.get("use_rslora", False))
    adapter = Adapter(layers={}, format="peft", metadata=metadata, config=config, extra_tensors=extra, source=str(path),
                      config_generated=generated)
    fused, expert_info = experts.take_fused(parts, config, wfile, adapter.warnings)  # target_parameters wrappers
    if expert_info:
        adapter.provenance.update(expert_info, expert_layout="fused")
    for mod, p in parts.items():
        if mod in fused:
            adapter.layers.update(fused[mod])
            continue
        emb = "emb_A" in p or "emb_B" in p
        a_key, b_key = ("emb_A", "emb_B") if emb else ("lora_A", "lora_B")
        if a_key not in p or b_key not in p:
            missing = "lora_embedding_" + a_key[-1] if emb and a_key not in p else (
                "lora_embedding_" + b_key[-1] if emb else (a_key if a_key not in p else b_key))
            raise LoraToolsError(f"{wfile}: module {mod} has no {missing} tensor")
        a, b = p[a_key], p[b_key]
        for slot, t in ((a_key, a), (b_key, b), ("mag", p.get("mag"))):
            if t is not None:
                disk = {"emb_A": "lora_embedding_A", "emb_B": "lora_embedding_B", "mag": "lora_magnitude_vector"}
                check_factor(t, f"{wfile}: module {mod}", disk.get(slot, slot + ".weight"))
        if emb:  # lora_embedding_A [r, vocab], lora_embedding_B [dim, r]; ΔW[vocab, dim] = Aᵀ Bᵀ
            if a.dim() != 2 or b.dim() != 2 or a.shape[0] != b.shape[1]:
                raise LoraToolsError(
                    f"{wfile}: module {mod}: lora_embedding_A {tuple(a.shape)} and lora_embedding_B {tuple(b.shape)} do not fit"
                )
            down, up = b.T, a.T
        else:
            down, up = a, b
        try:
            layer = LoraLayer(down=down, up=up, rslora=rslora, embedding=emb)
        except LoraToolsError as exc:
            raise LoraToolsError(f"{wfile}: module {mod}: {exc}") from None
        rk = pattern_key(rank_pattern, mod)
        expect_r = int(rank_pattern[rk]) if rk is not None else r_default
        if expect_r != layer.rank:
            adapter.warnings.append(
                f"{mod}: tensors have rank {layer.rank} but adapter_config.json says r={expect_r}; using {layer.rank}"
            )
        ak = pattern_key(alpha_pattern, mod)
        layer.alpha = float(alpha_pattern[ak]) if ak is not None else alpha_default
        if "mag" in p:
            mag = p["mag"].reshape(-1)
            if mag.numel() != layer.shape[0]:
                raise LoraToolsError(
                    f"{wfile}: module {mod}: lora_magnitude_vector has {mag.numel()} values, expected {layer.shape[0]} (out features)"
                )
            layer.magnitude = p["mag"]
        adapter.layers[mod] = layer
    if not adapter.layers:
        raise LoraToolsError(f"{wfile}: no LoRA tensors found (expected *.lora_A.weight / *.lora_B.weight keys)")
    if config.get("modules_to_save"):
        adapter.warnings.append(
            f"modules_to_save {config['modules_to_save']}: {len(extra)} full tensor(s) carried along unchanged"
        )
    return adapter


def _read_lycoris_type(tensors: dict[str, torch.Tensor], metadata: dict[str, str], config: dict,
                       wfile: Path, path: Path) -> Adapter:
    """PEFT's own LoHa / LoKr: ``base_model.model.<module>.hada_w1_a`` etc. (see formats/lycoris.py)."""
    from loratools.formats import lycoris

    keys = lycoris.LOHA_KEYS + lycoris.LOKR_KEYS
    parts: dict[str, dict[str, torch.Tensor]] = {}
    extra: dict[str, torch.Tensor] = {}
    for key, t in tensors.items():
        mod, _, param = key.rpartition(".")
        if param not in keys:
            extra[key] = t
            continue
        mod = mod[len(PREFIX):] if mod.startswith(PREFIX) else mod
        parts.setdefault(mod, {})[param] = t
    if not parts:
        raise LoraToolsError(f"{wfile}: no {config.get('peft_type')} tensors found (expected *.hada_w1_a / *.lokr_w1 keys)")
    layers = lycoris.peft_lycoris_layers(parts, config, wfile, pattern_key)
    return Adapter(layers=layers, format="peft", metadata=metadata, config=config, extra_tensors=extra, source=str(path))


def _describes(config: dict, adapter: Adapter, rslora: bool, fused: list[experts.FusedParam]) -> bool:
    """Whether an existing config already gives every layer (and fused expert parameter) its rank, alpha and
    targeting."""
    r = int(config.get("r", 8))
    alpha = float(config.get("lora_alpha", r))
    rp, ap = config.get("rank_pattern") or {}, config.get("alpha_pattern") or {}
    if bool(config.get("use_rslora", False)) != rslora:
        return False
    if not experts.describes(config, fused, adapter.provenance.get("expert_keys")):
        return False
    for name, layer in adapter.layers.items():
        rk, ak = pattern_key(rp, name), pattern_key(ap, name)
        if (int(rp[rk]) if rk else r) != layer.rank:
            return False
        if (float(ap[ak]) if ak else alpha) != alpha_for(layer, rslora):
            return False
        if not _targets(config, name):
            return False
    return True


def build_config(adapter: Adapter, fused: list[experts.FusedParam] | None = None) -> tuple[dict, bool]:
    """The adapter_config.json for ``adapter`` (and its ``fused`` expert parameters, see formats/experts.py), and
    whether it was generated (vs. kept from PEFT)."""
    layers = adapter.layers
    fused = fused or []
    rs = Counter([layer.rslora for layer in layers.values()] + [fp.rslora for fp in fused]).most_common(1)[0][0]
    dora = [layer.magnitude is not None for layer in layers.values()]
    if any(dora) and not all(dora):
        raise LoraToolsError("PEFT cannot hold DoRA and plain LoRA layers in one adapter (use_dora is global)")
    source = dict(adapter.config) if adapter.config.get("peft_type") else {}
    if source and _describes(source, adapter, rs, fused) and bool(source.get("use_dora", False)) == any(dora):
        return source, adapter.config_generated
    config = {**_DEFAULT_CONFIG, **{k: v for k, v in source.items() if k not in ("rank_pattern", "alpha_pattern")}}
    ranks = {n: layer.rank for n, layer in layers.items()} | {fp.key: fp.rank for fp in fused}
    alphas = {n: alpha_for(layer, rs) for n, layer in layers.items()} | {fp.key: alpha_for(fp, rs) for fp in fused}
    r = Counter(ranks.values()).most_common(1)[0][0]
    alpha = Counter(alphas.values()).most_common(1)[0][0]
    config.update(
        peft_type="LORA",
        r=r,
        lora_alpha=int(alpha) if float(alpha).is_integer() else alpha,
        rank_pattern={n: v for n, v in ranks.items() if v != r},
        alpha_pattern={n: v for n, v in alphas.items() if v != alpha},
        use_rslora=rs,
        use_dora=any(dora),
    )
    if not source:
        config.update(task_type=adapter.provenance.get("task_type"),
                      base_model_name_or_path=adapter.provenance.get("base_model"))
    if not (source and all(_targets(source, n) for n in layers)):
        config["target_modules"] = sorted(layers)
    if fused or config.get("target_parameters"):
        config.update(experts.target_parameter_config(fused, config.get("target_modules")))
    if adapter.extra_tensors and not source and not config.get("modules_to_save"):
        # full tensors from a non-PEFT source (kohya / diffusers file, extract --save-full): PEFT restores them
        # into the modules named here
        config["modules_to_save"] = sorted({k[len(PREFIX):].rpartition(".")[0] for k in adapter.extra_tensors})
    return config, True


def one_model(adapter: Adapter) -> Adapter:
    """A PEFT folder adapts one model: a model family's canonical names lose their pipeline component (``unet.x`` →
    ``x``, the module path PEFT sees in that model); layers of several components cannot share one folder."""
    if not adapter.family:
        return adapter
    components = {split_component(n)[0] for n in adapter.layers}
    if len(components) > 1:
        raise LoraToolsError(
            f"a PEFT folder adapts one model, but this {adapter.family} adapter has layers for "
            f"{', '.join(sorted(c or 'no component' for c in components))}; write kohya, comfy or diffusers instead "
            "(or --include one component with resize)"
        )
    return replace(adapter, layers={split_component(n)[1]: la for n, la in adapter.layers.items()})


def write(adapter: Adapter, out: Path, force: bool = False, options: WriteOptions = WriteOptions()) -> None:
    dtype = options.dtype
    check_resolved(adapter)
    adapter = one_model(adapter)
    adapter, fused = experts.fuse(adapter)  # per-expert layers written as PEFT target_parameters, if so laid out
    if options.force_component and options.component:
        adapter.warnings.append(f"--component {options.component} has no effect on PEFT output (PEFT keys carry no "
                                "pipeline component)")
    tensors: dict[str, torch.Tensor] = {}

    def cast(t: torch.Tensor) -> torch.Tensor:
        return t.to(dtype) if dtype is not None else t

    for name, layer in adapter.layers.items():
        stem = "base_model.model." + name
        if layer.embedding:
            tensors[stem + ".lora_embedding_A"] = cast(layer.up.T)
            tensors[stem + ".lora_embedding_B"] = cast(layer.down.T)
        else:
            tensors[stem + ".lora_A.weight"] = cast(layer.down)
            tensors[stem + ".lora_B.weight"] = cast(layer.up)
        if layer.magnitude is not None:
            tensors[stem + ".lora_magnitude_vector"] = cast(layer.magnitude)
    tensors.update(experts.peft_tensors(fused, cast))
    config, generated = build_config(adapter, fused)
    if not fused:
        adapter.warnings.extend(experts.per_expert_notes(config, adapter.layers))
    for k, t in adapter.extra_tensors.items():
        tensors[k] = t
    metadata = {**{k: v for k, v in adapter.metadata.items() if k != PEFT_CONFIG_KEY}, "format": "pt"}
    if generated:
        metadata[GENERATED_KEY] = "1"
    with atomic_path(out, force, is_dir=True) as tmp:
        save_safetensors(tensors, tmp / "adapter_model.safetensors", metadata)
        (tmp / "adapter_config.json").write_text(json_dumps(config) + "\n")


def refuse(name: str, layer: Layer) -> str | None:
    if not isinstance(layer, LoraLayer):
        return f"{layer.kind} layers have no PEFT LoRA form; convert them to LoRA first"
    if layer.magnitude is not None and layer.magnitude_axis != "out":
        return (f"LyCORIS dora_scale {tuple(layer.magnitude.shape)} is per input column (wd_on_output=False); PEFT DoRA "
                "has no such form: use --fold-dora --base CKPT to fold it into plain LoRA")
    return None


FORMAT = AdapterFormat(
    name="peft", summary="PEFT folder (adapter_config.json + adapter_model.safetensors)", folder=True, read=read,
    write=write, detect=detect, claims=lambda key: key.startswith(PREFIX), refuse=refuse, dora="peft", dora_all_or_none="PEFT's use_dora",
)
