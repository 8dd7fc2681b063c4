"""Data-parallel runs under ``torchrun``: one shared helper for every command's per-layer loop.

``torchrun --nproc-per-node N [--nnodes M …] -m loratools extract …`` starts N·M copies of the command. Each one
finds its place in the world from the environment torchrun sets (``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``) and joins a
``torch.distributed`` process group (gloo for CPU work, plus NCCL when CUDA is present); a plain single process is a
world of one with no process group at all, and runs exactly the code it ran before.

:func:`parallel_map` is the loop every command uses: the work units (layer pairs, adapter layers, weight files) get
a cost (m·n·k, bytes), a deterministic greedy longest-processing-time assignment over their stable order gives each
rank a disjoint, balanced share, each rank runs ``work`` on its share only (reading only its tensors), and the
results are gathered back into the units' order on every rank. Work units are pure functions of their input (the
randomized SVD seeds a fresh generator per layer with the same seed), so the gathered list — and the file rank 0
writes from it — is byte-identical to a single-process run.

Failure: a rank whose ``work`` raises still takes part in the gather, carrying its one-line error instead of
results, so every rank learns of it at the same point and raises it (rank 0 prints it; the others stay quiet); a
rank that dies outright (SIGKILL, OOM) makes torchrun stop the others. Either way the atomic writers leave no output.

Resume: while a :class:`Session` is open (the CLI opens one per command, see :func:`session`) each committed unit
result goes into a :class:`~loratools.journal.Journal` next to the output; a restarted run with ``--resume`` loads
them instead of recomputing them.

Test hooks (environment): ``LORATOOLS_TEST_FAIL_RANK=R`` makes rank R raise on its first unit;
``LORATOOLS_TEST_PAUSE_AFTER=N`` makes every rank stop (sleep) after committing N units, printing its pid, so a test
can kill it mid-run.
"""

from __future__ import annotations

import atexit
import datetime
import os
import sys
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, TypeVar

import torch

from loratools.errors import LoraToolsError
from loratools.journal import Journal

T = TypeVar("T")
R = TypeVar("R")

FAIL_HOOK = "LORATOOLS_TEST_FAIL_RANK"
PAUSE_HOOK = "LORATOOLS_TEST_PAUSE_AFTER"
#: how long a rank waits in a collective for the others (a gather waits for the slowest rank's whole share)
TIMEOUT_ENV = "LORATOOLS_DIST_TIMEOUT_S"
DEFAULT_TIMEOUT_S = 24 * 3600


class PeerLost(LoraToolsError):
    """A collective failed: another rank died (its launcher stops this one too). The journal is kept."""


class RelayedError(LoraToolsError):
    """Another rank's failure, raised on every rank; only rank 0 prints it (the CLI checks :attr:`quiet`)."""

    def __init__(self, message: str, quiet: bool) -> None:
        super().__init__(message)
        self.quiet = quiet


@dataclass
class World:
    """This process's place among the ranks of a run (a single process: rank 0 of 1, no process group)."""

    rank: int = 0
    size: int = 1
    local_rank: int = 0
    group: Any = None  # gloo group for the object collectives (results, errors)

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def all_gather(self, obj: Any) -> list[Any]:
        """Every rank's ``obj``, in rank order (pickled over gloo)."""
        if self.size == 1:
            return [obj]
        import torch.distributed as dist

        out: list[Any] = [None] * self.size
        try:
            dist.all_gather_object(out, obj, group=self.group)
        except RuntimeError as exc:
            raise PeerLost(f"rank {self.rank}: lost contact with the other ranks ({str(exc).splitlines()[0]}); "
                           "rerun with --resume") from None
        return out

    def from_main(self, fn: Callable[[], T]) -> T:
        """``fn()`` run on rank 0 only, its value (or its error) handed to every rank."""
        if self.size == 1:
            return fn()
        import torch.distributed as dist

        value, error = None, None
        if self.is_main:
            try:
                value = fn()
            except LoraToolsError as exc:
                error = exc
        box = [(value, str(error) if error else None)]
        try:
            dist.broadcast_object_list(box, src=0, group=self.group)
        except RuntimeError as exc:
            raise PeerLost(f"rank {self.rank}: lost contact with rank 0 ({str(exc).splitlines()[0]})") from None
        if error is not None:
            raise error
        if box[0][1] is not None:
            raise RelayedError(box[0][1], quiet=True)
        return box[0][0]


_WORLD: World | None = None


def world() -> World:
    """The world of this process, joined on first use (``WORLD_SIZE`` > 1: torchrun started it)."""
    global _WORLD
    if _WORLD is None:
        size = int(os.environ.get("WORLD_SIZE", "1") or 1)
        if size <= 1:
            _WORLD = World()
        else:
            _WORLD = _join(size)
    return _WORLD


def _join(size: int) -> World:
    import torch.distributed as dist

    local = int(os.environ.get("LOCAL_RANK", "0"))
    timeout = datetime.timedelta(seconds=float(os.environ.get(TIMEOUT_ENV, DEFAULT_TIMEOUT_S)))
    if not dist.is_initialized():
        backend = "cpu:gloo,cuda:nccl" if torch.cuda.is_available() else "gloo"
        if torch.cuda.is_available():
            torch.cuda.set_device(local % torch.cuda.device_count())
        dist.init_process_group(backend=backend, timeout=timeout)
        atexit.register(_leave)
    group = dist.new_group(backend="gloo", timeout=timeout) if torch.cuda.is_available() else None
    return World(rank=dist.get_rank(), size=dist.get_world_size(), local_rank=local, group=group)


def _leave() -> None:
    import torch.distributed as dist

    if dist.is_initialized():
        dist.destroy_process_group()


def device_name(device: str) -> str:
    """``cuda`` under torchrun → ``cuda:LOCAL_RANK`` (each rank its own GPU); anything else unchanged."""
    w = world()
    if device == "cuda" and w.size > 1 and torch.cuda.is_available():
        return f"cuda:{w.local_rank % torch.cuda.device_count()}"
    return device


def balance(costs: Sequence[float], size: int) -> list[int]:
    """Owner rank of each unit: greedy longest-processing-time over the units by decreasing cost (ties: earlier
    unit first), each to the least-loaded rank (ties: lower rank). Deterministic, so every rank computes the same."""
    loads = [0.0] * size
    owner = [0] * len(costs)
    for i in sorted(range(len(costs)), key=lambda i: (-float(costs[i]), i)):
        r = min(range(size), key=lambda r: (loads[r], r))
        owner[i] = r
        loads[r] += float(costs[i])
    return owner


@dataclass
class RankShare:
    rank: int
    layers: int
    seconds: float


@dataclass
class Session:
    """One command's run: its journal (when it has an output) and how the work was split."""

    journal: Journal | None = None
    shares: dict[int, RankShare] = field(default_factory=dict)

    def report(self) -> dict:
        """``{"world_size": N, "per_rank": [{"rank", "layers", "seconds"}, …]}`` (summed over the run's loops)."""
        w = world()
        per = [self.shares.get(r, RankShare(r, 0, 0.0)) for r in range(w.size)]
        return {"world_size": w.size, "per_rank": [{"rank": s.rank, "layers": s.layers, "seconds": s.seconds}
                                                   for s in per]}


_SESSION: Session | None = None


def current() -> Session:
    """The open session (a bare one when none is open: library use without the CLI)."""
    global _SESSION
    if _SESSION is None:
        _SESSION = Session()
    return _SESSION


@contextmanager
def session(out: str | os.PathLike | None, resume: bool, fingerprint: str) -> Iterator[Session]:
    """Open a run writing ``out``: its journal (``OUT.loratools-journal``) is checked (a stale one needs
    ``resume``), created, and removed once the block ends without error. A failure of the input or the work (a
    :class:`LoraToolsError`) removes it too — rerunning would fail the same way — but a kill, SIGTERM, Ctrl-C, a lost
    rank or an unexpected error (disk full, a bug) leaves it for ``--resume``."""
    global _SESSION
    w = world()
    journal = None
    if out is not None:
        journal = Journal.beside(out, fingerprint)
        w.from_main(lambda: journal.open(resume))
    previous, _SESSION = _SESSION, Session(journal=journal)
    try:
        yield _SESSION
    except LoraToolsError as exc:
        if journal is not None and w.is_main and not isinstance(exc, PeerLost):
            journal.remove()
        raise
    else:
        if journal is not None and w.is_main:
            journal.remove()
    finally:
        _SESSION = previous


def parallel_map(
    units: Sequence[T],
    work: Callable[[Any], R],
    costs: Sequence[float],
    names: Sequence[str],
    feed: Callable[[list[T]], Iterable[Any]] | None = None,
    progress: Callable[[Iterable, int], Iterable] | None = None,
    files_of: Callable[[Any], Sequence[str]] | None = None,
    serial: bool = False,
) -> list[R]:
    """``[work(u) for u in units]``, split across the ranks of the world (see the module doc).

    ``costs`` balance the shares; ``names`` identify the units in the journal. ``feed`` turns a rank's share into
    the arguments ``work`` gets, one per unit in order (a reader that prefetches the next tensors); default: the
    units themselves. ``progress`` wraps rank 0's share. Results must be picklable (torch tensors included).
    """
    w, run = world(), current()
    journal = None if serial else run.journal
    done: dict[int, Any] = journal.load(names) if journal is not None else {}
    if w.size > 1:  # every rank read the journal before any writes to it; units all of them saw are done
        agreed = set.intersection(*(set(d) for d in w.all_gather(sorted(done))))
        done = {i: r for i, r in done.items() if i in agreed}
    todo = [i for i in range(len(units)) if i not in done]
    owner = [0] * len(todo) if serial else balance([costs[i] for i in todo], w.size)
    mine = [i for i, o in zip(todo, owner) if o == w.rank]
    results: dict[int, Any] = {}
    t0 = time.perf_counter()
    error: str | None = None
    try:
        items: Iterable[Any] = feed([units[i] for i in mine]) if feed is not None else (units[i] for i in mine)
        if progress is not None and w.is_main:
            items = progress(items, len(mine))
        for i, item in zip(mine, items):
            _fail_hook(w, names[i])
            results[i] = work(item)
            if journal is not None:
                journal.commit(i, names[i], results[i], files_of(results[i]) if files_of else ())
            _pause_hook(w, len(results))
    except Exception as exc:
        if w.size == 1:
            raise
        error = str(exc).replace("\n", " ") if isinstance(exc, LoraToolsError | OSError) else (
            f"unexpected {type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}")
    seconds = time.perf_counter() - t0
    gathered = w.all_gather((w.rank, error, results if error is None else {}, len(mine), seconds))
    for rank, err, _, _, _ in gathered:
        if err is not None:
            raise RelayedError(f"rank {rank}: {err}" if w.size > 1 else err, quiet=not w.is_main)
    merged = dict(done)
    for rank, _, res, n, sec in gathered:
        merged.update(res)
        prev = run.shares.get(rank, RankShare(rank, 0, 0.0))
        run.shares[rank] = RankShare(rank, prev.layers + n, prev.seconds + sec)
    return [merged[i] for i in range(len(units))]


def _fail_hook(w: World, name: str) -> None:
    target = os.environ.get(FAIL_HOOK)
    if target is not None and target.strip() == str(w.rank):
        raise LoraToolsError(f"test hook {FAIL_HOOK}: rank {w.rank} failed on {name}")


def _pause_hook(w: World, committed: int) -> None:
    after = os.environ.get(PAUSE_HOOK)
    if after is not None and committed == int(after):
        print(f"loratools test hook: rank {w.rank} pid {os.getpid()} paused after {committed} units",
              file=sys.stderr, flush=True)
        while True:
            time.sleep(3600)
