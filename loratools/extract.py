"""Library side of ``extract`` and ``spectrum``: LoRA from a full fine-tune (DESIGN.md §4–5).

Algorithm, one layer pair at a time (peak memory: a few copies of the largest layer, not a model):

1. **Pair** the tensors of BASE and TUNED by key (:func:`pair_tensors`): keys on one side only,
   shape mismatches and non-float tensors are reported and skipped; if no tensor pairs up at all
   the checkpoints belong to different architectures and nothing is done.
   A model family's single file (Stable Diffusion: :meth:`Checkpoint.naming`) is paired by its modules:
   each changed matrix is named by its canonical module (``unet.down_blocks…``, ``text_encoder_2.…``), a
   fused tensor (OpenCLIP ``in_proj``: q, k, v) is read once and its row slices of ΔW decomposed
   separately (one LoRA per module, exact), a transposed one (``text_projection``) transposed back;
   tensors the family maps to no module (VAE, EMA…) are skipped with its reason, and the adapter
   carries the family, so writers name the layers in their convention. TUNED must be of the same
   family and layout.
2. **Stream** each pair with plain positioned reads (:class:`TensorStream`, no memory map, so the
   resident set stays at the current layer), upcast to float32 on the chosen device and subtract:
   ``ΔW = W_tuned − W_base``. NaN/Inf in either input is an error naming the file and key.
3. **Decompose** ``ΔW`` (flattened to [out, in·kh·kw] for convs) with
   :func:`loratools.linalg.truncated_svd`: exact ‖ΔW‖_F², then a seeded randomized SVD
   (Halko–Martinsson–Tropp) whose sketch grows until the :class:`~loratools.linalg.RankRule` is
   decided, or an exact thin SVD for small layers / ``exact=True``. By Eckart–Young the kept
   triplets are the best rank-k approximation, with relative error √(1 − Σ_{i≤k}σᵢ²/‖ΔW‖²).
4. **Store** the kept triplets as a LoRA layer (balanced √Σ split, alpha = rank so scale 1;
   conv down [k, in, kh, kw] / up [out, k, 1, 1], the kohya LoCon and PEFT layout; embeddings as
   PEFT ``lora_embedding_A/B``). Optional clamp of the factors at an exact quantile of |values|.
   When the stored factors differ from the float32 truncation (half-precision output, clamp) the
   error reported is measured on the stored factors, block by block, without forming ``L Rᵀ``.
5. Modules matched by ``save_full`` are stored in full (PEFT ``modules_to_save``); changed 1-D
   tensors (biases, norms) are listed, and stored in full when their module matches ``save_full``.
   Zero diffs (or ‖ΔW‖/‖W‖ below ``min_diff``) are skipped. Keys holding identical data on both
   sides (tied weights saved twice) are decomposed once and the factors reused.

The functions return plain data (:class:`ExtractResult`, dict rows); the CLI renders them.
"""

from __future__ import annotations

import fnmatch
import json
import math
import os
import re
import struct
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from pathlib import Path

import torch

from loratools.adapter import EXTRA_PREFIX, Adapter, LoraLayer
from loratools.checkpoint import DTYPES, Checkpoint, ModuleRef, is_safetensors
from loratools.device import resolve_device
from loratools.distributed import parallel_map
from loratools.errors import LoraToolsError
from loratools.linalg import RankRule, frobenius_sq, krylov_fits, lora_from_svd, randomized_svd, truncated_svd
from loratools.quant import dequantize, lora_dtype, noise_floor_sq, noise_only, noise_warnings, unit_noise
from loratools.relayout import in_base_layout
from loratools.stats import spectrum_stats

Progress = Callable[[Iterable, int], Iterable]

#: last name component of modules that are ``nn.Embedding`` in common architectures
EMBEDDING_NAMES = re.compile(
    r"(^|\.)(embed_tokens|embed_in|embed_positions|tok_embeddings|wte|wpe|word_embeddings|"
    r"position_embeddings|token_type_embeddings|shared)$"
)
#: ranks tabulated by ``spectrum`` ("rank r → energy kept / params")
TABLE_RANKS = (4, 8, 16, 32, 64, 128, 256)


# ---------------------------------------------------------------------------------------- reading
class TensorStream:
    """Reads one tensor at a time from a :class:`Checkpoint` with plain positioned reads.

    safetensors data is read straight into a tensor (no memory map), so pages of layers already
    processed never count against the process's resident set. Large tensors are read with
    ``O_DIRECT`` where the OS and filesystem allow it: the disk writes into our buffer directly, with
    no page-cache copy. (On the 2-core CI VM a buffered cold read of 8 GB costs more than a core of
    CPU time, which it then takes from the SVD; a direct read costs almost none.) Anything else —
    small tensors, misaligned data, filesystems without ``O_DIRECT`` — is a buffered ``readinto``.
    Other file types go through :meth:`Checkpoint.get` (``torch.load(weights_only=True)``). An fp8 weight with a
    scale comes back dequantized to float32 (a fresh tensor; :mod:`loratools.quant`).
    """

    def __init__(self, ckpt: Checkpoint) -> None:
        self.ckpt = ckpt
        self._headers: dict[Path, tuple[int, dict]] = {}
        self._slots: dict[int, torch.Tensor] = {}
        self._lock = threading.Lock()  # Checkpoint.get (pickles) from the reader thread and the caller

    def _header(self, f: Path) -> tuple[int, dict]:
        if f not in self._headers:
            with open(f, "rb") as fh:
                (n,) = struct.unpack("<Q", fh.read(8))
                self._headers[f] = (8 + n, json.loads(fh.read(n)))
        return self._headers[f]

    def owns(self, key: str) -> bool:
        """Whether :meth:`read` returns a buffer of its own (fresh, or a scratch slot) the caller may modify in place."""
        return is_safetensors(self.ckpt.file_of(key))

    def _buffer(self, nbytes: int, slot: int | None) -> torch.Tensor:
        """``nbytes`` of uint8 whose address is aligned for ``O_DIRECT``: fresh, or the reusable ``slot``."""
        size = nbytes + DIRECT_ALIGN
        if slot is None:
            raw = torch.empty(size, dtype=torch.uint8)
        else:
            raw = self._slots.get(slot)
            # grown to the largest tensor so far; given back once a much smaller one follows (after an embedding)
            if raw is None or raw.numel() < size or raw.numel() > 2 * size + SLOT_SLACK:
                self._slots.pop(slot, None)
                raw = self._slots[slot] = torch.empty(size, dtype=torch.uint8)
        pad = -raw.data_ptr() % DIRECT_ALIGN
        return raw[pad : pad + nbytes]

    def drop(self, slot: int) -> None:
        """Give back scratch ``slot``'s buffer (no tensor handed out from it may still be in use)."""
        self._slots.pop(slot, None)

    def read(self, key: str, slot: int | None = None) -> torch.Tensor:
        """The tensor ``key``, in a fresh buffer, or with ``slot`` (0, 1, …) in a buffer this stream reuses for
        that slot: already paged in (no page faults for a fresh layer-sized allocation), valid until the next
        read into the same slot."""
        f = self.ckpt.file_of(key)
        if not is_safetensors(f):
            with self._lock:
                return self.ckpt.get(key)
        start, header = self._header(f)
        info = header[self.ckpt.stored_key(key)]
        dtype = DTYPES.get(info["dtype"])
        if dtype is None:
            raise LoraToolsError(f"{f}: tensor {key!r} has unsupported dtype {info['dtype']}")
        a, b = info["data_offsets"]
        lo = (start + a) // DIRECT_ALIGN * DIRECT_ALIGN
        hi = -(-(start + b) // DIRECT_ALIGN) * DIRECT_ALIGN
        head = start + a - lo
        direct = b - a >= DIRECT_MIN_BYTES and head % 8 == 0
        buf = self._buffer(hi - lo if direct else b - a, slot)
        got = _read_direct(f, lo, buf) - head if direct else -1
        if got < b - a:  # no O_DIRECT here (or a short read): the buffered path decides
            buf = buf[: b - a]
            with open(f, "rb") as fh:
                fh.seek(start + a)
                got = fh.readinto(memoryview(buf.numpy())) if b > a else 0
            head = 0
        if got < b - a:
            raise LoraToolsError(f"{f}: tensor {key!r} is truncated ({got} of {b - a} bytes; file incomplete?)")
        return dequantize(self.ckpt, key, buf[head : head + b - a].view(dtype).reshape(info["shape"]), self.read)


#: a scratch slot more than twice (plus this) the size it is asked for is reallocated smaller
SLOT_SLACK = 64 << 20
#: tensors of at least this many bytes are read with O_DIRECT where possible (smaller: buffered)
DIRECT_MIN_BYTES = 8 << 20
#: O_DIRECT offset, length and address alignment (the largest logical block size in use)
DIRECT_ALIGN = 4096


def _read_direct(path: Path, offset: int, buf: torch.Tensor) -> int:
    """Read ``buf.numel()`` bytes at ``offset`` (both aligned) with ``O_DIRECT``; bytes read, or -1 where the
    platform or filesystem refuses it (the caller then reads buffered). (A non-blocking buffered read of the
    pages already cached first was tried: on a cold file the kernel then starts its readahead anyway, so the
    bytes were read twice and cached — what ``O_DIRECT`` is there to avoid.)"""
    flag = getattr(os, "O_DIRECT", 0)
    if not flag:
        return -1
    try:
        fd = os.open(path, os.O_RDONLY | flag)
    except OSError:
        return -1
    view, got = memoryview(buf.numpy()), 0
    try:
        while got < len(view):
            n = os.preadv(fd, [view[got:]], offset + got)
            got += max(n, 0)
            if n <= 0 or n % DIRECT_ALIGN:  # end of file
                break
    except OSError:
        return -1
    finally:
        os.close(fd)
    return got


#: pairs with more elements than this (a large vocabulary's embedding or head) are never read ahead, and go into
#: the slot the caller just released: at most one such pair is in memory at a time
READ_AHEAD_MAX = 1 << 26


def read_pairs(
    pairs: list[TensorPair], bstream: TensorStream, tstream: TensorStream
) -> Iterator[tuple[TensorPair, torch.Tensor, torch.Tensor]]:
    """Yield ``(pair, W_base, W_tuned)`` in order while a helper thread reads the next pair.

    Two scratch slots per stream: while the caller works on a pair in one slot, the thread reads the next pair
    into the other (the thread waits on the disk, without the GIL, so reading overlaps the caller's SVD). The
    tensors handed out are valid until the caller asks for the next pair. A pair above ``READ_AHEAD_MAX``
    elements is read only once the caller asks for it, into the slot just released. Read errors surface in the
    caller's loop.
    """
    def load(i: int, slot: int) -> tuple[torch.Tensor, torch.Tensor]:
        key = pairs[i].key
        if big[i]:  # read now, into the slot just released: the other slot's buffer (an older pair's) is given back
            bstream.drop(1 - slot)
            tstream.drop(1 - slot)
        return bstream.read(key, slot=slot), tstream.read(key, slot=slot)

    if not pairs:
        return
    big = [math.prod(p.shape) > READ_AHEAD_MAX for p in pairs]
    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="loratools-read") as pool:
        slot, pending = 0, None
        for i, pair in enumerate(pairs):
            w_base, w_tuned = pending.result() if pending is not None else load(i, slot)
            pending = None
            if i + 1 < len(pairs) and not big[i + 1]:
                slot = 1 - slot
                pending = pool.submit(load, i + 1, slot)
            yield pair, w_base, w_tuned
            del w_base, w_tuned  # released before the next read (a big pair reuses their slot's memory)


# ---------------------------------------------------------------------------------------- pairing
@dataclass
class TensorPair:
    """A tensor present in both checkpoints with the same shape.

    In a model family's checkpoint (SD single files) ``module`` is the canonical module name and ``ref`` says where
    its weight lies in the tensor (a row slice of a fused tensor, transposed); a fused tensor holding several
    modules (OpenCLIP ``in_proj``: q, k, v) is one pair, read once, with one ``parts`` entry per module.
    """

    key: str
    module: str
    shape: tuple[int, ...]
    kind: str  # linear | conv | embedding | vector | other | fused
    ref: ModuleRef | None = None
    parts: tuple[TensorPair, ...] = ()

    @property
    def whole(self) -> bool:
        """Whether the module's weight is the whole tensor as stored (no row slice, not transposed)."""
        return self.ref is None or self.ref.whole

    def units(self) -> tuple[TensorPair, ...]:
        """The modules this tensor holds: its ``parts``, or the pair itself."""
        return self.parts or (self,)

    def describe(self, **row) -> dict:
        """A report row for this module: ``name`` (and, for a family module, the checkpoint ``key``, its ``rows``)."""
        out = {"name": self.key if self.ref is None else self.module}
        if self.ref is not None:
            out["key"] = self.key
            if self.ref.rows is not None:
                out["rows"] = list(self.ref.rows)
        return {**out, **row}


def module_of(key: str) -> str:
    """``a.b.weight`` → ``a.b`` (the module path a parameter belongs to)."""
    return key.rsplit(".", 1)[0] if "." in key else key


def tensor_kind(key: str, shape: tuple[int, ...]) -> str:
    if len(shape) <= 1 or not key.endswith(".weight"):
        return "vector" if len(shape) <= 1 else "other"
    if len(shape) > 2:
        return "conv"
    return "embedding" if EMBEDDING_NAMES.search(module_of(key)) else "linear"


def matches(name: str, key: str, globs: Iterable[str]) -> bool:
    """Whether a module name or tensor key matches any of the shell-style ``globs``."""
    return any(fnmatch.fnmatchcase(name, g) or fnmatch.fnmatchcase(key, g) for g in globs)


def family_of(base: Checkpoint, tuned: Checkpoint) -> str | None:
    """The model family both checkpoints belong to when BASE has its names (an SD single file or a diffusers
    pipeline folder of a known family), else None; a TUNED of another family or layout is an error."""
    if base.family_naming() is None:
        return None
    bf, tf = base.family(), tuned.family()
    if tf != bf:
        what = f"a {tf[0]} checkpoint ({tf[1]} layout)" if tf else "no known model family"
        raise LoraToolsError(
            f"{tuned.path} is {what} but the base {base.path} is a {bf[0]} checkpoint ({bf[1]} layout); "
            "extract needs both in the same family and layout"
        )
    return bf[0]


def _family_pair(base: Checkpoint, key: str, shape: tuple[int, ...], mods: list[tuple[str, ModuleRef]],
                 include: list[str], exclude: list[str], skipped: list[dict]) -> TensorPair | None:
    """The pair of a family tensor holding ``mods`` (canonical name, where in the tensor): one module, or a fused
    tensor's modules as ``parts``; --include / --exclude match canonical names or the key."""
    units = []
    for name, ref in mods:
        unit = TensorPair(key, name, tuple(base.module_shape(name)), "", ref)
        unit.kind = "conv" if len(unit.shape) > 2 else "linear"
        if include and not matches(name, key, include):
            continue
        if exclude and matches(name, key, exclude):
            skipped.append(unit.describe(reason="excluded by --exclude"))
            continue
        units.append(unit)
    if not units:
        return None
    if len(mods) == 1:
        return units[0]
    return TensorPair(key, module_of(key), shape, "fused", parts=tuple(units))


def pair_tensors(
    base: Checkpoint, tuned: Checkpoint, include: Iterable[str] = (), exclude: Iterable[str] = (),
    router: str = "lora",
) -> tuple[list[TensorPair], list[dict]]:
    """Tensors to compare, in TUNED's key order, and ``{"name", "reason"}`` rows for the rest.

    When BASE is a model family's single file or pipeline folder (see :func:`family_of`) its matrices are paired as
    the family's modules (canonical names, fused tensors split by rows); tensors the family does not map are skipped
    with the family's reason (VAE, EMA…), except 1-D ones of the model (biases, norms), which are paired as vectors.
    Routed experts are paired by canonical expert module across layouts (:func:`loratools.moe.plan_experts`); the
    MoE router is skipped with ``router="skip"``.
    """
    from loratools.moe import ExpertPairs, plan_experts

    include, exclude = list(include), list(exclude)
    experts = plan_experts(base, tuned, include, exclude, router) or ExpertPairs()
    bkeys, tkeys = set(base.keys()), tuned.keys()
    pairs: list[TensorPair] = []
    skipped: list[dict] = list(experts.skipped)
    common = len(experts.pairs)
    naming = base.family_naming() if family_of(base, tuned) else None
    by_key: dict[str, list[tuple[str, ModuleRef]]] = {}
    owner: dict[str, str] = {}  # bias key of a module stored whole → its canonical name
    if naming is not None:
        for name, ref in base.family_refs().items():
            by_key.setdefault(ref.key, []).append((name, ref))
            if ref.whole and ref.key.endswith(".weight"):
                owner[ref.key[: -len("weight")] + "bias"] = name
    for key in tkeys:
        aux = tuned.quant.reason(key) or base.quant.reason(key)
        if aux:  # fp8 scales and markers
            skipped.append({"name": key, "reason": aux})
            continue
        if key in experts.tuned_keys:
            pairs += [experts.pairs[key]] if key in experts.pairs else []
            continue
        if key not in bkeys:
            skipped.append({"name": key, "reason": "only in tuned checkpoint"})
            continue
        bs, ts = tuple(base.shape(key)), tuple(tuned.shape(key))
        if bs != ts:
            skipped.append({"name": key, "reason": f"shape mismatch: base {list(bs)} vs tuned {list(ts)}"})
            continue
        if not (base.dtype(key).is_floating_point and tuned.dtype(key).is_floating_point):
            skipped.append({"name": key, "reason": f"not a float tensor ({tuned.dtype(key)})"})
            continue
        common += 1
        mod = module_of(key)
        if naming is not None:
            if key in by_key:
                pair = _family_pair(base, key, ts, by_key[key], include, exclude, skipped)
                if pair is not None:
                    pairs.append(pair)
                continue
            reason = _pipeline_reason(base, naming, key, ts) if base.is_pipeline else naming.unmapped([key])[key]
            if len(ts) > 1 or reason != "not a weight matrix":
                skipped.append({"name": key, "reason": f"{reason}: not part of a LoRA"})
                continue
            mod = owner.get(key, mod)  # a bias follows its module's canonical name
        if include and not matches(mod, key, include):
            continue
        if exclude and matches(mod, key, exclude):
            skipped.append({"name": key, "reason": "excluded by --exclude"})
            continue
        pairs.append(TensorPair(key, mod, ts, tensor_kind(key, ts)))
    tset = set(tkeys)
    skipped += [{"name": k, "reason": base.quant.reason(k) or "only in base checkpoint"}
                for k in base.keys() if k not in tset and k not in experts.base_keys]
    if common == 0:
        example = next((s["name"] + ": " + s["reason"] for s in skipped), "both are empty")
        raise LoraToolsError(
            f"architecture mismatch: no tensor of {tuned.path} matches {base.path} by name and shape "
            f"({len(base.keys())} vs {len(tset)} keys; e.g. {example})"
        )
    if not pairs:
        raise LoraToolsError(f"no tensor left to compare after --include {include} / --exclude {exclude}")
    return pairs, skipped


def _pipeline_reason(base: Checkpoint, naming, key: str, shape: tuple[int, ...]) -> str:
    """Why a pipeline folder's tensor is no family module (the reasons ``SDNaming.unmapped`` gives a single file)."""
    comp = key.split(".", 1)[0]
    if comp == "vae":
        return "VAE"
    if comp not in {m.component for m in naming.modules}:
        return f"{comp} component"
    if len(shape) <= 1:
        return "not a weight matrix"
    return "embedding" if EMBEDDING_NAMES.search(module_of(key)) else "not an adaptable module"


# ---------------------------------------------------------------------------------------- clamp
def exact_quantile(x: torch.Tensor, q: float) -> float:
    """``torch.quantile(x, q)`` (linear interpolation) for any size, via two ``kthvalue`` selections.

    ``torch.quantile`` refuses inputs above 2^24 elements; selection is O(n) and has no such limit.
    """
    flat = x.reshape(-1)
    n = flat.numel()
    if n == 0:
        raise LoraToolsError("quantile of an empty tensor")
    if not 0 <= q <= 1:
        raise LoraToolsError(f"--clamp-quantile must be in [0, 1], got {q}")
    pos = q * (n - 1)
    lo = math.floor(pos)
    hi = min(lo + 1, n - 1)
    v_lo = float(torch.kthvalue(flat, lo + 1).values)
    v_hi = float(torch.kthvalue(flat, hi + 1).values) if hi != lo else v_lo
    return v_lo + (v_hi - v_lo) * (pos - lo)


def clamp_factors(up: torch.Tensor, down: torch.Tensor, q: float) -> tuple[torch.Tensor, torch.Tensor, int]:
    """Clip both factors to ±(q-quantile of |values| over both); returns the number of values clipped."""
    mags = torch.cat([up.reshape(-1).abs(), down.reshape(-1).abs()])
    limit = exact_quantile(mags, q)
    clipped = int((mags > limit).sum())
    return up.clamp(-limit, limit), down.clamp(-limit, limit), clipped


def residual_sq(diff: torch.Tensor, left: torch.Tensor, right: torch.Tensor, block_elems: int = 1 << 22) -> float:
    """‖ΔW − L Rᵀ‖_F², computed in float64 over row blocks of about ``block_elems`` elements (never forms the
    full L Rᵀ): float32 products would put a rounding floor of ~1e-7·‖ΔW‖ under an error that can be smaller."""
    right64 = right.double()
    rows = max(1, block_elems // max(diff.shape[1], 1))
    total = 0.0
    for i in range(0, diff.shape[0], rows):
        total += frobenius_sq(diff[i : i + rows].double() - left[i : i + rows].double() @ right64.T)
    return total


# ---------------------------------------------------------------------------------------- extract
@dataclass
class ExtractOptions:
    """Everything ``extract`` needs besides the two checkpoints (CLI flags map one to one)."""

    rule: RankRule = field(default_factory=lambda: RankRule("rank", 16))
    conv_rule: RankRule | None = None
    include: list[str] = field(default_factory=list)
    exclude: list[str] = field(default_factory=list)
    save_full: list[str] = field(default_factory=list)
    device: str = "auto"
    dtype: torch.dtype | None = None
    exact: bool = False
    seed: int = 0
    clamp_quantile: float | None = None
    min_diff: float = 0.0
    format: str = "peft"
    power_iters: int = 6
    power_tol: float = 0.005
    #: rank rule of routed experts (``--expert-rank``; None: ``rule``), what becomes of the MoE router (``--router``)
    expert_rule: RankRule | None = None
    router: str = "full"


@dataclass
class ExtractResult:
    adapter: Adapter
    layers: list[dict]
    skipped: list[dict]
    changed_vectors: list[dict]
    full: list[str]
    summary: dict


def _read_diff(
    w_base: torch.Tensor, raw: torch.Tensor, bstream: TensorStream, tstream: TensorStream, key: str,
    device: torch.device,
) -> tuple[torch.Tensor, float, float]:
    """``(ΔW float32 on device, ‖W_base‖, ‖ΔW‖²)`` from the pair :func:`read_pairs` handed out.

    ΔW is computed in place in TUNED's scratch buffer when it is already float32 on the device, so a
    pair holds two layer-sized buffers, not three (four in all with the pair being read meanwhile).
    Finiteness is checked through the two norms (NaN/Inf in either input makes one of them
    non-finite), and only then located tensor by tensor for the error message.
    """
    wb = w_base.to(device=device, dtype=torch.float32)
    wt = raw.to(device=device, dtype=torch.float32)
    diff = wt.sub_(wb) if (wt is not raw or tstream.owns(key)) else wt - wb
    total, base_sq = frobenius_sq(diff), frobenius_sq(wb)
    if not (math.isfinite(total) and math.isfinite(base_sq)):
        _check_finite(w_base, bstream.ckpt, key)
        _check_finite(tstream.read(key), tstream.ckpt, key)  # the scratch copy now holds ΔW
    return diff, base_sq**0.5, total


def rounding_only(w_base: torch.Tensor, w_tuned: torch.Tensor) -> str | None:
    """Why a pair with a lower-precision TUNED is unchanged, or None: TUNED is the base rounded to its dtype (a bf16
    or fp16 copy of a fine-tune against an fp32 base), so its ΔW is pure rounding noise, not a change."""
    lower = (w_tuned.dtype.is_floating_point and w_base.dtype.is_floating_point
             and torch.finfo(w_tuned.dtype).eps > torch.finfo(w_base.dtype).eps)
    if lower and torch.equal(w_base.to(w_tuned.dtype), w_tuned):
        return f"unchanged (the base rounded to {str(w_tuned.dtype).replace('torch.', '')})"
    return None


def _check_finite(t: torch.Tensor, ckpt: Checkpoint, key: str) -> None:
    bad = ~torch.isfinite(t)
    if bool(bad.any()):
        raise LoraToolsError(
            f"{ckpt.file_of(key) if key in ckpt else ckpt.path}: tensor {key} {list(t.shape)} has {int(bad.sum())} "
            "non-finite values (NaN/Inf)"
        )


def _peft_task_type(base: Checkpoint) -> str | None:
    cfg = base.path / "config.json" if base.path.is_dir() else None
    if cfg is None or not cfg.is_file():
        return None
    try:
        archs = json.loads(cfg.read_text()).get("architectures") or []
    except (json.JSONDecodeError, AttributeError):
        return None
    for suffix, task in (("ForCausalLM", "CAUSAL_LM"), ("ForSequenceClassification", "SEQ_CLS"),
                         ("ForTokenClassification", "TOKEN_CLS"), ("ForQuestionAnswering", "QUESTION_ANS")):
        if any(str(a).endswith(suffix) for a in archs):
            return task
    return None


def _tied_head_warning(base: Checkpoint, tuned: Checkpoint, layers: dict[str, LoraLayer]) -> list[str]:
    """Checkpoints saved with tied embeddings store the head once; a LoRA on the embedding then misses the head."""
    cfg = base.path / "config.json" if base.path.is_dir() else None
    try:
        tied = cfg is not None and cfg.is_file() and bool(json.loads(cfg.read_text()).get("tie_word_embeddings"))
    except (json.JSONDecodeError, AttributeError):
        tied = False
    emb = [n for n, la in layers.items() if la.embedding]
    if tied and emb and "lm_head.weight" not in tuned:
        return [f"{base.path / 'config.json'} ties the output head to {emb[0]}, but the adapter's embedding LoRA only "
                "patches the input side: the head keeps the base weights (target lm_head separately, or untie)"]
    return []


def _pair_diff(
    pair: TensorPair, w_base: torch.Tensor, w_tuned: torch.Tensor, bstream: TensorStream, tstream: TensorStream,
    device: torch.device,
) -> tuple[torch.Tensor | None, float, float]:
    """:func:`_read_diff` of a pair, or ``(None, 0, 0)`` for a fused 3-D expert tensor: its experts are diffed one by
    one in :func:`_unit_diff`, so no float32 copy of the whole [E, …] tensor is ever made (peak memory: the two
    stored tensors, not four float32 ones)."""
    if pair.parts and all(u.ref is not None and u.ref.expert is not None for u in pair.parts):
        return None, 0.0, 0.0
    return _read_diff(w_base, w_tuned, bstream, tstream, pair.key, device)


def _unit_diff(
    unit: TensorPair, diff: torch.Tensor | None, base_norm: float, total: float, w_base: torch.Tensor,
    device: torch.device, w_tuned: torch.Tensor | None = None,
) -> tuple[torch.Tensor, float, float]:
    """``(ΔW, ‖W_base‖, ‖ΔW‖²)`` of one module of a pair: the whole tensor's, or its rows (transposed back) of a
    fused or transposed tensor, measured on that part alone (``diff`` None: from the stored ``w_tuned`` and
    ``w_base``, NaN/Inf an error naming the module)."""
    if diff is None:
        wb = unit.ref.take(w_base).to(device=device, dtype=torch.float32)
        part = unit.ref.take(w_tuned).to(device=device, dtype=torch.float32) - wb
        total, base_sq = frobenius_sq(part), frobenius_sq(wb)
        if not (math.isfinite(total) and math.isfinite(base_sq)):
            raise LoraToolsError(f"tensor {unit.key}: module {unit.module} {list(unit.shape)} has non-finite values "
                                 "(NaN/Inf) in base or tuned")
        return part, base_sq**0.5, total
    if unit.whole:
        return diff, base_norm, total
    part = unit.ref.take(diff).contiguous()
    wb = unit.ref.take(w_base).to(device=device, dtype=torch.float32)
    return part, frobenius_sq(wb) ** 0.5, frobenius_sq(part)


def _param_name(unit: TensorPair) -> str:
    """The parameter name a tensor saved in full goes under: its key, or in a model family its canonical module
    with the key's last component (``unet.….proj_in.bias``; ``….weight`` for a module's rows of a fused tensor)."""
    if unit.ref is None and unit.module == module_of(unit.key):
        return unit.key
    if unit.ref is not None:
        return f"{unit.module}.weight"
    return f"{unit.module}.{unit.key.rsplit('.', 1)[-1]}"


def pair_cost(pair: TensorPair, rule: RankRule) -> float:
    """Work of a pair for balancing ranks: m·n·k for a matrix (k: the rule's rank, or a first sketch's), else its size."""
    k = int(rule.value) if rule.kind == "rank" else 32
    return float(math.prod(pair.shape)) * (k if len(pair.shape) > 1 else 1)


def _screen(key: str, w_base: torch.Tensor, w_tuned: torch.Tensor, bstream: TensorStream, tstream: TensorStream
            ) -> tuple[str | None, torch.Tensor | None]:
    """``(why the pair is unchanged, None)`` when ΔW is only rounding (bf16/fp16 of the base, or fp8 requantization),
    else ``(None, the per-row fp8 noise floor or None)``."""
    bck, tck = bstream.ckpt, tstream.ckpt
    reason = rounding_only(w_base, w_tuned) or noise_only(bck, tck, key, w_base, w_tuned, bstream.read, tstream.read)
    if reason:
        return reason, None
    return None, noise_floor_sq(bck, tck, key, w_base, w_tuned, bstream.read, tstream.read)


def _extract_pair(
    pair: TensorPair, w_base: torch.Tensor, w_tuned: torch.Tensor, bstream: TensorStream, tstream: TensorStream,
    device: torch.device, opt: ExtractOptions,
) -> list[tuple[str, TensorPair, dict | None, object]]:
    """One pair's outcome per module: ``(what, unit, row, value)`` with ``what`` = ``skipped`` (row: why),
    ``vector`` (row: a changed 1-D tensor or None; value: the tensor saved in full or None) or ``layer`` (row: the
    report row with its tied-weight ``fingerprint``; value: the LoRA layer). A pure function of the pair's data, so
    any rank may compute it."""
    key = pair.key
    t_layer = time.perf_counter()
    bck, tck = bstream.ckpt, tstream.ckpt
    reason, floor = _screen(key, w_base, w_tuned, bstream, tstream)
    if reason:
        return [("skipped", u, u.describe(reason=reason), None) for u in pair.units()]
    whole_diff, whole_norm, whole_total = _pair_diff(pair, w_base, w_tuned, bstream, tstream, device)
    out_dtype = opt.dtype or lora_dtype(bck, tck, key)
    outs: list[tuple[str, TensorPair, dict | None, object]] = []
    for unit in pair.units():
        diff, base_norm, total = _unit_diff(unit, whole_diff, whole_norm, whole_total, w_base, device, w_tuned)
        rel = math.sqrt(total) / base_norm if base_norm > 0 else (math.inf if total > 0 else 0.0)
        if total == 0:
            outs.append(("skipped", unit, unit.describe(reason="unchanged (ΔW = 0)"), None))
            continue
        if rel < opt.min_diff:
            outs.append(("skipped", unit, unit.describe(reason=f"below --min-diff (‖ΔW‖/‖W‖ = {rel:.3g})"), None))
            continue
        full = bool(opt.save_full) and matches(unit.module, key, opt.save_full)
        if unit.kind in ("vector", "other") or full:
            row = ({"name": key, "shape": list(unit.shape), "relative_norm": rel, "saved": full}
                   if unit.kind in ("vector", "other") else None)
            value = None
            if full:
                value = tstream.read(key)
                value = (unit.ref.take(value) if unit.ref is not None else value).to(out_dtype).contiguous()
            outs.append(("vector", unit, row, value))
            continue
        rule = opt.conv_rule if unit.kind == "conv" and opt.conv_rule is not None else opt.rule
        rule = opt.expert_rule if unit.kind == "expert" and opt.expert_rule is not None else rule
        row, layer = _extract_layer(diff, unit, rule, total, base_norm, out_dtype, opt)
        del diff
        if layer is None:
            outs.append(("skipped", unit, unit.describe(reason=row["reason"]), None))
            continue
        row["time_s"] = time.perf_counter() - t_layer
        t_layer = time.perf_counter()  # the next module of a fused tensor (experts) is timed on its own
        row.update(unit_noise(floor, unit.ref.rows if unit.ref is not None else None, total))
        row["fingerprint"] = (unit.shape, total, base_norm)
        outs.append(("layer", unit, row, layer))
    return outs


def extract(
    base: str | Path | Checkpoint,
    tuned: str | Path | Checkpoint,
    options: ExtractOptions | None = None,
    progress: Progress | None = None,
) -> ExtractResult:
    """Extract a LoRA adapter approximating ``tuned − base`` (see the module docstring)."""
    opt = options or ExtractOptions()
    t0 = time.perf_counter()
    bck = base if isinstance(base, Checkpoint) else Checkpoint(base)
    tck = in_base_layout(bck, tuned if isinstance(tuned, Checkpoint) else Checkpoint(tuned))
    if opt.clamp_quantile is not None and not 0 < opt.clamp_quantile <= 1:
        raise LoraToolsError(f"--clamp-quantile must be in (0, 1], got {opt.clamp_quantile}")
    device = resolve_device(opt.device)
    family = family_of(bck, tck)
    from loratools.moe import ROUTER_MODES, base_stream, plan_experts

    if opt.router not in ROUTER_MODES:
        raise LoraToolsError(f"--router must be one of {', '.join(ROUTER_MODES)}, got {opt.router!r}")
    pairs, skipped = pair_tensors(bck, tck, opt.include, opt.exclude, opt.router)
    experts = plan_experts(bck, tck)
    save_full = opt.save_full + (sorted(experts.routers.values()) if experts and opt.router == "full" else [])
    bstream, tstream = base_stream(bck, tck), TensorStream(tck)
    layers: dict[str, LoraLayer] = {}
    rows: list[dict] = []
    vectors: list[dict] = []
    extra: dict[str, torch.Tensor] = {}
    full_modules: set[str] = set()
    seen: dict[tuple, str] = {}  # fingerprint of (shape, ‖ΔW‖², ‖W‖) → first key, for tied weights
    by_key: dict[str, LoraLayer] = {}
    work_opt = replace(opt, save_full=save_full)  # the MoE routers saved in full with --router full
    outcomes = parallel_map(pairs, lambda item: _extract_pair(*item, bstream, tstream, device, work_opt),
                            [pair_cost(p, opt.rule) for p in pairs], [p.key for p in pairs],
                            feed=lambda mine: read_pairs(mine, bstream, tstream), progress=progress)
    for pair, outs in zip(pairs, outcomes):  # in the pairs' order, whichever rank computed them
        key = pair.key
        for what, unit, row, value in outs:
            fp = row.pop("fingerprint") if what == "layer" else None
            if what == "skipped":
                skipped.append(row)
            elif what == "vector":
                if row is not None:
                    vectors.append(row)
                if value is not None:
                    extra[EXTRA_PREFIX + _param_name(unit)] = value
                    full_modules.add(unit.module)
            elif unit.whole and fp in seen and torch.equal(
                    bstream.read(key), bstream.read(seen[fp])) and torch.equal(tstream.read(key), tstream.read(seen[fp])):
                first = by_key[seen[fp]]
                layers[unit.module] = LoraLayer(down=first.down, up=first.up, alpha=first.alpha,
                                                embedding=unit.kind == "embedding")
                first_row = next(r for r in rows if r["key"] == seen[fp])
                rows.append(dict(first_row, name=unit.module, key=key, kind=unit.kind, tied_to=first_row["name"]))
            else:
                if unit.whole:
                    seen[fp] = key
                    by_key[key] = value
                layers[unit.module] = value
                rows.append(row)
    if not layers and not extra:
        raise LoraToolsError(
            f"nothing to extract: every paired tensor was skipped ({len(skipped)} skipped, e.g. "
            f"{skipped[0]['name']}: {skipped[0]['reason']})" if skipped else "nothing to extract"
        )
    if not layers:
        raise LoraToolsError("nothing to extract as LoRA: all changed tensors are saved in full (--save-full)")
    both = sorted(full_modules & set(layers))
    if both:
        raise LoraToolsError(
            f"module {both[0]} would be both a LoRA target and saved in full (--save-full matched only some of its "
            "tensors, e.g. the bias); match the whole module or none of it"
        )
    padded = 0
    if experts is not None:
        from loratools.moe import uniform_expert_ranks

        padded = uniform_expert_ranks(layers)
    warnings = _tied_head_warning(bck, tck, layers) + bck.quant.notes + tck.quant.notes + noise_warnings(rows)
    adapter = Adapter(layers=dict(layers), format=opt.format, extra_tensors=extra, source=str(tck.path),
                      warnings=warnings, family=family, provenance={
                          "base_model": str(bck.path), "task_type": _peft_task_type(bck), "output_name": "extracted",
                          "family": family,
                          "comment": f"extracted by loratools from {bck.path.name} and {tck.path.name} "
                                     f"({opt.rule.describe()})"})
    energies = [r["retained_energy"] for r in rows]
    summary = {
        "base": str(bck.path), "tuned": str(tck.path), "family": family, "format": opt.format,
        "rule": opt.rule.describe(),
        "conv_rule": opt.conv_rule.describe() if opt.conv_rule else None, "device": str(device),
        "layers": len(rows), "params": adapter.num_params + sum(t.numel() for t in extra.values()),
        "lora_params": adapter.num_params, "full_params": sum(t.numel() for t in extra.values()),
        "mean_retained_energy": sum(energies) / len(energies), "min_retained_energy": min(energies),
        "skipped": len(skipped), "changed_vectors": len(vectors), "saved_full": sorted(full_modules),
        "wall_time_s": time.perf_counter() - t0,
    }
    if experts is not None:
        from loratools.moe import expert_summary

        summary["experts"] = expert_summary(rows, skipped, experts, opt.router, full_modules, padded)
        summary["expert_rule"] = (opt.expert_rule or opt.rule).describe()
    if opt.clamp_quantile is not None:
        summary["clipped_values"] = sum(r.get("clipped", 0) for r in rows)
    return ExtractResult(adapter, rows, skipped, vectors, sorted(full_modules), summary)


def _extract_layer(
    diff: torch.Tensor, pair: TensorPair, rule: RankRule, total: float, base_norm: float,
    out_dtype: torch.dtype, opt: ExtractOptions,
) -> tuple[dict, LoraLayer | None]:
    """SVD, truncation, storage and error measurement of one changed matrix."""
    m = pair.shape[0]
    mat = diff.reshape(m, -1)
    info: dict = {}
    u, s, vh, _ = truncated_svd(mat, rule, seed=opt.seed, exact=opt.exact, n_iter=opt.power_iters, tol=opt.power_tol,
                                total_energy=total, info=info)
    k = int(s.numel())
    if k == 0:
        return {"reason": f"rank rule {rule.describe()} keeps no singular value"}, None
    discarded = min(max(info["discarded_energy"], 0.0), total)
    layer = lora_from_svd(u, s, vh, pair.shape, torch.float32)  # balanced √Σ split, alpha = k (scale 1)
    layer.embedding = pair.kind == "embedding"
    row = {
        "name": pair.module, "key": pair.key, "kind": pair.kind, "shape": list(pair.shape), "rank": k,
        "retained_energy": 1.0 - discarded / total, "relative_error": math.sqrt(discarded / total),
        "relative_norm": math.sqrt(total) / base_norm if base_norm > 0 else None,
        "fro_norm": math.sqrt(total), "sigma_1": float(s[0]), "sigma_k": float(s[-1]),
        "error_measured": False, "power_iters": info["power_iters"],
    }
    if pair.ref is not None and pair.ref.rows is not None:
        row["rows"] = list(pair.ref.rows)
    if opt.clamp_quantile is not None:
        layer.up, layer.down, row["clipped"] = clamp_factors(layer.up, layer.down, opt.clamp_quantile)
    layer.up = layer.up.to(dtype=out_dtype).cpu().contiguous()
    layer.down = layer.down.to(dtype=out_dtype).cpu().contiguous()
    # the Eckart–Young figure is the stored error only up to rounding: measure what was stored wherever rounding
    # can matter (half-precision factors, clamped factors, and near full rank, where ‖ΔW‖² − Σσ² cancels)
    if (opt.clamp_quantile is not None or out_dtype not in (torch.float32, torch.float64)
            or row["relative_error"] < MEASURE_ERROR_BELOW):
        left, right = (f.to(mat.device) for f in layer.factors(torch.float32))
        err_sq = residual_sq(mat, left, right)
        row["relative_error"] = math.sqrt(err_sq / total)
        row["retained_energy"] = max(1.0 - err_sq / total, 0.0)
        row["error_measured"] = True
    return row, layer


#: predicted relative errors below this are measured on the stored factors (the prediction's rounding is ~1e-7·‖ΔW‖²)
MEASURE_ERROR_BELOW = 1e-2


def output_size(path: Path) -> int:
    """Bytes on disk of a written adapter file or folder."""
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file()) if path.is_dir() else path.stat().st_size


# ---------------------------------------------------------------------------------------- spectrum
#: most power iterations of spectrum's randomized top-K (stopped earlier by extract's --power-tol default)
SPECTRUM_POWER_ITERS = 4


def layer_spectrum_of_diff(
    diff: torch.Tensor, top: int, exact: bool, exact_below: int, seed: int, total: float | None = None
) -> tuple[torch.Tensor, bool]:
    """Singular values of ΔW (2-D): exact ``svdvals`` when small or asked, else randomized top-``top``
    (block Krylov, iterations stopped by the same convergence test as ``extract``; ``total`` = ‖ΔW‖²)."""
    fits = krylov_fits(*diff.shape, top, n_iter=SPECTRUM_POWER_ITERS)
    if exact or min(diff.shape) <= exact_below or top >= min(diff.shape) or not fits:
        return torch.linalg.svdvals(diff).cpu(), True
    _, s, _ = randomized_svd(diff, top, seed=seed, n_iter=SPECTRUM_POWER_ITERS, tol=ExtractOptions.power_tol,
                             total_energy=total)
    return s.cpu(), False


def spectrum(
    base: str | Path | Checkpoint,
    tuned: str | Path | Checkpoint,
    include: Iterable[str] = (),
    exclude: Iterable[str] = (),
    top: int = 256,
    exact: bool = False,
    exact_below: int = 1024,
    device: str = "auto",
    seed: int = 0,
    progress: Progress | None = None,
) -> dict:
    """Per-layer spectrum of ``tuned − base`` for every changed matrix, without writing anything.

    Each row has σ₁, stable rank ‖ΔW‖²/σ₁² (exact: uses the exact ‖ΔW‖²), entropy effective rank
    exp(H(σ/Σσ)) and the ranks keeping 50/90/99 % of ‖ΔW‖² (from :func:`loratools.stats.spectrum_stats`),
    and ``rank_table``: for r in 4…256 (≤ min(m, n)) the energy kept Σ_{i≤r}σᵢ²/‖ΔW‖² and the LoRA
    parameter count r·(m + n). A randomized top-``top`` spectrum cannot decide quantities beyond
    its last singular value: those are ``None`` (entropy effective rank included).
    """
    if top < 1:
        raise LoraToolsError(f"--top must be ≥ 1, got {top}")
    t0 = time.perf_counter()
    bck = base if isinstance(base, Checkpoint) else Checkpoint(base)
    tck = in_base_layout(bck, tuned if isinstance(tuned, Checkpoint) else Checkpoint(tuned))
    dev = resolve_device(device)
    family = family_of(bck, tck)
    from loratools.moe import base_stream

    pairs, skipped = pair_tensors(bck, tck, include, exclude)
    bstream, tstream = base_stream(bck, tck), TensorStream(tck)
    rows, vectors = [], []

    def work(item: tuple[TensorPair, torch.Tensor, torch.Tensor]) -> list[tuple[str, dict]]:
        pair, w_base, w_tuned = item
        reason, floor = _screen(pair.key, w_base, w_tuned, bstream, tstream)
        if reason:
            return [("skipped", u.describe(reason=reason)) for u in pair.units()]
        whole_diff, whole_norm, whole_total = _pair_diff(pair, w_base, w_tuned, bstream, tstream, dev)
        outs = []
        for unit in pair.units():
            diff, base_norm, total = _unit_diff(unit, whole_diff, whole_norm, whole_total, w_base, dev, w_tuned)
            if unit.kind in ("vector", "other") and total > 0:
                outs.append(("vector", {"name": unit.key, "shape": list(unit.shape),
                                        "relative_norm": math.sqrt(total) / base_norm if base_norm else None}))
            elif total == 0:
                outs.append(("skipped", unit.describe(reason="unchanged (ΔW = 0)")))
            else:
                s, is_exact = layer_spectrum_of_diff(diff.reshape(unit.shape[0], -1), top, exact, exact_below, seed,
                                                     total)
                outs.append(("layer", {**_spectrum_row(unit, s.double(), total, base_norm, is_exact),
                                       **unit_noise(floor, unit.ref.rows if unit.ref is not None else None, total)}))
        return outs

    rule = RankRule("rank", top)
    for outs in parallel_map(pairs, work, [pair_cost(p, rule) for p in pairs], [p.key for p in pairs],
                             feed=lambda mine: read_pairs(mine, bstream, tstream), progress=progress):
        for what, row in outs:
            {"skipped": skipped, "vector": vectors, "layer": rows}[what].append(row)
    return {
        "base": str(bck.path), "tuned": str(tck.path), "layers": rows, "skipped": skipped,
        "changed_vectors": vectors, "table_ranks": list(TABLE_RANKS),
        "summary": {"family": family, "layers": len(rows), "exact_layers": sum(r["exact"] for r in rows),
                    "skipped": len(skipped), "changed_vectors": len(vectors),
                    "wall_time_s": time.perf_counter() - t0},
    }


def _spectrum_row(pair: TensorPair, s: torch.Tensor, total: float, base_norm: float, is_exact: bool) -> dict:
    m, n = pair.shape[0], math.prod(pair.shape[1:])
    st = spectrum_stats(s, total)
    cum = torch.cumsum(s.square(), 0)
    captured = float(cum[-1]) if cum.numel() else 0.0
    energy_rank = {t: (r if is_exact or captured >= float(t) * total * (1 - 1e-9) else None)
                   for t, r in st.energy_rank.items()}
    table = {}
    for r in TABLE_RANKS:
        if r > min(m, n):
            break
        table[str(r)] = {
            "energy": min(float(cum[r - 1]) / total, 1.0) if r <= cum.numel() else None,
            "params": r * (m + n),
        }
    return {
        "name": pair.module, "key": pair.key, "kind": pair.kind, "shape": list(pair.shape),
        "fro_norm": st.fro_norm, "relative_norm": st.fro_norm / base_norm if base_norm > 0 else None,
        "sigma_1": st.spectral_norm, "stable_rank": st.stable_rank,
        "effective_rank": st.effective_rank if is_exact else None,
        "energy_rank": energy_rank, "rank_table": table, "exact": is_exact,
        "captured_energy": min(captured / total, 1.0),
        "singular_values": [float(x) for x in s],
        **({"rows": list(pair.ref.rows)} if pair.ref is not None and pair.ref.rows is not None else {}),
    }
