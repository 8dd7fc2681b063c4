"""What every diffusion-transformer (DiT) family description shares, and what the fused ↔ split engine asks of it.

A DiT family (Flux.1 in :mod:`loratools.families.flux`; SD3, Wan, Qwen-Image, HunyuanVideo modelled on it) describes
its adaptable Linears as ``ModuleMap``s whose original checkpoint tensor may hold several canonical modules by rows
(``rows``) or one module's rows in another order (``row_order``). Its naming object answers, besides SD's
``lookup`` / ``resolve`` / ``module`` / ``kohya_stem`` / ``comfy_key`` / ``unmapped``:

* ``lookup_group(name) -> (modules, convention) | None``: every module a (possibly fused) name covers, in row order;
* ``by_original(key) -> modules``: the modules of one original tensor, in row order;
* ``ORIGINAL_CONVENTIONS``: the conventions whose names are original tensors (their LoRA factors are in original
  rows: kohya "original" stems ``lora_unet_…``, ComfyUI ``diffusion_model.…``, checkpoint keys);
* ``kohya_default_style``: the kohya stem style written unless asked ("original": sd-scripts' names, which
  ComfyUI, diffusers and Forge all read);
* ``is_canonical(name)``.

:class:`DiTNaming` gives a family's naming class the last three (subclass it); the family object may add
``naming_for_shapes(shapes)`` (its structure from an adapter's layer shapes: row slices depend on the hidden size).
The engine (:mod:`loratools.formats.fused`, name resolution, the kohya / ComfyUI writers) only uses this surface, so a
new DiT family is a description module and its tests. Imports nothing from ``loratools.formats``.
"""

from __future__ import annotations

import importlib
import re
from collections import Counter
from collections.abc import Iterable, Mapping
from functools import cache
from typing import Any, ClassVar

#: kohya "original" stem prefix, kohya "diffusers" (OneTrainer) stem prefix, ComfyUI prefix of a DiT's keys
KOHYA_ORIGINAL_PREFIX = "lora_unet_"
KOHYA_DIFFUSERS_PREFIX = "lora_transformer_"
COMFY_PREFIX = "diffusion_model."
#: conventions that name original checkpoint tensors (fused projections, original row order)
ORIGINAL_CONVENTIONS = frozenset({"kohya_original", "comfy", "original"})


#: prefixes an original key may carry in a checkpoint (longest first)
ORIGINAL_PREFIXES = ("model.diffusion_model.", "diffusion_model.", "")


def strip_prefix(name: str) -> str:
    """An original key without ``model.diffusion_model.`` / ``diffusion_model.``."""
    for p in ORIGINAL_PREFIXES[:-1]:
        if name.startswith(p):
            return name[len(p):]
    return name


def mangle(path: str) -> str:
    """kohya-style mangling: every ``.`` becomes ``_``."""
    return path.replace(".", "_")


class DiTNaming:
    """All name conventions of one DiT structure (anything with ``module_maps()``); ``modules`` in model order.

    Names generated for every module: canonical and bare diffusers path ("diffusers"), ``lora_transformer_`` +
    path mangled ("kohya_diffusers"), ``lycoris_`` + path mangled ("lycoris"), ``lora_unet_`` + original path
    mangled ("kohya_original"), ``diffusion_model.`` + original path ("comfy"), the original key bare or with
    ``model.diffusion_model.`` ("original"), plus the family's ``extra_names`` (hook). A fused original names a
    group (``lookup_group``); ``extra_groups`` (hook) adds group names such as ComfyUI's Flux ``linear1_qkv``.
    Mangled names are resolved through this table, never by un-mangling ``_``.
    """

    #: kohya stem style written unless asked: sd-scripts' original names
    kohya_default_style = "original"
    ORIGINAL_CONVENTIONS = ORIGINAL_CONVENTIONS
    #: what the family describes, for ``unmapped``'s reasons
    label = "DiT"

    def __init__(self, family: Any, structure: Any) -> None:
        self.family = family
        self.structure = structure
        self.modules: list[Any] = structure.module_maps()
        self._by_canonical = {m.canonical: m for m in self.modules}
        self._by_original: dict[str, list[Any]] = {}
        for m in self.modules:
            self._by_original.setdefault(strip_prefix(m.original), []).append(m)
        for group in self._by_original.values():
            group.sort(key=lambda m: m.rows or (0, 0))
        self._index: dict[str, tuple[str, str]] = {}
        self._groups: dict[str, tuple[str, str]] = {}  # name → (bare original key of a fused tensor, convention)
        for m in self.modules:
            c, path, bare = m.canonical, m.path, strip_prefix(m.original)
            self._add(c, c, "diffusers")
            self._add(path, c, "diffusers")
            self._add(KOHYA_DIFFUSERS_PREFIX + mangle(path), c, "kohya_diffusers")
            self._add("lycoris_" + mangle(path), c, "lycoris")
            names = [
                (KOHYA_ORIGINAL_PREFIX + mangle(bare), "kohya_original"),
                (COMFY_PREFIX + bare, "comfy"),
                ("model.diffusion_model." + bare, "original"),
                (bare, "original"),
                *self.extra_names(m, bare),
            ]
            for name, conv in names:
                if m.fused:
                    self._group(name, bare, conv)
                else:
                    self._add(name, c, conv)
        self._extra_groups = self.extra_groups()

    # ----------------------------------------------------------------------------------- hooks
    def extra_names(self, module: Any, bare: str) -> list[tuple[str, str]]:
        """More ``(name, convention)`` of one module (``bare``: its original key without prefix); a fused module's
        extra names name its whole original tensor. None by default."""
        return []

    def extra_groups(self) -> dict[str, tuple[tuple[str, ...], str]]:
        """Names of a run of modules that are no original tensor: name → (canonicals in row order, convention)."""
        return {}

    def _add(self, name: str, canonical: str, convention: str) -> None:
        old = self._index.setdefault(name, (canonical, convention))
        if old[0] != canonical or name in self._groups:
            raise AssertionError(f"name {name!r} generated for both {old[0]} and {canonical}")

    def _group(self, name: str, bare: str, convention: str) -> None:
        old = self._groups.setdefault(name, (bare, convention))
        if old[0] != bare or name in self._index:
            raise AssertionError(f"fused name {name!r} generated for both {old[0]} and {bare}")

    # ----------------------------------------------------------------------------- module access
    def is_canonical(self, name: str) -> bool:
        """Whether ``name`` is the canonical name of a module of this structure (not an alias of one)."""
        return name in self._by_canonical

    def module(self, canonical: str) -> Any:
        """The ModuleMap of a canonical name (KeyError if this structure has no such module)."""
        return self._by_canonical[canonical]

    def by_original(self, original: str) -> list[Any]:
        """Modules stored in one original tensor (any prefix, ``.weight`` optional), fused ones in row order; an
        unfused key → its one module; unknown → []."""
        return list(self._by_original.get(strip_prefix(original.removesuffix(".weight")), ()))

    def fused_name(self, canonical: str) -> str | None:
        """The original (checkpoint) module key of the fused tensor holding a module, None if unfused."""
        m = self.module(canonical)
        return m.original if m.fused else None

    # ------------------------------------------------------------------------------ conventions
    def kohya_stem(self, canonical: str, style: str = "original") -> str:
        """kohya LoRA stem. "original" (sd-scripts / musubi-tuner): ``lora_unet_`` + original path mangled (the
        *fused* stem for a fused module); "diffusers" (OneTrainer): ``lora_transformer_`` + diffusers path mangled."""
        m = self.module(canonical)
        if style == "original":
            return KOHYA_ORIGINAL_PREFIX + mangle(strip_prefix(m.original))
        if style == "diffusers":
            return KOHYA_DIFFUSERS_PREFIX + mangle(m.path)
        raise ValueError(f"kohya style is 'diffusers' or 'original', not {style!r}")

    def comfy_key(self, canonical: str) -> str:
        """ComfyUI-native LoRA key (no suffix): ``diffusion_model.<original path>`` (fused for fused modules)."""
        return COMFY_PREFIX + strip_prefix(self.module(canonical).original)

    def lookup(self, name: str) -> tuple[str, str] | None:
        """``(canonical, convention)`` for a name of exactly one module (trailing ``.weight`` accepted), else None.
        Fused original names answer None here: see ``lookup_group``."""
        got = self._index.get(name)
        if got is None and name.endswith(".weight"):
            got = self._index.get(name[: -len(".weight")])
        return got

    def resolve(self, name: str) -> str | None:
        """Canonical name of a module named in any convention (see ``lookup``), or None."""
        got = self.lookup(name)
        return got[0] if got else None

    def lookup_group(self, name: str) -> tuple[list[Any], str] | None:
        """``(modules, convention)`` for any name: one module, or all modules of a fused name in row order."""
        base = name.removesuffix(".weight")
        got = self.lookup(base)
        if got is not None:
            return [self.module(got[0])], got[1]
        grp = self._groups.get(base)
        if grp is not None:
            return self.by_original(grp[0]), grp[1]
        extra = self._extra_groups.get(base)
        if extra is not None:
            return [self.module(c) for c in extra[0]], extra[1]
        return None

    def unmapped(self, keys: Iterable[str]) -> dict[str, str]:
        """Checkpoint tensors that are no adaptable module's weight, with the reason."""
        mapped = {m.weight_key for m in self.modules}
        out: dict[str, str] = {}
        for k in keys:
            if k in mapped:
                continue
            if k.startswith(("vae.", "first_stage_model.")):
                out[k] = "VAE"
            elif k.startswith(("text_encoders.", "cond_stage_model.", "conditioner.", "text_encoder")):
                out[k] = f"text encoder (not described by the {self.label} family)"
            elif k.endswith((".bias", ".scale")) or ".norm" in k:
                out[k] = "not a weight matrix"
            else:
                out[k] = "not an adaptable module"
        return out


def original_conventions(naming: Any) -> frozenset[str]:
    """The conventions of ``naming`` that name original tensors (the DiT default where it does not say)."""
    return getattr(naming, "ORIGINAL_CONVENTIONS", ORIGINAL_CONVENTIONS)


def is_canonical(naming: Any, name: str) -> bool:
    """``naming.is_canonical(name)``, or for a naming without it: ``name`` resolves to itself."""
    check = getattr(naming, "is_canonical", None)
    if check is not None:
        return bool(check(name))
    found = naming.lookup(name)
    return found is not None and found[0] == name


def adapter_hits(names: Iterable[str], families: Mapping[str, Any]) -> tuple[str, str, int] | None:
    """``(family, convention, modules)``: of ``families`` (name → family), the one whose default naming covers the
    most transformer modules of an adapter's keys or module names (the first on a tie), its most common convention
    among them, and how many modules; None if none names any."""
    from .sd import adapter_module

    mods = {adapter_module(k) for k in names}
    best: tuple[int, str, Counter[str]] | None = None
    for name, fam in families.items():
        nm = fam.naming()
        covered: set[str] = set()
        convs: Counter[str] = Counter()
        for mod in mods:
            found = nm.lookup_group(mod)
            if found is not None:
                covered.update(m.canonical for m in found[0])
                convs[found[1]] += 1
        if covered and (best is None or len(covered) > best[0]):
            best = (len(covered), name, convs)
    if best is None:
        return None
    return best[1], best[2].most_common(1)[0][0], best[0]


class DiTFamilyMixin:
    """What a DiT family object (a frozen dataclass with ``name``, ``default`` and ``structure(keys)``) adds to be
    wired: its naming in the default structure, a checkpoint's, an adapter's (``naming_for_shapes``) and a pipeline
    folder's. ``naming_class`` builds it (:class:`DiTNaming` or a subclass with its hooks)."""

    naming_class: ClassVar[type[DiTNaming]] = DiTNaming

    def structure(self, keys: Iterable[str] | Mapping[str, Any] | None = None) -> Any:
        """The default structure, or the structure of a checkpoint key set (read by the default's class)."""
        return self.default if keys is None else type(self.default).from_keys(keys)  # type: ignore[attr-defined]

    def detect(self, keys: Iterable[str] | Mapping[str, Any]) -> tuple[str, str] | None:
        """``(name, layout)`` when a checkpoint key set is this family (its module's ``detect`` says), else None."""
        got = importlib.import_module(type(self).__module__).detect(keys)
        return got if got is not None and got[0] == self.name else None  # type: ignore[attr-defined]

    def naming(self, keys: Iterable[str] | Mapping[str, Any] | None = None) -> DiTNaming:
        """Name maps for the default structure, or for the structure of a checkpoint key set."""
        if keys is None:
            return _default_naming(self)
        return self.naming_class(self, self.structure(keys))  # type: ignore[attr-defined]

    def naming_for_shapes(self, shapes: Mapping[str, tuple[int, ...]]) -> DiTNaming:
        """Name maps in the structure an adapter's layers imply (``shapes``: layer name in any convention → ΔW
        shape); the default's where :meth:`structure_for_shapes` finds nothing to change."""
        nm = self.naming()
        seen: dict[str, tuple[int, ...]] = {}
        for name, shape in shapes.items():
            got = nm.lookup_group(name)
            if got is not None and len(shape) == 2:
                for m in got[0]:
                    seen[m.path] = tuple(shape) if len(got[0]) == 1 else (-int(shape[0]), int(shape[1]))
        st = self.structure_for_shapes(seen) if seen else None
        return nm if st is None or st == nm.structure else self.naming_class(self, st)

    def structure_for_shapes(self, seen: Mapping[str, tuple[int, ...]]) -> Any:
        """The structure of an adapter whose modules (diffusers paths) have these ΔW shapes (a fused member: its
        tensor's rows, negated); None for the default. Families whose row slices do not depend on widths keep
        this default."""
        return None

    def pipeline_naming(self, configs: Mapping[str, Mapping[str, Any]], keys: Iterable[str] | Mapping[str, Any]):
        """Name maps of a diffusers pipeline folder's transformer (its structure from its ``transformer.`` keys)."""
        return self.naming_class(self, type(self.default).from_keys(component_keys(keys, "transformer")))  # type: ignore[attr-defined]


def hidden_of(seen: Mapping[str, tuple[int, ...]], pattern: str) -> int | None:
    """Input width of the first module whose diffusers path matches ``pattern`` (a hidden-size input), or None."""
    rx = re.compile(pattern)
    return next((int(s[1]) for p, s in seen.items() if rx.search(p)), None)


def blocks_seen(seen: Iterable[str], block: str) -> int:
    """1 + the highest index ``N`` of a ``<block>.N.`` path seen (0 if none)."""
    rx = re.compile(r"(?:^|\.)" + re.escape(block) + r"\.(\d+)\.")
    return max((int(m.group(1)) + 1 for p in seen if (m := rx.match(p) or rx.search(p))), default=0)


def component_keys(keys: Iterable[str] | Mapping[str, Any], component: str) -> Mapping[str, Any] | list[str]:
    """A pipeline folder's keys of one component (``<component>.`` dropped; with their values for a mapping); all
    keys where none has that component."""
    ks = list(keys)
    pre = component + "."
    inner = [k for k in ks if k.startswith(pre)]
    if not inner:
        return keys if isinstance(keys, Mapping) else ks
    if isinstance(keys, Mapping):
        return {k[len(pre):]: keys[k] for k in inner}
    return [k[len(pre):] for k in inner]


@cache
def _default_naming(family: Any) -> DiTNaming:
    return family.naming_class(family, family.default)
