"""Mixture-of-experts LLMs as data: where each architecture keeps its routed experts (DESIGN.md §8).

Canonical form (shared with the adapter side, ``formats/experts.py``): every routed expert is three 2-D modules
``<experts module path>.<e>.gate_proj|up_proj|down_proj`` (``model.layers.0.mlp.experts.3.gate_proj``), weight in
``nn.Linear`` orientation ``[out, in]``. A checkpoint stores them in one of two ways:

* **fused 3-D** (transformers ≥ 5 modules): ``….experts.gate_up_proj`` and ``….experts.down_proj``, one tensor of
  all E experts each. Qwen2/3-MoE, DeepSeek-V2/V3, Mixtral, OLMoE… store ``[E, out, in]`` with gate and up
  *concatenated* (``gate_up_proj[e, :I]`` = gate, ``[e, I:]`` = up); GPT-OSS stores ``[E, in, out]`` (it computes
  ``x @ W[e]``) with gate and up *interleaved* (columns ``0::2`` gate, ``1::2`` up).
* **per expert** (the original checkpoints, and what ``save_pretrained`` writes back through transformers'
  ``conversion_mapping``): ``….experts.3.gate_proj.weight``; Mixtral-style ``….block_sparse_moe.experts.3.w1|w3|w2``
  (gate, up, down) under ``mlp``.

Which applies is read from ``config.json``'s ``model_type`` (:data:`LAYOUTS`), never guessed from shapes: a GPT-OSS
``gate_up_proj`` with hidden = 2·intermediate is square per expert and reads wrongly either way round. The router is
the ``gate`` module beside ``experts`` (``….mlp.gate.weight``, [E, hidden]); shared experts (``shared_expert``,
``shared_experts``) are plain Linear modules. Leaf module: imports nothing from loratools.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

PROJECTIONS = ("gate_proj", "up_proj", "down_proj")


@dataclass(frozen=True)
class ExpertLayout:
    """How one architecture stores its routed experts.

    ``transposed``: fused tensors are ``[E, in, out]`` (else ``[E, out, in]``); ``interleaved``: in ``gate_up_proj``
    gate and up alternate along the output dimension (else gate is the first half); ``per_expert``: the names
    per-expert checkpoints give gate, up, down; ``renames``: module-path renames from the per-expert checkpoint to
    the transformers module path (Mixtral's ``block_sparse_moe`` → ``mlp``).
    """

    name: str
    transposed: bool = False
    interleaved: bool = False
    per_expert: tuple[str, str, str] = PROJECTIONS
    renames: tuple[tuple[str, str], ...] = ()
    router: str = "gate"


QWEN = ExpertLayout("qwen2_moe")
MIXTRAL = ExpertLayout("mixtral", per_expert=("w1", "w3", "w2"), renames=((".block_sparse_moe.", ".mlp."),))
GPT_OSS = ExpertLayout("gpt_oss", transposed=True, interleaved=True, router="router")

#: config.json ``model_type`` → expert layout (transformers 5.24 modeling files and ``conversion_mapping.py``)
LAYOUTS: dict[str, ExpertLayout] = {
    **{t: QWEN for t in (
        "qwen2_moe", "qwen3_moe", "qwen3_next", "qwen3_5_moe", "qwen3_5_moe_text", "qwen3_vl_moe", "qwen3_omni_moe",
        "deepseek_v2", "deepseek_v3", "deepseek_v32", "olmoe", "flex_olmo", "glm4_moe", "glm4_moe_lite", "dots1",
        "ernie4_5_moe", "hunyuan_v1_moe", "exaone_moe", "solar_open", "afmoe", "cohere2_moe", "kimi_k25")},
    **{t: MIXTRAL for t in ("mixtral", "minimax", "minimax_m2")},
    "gpt_oss": GPT_OSS,
}

FUSED_KEY = re.compile(r"^(?P<mod>.*\.experts)\.(?P<param>gate_up_proj|down_proj)$")
PER_EXPERT_KEY = re.compile(r"^(?P<mod>.*\.experts)\.(?P<e>\d+)\.(?P<proj>\w+)\.weight$")
ROUTER_KEY = re.compile(r"^(?P<parent>.*)\.(?P<name>gate|router)\.weight$")
#: a canonical routed-expert module name (routers are the other modules ``expert_modules`` returns)
EXPERT_NAME = re.compile(r"\.experts\.\d+\.(gate_proj|up_proj|down_proj)$")


@dataclass(frozen=True)
class ExpertModule:
    """One canonical expert module found in a checkpoint: ``name`` (canonical), the tensor ``key`` holding it,
    ``expert`` (index into a fused tensor's first dimension, None for a per-expert tensor), the output ``rows``
    ``(start, stop, step)`` of a fused ``gate_up_proj`` (None: all), ``transpose`` (stored ``[in, out]``). The
    router beside the experts is returned too, by its canonical name (``….mlp.gate``: Mixtral's
    ``block_sparse_moe.gate`` renamed), so routers of checkpoints in different layouts pair."""

    name: str
    key: str
    expert: int | None = None
    rows: tuple[int, int, int] | None = None
    transpose: bool = False


def model_type(folder: Path) -> str | None:
    """``model_type`` of ``folder/config.json`` (a nested ``text_config``'s when the top level has no layout)."""
    cfg = folder / "config.json"
    if not folder.is_dir() or not cfg.is_file():
        return None
    try:
        doc = json.loads(cfg.read_text())
    except (OSError, json.JSONDecodeError, UnicodeDecodeError):
        return None
    if not isinstance(doc, dict):
        return None
    top = doc.get("model_type")
    text = doc.get("text_config") if isinstance(doc.get("text_config"), dict) else {}
    return top if top in LAYOUTS or not text.get("model_type") else text.get("model_type")


def layout_for(mtype: str | None) -> ExpertLayout | None:
    return LAYOUTS.get(mtype) if mtype else None


def _rename(path: str, layout: ExpertLayout | None) -> str:
    """A module path of a per-expert checkpoint in the transformers module tree (``….block_sparse_moe`` → ``….mlp``)."""
    path += "."
    for old, new in layout.renames if layout is not None else ():
        path = path.replace(old, new)
    return path[:-1]


def expert_modules(keys: Iterable[str], shapes: dict[str, tuple[int, ...]], layout: ExpertLayout | None
                   ) -> list[ExpertModule]:
    """Every canonical expert module (and router) of a checkpoint's ``keys`` (``shapes``: their stored shapes).

    Fused tensors need ``layout`` (from the architecture); per-expert tensors are named by it, or by the common
    ``gate_proj``/``up_proj``/``down_proj`` names when the architecture is unknown. Raises ValueError for a fused
    tensor without a layout or of an impossible shape.
    """
    keys = list(keys)
    out: list[ExpertModule] = []
    names = layout.per_expert if layout is not None else PROJECTIONS
    canon = dict(zip(names, PROJECTIONS))
    for key in keys:
        m = FUSED_KEY.match(key)
        if m is not None:
            shape = shapes[key]
            if layout is None:
                raise ValueError(f"{key}: a fused 3-D expert tensor {list(shape)} but no known MoE architecture "
                                 "(config.json model_type) says whether it is stored [E, out, in] or [E, in, out]")
            if len(shape) != 3:
                raise ValueError(f"{key}: expected a 3-D [experts, …] tensor, got shape {list(shape)}")
            out_dim = shape[2] if layout.transposed else shape[1]
            mod = m["mod"]
            for e in range(shape[0]):
                if m["param"] == "down_proj":
                    out.append(ExpertModule(f"{mod}.{e}.down_proj", key, e, None, layout.transposed))
                    continue
                if out_dim % 2:
                    raise ValueError(f"{key}: gate_up_proj {list(shape)} has an odd fused dimension {out_dim}")
                half = out_dim // 2
                gate, up = ((0, out_dim, 2), (1, out_dim, 2)) if layout.interleaved else ((0, half, 1), (half, out_dim, 1))
                out.append(ExpertModule(f"{mod}.{e}.gate_proj", key, e, gate, layout.transposed))
                out.append(ExpertModule(f"{mod}.{e}.up_proj", key, e, up, layout.transposed))
            continue
        m = PER_EXPERT_KEY.match(key)
        if m is not None and m["proj"] in canon and len(shapes[key]) == 2:
            out.append(ExpertModule(f"{_rename(m['mod'], layout)}.{m['e']}.{canon[m['proj']]}", key))
    parents = {m.name.rsplit(".", 3)[0] for m in out}
    router = layout.router if layout is not None else "gate"
    for key in keys:
        m = ROUTER_KEY.match(key)
        if m is not None and m["name"] == router and len(shapes.get(key, ())) == 2:
            parent = _rename(m["parent"], layout)
            if parent in parents:
                out.append(ExpertModule(f"{parent}.{router}", key))
    return out


SHARED = re.compile(r"\.(shared_experts?|shared_expert_gate)(\.|$)")


def is_shared_expert(name: str) -> bool:
    """Whether a module belongs to a shared (always-on) expert: Qwen2-MoE ``shared_expert``(+``_gate``), DeepSeek
    ``shared_experts``."""
    return bool(SHARED.search(name))
