"""Mixture-of-experts adapters: every on-disk expert layout ↔ canonical per-expert layers.

**Canonical form** (what every operation sees): one plain LoRA layer per expert and projection, named
``<experts module>.<e>.<gate_proj|up_proj|down_proj>`` (``model.layers.0.mlp.experts.3.gate_proj``) with ΔW in
``nn.Linear`` orientation ``[out, in]`` — the names vLLM, transformers 4 and PEFT ``target_modules`` use. Shared
experts and the router (``mlp.gate``) are ordinary modules. Mixtral's transformers-4 names (``block_sparse_moe.
experts.N.w1|w3|w2``) are kept as they are and count as gate / up / down.

**PEFT ``target_parameters``** (PEFT ≥ 0.18, ``peft/tuners/lora/layer.py`` ``ParamWrapper``) on a fused 3-D expert
tensor ``[E, d1, d2]``: ``lora_A`` is ``[r·E, in]`` and ``lora_B`` ``[out, r·E]`` with ``r`` the *per-expert* rank
of the config (``r`` / ``rank_pattern`` keyed by ``<module>.<param>``); scale ``lora_alpha / r`` (``/ √r`` with
rsLoRA). ``get_delta_weight`` reshapes A to ``[E, r, in]`` (expert-major rows: expert e owns rows ``e·r … e·r+r-1``)
and B to ``[out, r, E]`` (rank-major columns: expert e owns columns ``e, E+e, 2E+e, …``), so expert e's delta is
``scale · B[:, e::E] @ A[e·r:(e+1)·r]`` in the linear orientation — for ``[E, out, in]`` storage (Qwen, Mixtral,
DeepSeek in transformers 5, where PEFT swaps in/out) and for ``[E, in, out]`` storage that declares
``is_transposed`` (GPT-OSS) alike. Llama 4 stores ``[E, in, out]`` without declaring it: PEFT then builds the
factors the other way round (A holds the output side), recorded as ``peft_swapped``.

Several targeted parameters of one module are *nested* wrappers: PEFT wraps them in the module's parameter
registration order, so the last-registered parameter is the outermost wrapper (``…experts.lora_A.weight``) and
each earlier one sits one ``base_layer`` deeper (``…experts.base_layer.lora_A.weight``). Every transformers
Experts class registers ``gate_up_proj`` before ``down_proj``; the shapes are checked against that order.

**Fused gate/up**: ``gate_up_proj`` rows are gate then up (concatenated, transformers' default and the
``_MOE_FUSED_TARGETS`` order of PEFT's own v4→v5 conversion), or alternate gate, up, gate, … (GPT-OSS:
``gate_up[..., ::2]``, ``is_concatenated=False``).

Conversions (DESIGN.md §8): fused → per-expert slices A rows and B columns (bit-exact); gate_up → gate_proj +
up_proj shares the expert's A and slices B rows (bit-exact). Per-expert → fused needs one rank per parameter:
lower-rank experts are padded with zero rank columns, missing experts are zero, and gate + up with different
down factors are stacked (A concatenated, B block-diagonal: rank r_gate + r_up, as PEFT's
``PeftConcatenate``) — exact, but the rank changes, and the report says so.
"""

from __future__ import annotations

import json
import math
import re
from collections import Counter
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import torch

from loratools.adapter import Adapter, Layer, LoraLayer
from loratools.errors import LoraToolsError
from loratools.formats.naming import pattern_key

#: ``--expert-layout`` choices: per-expert 2-D modules; fused 3-D in the architecture's own gate/up order; fused
#: with the gate/up order given explicitly (for a model loratools does not know)
LAYOUTS = ("per-expert", "fused", "fused-concat", "fused-interleaved")
PER_EXPERT = re.compile(r"^(?P<module>.+\.experts)\.(?P<expert>\d+)\.(?P<proj>gate_proj|up_proj|down_proj|w1|w2|w3)$")
#: Mixtral's transformers-4 projection names
ALIASES = {"w1": "gate_proj", "w3": "up_proj", "w2": "down_proj"}
#: fused expert parameters in the order transformers' Experts classes register them (PEFT's nesting order)
FUSED_PARAMS = ("gate_up_proj", "gate_proj", "up_proj", "down_proj")
#: fused parameter → the per-expert projections it holds (row blocks, in order)
SPLIT = {"gate_up_proj": ("gate_proj", "up_proj"), "gate_proj": ("gate_proj",), "up_proj": ("up_proj",),
         "down_proj": ("down_proj",)}
FUSED_OF = {"gate_proj": "gate_up_proj", "up_proj": "gate_up_proj", "down_proj": "down_proj"}
#: gated experts: the projections of one expert
PROJECTIONS = ("gate_proj", "up_proj", "down_proj")
#: the prefix of PEFT's saved keys
PEFT_PREFIX = "base_model.model."


@dataclass(frozen=True)
class ExpertArch:
    """How an architecture stores its fused experts (transformers 5 modeling files, ``use_experts_implementation``)."""

    interleaved: bool = False  # gate/up rows alternate (GPT-OSS) instead of gate rows then up rows
    transposed: bool = False  # stored [E, in, out] instead of [E, out, in]
    peft_swapped: bool = False  # PEFT's ParamWrapper sees [E, in, out] as [E, out, in]: A holds the output side


_CONCAT = ExpertArch()
#: model_type → expert storage (a minimal table; loratools.families.moe is the full one)
ARCHS: dict[str, ExpertArch] = {
    **dict.fromkeys(("qwen2_moe", "qwen3_moe", "qwen3_5_moe", "qwen3_5_moe_text", "qwen3_next", "qwen3_vl_moe",
                     "qwen3_omni_moe", "mixtral", "minimax", "deepseek_v2", "deepseek_v3", "deepseek_v32", "glm4_moe",
                     "glm4v_moe", "olmoe", "flex_olmo", "granitemoe", "hunyuan_v1_moe", "ernie4_5_moe", "kimi_k25",
                     "dots1", "exaone_moe"), _CONCAT),
    "gpt_oss": ExpertArch(interleaved=True, transposed=True),
    "llama4": ExpertArch(transposed=True, peft_swapped=True),
    "llama4_text": ExpertArch(transposed=True, peft_swapped=True),
}
#: model class name prefix (PEFT's ``auto_mapping.base_model_class``) → model_type
_CLASS_PREFIX = {"GptOss": "gpt_oss", "Qwen3_5Moe": "qwen3_5_moe", "Qwen3Moe": "qwen3_moe", "Qwen2Moe": "qwen2_moe",
                 "Mixtral": "mixtral", "DeepseekV3": "deepseek_v3", "DeepseekV2": "deepseek_v2", "Llama4": "llama4",
                 "Olmoe": "olmoe", "Glm4Moe": "glm4_moe"}
#: substrings of a base model name (``base_model_name_or_path``) that name the architecture
_NAME_HINTS = {"gpt-oss": "gpt_oss", "gpt_oss": "gpt_oss", "llama-4": "llama4", "llama4": "llama4",
               "qwen3-30b-a3b": "qwen3_moe", "qwen3-235b-a22b": "qwen3_moe", "mixtral": "mixtral"}


def arch_of(model_type: str | None) -> ExpertArch | None:
    return ARCHS.get(model_type) if model_type else None


def model_type_of_config(config: dict) -> str | None:
    """The model_type an adapter_config.json names (``auto_mapping.base_model_class``, else a known base model
    name), or None."""
    cls = (config.get("auto_mapping") or {}).get("base_model_class") if isinstance(config.get("auto_mapping"), dict) else None
    for prefix, mt in _CLASS_PREFIX.items():
        if isinstance(cls, str) and cls.startswith(prefix):
            return mt
    name = str(config.get("base_model_name_or_path") or "").lower()
    return next((mt for hint, mt in _NAME_HINTS.items() if hint in name), None)


def model_type_of_base(path: Path) -> str | None:
    """The model_type of a base checkpoint's ``config.json`` (its text config's for a multimodal model), or None."""
    folder = path if path.is_dir() else path.parent
    cfg_file = folder / "config.json"
    if not cfg_file.is_file():
        return None
    try:
        cfg = json.loads(cfg_file.read_text())
    except (OSError, json.JSONDecodeError):
        return None
    if not isinstance(cfg, dict):
        return None
    for c in (cfg, cfg.get("text_config") if isinstance(cfg.get("text_config"), dict) else {}):
        if c.get("model_type") in ARCHS:
            return c["model_type"]
    return cfg.get("model_type") if isinstance(cfg.get("model_type"), str) else None


# --------------------------------------------------------------------------- factor layout helpers
def split_rows(up: torch.Tensor, interleaved: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """gate_up rows → (gate rows, up rows)."""
    if up.shape[0] % 2:
        raise LoraToolsError(f"gate_up_proj factor {tuple(up.shape)} has an odd number of rows; cannot split gate/up")
    if interleaved:
        return up[0::2].contiguous(), up[1::2].contiguous()
    half = up.shape[0] // 2
    return up[:half].contiguous(), up[half:].contiguous()


def join_rows(gate: torch.Tensor, up: torch.Tensor, interleaved: bool) -> torch.Tensor:
    """Inverse of :func:`split_rows`."""
    if interleaved:
        return torch.stack([gate, up], 1).reshape(gate.shape[0] * 2, *gate.shape[1:])
    return torch.cat([gate, up], 0)


def expert_slice(lora_a: torch.Tensor, lora_b: torch.Tensor, rank: int, e: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Expert ``e``'s (A_e [r, ·], B_e [·, r]) out of PEFT's fused [r·E, ·] / [·, r·E] (A expert-major, B rank-major)."""
    n = lora_a.shape[0] // rank
    return lora_a[e * rank:(e + 1) * rank].contiguous(), lora_b.reshape(lora_b.shape[0], rank, n)[:, :, e].contiguous()


def expert_stack(a_list: list[torch.Tensor], b_list: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """Inverse of :func:`expert_slice` over every expert: (A [r·E, ·], B [·, r·E])."""
    return torch.cat(a_list, 0), torch.stack(b_list, 2).reshape(b_list[0].shape[0], -1)


# --------------------------------------------------------------------------- reading PEFT target_parameters
def _targeted_params(module: str, targets: list[str]) -> list[str]:
    """The fused expert parameters of ``module`` that ``target_parameters`` names, in registration order."""
    found = set()
    for t in targets:
        mod, _, param = t.rpartition(".")
        if param in FUSED_PARAMS and (module == mod or module.endswith("." + mod)):
            found.add(param)
    return [p for p in FUSED_PARAMS if p in found]


def take_fused(parts: dict[str, dict[str, torch.Tensor]], config: dict, wfile: Path,
               warnings: list[str]) -> tuple[dict[str, dict[str, LoraLayer]], dict[str, Any]]:
    """Split PEFT ``target_parameters`` wrappers into canonical per-expert layers.

    ``parts`` maps a PEFT module key (``…experts`` / ``…experts.base_layer``) to its ``lora_A`` / ``lora_B``. Returns
    {wrapper key → {canonical name → layer}} for the keys that are fused expert wrappers, and the provenance to keep
    (``experts``: per experts module its expert count and gate/up order; ``expert_keys``: the parameters read).
    """
    targets = config.get("target_parameters") or []
    if not isinstance(targets, list) or not targets:
        return {}, {}
    model_type = model_type_of_config(config)
    arch = arch_of(model_type)
    rank_pattern = config.get("rank_pattern") or {}
    alpha_pattern = config.get("alpha_pattern") or {}
    r_default = int(config.get("r", 8))
    alpha_default = float(config.get("lora_alpha", r_default))
    rslora = bool(config.get("use_rslora", False))
    groups: dict[str, dict[int, str]] = {}
    for key in parts:
        module, depth = key, 0
        while module.endswith(".base_layer"):
            module, depth = module[: -len(".base_layer")], depth + 1
        if _targeted_params(module, targets):
            groups.setdefault(module, {})[depth] = key
    out: dict[str, dict[str, LoraLayer]] = {}
    info: dict[str, dict[str, Any]] = {}
    read_keys: list[str] = []
    assumed = False
    for module, by_depth in groups.items():
        params = _targeted_params(module, targets)
        if sorted(by_depth) != list(range(len(params))):
            raise LoraToolsError(
                f"{wfile}: {module}: target_parameters {params} make {len(params)} nested PEFT wrapper(s), but the file "
                f"holds {len(by_depth)} ({', '.join(sorted(by_depth.values()))})"
            )
        sizes: dict[str, tuple[int, int]] = {}
        for depth, key in by_depth.items():
            param = params[len(params) - 1 - depth]  # the outermost wrapper is the last-registered parameter
            p = parts[key]
            label = f"{wfile}: {PEFT_PREFIX}{key}"
            if "mag" in p or "emb_A" in p or "emb_B" in p:
                raise LoraToolsError(f"{label}: PEFT target_parameters wrappers hold no DoRA / embedding LoRA")
            if "lora_A" not in p or "lora_B" not in p:
                raise LoraToolsError(f"{label}: has no {'lora_A' if 'lora_A' not in p else 'lora_B'} tensor")
            a, b = p["lora_A"], p["lora_B"]
            full = f"{module}.{param}"
            rk = pattern_key(rank_pattern, full)
            r = int(rank_pattern[rk]) if rk is not None else r_default
            ak = pattern_key(alpha_pattern, full)
            alpha = float(alpha_pattern[ak]) if ak is not None else alpha_default
            if a.dim() != 2 or b.dim() != 2 or a.shape[0] != b.shape[1] or a.shape[0] % r:
                raise LoraToolsError(
                    f"{label}: lora_A {tuple(a.shape)} / lora_B {tuple(b.shape)} do not hold r·E rank rows for the "
                    f"per-expert r={r} that adapter_config.json gives {full}"
                )
            n = a.shape[0] // r
            swapped = arch is not None and arch.peft_swapped
            out_f, in_f = (a.shape[1], b.shape[0]) if swapped else (b.shape[0], a.shape[1])
            sizes[param] = (out_f, in_f)
            prev = info.get(module, {}).get("num_experts")
            if prev is not None and prev != n:
                raise LoraToolsError(f"{label}: {n} experts (rows {a.shape[0]} / r={r}) but {prev} in another "
                                     f"parameter of {module}")
            entry = info.setdefault(module, {"num_experts": n, "model_type": model_type,
                                             "interleaved": bool(arch and arch.interleaved)})
            if param == "gate_up_proj" and arch is None:
                assumed = True
            layers: dict[str, LoraLayer] = {}
            for e in range(n):
                a_e, b_e = expert_slice(a, b, r, e)
                down, up = (b_e.T.contiguous(), a_e.T.contiguous()) if swapped else (a_e, b_e)
                blocks = split_rows(up, entry["interleaved"]) if param == "gate_up_proj" else (up,)
                for proj, up_rows in zip(SPLIT[param], blocks):
                    layers[f"{module}.{e}.{proj}"] = LoraLayer(down=down, up=up_rows, alpha=alpha, rslora=rslora)
            out[key] = layers
            read_keys.append(full)
        if "gate_up_proj" in sizes and "down_proj" in sizes:
            (gu_out, gu_in), (d_out, d_in) = sizes["gate_up_proj"], sizes["down_proj"]
            if gu_out != 2 * d_in or gu_in != d_out:
                raise LoraToolsError(
                    f"{wfile}: {module}: the nested wrappers do not fit gate_up_proj [{gu_out}, {gu_in}] before "
                    f"down_proj [{d_out}, {d_in}] (expected gate_up out = 2 × down in, gate_up in = down out)"
                )
    if assumed:
        warnings.append(
            "fused gate_up_proj of an architecture adapter_config.json does not name: read as gate rows then up rows "
            "(transformers' default; GPT-OSS interleaves them); pass --base to take the order from the model"
        )
    return out, {"experts": info, "expert_keys": sorted(read_keys)} if info else {}



# --------------------------------------------------------------------------- per-expert grouping
def parse(name: str) -> tuple[str, int, str] | None:
    """(experts module, expert index, canonical projection) of a per-expert layer name, or None."""
    m = PER_EXPERT.match(name)
    if m is None:
        return None
    return m["module"], int(m["expert"]), ALIASES.get(m["proj"], m["proj"])


def expert_groups(layers: dict[str, Layer]) -> dict[str, dict[int, dict[str, tuple[str, Layer]]]]:
    """{experts module → {expert → {projection → (layer name, layer)}}} of an adapter's per-expert layers."""
    groups: dict[str, dict[int, dict[str, tuple[str, Layer]]]] = {}
    for name, layer in layers.items():
        p = parse(name)
        if p is not None:
            groups.setdefault(p[0], {}).setdefault(p[1], {})[p[2]] = (name, layer)
    return groups


def fused_module(module: str) -> str:
    """The transformers-5 module that holds an experts module's fused tensors (Mixtral: ``block_sparse_moe`` → ``mlp``)."""
    return module.replace(".block_sparse_moe.experts", ".mlp.experts")


def settle(adapter: Adapter, base=None) -> None:
    """After reading: record the adapter's expert layout, and take the gate/up order and the expert counts from the
    base model where one is given (re-splitting fused gate/up rows read in the other order — exact)."""
    groups = expert_groups(adapter.layers)
    if not groups:
        return
    adapter.provenance.setdefault("expert_layout", "per-expert")
    adapter.provenance.setdefault("source_expert_layout", adapter.provenance["expert_layout"])
    info = adapter.provenance.setdefault("experts", {})
    mt = (model_type_of_base(base.path) if base is not None else None) or model_type_of_config(adapter.config)
    arch = arch_of(mt)
    counts = base_expert_counts(base) if base is not None else {}
    for module in groups:
        entry = info.setdefault(module, {"num_experts": None, "model_type": None, "interleaved": False})
        fm = fused_module(module)
        if counts.get(fm) is not None:
            if entry["num_experts"] not in (None, counts[fm]):
                raise LoraToolsError(f"{adapter.source}: {module} has {entry['num_experts']} experts but the base "
                                     f"{base.path} has {counts[fm]}")
            entry["num_experts"] = counts[fm]
        if arch is None:
            continue
        entry["model_type"] = mt
        if entry["interleaved"] != arch.interleaved and adapter.provenance.get("expert_layout") == "fused":
            for projs in groups[module].values():  # read in the other gate/up order: regroup the rows, exactly
                if "gate_proj" in projs and "up_proj" in projs:
                    (gn, g), (un, u) = projs["gate_proj"], projs["up_proj"]
                    gate, up = split_rows(join_rows(g.up, u.up, entry["interleaved"]), arch.interleaved)
                    adapter.layers[gn] = replace(g, up=gate)
                    adapter.layers[un] = replace(u, up=up)
            adapter.warnings[:] = [w for w in adapter.warnings if not w.startswith("fused gate_up_proj of an arch")]
        entry["interleaved"] = arch.interleaved


# --------------------------------------------------------------------------- writing PEFT target_parameters
@dataclass
class FusedParam:
    """One PEFT ``target_parameters`` entry as written: ``lora_A`` [rank·E, in], ``lora_B`` [out, rank·E]."""

    module: str
    param: str
    lora_a: torch.Tensor
    lora_b: torch.Tensor
    rank: int
    alpha: float
    rslora: bool
    num_experts: int
    depth: int = 0
    notes: list[str] = field(default_factory=list)
    source_ranks: list[int] = field(default_factory=list)

    @property
    def key(self) -> str:
        return f"{self.module}.{self.param}"

    @property
    def stem(self) -> str:
        return self.module + ".base_layer" * self.depth

    @property
    def scale(self) -> float:
        return self.alpha / (math.sqrt(self.rank) if self.rslora else self.rank)

    def row(self) -> dict:
        return {"parameter": self.key, "experts": self.num_experts, "rank": self.rank,
                "source_ranks": sorted(set(self.source_ranks)), "rank_changed": any(r != self.rank for r in self.source_ranks),
                "notes": list(self.notes)}


def output_layout(adapter: Adapter) -> str | None:
    """The expert layout ``adapter`` is written in (``fused*``, ``per-expert``), None for no expert layers."""
    return adapter.provenance.get("expert_layout") if expert_groups(adapter.layers) else None


def set_layout(adapter: Adapter, layout: str | None, to_format: str) -> None:
    """The user's ``--expert-layout`` (None: keep the input's). Only PEFT holds fused expert tensors."""
    if layout is None:
        return
    if layout not in LAYOUTS:
        raise LoraToolsError(f"unknown expert layout {layout!r}; expected one of {', '.join(LAYOUTS)}")
    if not expert_groups(adapter.layers):
        adapter.warnings.append(f"--expert-layout {layout}: the adapter has no per-expert layers; nothing to re-lay")
        return
    if layout != "per-expert" and to_format != "peft":
        raise LoraToolsError(f"--expert-layout {layout} is PEFT's target_parameters form: write it with --to peft "
                             f"({to_format} files hold per-expert layers)")
    adapter.provenance["expert_layout"] = layout


def _lora(name: str, layer: Layer) -> LoraLayer:
    if not isinstance(layer, LoraLayer):
        raise LoraToolsError(f"{name}: a {layer.kind} layer has no fused expert form; convert it to LoRA first")
    if layer.magnitude is not None:
        raise LoraToolsError(f"{name}: PEFT's target_parameters LoRA refuses DoRA; write --expert-layout per-expert "
                             "or fold the magnitude (--fold-dora)")
    return layer


def _fuse_param(module: str, param: str, experts: dict[int, dict[str, tuple[str, Layer]]], n: int,
                interleaved: bool, swapped: bool) -> FusedParam:
    """Expert factors of one fused parameter at a common rank (see the module docstring)."""
    projs = SPLIT[param]
    per: list[tuple[torch.Tensor, torch.Tensor, float, bool, float | None] | None] = []
    notes: list[str] = []
    stacked: list[int] = []
    layer_ranks: list[int] = []
    dtype = None
    shapes: dict[str, tuple[int, int]] = {}
    for e in range(n):
        got = {p: _lora(*experts[e][p]) for p in projs if p in experts.get(e, {})}
        for p, la in got.items():
            shapes.setdefault(p, la.shape[:2])
            dtype = dtype or la.dtype
            if la.shape[:2] != shapes[p]:
                raise LoraToolsError(f"{experts[e][p][0]}: shape {tuple(la.shape)} differs from expert 0's {shapes[p]}")
        per.append(None if not got else got)  # type: ignore[arg-type]
        layer_ranks.extend(la.rank for la in got.values())
    if param == "gate_up_proj" and len(shapes) == 1:  # one of gate/up never adapted: its rows are zero
        (p, (o, i)), = shapes.items()
        shapes["up_proj" if p == "gate_proj" else "gate_proj"] = (o, i)
    out_rows = sum(shapes[p][0] for p in projs)
    in_cols = next(iter(shapes.values()))[1]
    factors: list[tuple[torch.Tensor, torch.Tensor, float, bool, float | None] | None] = []
    for e, got in enumerate(per):
        if got is None:
            factors.append(None)
            continue
        if len(projs) == 1:
            la = got[projs[0]]
            factors.append((la.down, la.up, la.scale, la.rslora, la.alpha))
            continue
        g, u = got.get("gate_proj"), got.get("up_proj")
        if g is not None and u is not None and g.rank == u.rank and torch.equal(g.down, u.down) and \
                (g.alpha, g.rslora) == (u.alpha, u.rslora):  # one shared down factor: the exact inverse of the split
            factors.append((g.down, join_rows(g.up, u.up, interleaved), g.scale, g.rslora, g.alpha))
            continue
        parts = [la for la in (g, u) if la is not None]
        ref = parts[0]
        down = torch.cat([la.down for la in parts], 0)
        col = 0
        blocks = {}
        for p in projs:
            la = got.get(p)
            block = torch.zeros(shapes[p][0], down.shape[0], dtype=ref.up.dtype)
            if la is not None:
                block[:, col:col + la.rank] = _rescaled(la.up, la.scale, ref.scale)
                col += la.rank
            blocks[p] = block
        gate_up = join_rows(blocks["gate_proj"], blocks["up_proj"], interleaved)
        if g is not None and u is not None:
            stacked.append(e)
        factors.append((down, gate_up, ref.scale, ref.rslora, None))  # alpha no longer matches the stacked rank
    present = [f for f in factors if f is not None]
    ranks = [f[0].shape[0] for f in present]
    rank = max(ranks)
    rs = Counter(f[3] for f in present).most_common(1)[0][0]
    scale = Counter(f[2] for f in present if f[2] != 0).most_common(1)[0][0] if any(f[2] for f in present) else 1.0
    same = {(f[0].shape[0], f[3], f[4]) for f in present}
    if len(same) == 1 and rank == ranks[0] and present[0][4] is not None and present[0][3] == rs:
        alpha = float(present[0][4])  # every expert at the same rank, alpha and rsLoRA: kept as they are
    else:
        alpha = scale * (math.sqrt(rank) if rs else rank)
    downs, ups = [], []
    missing, padded = [], []
    for e, f in enumerate(factors):
        if f is None:
            missing.append(e)
            downs.append(torch.zeros(rank, in_cols, dtype=dtype))
            ups.append(torch.zeros(out_rows, rank, dtype=dtype))
            continue
        down, up, s, _, _ = f
        up = _rescaled(up, s, scale)
        if down.shape[0] < rank:
            padded.append(e)
            down = torch.cat([down, down.new_zeros(rank - down.shape[0], down.shape[1])], 0)
            up = torch.cat([up, up.new_zeros(up.shape[0], rank - up.shape[1])], 1)
        downs.append(down.to(dtype))
        ups.append(up.to(dtype))
    if swapped:
        downs, ups = [u.T.contiguous() for u in ups], [d.T.contiguous() for d in downs]
    lora_a, lora_b = expert_stack(downs, ups)
    what = f"{module}.{param}"
    if stacked:
        notes.append(f"{len(stacked)} expert(s) (e.g. {stacked[0]}) have different gate_proj and up_proj down factors: "
                     "stacked into gate_up_proj (A concatenated, B block-diagonal), rank = r_gate + r_up")
    if padded:
        notes.append(f"{len(padded)} expert(s) (e.g. {padded[0]}) padded with zero rank columns to rank {rank} "
                     "(PEFT's target_parameters holds one rank per parameter; ΔW unchanged)")
    if missing:
        notes.append(f"{len(missing)} of {n} expert(s) (e.g. {missing[0]}) have no layers: written as zero (no change)")
    if any(f[2] != scale for f in present):
        notes.append("experts with another scale (alpha/r) have it folded into their B factor")
    return FusedParam(module=fused_module(module), param=param, lora_a=lora_a, lora_b=lora_b, rank=rank, alpha=alpha,
                      rslora=rs, num_experts=n, notes=[f"{what}: {x}" for x in notes], source_ranks=layer_ranks)


def _rescaled(up: torch.Tensor, scale: float, target: float) -> torch.Tensor:
    """``up`` with the scale ``scale`` moved to ``target`` (unchanged, bit for bit, when they are equal)."""
    if scale == target:
        return up
    return (up.double() * (scale / target)).to(up.dtype)


def fuse(adapter: Adapter) -> tuple[Adapter, list[FusedParam]]:
    """``adapter`` without its per-expert layers, and those layers as fused PEFT ``target_parameters`` — when its
    expert layout is ``fused*``; else ``(adapter, [])``."""
    layout = output_layout(adapter)
    if layout is None or not layout.startswith("fused"):
        return adapter, []
    groups = expert_groups(adapter.layers)
    info = adapter.provenance.get("experts") or {}
    fused: list[FusedParam] = []
    for module, experts in groups.items():
        entry = info.get(module) or {}
        arch = arch_of(entry.get("model_type"))
        interleaved = {"fused-concat": False, "fused-interleaved": True}.get(layout, bool(entry.get("interleaved")))
        n = entry.get("num_experts")
        if n is None:
            n = max(experts) + 1
            adapter.warnings.append(f"{module}: expert count unknown, taken as {n} (the highest expert index + 1); "
                                    "pass --base for the model's own count")
        elif max(experts) >= n:
            raise LoraToolsError(f"{module}.{max(experts)}: expert index beyond the model's {n} experts")
        if layout == "fused" and arch is None and any("gate_proj" in p or "up_proj" in p for p in experts.values()):
            adapter.warnings.append(f"{module}: architecture unknown; gate_up_proj written as gate rows then up rows "
                                    "(transformers' default; --expert-layout fused-interleaved for GPT-OSS order)")
        params = [p for p in FUSED_PARAMS if any(FUSED_OF[q] == p for projs in experts.values() for q in projs)]
        for depth, param in enumerate(reversed(params)):
            fp = _fuse_param(module, param, experts, n, interleaved, bool(arch and arch.peft_swapped))
            fp.depth = depth
            fused.append(fp)
    for fp in fused:
        adapter.warnings.extend(fp.notes)
    rest = {n: la for n, la in adapter.layers.items() if parse(n) is None}
    return replace(adapter, layers=rest), fused


def per_expert_notes(config: dict, layers: dict[str, Layer]) -> list[str]:
    """What PEFT on transformers ≥ 5 makes of a per-expert PEFT file for a model with fused experts: it fuses the
    file itself (``peft/utils/transformers_weight_conversion.py``) at the config's one ``r`` / ``lora_alpha`` (gate +
    up stacked at 2r with 2·lora_alpha), ignoring per-expert ``rank_pattern`` / ``alpha_pattern`` entries."""
    from loratools.formats.common import alpha_for

    groups = expert_groups(layers)
    if not groups:
        return []
    r = int(config.get("r", 8))
    alpha = float(config.get("lora_alpha", r))
    rs = bool(config.get("use_rslora", False))
    off = [name for experts in groups.values() for projs in experts.values() for name, la in projs.values()
           if isinstance(la, LoraLayer) and (la.rank != r or alpha_for(la, rs) != alpha)]
    notes = []
    if off:
        notes.append(f"{len(off)} per-expert layer(s) (e.g. {off[0]}) are not at the config's r={r} / lora_alpha={alpha:g}: "
                     "PEFT on transformers ≥ 5 fuses per-expert files at that one rank and refuses these (size mismatch); "
                     "for a model with fused experts write --expert-layout fused")
    if rs and any("gate_proj" in p or "up_proj" in p for experts in groups.values() for p in experts.values()):
        notes.append("rsLoRA per-expert gate/up: PEFT on transformers ≥ 5 fuses them at rank 2r with 2·lora_alpha, "
                     "which under rsLoRA scales them √2 too much; for a model with fused experts write --expert-layout fused")
    return notes


def layout_report(adapter: Adapter) -> dict | None:
    """What writing ``adapter`` does to its experts: the layout, and per fused parameter its rank and why it changed."""
    layout = output_layout(adapter)
    if layout is None:
        return None
    rows = []
    if layout.startswith("fused"):
        probe = replace(adapter, warnings=[])
        rows = [fp.row() for fp in fuse(probe)[1]]
    return {"layout": layout, "source_layout": adapter.provenance.get("source_expert_layout", layout),
            "parameters": rows}


def peft_tensors(fused: list[FusedParam], cast) -> dict[str, torch.Tensor]:
    """The PEFT state-dict entries of fused parameters (nested wrappers: ``base_layer`` per depth)."""
    out = {}
    for fp in fused:
        stem = PEFT_PREFIX + fp.stem
        out[stem + ".lora_A.weight"] = cast(fp.lora_a)
        out[stem + ".lora_B.weight"] = cast(fp.lora_b)
    return out


def describes(config: dict, fused: list[FusedParam], read_keys: list[str] | None) -> bool:
    """Whether a source config's target_parameters / rank / alpha already describe exactly ``fused``."""
    keys = sorted(fp.key for fp in fused)
    if keys != sorted(read_keys or []) or not fused:
        return not fused and not config.get("target_parameters")
    r = int(config.get("r", 8))
    alpha = float(config.get("lora_alpha", r))
    rp, ap = config.get("rank_pattern") or {}, config.get("alpha_pattern") or {}
    for fp in fused:
        rk, ak = pattern_key(rp, fp.key), pattern_key(ap, fp.key)
        if (int(rp[rk]) if rk else r) != fp.rank or (float(ap[ak]) if ak else alpha) != fp.alpha:
            return False
    return bool(config.get("use_rslora", False)) == all(fp.rslora for fp in fused)


def target_parameter_config(fused: list[FusedParam], target_modules: Any) -> dict:
    """Config fields PEFT needs for fused parameters: ``target_parameters`` (full parameter paths, so PEFT wraps
    exactly these and nests them as written), no dropout / bias (ParamWrapper refuses them), and ``target_modules``
    without per-expert names (PEFT's transformers-5 conversion would fuse those a second time)."""
    if not fused:
        return {"target_parameters": None}
    if isinstance(target_modules, list):
        target_modules = [t for t in target_modules if parse(t) is None]
    return {"target_parameters": sorted(fp.key for fp in fused), "lora_dropout": 0.0, "lora_bias": False,
            "target_modules": target_modules}


# --------------------------------------------------------------------------- coverage (inspect)
_BASE_FUSED = re.compile(r"^(?P<module>.*\.experts)\.(?P<param>gate_up_proj|gate_proj|up_proj|down_proj)$")
_BASE_PER = re.compile(r"^(?P<module>.*\.experts)\.(?P<expert>\d+)\.(?P<proj>gate_proj|up_proj|down_proj|w1|w2|w3)\.weight$")


def _base_experts(base) -> dict[str, dict[str, Any]]:
    """{experts module → {"num_experts", "numel": {projection → params per expert}}} of a base checkpoint."""
    out: dict[str, dict[str, Any]] = {}
    for key in base.keys():
        m = _BASE_FUSED.match(key)
        if m and not key.endswith(".weight"):
            shape = base.shape(key)
            if len(shape) != 3:
                continue
            entry = out.setdefault(m["module"], {"num_experts": shape[0], "numel": {}})
            projs = SPLIT[m["param"]]
            for p in projs:
                entry["numel"][p] = shape[1] * shape[2] // len(projs)
            continue
        m = _BASE_PER.match(key)
        if m:
            shape = base.shape(key)
            entry = out.setdefault(m["module"], {"num_experts": 0, "numel": {}})
            entry["num_experts"] = max(entry["num_experts"], int(m["expert"]) + 1)
            entry["numel"][ALIASES.get(m["proj"], m["proj"])] = math.prod(shape)
    return out


def expert_matcher(base):
    """``held(name)``: whether a per-expert layer's expert lives in ``base`` (a Checkpoint), as a slice of a fused
    3-D tensor or as its own weight (the base's module view names neither)."""
    counts = base_expert_counts(base)

    def held(name: str) -> bool:
        p = parse(name)
        return p is not None and p[1] < counts.get(fused_module(p[0]), 0)

    return held


def base_expert_counts(base) -> dict[str, int]:
    """{experts module (transformers-5 path) → expert count} of a base Checkpoint."""
    return {fused_module(m): e["num_experts"] for m, e in _base_experts(base).items()}


def coverage(adapter: Adapter, base=None) -> dict | None:
    """Expert coverage: per experts module, how many experts and what fraction of expert parameters the adapter
    touches. The totals come from ``base`` (a Checkpoint) where given, else from the adapter (its fused source's
    expert count, or the highest expert index: a lower bound). None when neither shows any experts."""
    groups = {fused_module(m): g for m, g in expert_groups(adapter.layers).items()}
    known = {fused_module(m): e for m, e in (_base_experts(base) if base is not None else {}).items()}
    info = {fused_module(m): e for m, e in (adapter.provenance.get("experts") or {}).items()}
    modules = list(dict.fromkeys([*known, *groups]))
    if not modules:
        return None
    rows = []
    for module in modules:
        experts = groups.get(module, {})
        b = known.get(module)
        numel = dict(b["numel"]) if b else {}
        for projs in experts.values():
            for p, (_, la) in projs.items():
                numel.setdefault(p, math.prod(la.shape))
        if numel and len(numel) < len(PROJECTIONS) and ("gate_proj" in numel or "up_proj" in numel or "down_proj" in numel):
            size = next(iter(numel.values()))  # gated experts: gate, up and down have the same size I·H
            for p in PROJECTIONS:
                numel.setdefault(p, size)
        if b:
            total, source = b["num_experts"], "base"
        elif (info.get(module) or {}).get("num_experts"):
            total, source = info[module]["num_experts"], "adapter"
        else:
            total, source = max(experts) + 1, "highest expert index (at least)"
        touched = sum(numel.get(p, 0) for projs in experts.values() for p in projs)
        all_params = total * sum(numel.values())
        rows.append({"module": module, "experts_touched": len(experts), "experts_total": total, "total_from": source,
                     "projections": sorted({p for projs in experts.values() for p in projs}),
                     "param_fraction": touched / all_params if all_params else 0.0,
                     "_touched": touched, "_all": all_params})
    touched = sum(r.pop("_touched") for r in rows)
    everything = sum(r.pop("_all") for r in rows)
    return {"modules": rows, "experts_touched": sum(r["experts_touched"] for r in rows),
            "experts_total": sum(r["experts_total"] for r in rows),
            "param_fraction": touched / everything if everything else 0.0}


def merged_provenance(adapters: list[Adapter]) -> dict:
    """A merge's expert provenance: the first input's expert layout (the output's), with every input's expert counts
    and gate/up order for modules the first does not describe. Nothing else of the inputs' provenance."""
    prov = {k: v for k, v in adapters[0].provenance.items() if k in ("expert_layout", "source_expert_layout")}
    experts: dict = {}
    for ad in reversed(adapters):
        experts.update(ad.provenance.get("experts") or {})
    if experts:
        prov["experts"] = experts
    if "expert_layout" not in prov:
        layout = next((ad.provenance["expert_layout"] for ad in adapters if "expert_layout" in ad.provenance), None)
        if layout:
            prov["expert_layout"] = layout
    return prov
