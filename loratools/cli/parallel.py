"""``--resume`` and the torchrun session of the commands that run data-parallel (see :mod:`loratools.distributed`)."""

from __future__ import annotations

import functools
import hashlib
import json
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import click

#: parameters that do not change what a run computes or writes
NEUTRAL = ("resume", "quiet", "as_json", "force", "plot")


def _paths(value: Any) -> Iterator[Path]:
    """Existing paths a parameter value names (``PATH`` or ``PATH:WEIGHT``; tuples of them)."""
    for v in value if isinstance(value, list | tuple) else (value,):
        if isinstance(v, str):
            for cand in (v, v.rpartition(":")[0]):
                if cand and Path(cand).exists():
                    yield Path(cand)
                    break


def fingerprint(ctx: click.Context, out_param: str | None) -> str:
    """The command, its arguments and its input files' sizes and modification times, hashed."""
    params = {k: v for k, v in ctx.params.items() if k not in NEUTRAL}
    inputs = []
    for k, v in sorted(params.items()):
        if k == out_param:
            continue
        for p in _paths(v):
            files = sorted(f for f in p.rglob("*") if f.is_file()) if p.is_dir() else [p]
            inputs += [(str(f), f.stat().st_size, f.stat().st_mtime_ns) for f in files]
    doc = {"command": ctx.command.name, "params": params, "inputs": inputs}
    return hashlib.sha256(json.dumps(doc, sort_keys=True, default=str).encode()).hexdigest()


def data_parallel(out_param: str | None) -> Callable:
    """Run the command in a :func:`loratools.distributed.session` (journal next to its output ``out_param``, with a
    ``--resume`` flag; None: no output, no journal). Goes right under ``handle_errors``."""

    def deco(fn: Callable) -> Callable:
        @functools.wraps(fn)
        def wrapper(*args: Any, **kwargs: Any) -> Any:
            from loratools.distributed import session

            resume = bool(kwargs.pop("resume", False))
            ctx = click.get_current_context()
            out = kwargs.get(out_param) if out_param else None
            with session(out, resume, fingerprint(ctx, out_param)):
                return fn(*args, **kwargs)

        if out_param is None:
            return wrapper
        return click.option(
            "--resume", is_flag=True,
            help="Continue an interrupted run: reuse the layers its journal (OUT.loratools-journal) committed.")(wrapper)

    return deco


def worker_done() -> bool:
    """True on a rank other than 0 of a torchrun world once the library call returned: rank 0 writes and reports."""
    from loratools.distributed import world

    return not world().is_main


def distributed_report() -> dict:
    """``{"world_size", "per_rank": [...]}`` of the current run, for ``--json``."""
    from loratools.distributed import current

    return current().report()
