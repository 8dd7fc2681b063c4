"""Shared I/O helpers for adapter formats: reading tensor files, atomic writes, name mangling."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

import torch
from safetensors.torch import save_file

from loratools.checkpoint import open_safetensors, safe_load_pickle
from loratools.errors import LoraToolsError

#: kohya prefix → diffusers pipeline component
KOHYA_PREFIXES = {
    "lora_unet_": "unet",
    "lora_te_": "text_encoder",
    "lora_te1_": "text_encoder",
    "lora_te2_": "text_encoder_2",
    "lora_te3_": "text_encoder_3",
    "lora_transformer_": "transformer",
}
COMPONENT_PREFIX = {"unet": "lora_unet_", "text_encoder": "lora_te_", "text_encoder_2": "lora_te2_",
                    "text_encoder_3": "lora_te3_", "transformer": "lora_transformer_"}
#: safetensors metadata key under which a kohya file keeps the PEFT config it was converted from
PEFT_CONFIG_KEY = "loratools.peft_config"
COMPONENTS = ("unet", "text_encoder", "text_encoder_2", "text_encoder_3", "transformer")


def read_tensors(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """All tensors and header metadata of an adapter file (.safetensors, or .bin/.pt safely)."""
    if path.suffix == ".safetensors":
        f = open_safetensors(path)
        out = {}
        for k in f.keys():
            try:
                out[k] = f.get_tensor(k)
            except Exception as exc:
                raise LoraToolsError(f"{path}: cannot read tensor {k!r} (file truncated or corrupt: {exc})") from None
        return out, dict(f.metadata() or {})
    return safe_load_pickle(path), {}


def mangle(path: str) -> str:
    """kohya's module-name mangling: dots become underscores."""
    return path.replace(".", "_")


def guess_component(name: str) -> str:
    """Pipeline component of a module path that carries none (used to pick a kohya prefix)."""
    head = name.split(".", 1)[0]
    if head in COMPONENTS:
        return head
    return "unet"


def split_component(name: str) -> tuple[str | None, str]:
    head, _, rest = name.partition(".")
    if head in COMPONENTS and rest:
        return head, rest
    return None, name


def check_output(out: str | os.PathLike, force: bool) -> Path:
    """Refuse to replace an existing output without ``--force`` (checked before any work)."""
    p = Path(out)
    if p.exists() and not force:
        raise LoraToolsError(f"{p}: output already exists (use --force to replace it)")
    if not p.parent.exists():
        raise LoraToolsError(f"{p.parent}: output folder does not exist")
    return p


@contextlib.contextmanager
def atomic_path(out: Path, force: bool, is_dir: bool) -> Iterator[Path]:
    """Yield a temporary sibling path; on success rename it onto ``out`` (replacing it with force).

    On any error the temporary file or folder is removed and ``out`` is left as it was.
    """
    check_output(out, force)
    parent = out.parent
    if is_dir:
        tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".tmp", dir=parent))
    else:
        fd, name = tempfile.mkstemp(prefix=f".{out.name}.", suffix=".tmp", dir=parent)
        os.close(fd)
        tmp = Path(name)
    try:
        yield tmp
        if out.exists():
            if out.is_dir() and not out.is_symlink():
                trash = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".old", dir=parent))
                os.replace(out, trash / "old")
                os.replace(tmp, out)
                shutil.rmtree(trash, ignore_errors=True)
                return
            if is_dir:
                out.unlink()
        os.replace(tmp, out)
    except BaseException:
        if tmp.is_dir():
            shutil.rmtree(tmp, ignore_errors=True)
        else:
            tmp.unlink(missing_ok=True)
        raise


def save_safetensors(tensors: dict[str, torch.Tensor], path: Path, metadata: dict[str, str]) -> None:
    """Write tensors (contiguous, no shared storage) with string metadata."""
    clean = {k: v.detach().contiguous().clone() if _shares(v) else v.detach().contiguous() for k, v in tensors.items()}
    save_file(clean, str(path), metadata={str(k): str(v) for k, v in metadata.items()})


def _shares(t: torch.Tensor) -> bool:
    return t.untyped_storage().nbytes() != t.numel() * t.element_size()


def json_dumps(obj) -> str:
    return json.dumps(obj, indent=2, sort_keys=True)
