"""Library side of ``merge``: PEFT ``add_weighted_adapter`` methods, exact ones in factored space.

Notation: adapter i has weight wᵢ, scale sᵢ (alpha/r or alpha/√r for rsLoRA), LoRA factors
Aᵢ = down [r, in], Bᵢ = up [out, r], and ΔWᵢ = sᵢ Bᵢ Aᵢ. The exact target is Σ wᵢ ΔWᵢ.

* ``cat`` (exact): A = [w₁s₁A₁; w₂s₂A₂; …], B = [B₁ B₂ …] — rank Σrᵢ, ΔW = Σ wᵢ ΔWᵢ exactly.
* ``svd`` (exact up to the chosen rank): the same concatenated factors (rank Σrᵢ) go through
  :func:`loratools.linalg.factored_svd` (QR of both + a Σrᵢ×Σrᵢ SVD); keeping rank k gives the
  best rank-k approximation of Σ wᵢ ΔWᵢ — what PEFT's dense ``svd`` computes, without forming
  any m×n matrix. ``cat`` with ``rank`` does the same.
* ``linear, ties, dare_linear, dare_ties, magnitude_prune`` (approximations, PEFT semantics):
  combine the A's and the B's *separately* with weights sgn(cᵢ)√|cᵢ| (A) and √|cᵢ| (B),
  cᵢ = wᵢsᵢ; the product contains cross terms Bᵢ Aⱼ. Pruning / sign election act on each stack.
* ``ties_svd, dare_linear_svd, dare_ties_svd, magnitude_prune_svd`` (approximations): the dense
  per-layer ΔWᵢ are pruned / sign-elected and summed on ``device``, one layer at a time, then
  factored back to rank k with :func:`loratools.linalg.truncated_svd`.

Pruning semantics follow ``peft.utils.merge_utils`` exactly: magnitude pruning keeps the top
⌊d·numel⌋ |x| (no rescale); DARE keeps Bernoulli(d) entries and divides by d; TIES elects a sign
per entry from the *unweighted* pruned stack (``total``: sign of the sum, ``frequency``: sign of
the count, ties → +) and takes the weighted *mean* over agreeing entries.

DARE draws replay PEFT's RNG use (``peft_rng=True``): after seeding, PEFT's injection of the new
adapter consumes random numbers (layer constructors and ``reset_lora_parameters``) in module order,
then each module draws ``bernoulli`` masks in the order above. Given PEFT's module order
(``module_order``; the model's ``named_modules()`` order), the masks are bit-identical.

Deliberate differences from PEFT (documented in the README): the output always has scale 1
(PEFT's merged adapter inherits ``use_rslora`` from the first input and is then √r too large);
``cat`` does not zero-pad modules missing from some inputs; DoRA inputs are refused (PEFT ignores
their magnitudes); every method reports its relative error against the exact Σ wᵢ ΔWᵢ.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from loratools.adapter import Adapter, Layer, LoraLayer
from loratools.distributed import parallel_map
from loratools.errors import LoraToolsError
from loratools.formats.experts import merged_provenance
from loratools.formats.fused import FUSED
from loratools.formats.naming import mangle, split_component, split_prefix
from loratools.linalg import RankRule, factored_norm2, factored_svd, lora_from_svd, truncated_svd

Progress = Callable[[Iterable, int], Iterable]

EXACT_METHODS = ("cat", "svd")
AB_METHODS = ("linear", "ties", "dare_linear", "dare_ties", "magnitude_prune")
DENSE_METHODS = ("ties_svd", "dare_linear_svd", "dare_ties_svd", "magnitude_prune_svd")
METHODS = ("svd", "cat", *AB_METHODS, *DENSE_METHODS)
PRUNING = ("ties", "dare_linear", "dare_ties", "magnitude_prune")


# --------------------------------------------------------------------------- weighted specs
def parse_weighted_spec(spec: str) -> tuple[str, float]:
    """``PATH[:WEIGHT]`` → (path, weight); weight 1 when absent. Shared by ``merge`` and ``bake``.

    The weight is whatever follows the last ``:``; a path that itself exists (even with a colon in
    its name) is taken whole. A suffix that is not a number is an error, never part of the path.
    """
    if Path(spec).exists() or ":" not in spec:
        return spec, 1.0
    path, _, text = spec.rpartition(":")
    try:
        weight = float(text)
    except ValueError:
        raise LoraToolsError(f"{spec}: weight {text!r} is not a number (use PATH or PATH:WEIGHT, e.g. a:0.5)") from None
    if not math.isfinite(weight):
        raise LoraToolsError(f"{spec}: weight must be finite, got {text!r}")
    if not path:
        raise LoraToolsError(f"{spec}: missing adapter path before ':'")
    return path, weight


# --------------------------------------------------------------------------- name alignment
def _parent(name: str) -> str:
    return name.rsplit(".", 1)[0] if "." in name else name.rsplit("_", 1)[0]


def align_names(adapters: list[Adapter]) -> int:
    """Rename unresolved kohya stems to module paths another input uses (mangled names equal), in place.

    This lets kohya and PEFT inputs be merged without ``--base``; a stem with no unique match keeps
    its name. Returns how many stems were paired that way (the caller warns: ``--base`` resolves them for sure).
    """
    paired = 0
    known: dict[str, list[str]] = {}
    for ad in adapters:
        for name, layer in ad.layers.items():
            if layer.meta.get("kohya_stem") != name:
                known.setdefault(mangle(split_component(name)[1]), []).append(name)
    for ad in adapters:
        if ad.resolved:
            continue
        renamed: dict[str, Layer] = {}
        for name, layer in ad.layers.items():
            cands = set(known.get(split_prefix(name)[1], [])) if layer.meta.get("kohya_stem") == name else set()
            renamed[next(iter(cands)) if len(cands) == 1 else name] = layer
            paired += len(cands) == 1
        ad.layers = renamed
        ad.resolved = all(layer.meta.get("kohya_stem") != n for n, layer in renamed.items())
    return paired


def check_compatible(adapters: list[Adapter], labels: list[str]) -> None:
    """Refuse inputs that cannot belong to one base model: conflicting shapes, or nothing in common."""
    shapes: dict[str, tuple[tuple[int, ...], str]] = {}
    for ad, label in zip(adapters, labels):
        for name, layer in ad.layers.items():
            if name in shapes and shapes[name][0] != layer.shape:
                other_shape, other = shapes[name]
                raise LoraToolsError(
                    f"{name}: shape {'×'.join(map(str, other_shape))} in {other} but "
                    f"{'×'.join(map(str, layer.shape))} in {label}; adapters for different base models?"
                )
            shapes.setdefault(name, (layer.shape, label))
    if len(adapters) < 2:
        return
    for i, (ad, label) in enumerate(zip(adapters, labels)):
        others = [o for j, o in enumerate(adapters) if j != i]
        names = {n for o in others for n in o.layers}
        parents = {_parent(n) for n in names}
        if not any(n in names or _parent(n) in parents for n in ad.layers):
            raise LoraToolsError(
                f"{label}: shares no module (nor parent module) with the other adapters, e.g. {next(iter(ad.layers))} "
                f"vs {next(iter(names))}; adapters for different base models? (pass --base to resolve kohya names)"
            )


# --------------------------------------------------------------------------- PEFT merge_utils semantics
def _prune_magnitude(t: torch.Tensor, density: float) -> torch.Tensor:
    if density >= 1:
        return t
    k = int(density * t.numel())
    mask = torch.zeros(t.numel(), dtype=t.dtype, device=t.device)
    mask[torch.topk(t.abs().reshape(-1), k=k, largest=True)[1]] = 1
    return t * mask.reshape(t.shape)


def _prune_random(t: torch.Tensor, density: float, gen: torch.Generator) -> torch.Tensor:
    if density >= 1:
        return t  # PEFT returns early: no random numbers drawn
    return t * torch.bernoulli(torch.full_like(t, density), generator=gen) / density


def combine(method: str, tensors: list[torch.Tensor], weights: list[float], density: float | None,
            majority_sign: str, gen: torch.Generator | None) -> torch.Tensor:
    """One PEFT ``merge_utils`` combination of equally shaped tensors (method without ``_svd``)."""
    if method.startswith("dare"):
        tensors = [_prune_random(t, density, gen) for t in tensors]  # type: ignore[arg-type]
    elif method in ("ties", "magnitude_prune"):
        tensors = [_prune_magnitude(t, density) for t in tensors]  # type: ignore[arg-type]
    stack = torch.stack(tensors, 0)
    w = torch.tensor(weights, dtype=torch.float32, device=stack.device)
    weighted = stack * w.view(w.shape + (1,) * (stack.dim() - 1))
    if method not in ("ties", "dare_ties"):
        return weighted.sum(0)
    sign = stack.sign()
    votes = stack.sum(0) if majority_sign == "total" else sign.sum(0)
    mask = sign == torch.where(votes >= 0, 1.0, -1.0)
    return (weighted * mask).sum(0) / torch.clamp(mask.sum(0), min=1.0)


def _peft_ab(layer: LoraLayer) -> tuple[torch.Tensor, torch.Tensor]:
    """PEFT's (lora_A, lora_B) tensors: embeddings keep lora_embedding_A [r, vocab], _B [dim, r]."""
    return (layer.up.T, layer.down.T) if layer.embedding else (layer.down, layer.up)


def replay_peft_injection(layers: list[Layer], rank: int, gen: torch.Generator, init: object = True) -> None:
    """Consume the random numbers PEFT's ``inject_adapter`` draws for a new adapter of rank ``rank``.

    Per module (in order): ``nn.Linear(in, r)`` and ``nn.Linear(r, out)`` constructors (kaiming
    uniform), then ``reset_lora_parameters`` (kaiming on A, or normal with init="gaussian");
    embeddings draw ``randn`` A and B then ``normal_`` B; convs draw the two conv constructors.
    """
    def kaiming(*shape: int) -> None:
        torch.nn.init.kaiming_uniform_(torch.empty(*shape, device=gen.device), a=math.sqrt(5), generator=gen)

    for layer in layers:
        out_f, in_f = layer.shape[0], layer.shape[1]
        if getattr(layer, "embedding", False):
            torch.randn((rank, out_f), generator=gen, device=gen.device)  # lora_embedding_A [r, num_embeddings]
            torch.randn((in_f, rank), generator=gen, device=gen.device)
            if init is not False:
                torch.nn.init.normal_(torch.empty(in_f, rank, device=gen.device), generator=gen)
            continue
        kernel = tuple(layer.shape[2:])
        kaiming(rank, in_f, *kernel)
        kaiming(out_f, rank, *((1,) * len(kernel)))
        if init is True:
            kaiming(rank, in_f, *kernel)
        elif isinstance(init, str) and init.lower() == "gaussian":
            torch.nn.init.normal_(torch.empty(rank, in_f, *kernel, device=gen.device), std=1 / rank, generator=gen)


# --------------------------------------------------------------------------- the merge
@dataclass
class LayerMerge:
    name: str
    inputs: int
    rank: int
    fro_norm: float  # ‖Σ wᵢ ΔWᵢ‖_F (exact target)
    relative_error: float  # ‖ΔW_merged − Σ wᵢ ΔWᵢ‖_F / ‖Σ wᵢ ΔWᵢ‖_F


@dataclass
class MergeReport:
    method: str
    exact: bool
    rank: int | None
    device: str
    layers: list[LayerMerge] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)

    def totals(self) -> dict:
        total = sum(r.fro_norm**2 for r in self.layers)
        err = sum((r.relative_error * r.fro_norm) ** 2 for r in self.layers)
        return {"layers": len(self.layers), "relative_error": math.sqrt(err / total) if total > 0 else 0.0,
                "max_layer_relative_error": max((r.relative_error for r in self.layers), default=0.0),
                "ranks": sorted({r.rank for r in self.layers})}

    def as_dict(self) -> dict:
        return {"method": self.method, "exact": self.exact, "rank": self.rank, "device": self.device,
                "layers": [asdict(r) for r in self.layers], "totals": self.totals(), "warnings": list(self.warnings)}


def _weighted_factors(layer: Layer, w: float, dtype: torch.dtype, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """(L, R) with L Rᵀ = w·ΔW; like PEFT's ``cat``, weight and scale go on the down (A) side."""
    if isinstance(layer, LoraLayer):
        up = layer.up.reshape(layer.up.shape[0], -1).to(device, dtype)
        down = layer.down.reshape(layer.rank, -1).to(device, dtype)
        return up, down.T * (w * layer.scale)
    left, right = layer.factors(dtype)
    return left.to(device), right.to(device) * w


def _layer_from_factors(left: torch.Tensor, right: torch.Tensor, like: Layer, dtype: torch.dtype) -> LoraLayer:
    """LoRA layer with up = L, down = Rᵀ (reshaped to ``like``), alpha = rank (scale 1)."""
    k = left.shape[1]
    shape = like.shape
    down = right.T.reshape(k, *shape[1:])
    up = left.reshape(shape[0], k, *([1] * (len(shape) - 2)))
    return LoraLayer(down=down.to(dtype).cpu().contiguous(), up=up.to(dtype).cpu().contiguous(), alpha=float(k))


def _finish(new: LoraLayer, like: Layer) -> LoraLayer:
    new.embedding = bool(getattr(like, "embedding", False))
    new.meta = {k: v for k, v in like.meta.items() if k in ("kohya_stem", "component", "alpha_dtype", FUSED)}
    return new


def merge_adapters(
    inputs: list[tuple[Adapter, float]],
    method: str = "svd",
    rank: int | None = None,
    density: float | None = None,
    majority_sign: str = "total",
    seed: int = 0,
    device: str = "cpu",
    exact_svd: bool = False,
    module_order: list[str] | None = None,
    peft_rng: bool = True,
    labels: list[str] | None = None,
    progress: Progress | None = None,
) -> tuple[Adapter, MergeReport]:
    """Merge weighted adapters with a PEFT ``add_weighted_adapter`` method; see the module docstring.

    Args:
        inputs: (adapter, weight) pairs; modules are the union of all inputs (missing = zero).
        method: one of :data:`METHODS`.
        rank: output rank (``svd`` family default: the largest input rank, as PEFT; ``cat``: Σrᵢ,
            or truncated exactly to ``rank``; A/B methods: the common input rank).
        density: kept fraction for the pruning methods, in (0, 1].
        majority_sign: ``total`` or ``frequency`` (TIES sign election).
        seed: seeds DARE's Bernoulli draws and randomized SVDs.
        device: where dense per-layer work runs (``cpu``/``cuda``); results come back to CPU.
        exact_svd: use a full SVD instead of the randomized sketch for the dense ``*_svd`` methods.
        module_order: order in which modules are processed (PEFT's ``named_modules()`` order
            reproduces PEFT's DARE draws bit-exactly); default: order of first appearance.
        peft_rng: replay the random numbers PEFT's adapter injection consumes before DARE draws.
    """
    if method not in METHODS:
        raise LoraToolsError(f"unknown merge method {method!r}; expected one of {', '.join(METHODS)}")
    if not inputs:
        raise LoraToolsError("merge needs at least one adapter")
    if majority_sign not in ("total", "frequency"):
        raise LoraToolsError(f"--majority-sign must be total or frequency, got {majority_sign!r}")
    labels = labels or [ad.source or f"adapter {i}" for i, (ad, _) in enumerate(inputs)]
    adapters = [ad for ad, _ in inputs]
    weights = [float(w) for _, w in inputs]
    warnings: list[str] = []
    base_method = method[:-4] if method.endswith("_svd") else method
    if base_method in PRUNING:
        if density is None:
            raise LoraToolsError(f"--density is required for method {method} (fraction of entries kept, in (0, 1])")
        if not 0 < density <= 1:
            raise LoraToolsError(f"--density must be in (0, 1], got {density}")
    elif density is not None:
        warnings.append(f"--density is ignored by method {method}")
    for ad, label in zip(adapters, labels):
        dora = [n for n, layer in ad.layers.items() if layer.magnitude is not None]
        if dora:
            raise LoraToolsError(
                f"{label}: DoRA layer {dora[0]} cannot be merged (a magnitude vector is defined for one ΔW, not for a "
                "weighted sum; PEFT ignores the inputs' magnitudes); bake DoRA adapters into the base with `loratools bake` instead"
            )
    if paired := align_names(adapters):
        warnings.append(f"{paired} unresolved kohya stem(s) paired with another input's module paths by mangled name "
                        "(pass --base to resolve them)")
    check_compatible(adapters, labels)
    if len(inputs) == 1 and method not in EXACT_METHODS:
        warnings.append(f"one input: method {method} reduces to linear (as in PEFT add_weighted_adapter)")
        method = base_method = "linear"

    ranks = [max(layer.rank for layer in ad.layers.values()) for ad in adapters]
    if rank is not None:
        if rank < 1:
            raise LoraToolsError(f"--rank must be ≥ 1, got {rank}")
        if rank > sum(ranks):
            raise LoraToolsError(
                f"--rank {rank} is above the inputs' combined rank Σrᵢ = {sum(ranks)} ({' + '.join(map(str, ranks))}); "
                "a merge of these adapters never needs more"
            )
    if method in AB_METHODS:
        _check_ab(adapters, labels)
    new_rank = rank if rank is not None else (max(ranks) if method not in ("cat",) + AB_METHODS else None)

    order = _module_order(adapters, module_order)
    dev = torch.device(device)
    gen = torch.Generator(device=dev).manual_seed(seed) if base_method.startswith("dare") else None
    work_dtype = torch.float64 if any(la.dtype == torch.float64 for ad in adapters for la in ad.layers.values()) else torch.float32
    if gen is not None and peft_rng:
        injected = [next(ad.layers[n] for ad in adapters if n in ad.layers) for n in order]
        peft_rank = sum(ranks) if method == "cat" else ranks[0] if method in AB_METHODS else int(new_rank or 0)
        replay_peft_injection(injected, peft_rank, gen, adapters[0].config.get("init_lora_weights", True))

    report = MergeReport(method=method, exact=method in EXACT_METHODS, rank=new_rank, device=str(dev), warnings=warnings)

    def merge_one(name: str) -> tuple[LoraLayer | None, LayerMerge | None]:
        present = [(ad.layers[name], w) for ad, w in zip(adapters, weights) if name in ad.layers]
        like = present[0][0]
        out_dtype = like.dtype
        targets = [_weighted_factors(layer, w, work_dtype, dev) for layer, w in present]
        t_left = torch.cat([t[0] for t in targets], 1)
        t_right = torch.cat([t[1] for t in targets], 1)
        spectrum = None
        scale_ref = sum(math.sqrt(factored_norm2(t[0], t[1])) for t in targets)
        if method in EXACT_METHODS and math.sqrt(factored_norm2(t_left, t_right)) <= 1e-6 * scale_ref:
            return None, None  # Σ wᵢΔWᵢ = 0 up to rounding: writing float noise as a layer helps nobody
        if method in EXACT_METHODS:
            new, spectrum = _merge_exact(t_left, t_right, like, out_dtype,
                                         None if method == "cat" and rank is None else new_rank)
        elif method in AB_METHODS:
            new = _merge_ab(base_method, present, like, density, majority_sign, gen, work_dtype, dev, out_dtype)
            if rank is not None and rank < new.rank:
                new, _ = _merge_exact(*_weighted_factors(new, 1.0, work_dtype, dev), like, out_dtype, rank)
        else:
            new = _merge_dense(base_method, present, like, density, majority_sign, gen, work_dtype, dev, out_dtype,
                               new_rank, seed, exact_svd)
        if new is None:
            return None, None
        new = _finish(new, like)
        if spectrum is not None:  # exact methods: the error is the discarded part of the exact spectrum
            target, err = spectrum
        else:
            n_left, n_right = _weighted_factors(new, 1.0, work_dtype, dev)
            target = factored_norm2(t_left, t_right)
            err = factored_norm2(torch.cat([n_left, -t_left], 1), torch.cat([n_right, t_right], 1))
        return new, LayerMerge(name, len(present), new.rank, math.sqrt(target),
                               math.sqrt(err / target) if target > 0 else 0.0)

    layers: dict[str, Layer] = {}
    cancelled: list[str] = []
    # DARE's Bernoulli draws come from one generator, in module order: such a merge runs on rank 0, start to end
    costs = [float(sum(math.prod(ad.layers[n].shape) * ad.layers[n].rank for ad in adapters if n in ad.layers))
             for n in order]
    for name, (new, row) in zip(order, parallel_map(order, merge_one, costs, order, progress=progress, serial=gen is not None)):
        if new is None:
            cancelled.append(name)
            continue
        report.layers.append(row)
        layers[name] = new
    if cancelled:
        warnings.append(f"{len(cancelled)} layer(s) cancel out to a zero delta and were left out (e.g. {cancelled[0]})")
    if rank is not None and any(r.relative_error > 1e-6 for r in report.layers):
        report.exact = False  # an exact method truncated to --rank is the optimal approximation, not exact

    first = adapters[0]
    extra = dict(first.extra_tensors)
    if any(ad.extra_tensors for ad in adapters[1:]):
        warnings.append("modules_to_save tensors of the 2nd and later inputs are not merged; the first input's are kept")
    merged = Adapter(
        layers=layers, format=first.format, metadata=dict(first.metadata),
        config={k: v for k, v in first.config.items() if k not in ("use_rslora", "use_dora")},
        extra_tensors=extra, warnings=[w for ad in adapters for w in ad.warnings] + warnings,
        resolved=all(ad.resolved for ad in adapters), source="merge", provenance=merged_provenance(adapters),
        family=first.family if all(ad.family == first.family for ad in adapters) else None,  # writers name by it
    )
    return merged, report


def _module_order(adapters: list[Adapter], module_order: list[str] | None) -> list[str]:
    union: dict[str, None] = {}
    for ad in adapters:
        union.update(dict.fromkeys(ad.layers))
    if module_order is None:
        return list(union)
    order = [n for n in module_order if n in union]
    return order + [n for n in union if n not in set(order)]


def _check_ab(adapters: list[Adapter], labels: list[str]) -> None:
    """A/B-stacking methods need plain LoRA layers of one rank per module (PEFT: one r overall)."""
    seen: dict[str, tuple[int, str]] = {}
    for ad, label in zip(adapters, labels):
        for name, layer in ad.layers.items():
            if not isinstance(layer, LoraLayer):
                raise LoraToolsError(f"{label}: {name} is a {layer.kind} layer; methods that combine A and B factors "
                                     "need plain LoRA (use svd, cat or a *_svd method)")
            if name in seen and seen[name][0] != layer.rank:
                raise LoraToolsError(f"{name}: rank {seen[name][0]} in {seen[name][1]} but {layer.rank} in {label}; "
                                     "linear/ties/dare/magnitude_prune need equal ranks (use svd or cat)")
            seen.setdefault(name, (layer.rank, label))


def _merge_exact(left: torch.Tensor, right: torch.Tensor, like: Layer, dtype: torch.dtype,
                 rank: int | None) -> tuple[LoraLayer, tuple[float, float] | None]:
    """``cat`` (rank None) or the exact factored SVD truncated to ``rank``.

    Returns the layer and, for the SVD, (‖L Rᵀ‖_F², discarded energy Σ_{i>k} σᵢ²).
    """
    if rank is None:
        return _layer_from_factors(left, right, like, dtype), (factored_norm2(left, right), 0.0)
    u, s, vh = factored_svd(left, right)
    k = min(rank, int(s.numel()))
    energy = s.double().square()
    new = lora_from_svd(u[:, :k].cpu(), s[:k].cpu(), vh[:k].cpu(), like.shape, dtype)
    return new, (float(energy.sum()), float(energy[k:].sum()))


def _merge_ab(method: str, present: list[tuple[Layer, float]], like: Layer, density: float | None,
              majority_sign: str, gen: torch.Generator | None, work: torch.dtype, dev: torch.device,
              dtype: torch.dtype) -> LoraLayer:
    """PEFT's A/B task arithmetic: all A's (weights sgn·√|wₛ|), then all B's (weights √|wₛ|)."""
    coef = [w * layer.scale for layer, w in present]  # type: ignore[attr-defined]
    w_a = [math.copysign(math.sqrt(abs(c)), 1.0 if c >= 0 else -1.0) for c in coef]
    w_b = [math.sqrt(abs(c)) for c in coef]
    a_list, b_list = zip(*(_peft_ab(layer) for layer, _ in present))  # type: ignore[arg-type]
    a = combine(method, [t.to(dev, work) for t in a_list], w_a, density, majority_sign, gen)
    b = combine(method, [t.to(dev, work) for t in b_list], w_b, density, majority_sign, gen)
    down, up = (b.T, a.T) if getattr(like, "embedding", False) else (a, b)
    return LoraLayer(down=down.to(dtype).cpu().contiguous(), up=up.to(dtype).cpu().contiguous(), alpha=float(down.shape[0]))


def _merge_dense(method: str, present: list[tuple[Layer, float]], like: Layer, density: float | None,
                 majority_sign: str, gen: torch.Generator | None, work: torch.dtype, dev: torch.device,
                 dtype: torch.dtype, rank: int, seed: int, exact_svd: bool) -> LoraLayer | None:
    """Dense ΔWᵢ (PEFT's layout: [out, in(, kh, kw)], embeddings [vocab, dim]) → combine → rank-k SVD."""
    deltas = []
    for layer, _ in present:
        left, right = layer.factors(work)
        deltas.append((left.to(dev) @ right.to(dev).T).reshape(layer.shape))
    merged = combine(method, deltas, [w for _, w in present], density, majority_sign, gen)
    del deltas
    m = merged.reshape(merged.shape[0], -1)
    u, s, vh, _ = truncated_svd(m, RankRule("rank", float(min(rank, *m.shape))), seed=seed, exact=exact_svd)
    if s.numel() == 0:  # the combination is exactly zero
        return None
    return lora_from_svd(u.cpu(), s.cpu(), vh.cpu(), like.shape, dtype)
