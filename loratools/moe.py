"""Routed experts in ``extract`` / ``spectrum``: pairing by canonical expert module, across layouts (issue 14).

Every routed expert is a 2-D module ``….experts.<e>.gate_proj|up_proj|down_proj`` (``families/moe.py``,
:meth:`Checkpoint.expert_refs`). A TUNED tensor holding experts is one pair, read once: a fused 3-D tensor
(``….experts.gate_up_proj`` [E, 2I, H]) is a ``fused`` pair with one ``expert`` part per module (its E experts
decomposed one by one from the single read, then freed: peak memory ~ one expert tensor, never the layer stack); a
per-expert tensor is a pair of its own. When BASE stores the same modules in another layout (per-expert vs fused),
:class:`ExpertStream` assembles BASE's tensor in TUNED's layout from BASE's modules (each read alone, a fused BASE
through a one-expert slice), so the pair streams exactly as if both were in the same layout.

The router (``….mlp.gate.weight`` beside ``experts``) is handled by ``router``: ``full`` (saved whole, PEFT
``modules_to_save``: PEFT cannot put a LoRA on transformers' router modules, which are not ``nn.Linear``), ``skip``
(reported), ``lora`` (decomposed like a Linear; bake applies it, PEFT does not load it). Shared experts are plain
Linear modules, decomposed like any other.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field

import torch

from loratools.adapter import LoraLayer
from loratools.checkpoint import Checkpoint, ModuleRef
from loratools.extract import TensorPair, TensorStream, matches
from loratools.families import moe

ROUTER_MODES = ("full", "skip", "lora")


@dataclass
class ExpertPairs:
    """What :func:`plan_experts` found: ``pairs`` by TUNED key, tensors it accounts for on either side, routers."""

    pairs: dict[str, TensorPair] = field(default_factory=dict)
    skipped: list[dict] = field(default_factory=list)
    tuned_keys: set[str] = field(default_factory=set)
    base_keys: set[str] = field(default_factory=set)
    routers: dict[str, str] = field(default_factory=dict)  # TUNED router weight key → its canonical module


def _by_key(refs: dict[str, ModuleRef]) -> dict[str, list[tuple[str, ModuleRef]]]:
    out: dict[str, list[tuple[str, ModuleRef]]] = {}
    for name, ref in refs.items():
        out.setdefault(ref.key, []).append((name, ref))
    return out


def plan_experts(base: Checkpoint, tuned: Checkpoint, include: Iterable[str] = (), exclude: Iterable[str] = (),
                 router: str = "lora") -> ExpertPairs | None:
    """The expert and router pairs of BASE and TUNED, matched by canonical module name (None: neither has routed
    experts); routers are skipped (and reported) with ``router="skip"``."""
    bref, tref = base.expert_refs(), tuned.expert_refs()
    if not bref and not tref:
        return None
    include, exclude = list(include), list(exclude)
    out = ExpertPairs()
    for key, mods in _by_key(tref).items():
        out.tuned_keys.add(key)
        units = []
        for name, ref in mods:
            if name not in bref:
                out.skipped.append({"name": name, "key": key, "reason": "only in tuned checkpoint"})
                continue
            out.base_keys.add(bref[name].key)
            bs, ts = base.module_shape(name), tuned.module_shape(name)
            if bs != ts:
                out.skipped.append({"name": name, "key": key,
                                    "reason": f"shape mismatch: base {list(bs)} vs tuned {list(ts)}"})
                continue
            if not (base.dtype(bref[name].key).is_floating_point and tuned.dtype(key).is_floating_point):
                out.skipped.append({"name": name, "key": key, "reason": f"not a float tensor ({tuned.dtype(key)})"})
                continue
            if include and not matches(name, key, include):
                continue
            if exclude and matches(name, key, exclude):
                out.skipped.append({"name": name, "key": key, "reason": "excluded by --exclude"})
                continue
            if not moe.EXPERT_NAME.search(name):
                out.routers[key] = name
                if router == "skip":
                    out.skipped.append({"name": name, "key": key, "reason": "router (--router skip)"})
                    continue
            units.append(TensorPair(key, name, ts, "expert" if moe.EXPERT_NAME.search(name) else "linear", ref))
        if not units:
            continue
        whole = len(mods) == 1 and mods[0][1].expert is None
        out.pairs[key] = units[0] if whole else TensorPair(key, key, tuple(tuned.shape(key)), "fused",
                                                            parts=tuple(units))
    out.skipped += [{"name": name, "key": ref.key, "reason": "only in base checkpoint"}
                    for name, ref in bref.items() if name not in tref]
    out.base_keys |= {ref.key for ref in bref.values()}
    return out


class ExpertStream(TensorStream):
    """BASE's tensors, with a TUNED expert tensor BASE stores in another layout assembled from BASE's modules."""

    def __init__(self, base: Checkpoint, tuned: Checkpoint) -> None:
        super().__init__(base)
        self.tuned = tuned
        self._tuned_refs = _by_key(tuned.expert_refs())
        self._same: dict[str, bool] = {}

    def _same_layout(self, key: str) -> bool:
        if key not in self._same:
            bref = self.ckpt.expert_refs()
            self._same[key] = (key in self.ckpt and tuple(self.ckpt.shape(key)) == tuple(self.tuned.shape(key))
                               and all(bref.get(name) == ref for name, ref in self._tuned_refs.get(key, ())))
        return self._same[key]

    def owns(self, key: str) -> bool:
        return True if not self._same_layout(key) else super().owns(key)

    def read(self, key: str, slot: int | None = None) -> torch.Tensor:
        if key not in self._tuned_refs or self._same_layout(key):
            return super().read(key, slot)
        bref = self.ckpt.expert_refs()
        first = next(bref[n].key for n, _ in self._tuned_refs[key] if n in bref)
        out = torch.zeros(tuple(self.tuned.shape(key)), dtype=self.ckpt.dtype(first))
        for name, ref in self._tuned_refs[key]:
            if name in bref:
                ref.put(out, self.ckpt.read_ref(bref[name]).to(out.dtype))
        return out


def base_stream(base: Checkpoint, tuned: Checkpoint) -> TensorStream:
    """The stream BASE's side of the pairs is read with (assembling expert tensors where the layouts differ)."""
    return ExpertStream(base, tuned) if (base.expert_refs() or tuned.expert_refs()) else TensorStream(base)


def uniform_expert_ranks(layers: dict[str, LoraLayer]) -> int:
    """Zero-pad the routed experts of each experts module (one MoE layer) to that module's largest rank, in place;
    returns how many layers were padded. ΔW is unchanged (zero rows / columns, alpha scaled with the rank), but
    PEFT (≥ 0.18) loads per-expert LoRAs onto transformers' fused expert tensors by stacking them, which needs one
    rank per experts module: a per-expert energy / threshold rule would otherwise give an adapter PEFT cannot load."""
    groups: dict[str, list[str]] = {}
    for name in layers:
        if moe.EXPERT_NAME.search(name):
            groups.setdefault(name.rsplit(".", 2)[0], []).append(name)
    padded = 0
    for names in groups.values():
        top = max(layers[n].rank for n in names)
        for n in names:
            la = layers[n]
            k = la.rank
            if k == top or la.magnitude is not None or la.down.dim() != 2:
                continue
            la.down = torch.cat([la.down, la.down.new_zeros(top - k, la.down.shape[1])])
            la.up = torch.cat([la.up, la.up.new_zeros(la.up.shape[0], top - k)], dim=1)
            if la.alpha is not None:  # same scale: alpha / r (rsLoRA: alpha / √r)
                la.alpha = la.alpha * ((top / k) ** 0.5 if la.rslora else top / k)
            padded += 1
    return padded


def expert_summary(rows: list[dict], skipped: list[dict], plan: ExpertPairs | None, router: str,
                   full_modules: Iterable[str], padded: int = 0) -> dict | None:
    """The ``experts`` block of extract's JSON summary (None without routed experts)."""
    if plan is None:
        return None
    experts = [r for r in rows if r.get("kind") == "expert"]
    shared = sorted({r["name"] for r in rows if moe.is_shared_expert(r["name"])})
    full = set(full_modules)
    return {
        "modules": len(experts),
        "tensors": len({r["key"] for r in experts}),
        "ranks": sorted({r["rank"] for r in experts}),
        "min_retained_energy": min((r["retained_energy"] for r in experts), default=None),
        "skipped": sum(1 for s in skipped if ".experts." in s["name"]),
        "router": router,
        "routers": [{"name": mod, "key": key, "handled": _router_fate(key, mod, rows, skipped, full)}
                    for key, mod in sorted(plan.routers.items())],
        "shared_expert_modules": shared,
        "padded_to_uniform_rank": padded,
    }


def _router_fate(key: str, mod: str, rows: list[dict], skipped: list[dict], full: set[str]) -> str:
    """What became of one router: saved in full, a LoRA, or skipped (with the reason)."""
    if mod in full:
        return "saved in full"
    if any(r["name"] == mod for r in rows):
        return "lora"
    reason = next((s["reason"] for s in skipped if s["name"] in (key, mod)), "not in the adapter")
    return "skipped" if reason.startswith("router") else f"skipped: {reason}"
