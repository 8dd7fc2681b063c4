"""Library side of ``loratools doctor``: which rules of a serving target an adapter breaks, and the fix.

:func:`diagnose` runs the target's rule table (:mod:`loratools.doctor_rules`) over an adapter and returns one
:class:`Finding` per broken rule. :func:`fix_adapter` rewrites the adapter so the target loads it and computes the
same thing, or the closest thing with the loss reported per layer:

* modules the target cannot hold (unmatched in the base, conv layers, flagged embeddings) and ``modules_to_save``
  copies are dropped, each named in a warning;
* LoHa/LoKr/full layers become exact plain LoRA (their exact spectrum; optimal truncation where the rank is capped);
* DoRA magnitudes are folded (``m·(W+ΔW)/‖W+ΔW‖ − W``, needs the base) into plain LoRA of the layer's rank, or of
  ``max_rank``; the achieved relative error is reported;
* ranks above the target's cap are truncated optimally (Eckart–Young, exact retained energy and error);
* scales the target cannot express (rsLoRA, per-module alpha/rank) are folded into the up factor so that one
  global alpha (llama.cpp) or one ``lora_alpha / r`` (SGLang, TensorRT-LLM, older vLLM) is right for every module.
"""

from __future__ import annotations

import math
from collections import Counter
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

from loratools.adapter import Adapter, Layer, LoraLayer, lora_scale
from loratools.checkpoint import Checkpoint
from loratools.doctor_rules import NATURAL_FORMAT, VLLM_MAX_LORA_RANKS, Rule, rules_for
from loratools.errors import LoraToolsError
from loratools.linalg import RankRule
from loratools.stats import layer_type

EMBEDDING_LEAVES = ("embed_tokens", "lm_head", "wte", "word_embeddings", "embed_in", "embed_out", "tok_embeddings",
                    "output")
#: a scale that differs by more than this (relative) is a different scale
SCALE_RTOL = 1e-6


@dataclass
class Finding:
    rule: str
    severity: str
    modules: list[str]
    message: str
    fix: str
    source: str


@dataclass
class Context:
    adapter: Adapter
    target: str
    base: Checkpoint | None = None
    #: the loader's message when no module matched the base (the adapter was then read without the base)
    zero_coverage: str | None = None
    #: the rank the server runs with (``--max-rank``), if given
    max_rank: int | None = None
    unmatched: list[str] = field(default_factory=list)


def load_for_doctor(path: str | Path, format: str | None, base: Checkpoint | None, family: str | None,
                    allow_nonfinite: bool = False) -> tuple[Adapter, str | None, list[str]]:
    """Read the adapter against ``base``; zero coverage (the loader refuses) becomes a finding, not an error.

    Returns (adapter, zero-coverage message or None, names that match no module of the base)."""
    from loratools.formats import load_adapter

    try:
        ad = load_adapter(path, format=format, base=base, allow_nonfinite=allow_nonfinite, family=family)
    except LoraToolsError as exc:
        if base is None or "matches a module of the base" not in str(exc):
            raise
        ad = load_adapter(path, format=format, base=None, allow_nonfinite=allow_nonfinite, family=family)
        return ad, str(exc), list(ad.layers)
    unmatched = [n for n in ad.layers if base is not None and base.module_ref(n) is None]
    return ad, None, unmatched


# ---------------------------------------------------------------------------------------------------------- checks
# Each check returns None (rule holds) or a dict with "modules" and any values its rule's message uses.


def _global(ad: Adapter) -> tuple[float, int, bool]:
    """(lora_alpha, r, use_rslora) the adapter declares for every module: its PEFT config, else the most common."""
    cfg = ad.config or {}
    loras = [la for la in ad.layers.values() if isinstance(la, LoraLayer)]
    rs = bool(cfg["use_rslora"]) if "use_rslora" in cfg else (
        Counter(la.rslora for la in loras).most_common(1)[0][0] if loras else False)
    if isinstance(cfg.get("r"), int) and isinstance(cfg.get("lora_alpha"), (int, float)):
        return float(cfg["lora_alpha"]), int(cfg["r"]), rs
    ranks = Counter(la.rank for la in loras)
    r = ranks.most_common(1)[0][0] if ranks else 8
    alphas = Counter(la.effective_alpha for la in loras if la.rank == r)
    return (alphas.most_common(1)[0][0] if alphas else float(r)), r, rs


def _differs(a: float, b: float) -> bool:
    return abs(a - b) > SCALE_RTOL * max(abs(a), abs(b), 1e-30)


def check_zero_coverage(ctx: Context, rule: Rule) -> dict | None:
    if ctx.zero_coverage is None:
        return None
    return {"modules": sorted(ctx.adapter.layers)}


def check_partial_coverage(ctx: Context, rule: Rule) -> dict | None:
    if ctx.zero_coverage is not None or not ctx.unmatched:
        return None
    return {"modules": list(ctx.unmatched)}


def _cap(ctx: Context, rule: Rule) -> int:
    allowed = rule.params.get("allowed") or VLLM_MAX_LORA_RANKS
    return ctx.max_rank if ctx.max_rank is not None else max(allowed)


def check_rank_cap(ctx: Context, rule: Rule) -> dict | None:
    cap = _cap(ctx, rule)
    over = [n for n, la in ctx.adapter.layers.items() if la.rank > cap]
    if not over:
        return None
    rank = max(ctx.adapter.layers[n].rank for n in over)
    where = "you serve with (--max-rank)" if ctx.max_rank is not None else "vLLM allows"
    return {"modules": over, "rank": rank, "cap": cap, "where": where}


def check_rank_setting(ctx: Context, rule: Rule) -> dict | None:
    allowed = rule.params["allowed"]
    rank = max((la.rank for la in ctx.adapter.layers.values()), default=0)
    if rank == 0 or rank > _cap(ctx, rule):
        return None
    setting = next(a for a in allowed if a >= rank)
    return {"modules": [], "rank": rank, "setting": setting, "allowed": ", ".join(map(str, allowed))}


def check_dora(ctx: Context, rule: Rule) -> dict | None:
    mods = [n for n, la in ctx.adapter.layers.items() if la.magnitude is not None]
    return {"modules": mods} if mods else None


def check_dora_axis(ctx: Context, rule: Rule) -> dict | None:
    mods = [n for n, la in ctx.adapter.layers.items() if la.magnitude is not None and la.magnitude_axis != "out"]
    return {"modules": mods} if mods else None


def check_mixed_dora(ctx: Context, rule: Rule) -> dict | None:
    with_mag = [n for n, la in ctx.adapter.layers.items() if la.magnitude is not None]
    if not with_mag or len(with_mag) == len(ctx.adapter.layers):
        return None
    return {"modules": [n for n in ctx.adapter.layers if n not in with_mag]}


def _is_base_copy(key: str) -> bool:
    """PEFT's copy of an adapted embedding's base weight (``save_embedding_layers``): engines skip it."""
    return ".base_layer." in key


def _saved_modules(ad: Adapter) -> list[str]:
    from loratools.formats.peft import PREFIX

    mods = {k[len(PREFIX):] if k.startswith(PREFIX) else k for k in ad.extra_tensors if not _is_base_copy(k)}
    return sorted({m.rpartition(".")[0] if m.endswith((".weight", ".bias")) else m for m in mods})


def check_modules_to_save(ctx: Context, rule: Rule) -> dict | None:
    ad = ctx.adapter
    declared = list((ad.config or {}).get("modules_to_save") or [])
    saved = _saved_modules(ad)
    allowed = set(rule.params.get("allowed", ()))
    bad = [m for m in declared if m not in allowed] or [m for m in saved if m.rpartition(".")[2] not in allowed]
    if not bad:
        return None
    return {"modules": saved or declared, "modules_to_save": declared or saved}


def _is_embedding(name: str, layer: Layer) -> bool:
    return bool(getattr(layer, "embedding", False)) or name.rpartition(".")[2] in EMBEDDING_LEAVES


def check_embedding(ctx: Context, rule: Rule) -> dict | None:
    mods = [n for n, la in ctx.adapter.layers.items() if _is_embedding(n, la)]
    return {"modules": mods} if mods else None


def check_layer_kind(ctx: Context, rule: Rule) -> dict | None:
    ad = ctx.adapter
    if rule.params.get("peft_native") and \
            str((ad.config or {}).get("peft_type", "LORA")).upper() in ("LOHA", "LOKR"):
        return None  # PEFT's own LoHa/LoKr folder: PEFT loads it
    mods = [n for n, la in ad.layers.items() if not isinstance(la, LoraLayer)]
    if not mods:
        return None
    kinds = ", ".join(sorted({layer_type(ad.layers[n]) for n in mods}))
    return {"modules": mods, "kinds": kinds}


def check_module_type(ctx: Context, rule: Rule) -> dict | None:
    mods = [n for n, la in ctx.adapter.layers.items() if la.is_conv]
    return {"modules": mods} if mods else None


def check_rslora(ctx: Context, rule: Rule) -> dict | None:
    mods = [n for n, la in ctx.adapter.layers.items() if isinstance(la, LoraLayer) and la.rslora]
    return {"modules": mods} if mods else None


def check_global_scale(ctx: Context, rule: Rule) -> dict | None:
    """Modules whose scale is not the adapter-wide ``lora_alpha / r`` (``/ √r`` with rsLoRA where the engine has it).

    Where the engine ignores rsLoRA (``rslora_ok`` false) the rsLoRA modules are the rslora rule's, not this one's."""
    alpha, r, rs = _global(ctx.adapter)
    rslora_ok = bool(rule.params.get("rslora_ok"))
    want = lora_scale(alpha, r, rs and rslora_ok)
    mods = [n for n, la in ctx.adapter.layers.items() if isinstance(la, LoraLayer)
            and not (la.rslora and not rslora_ok) and _differs(la.scale, want)]
    return {"modules": mods, "alpha": f"{alpha:g}", "r": r} if mods else None


def check_global_alpha(ctx: Context, rule: Rule) -> dict | None:
    """Modules that need an alpha other than the one global alpha (llama.cpp scales alpha / each tensor's rank)."""
    alpha, _, _ = _global(ctx.adapter)
    mods = [n for n, la in ctx.adapter.layers.items() if isinstance(la, LoraLayer) and not la.rslora
            and _differs(la.effective_alpha, alpha)]
    return {"modules": mods, "alpha": f"{alpha:g}"} if mods else None


def check_unresolved(ctx: Context, rule: Rule) -> dict | None:
    mods = [n for n, la in ctx.adapter.layers.items() if la.meta.get("kohya_stem") == n]
    return {"modules": mods} if mods else None


def check_no_family(ctx: Context, rule: Rule) -> dict | None:
    """No model family named the adapter's layers (an LLM adapter offered to an SD loader)."""
    return None if ctx.adapter.family else {"modules": list(ctx.adapter.layers)}


CHECKS = {name[len("check_"):]: fn for name, fn in globals().items() if name.startswith("check_")}


def _render(text: str, values: dict) -> str:
    class Missing(dict):
        def __missing__(self, key: str) -> str:
            return "{" + key + "}"

    return text.format_map(Missing(values))


def diagnose(ctx: Context) -> list[Finding]:
    """Every rule of ``ctx.target`` the adapter breaks, in table order."""
    findings = []
    for rule in rules_for(ctx.target):
        got = CHECKS[rule.check](ctx, rule)
        if got is None:
            continue
        mods = list(got.get("modules", []))
        values = {"n": len(mods), "example": ", ".join(mods[:3]) + (", …" if len(mods) > 3 else ""), **got}
        findings.append(Finding(rule.id, rule.severity, mods, _render(rule.message, values), _render(rule.fix, values),
                                rule.source))
    return findings


def broken(findings: list[Finding]) -> bool:
    return any(f.severity == "error" for f in findings)


# ------------------------------------------------------------------------------------------------------------- fix


@dataclass
class FixRow:
    name: str
    source_type: str
    shape: list[int]
    source_rank: int
    rank: int
    action: str
    retained_energy: float | None = 1.0
    relative_error: float | None = 0.0


def _check_of(finding: Finding) -> str:
    for rule in rules_for_all():
        if rule.id == finding.rule:
            return rule.check
    return ""


def rules_for_all() -> list[Rule]:
    from loratools.doctor_rules import RULES

    return [r for rules in RULES.values() for r in rules]


#: checks whose fix is exact: done for warnings too
EXACT_FIXES = ("global_scale", "global_alpha", "rslora")


def _fold_scale(layer: LoraLayer, alpha: float, rslora: bool) -> LoraLayer:
    """The same ΔW with the given alpha/rsLoRA: the scale ratio goes into the up factor."""
    new_scale = lora_scale(alpha, layer.rank, rslora)
    if not _differs(layer.scale, new_scale) and layer.rslora == rslora:
        return replace(layer, alpha=alpha)
    up = (layer.up.double() * (layer.scale / new_scale)).to(layer.up.dtype)
    return replace(layer, up=up, alpha=alpha, rslora=rslora, meta=dict(layer.meta))


def fix_adapter(ctx: Context, findings: list[Finding]) -> tuple[Adapter, list[dict], list[str], str]:
    """(fixed adapter, per-layer rows, warnings, output format) for ``ctx.target`` (see module docstring)."""
    from loratools.convert import _to_lora, fold_layer

    ad, target, base = ctx.adapter, ctx.target, ctx.base
    acting = {_check_of(f): f for f in findings
              if f.severity == "error" or (f.severity == "warning" and _check_of(f) in EXACT_FIXES)}
    if "zero_coverage" in acting:
        raise LoraToolsError(f"nothing to fix: {acting['zero_coverage'].message}")
    if "unresolved" in acting:
        raise LoraToolsError(f"{acting['unresolved'].message}; {acting['unresolved'].fix}")
    warnings: list[str] = []
    drop: dict[str, str] = {}
    for check, why in (("partial_coverage", "matches no module of the base"), ("module_type", "conv layer"),
                       ("embedding", "embedding/lm_head LoRA")):
        if check in acting:
            for n in acting[check].modules:
                drop.setdefault(n, why)
    if drop:
        for why in dict.fromkeys(drop.values()):
            names = [n for n, w in drop.items() if w == why]
            warnings.append(f"dropped {len(names)} module(s) ({why}, {target} cannot use them): {', '.join(names)}")
    extra = dict(ad.extra_tensors)
    config = dict(ad.config or {})
    if "modules_to_save" in acting and (extra or config.get("modules_to_save")):
        warnings.append(f"dropped modules_to_save {', '.join(_saved_modules(ad) or config.get('modules_to_save') or [])} "
                        f"({len(extra)} full tensor(s)): {target} cannot load them; merge them into the base instead")
        extra = {}
        config["modules_to_save"] = None
    if drop:  # PEFT's saved base-layer copies of dropped modules go with them
        extra = {k: v for k, v in extra.items() if not any(f".{n}.base_layer." in f".{k}" for n in drop)}
    fold = any(c in acting for c in ("dora", "dora_axis", "mixed_dora"))
    if fold and base is None:
        raise LoraToolsError("folding DoRA magnitudes needs --base CKPT (the DoRA norm is taken over W + ΔW)")
    cap = None
    if "rank_cap" in acting:
        cap = ctx.max_rank if ctx.max_rank is not None else max(VLLM_MAX_LORA_RANKS)
    elif ctx.max_rank is not None:
        cap = ctx.max_rank

    layers: dict[str, Layer] = {}
    rows: list[dict] = []
    for name, layer in ad.layers.items():
        row = FixRow(name, layer_type(layer), list(layer.shape), layer.rank, layer.rank, "kept")
        if name in drop:
            row.rank, row.action, row.retained_energy, row.relative_error = 0, "dropped", None, None
            rows.append(asdict(row))
            continue
        new: Layer = layer
        if fold and layer.magnitude is not None:
            k = min(cap or layer.rank, min(layer.matrix_shape))
            new, energy, err, _ = fold_layer(layer, base.module_weight(name), RankRule("full", 0.0, k))
            row.action, row.retained_energy, row.relative_error = "DoRA folded", energy, err
        elif not isinstance(layer, LoraLayer) or (cap is not None and layer.rank > cap):  # our writers store LoRA
            if getattr(layer, "embedding", False):
                raise LoraToolsError(f"{name}: embedding LoRA of rank {layer.rank} cannot be truncated; drop it")
            rule = RankRule("full", 0.0, cap) if cap is not None else None
            lora, energy, err = _to_lora(layer, rule)
            if lora is None:
                row.rank, row.action = 0, "dropped (zero delta)"
                warnings.append(f"{name}: nothing of its delta is kept; dropped")
                rows.append(asdict(row))
                continue
            new = lora
            truncated = lora.rank < layer.rank or err > 1e-6
            row.action = "truncated" if truncated else "converted (exact)"
            row.retained_energy, row.relative_error = energy, err
        row.rank = new.rank
        layers[name] = new
        rows.append(asdict(row))
    if not layers:
        raise LoraToolsError("nothing left to write: every module was dropped")

    # one global scale where the target has one
    checks = {r.check: r for r in rules_for(target)}
    alpha, r, rs = _global(ad)
    if "global_alpha" in checks:  # llama.cpp: one alpha, each tensor's own rank
        scaled = {}
        for n, la in layers.items():
            if isinstance(la, LoraLayer) and (la.rslora or _differs(la.effective_alpha, alpha)):
                scaled[n] = _fold_scale(la, alpha, False)
        _mark(rows, scaled, "alpha folded")
        layers.update(scaled)
    elif "global_scale" in checks:
        rs_ok = bool(checks["global_scale"].params.get("rslora_ok")) and rs
        want = lora_scale(alpha, r, rs_ok)
        scaled = {}
        for n, la in layers.items():
            if not isinstance(la, LoraLayer):
                continue
            la_alpha = want * (math.sqrt(la.rank) if rs_ok else la.rank)
            if la.rslora != rs_ok or _differs(la.scale, want):
                scaled[n] = _fold_scale(la, la_alpha, rs_ok)
        _mark(rows, scaled, "scale folded")
        layers.update(scaled)
    _measure_stored(ad.layers, layers, rows)
    for key in ("r", "lora_alpha", "rank_pattern", "alpha_pattern", "use_rslora", "use_dora"):
        config.pop(key, None)
    if drop:
        config.pop("target_modules", None)
    out_format = NATURAL_FORMAT[target] or ad.format
    if config:  # a PEFT config (only the PEFT reader gives one): it now describes plain LoRA
        config.setdefault("peft_type", "LORA")
    fixed = replace(ad, layers=layers, extra_tensors=extra, config=config, warnings=list(ad.warnings))
    return fixed, rows, warnings, out_format


def _measure_stored(source: dict[str, Layer], fixed: dict[str, Layer], rows: list[dict]) -> None:
    """Each rewritten layer's reported error is that of what is stored (factors in their output dtype, fp16/bf16
    rounding and folded scales included) against the source ΔW, in float64; DoRA folds keep fold_layer's figure
    (their ΔW depends on the base)."""
    from loratools.convert import stored_error

    for row in rows:
        name = row["name"]
        new, old = fixed.get(name), source.get(name)
        if new is None or new is old or row["action"].startswith("DoRA folded") or not isinstance(new, LoraLayer):
            continue
        row["relative_error"] = stored_error(old, new, new.dtype)
        if row["action"] == "converted (exact)" and row["relative_error"] > 1e-6:
            row["action"] = f"converted ({str(new.dtype).removeprefix('torch.')} rounding)"


def _mark(rows: list[dict], names: dict, action: str) -> None:
    for row in rows:
        if row["name"] in names:
            row["action"] = action if row["action"] == "kept" else f"{row['action']}, {action}"


def check_target_max_rank(target: str, max_rank: int | None) -> str | None:
    """A usage problem with ``--max-rank`` for ``target``, or None."""
    if max_rank is None:
        return None
    if max_rank < 1:
        return f"--max-rank must be a positive integer, got {max_rank}"
    if target == "vllm" and max_rank not in VLLM_MAX_LORA_RANKS:
        return (f"--max-rank {max_rank} is not a vLLM max_lora_rank; allowed: "
                f"{', '.join(map(str, VLLM_MAX_LORA_RANKS))}")
    return None


def total_error(rows: list[dict]) -> float:
    errs = [r["relative_error"] for r in rows if r.get("relative_error") is not None]
    return max(errs, default=0.0)


__all__ = ["Context", "Finding", "broken", "check_target_max_rank", "diagnose", "fix_adapter", "load_for_doctor"]
