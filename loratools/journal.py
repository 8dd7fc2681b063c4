"""The resume journal: committed per-unit results of a run, next to its output (``OUT.loratools-journal/``).

Layout: ``meta.json`` (the run's fingerprint: command, arguments, input files' sizes and times) and one record per
committed unit, ``S-IIIIII-DIGEST.pt`` (loop ``S`` of the command, unit ``I``): the unit's name and result,
``torch.save``-d, with the SHA-256 of those bytes in the file name. A record is written to a temporary name,
fsynced, renamed into place and the folder fsynced, so a record either is complete or does not exist; one that
does not match its digest (a torn disk, an edited file) is ignored and its unit recomputed. Large results that are
files of their own (bake's shards, written under :attr:`Journal.files`) are listed in the record with their
digests and checked the same way.

Every rank writes the records of the units it computed (a multi-node run needs the output folder on a shared
filesystem, as it needs it for the output). Records are read with ``torch.load(weights_only=True)``, only
loratools' own result types allowed (:func:`safe_types`): a record planted next to the output runs no code, and one
that does not load is recomputed. The folder is made at the first commit, so a run that fails before any work
leaves nothing behind.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import re
import shutil
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from loratools.errors import LoraToolsError

RECORD = re.compile(r"(\d+)-(\d+)-([0-9a-f]{64})\.pt\Z")
CHUNK = 16 << 20


def file_digest(path: Path) -> str:
    """SHA-256 of a file, read in chunks."""
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        while chunk := fh.read(CHUNK):
            h.update(chunk)
    return h.hexdigest()


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_durable(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` atomically and durably (temp name, fsync, rename, fsync of the folder)."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    with open(tmp, "wb") as fh:
        fh.write(data)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)
    _fsync_dir(path.parent)


class Journal:
    """Committed unit results of one run writing one output (see the module doc)."""

    SUFFIX = ".loratools-journal"

    def __init__(self, path: Path, fingerprint: str) -> None:
        self.path = path
        self.fingerprint = fingerprint
        self.loop = -1  # the command's current loop (parallel_map call), counted by load()

    @classmethod
    def beside(cls, out: str | os.PathLike, fingerprint: str) -> Journal:
        """The journal of output ``out``: ``OUT.loratools-journal`` beside it (``-o DIR/`` too: never inside)."""
        p = Path(os.path.abspath(out))
        return cls(p.with_name(p.name + cls.SUFFIX), fingerprint)

    @property
    def files(self) -> Path:
        """Where units whose results are files write them (bake's shards); made on first use."""
        self._create()
        return self.path / "files"

    def _create(self) -> None:
        meta = self.path / "meta.json"
        if meta.is_file():
            return
        try:
            (self.path / "files").mkdir(parents=True, exist_ok=True)
            write_durable(meta, json.dumps({"fingerprint": self.fingerprint}).encode())
        except OSError as exc:
            raise LoraToolsError(f"{self.path}: cannot create the resume journal: {exc.strerror or exc}") from None

    def open(self, resume: bool) -> None:
        """Create the journal, or with ``resume`` continue an existing one; a stale journal without ``resume`` is an
        error, as is resuming a journal another command or other inputs wrote."""
        meta = self.path / "meta.json"
        if self.path.exists():
            if not resume:
                raise LoraToolsError(
                    f"{self.path}: journal of an interrupted run writing this output; pass --resume to continue it "
                    f"or delete {self.path} to start over"
                )
            if not meta.exists() and not any(RECORD.match(e) for e in os.listdir(self.path)):
                return  # killed before its first record was complete: nothing to continue, nothing wrong
            try:
                old = json.loads(meta.read_text()).get("fingerprint")
            except (OSError, ValueError, AttributeError):
                old = None
            if old != self.fingerprint:
                raise LoraToolsError(
                    f"{self.path}: journal written by another command, other arguments or other input files; "
                    f"--resume cannot continue it (delete {self.path} to start over)"
                )
            return

    def load(self, names: Sequence[str]) -> dict[int, Any]:
        """Start the command's next loop; the results of its units already committed (by index)."""
        self.loop += 1
        done: dict[int, Any] = {}
        try:
            entries = sorted(os.listdir(self.path))
        except OSError:
            return done
        for entry in entries:
            m = RECORD.match(entry)
            if m is None or int(m.group(1)) != self.loop:
                continue
            i, digest = int(m.group(2)), m.group(3)
            data = (self.path / entry).read_bytes()
            if i >= len(names) or hashlib.sha256(data).hexdigest() != digest:
                continue
            try:
                with torch.serialization.safe_globals(safe_types()):
                    record = torch.load(io.BytesIO(data), weights_only=True, map_location="cpu")
            except Exception:  # not a record of ours (or of another version): recompute the unit
                continue
            if not isinstance(record, dict) or record.get("name") != names[i] or not all(
                    (self.files / rel).is_file() and file_digest(self.files / rel) == d
                    for rel, d in record.get("files", {}).items()):
                continue
            done[i] = record["result"]
        return done

    def commit(self, index: int, name: str, result: Any, files: Sequence[str] = ()) -> None:
        """Record ``result`` of unit ``index`` (``files``: paths under :attr:`files` it wrote, digested)."""
        buf = io.BytesIO()
        torch.save({"name": name, "result": result,
                    "files": {rel: file_digest(self.files / rel) for rel in files}}, buf)
        data = buf.getvalue()
        digest = hashlib.sha256(data).hexdigest()
        self._create()
        write_durable(self.path / f"{self.loop}-{index:06d}-{digest}.pt", data)

    def remove(self) -> None:
        shutil.rmtree(self.path, ignore_errors=True)


def safe_types() -> list:
    """The classes a unit result may hold (loaded with ``weights_only=True``): loratools' layers, pairs and rows."""
    from loratools import adapter, checkpoint, extract, layers, merge, resize

    return [adapter.LoraLayer, adapter.FullLayer, layers.TuckerLoraLayer, layers.LohaLayer, layers.LokrLayer,
            checkpoint.ModuleRef, extract.TensorPair, resize.LayerResize, merge.LayerMerge]
