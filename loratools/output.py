"""Safe outputs: which paths a run may write, and the atomic, no-surprise write itself.

Rules (README "Outputs"):

* No input byte is ever changed, ``--force`` or not: an output that is an input (by path, through a
  symbolic link, or as a hard link to the same file), that is a folder holding an input, or that lies
  inside an input folder is refused. The current folder (or one holding it) is never an output.
* An existing output is replaced only with ``--force``, and only if it is of the kind loratools writes:
  a regular file for a file output; for a folder output, an empty folder or a flat adapter/checkpoint
  folder (regular files only, each with a suffix loratools or a Hugging Face checkpoint uses, at least
  one of them weights). Anything else (links, other folders, a file where a folder goes) is refused.
* The write goes to a hidden sibling temp named ``.{name}.loratools-{host}-{pid}-XXXX.tmp`` and is
  renamed onto the output at the end. Without ``--force`` that rename never replaces an output that
  appeared meanwhile (``renameat2(RENAME_NOREPLACE)``, else link/mkdir); with ``--force`` what is there
  is re-checked just before it is replaced. Temps of ours whose process is dead are swept on the next
  write next to the same output. Missing parent folders are created, as ``save_pretrained`` does.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import os
import re
import shutil
import socket
import sys
import tempfile
from collections.abc import Iterable, Iterator
from pathlib import Path

from loratools.errors import LoraToolsError

#: file suffixes a replaceable folder output may hold (adapter, checkpoint, tokenizer and card files)
FOLDER_SUFFIXES = frozenset({".safetensors", ".bin", ".pt", ".pth", ".ckpt", ".msgpack", ".h5", ".json", ".md",
                             ".txt", ".model", ".jinja", ".tiktoken"})
#: suffixes of weight files: a non-empty folder is "ours" only if it holds at least one
WEIGHT_SUFFIXES = frozenset({".safetensors", ".bin", ".pt", ".pth", ".ckpt"})
FORCE_RULE = ("--force replaces only a file, an empty folder or an adapter/checkpoint folder; "
              "remove it yourself or choose another -o")

_AT_FDCWD = -100
_RENAME_NOREPLACE = 1
_RENAME_EXCHANGE = 2


def _load_renameat2():
    if not sys.platform.startswith("linux"):
        return None
    try:
        fn = ctypes.CDLL(None, use_errno=True).renameat2
    except (OSError, AttributeError):
        return None
    fn.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    fn.restype = ctypes.c_int
    return fn


#: Linux renameat2, or None (other systems, old libc): then the portable fallbacks are used
_RENAMEAT2 = _load_renameat2()


def _host() -> str:
    return re.sub(r"[^A-Za-z0-9]", "", socket.gethostname())[:24] or "host"


def _temp_prefix(name: str) -> str:
    return f".{name}.loratools-{_host()}-{os.getpid()}-"


def _lexists(p: Path) -> bool:
    return os.path.lexists(p)


def check_output(out: str | os.PathLike, force: bool, inputs: Iterable[str | os.PathLike | None] = (),
                 is_dir: bool | None = None, known_names: Iterable[str] = ()) -> Path:
    """Refuse an output that would touch an input, or replace what it may not (checked before any work).

    ``is_dir`` is whether the output is a folder (None: not known yet); ``known_names`` are extra paths, relative
    to the output folder, that a replaceable folder output may hold (``bake`` copies the base folder's tree).
    """
    p = Path(out)
    try:
        target = p.resolve()
        cwd = Path.cwd().resolve()
        if target == cwd or target in cwd.parents:
            raise LoraToolsError(f"{p}: output is the current folder or holds it; choose another -o")
        _check_inputs(p, target, [i for i in inputs if i is not None])
        _check_parent(p)
        if _lexists(p):
            if not force:
                raise LoraToolsError(f"{p}: output already exists (use --force to replace it)")
            _check_replaceable(p, is_dir, known_names)
    except OSError as exc:  # an unreadable folder on the way, a link loop
        raise LoraToolsError(f"{exc.filename or p}: {exc.strerror or exc}") from None
    return p


def _input_paths(inp: Path) -> Iterator[Path]:
    """The real paths an input consists of: itself, and everything under it with links resolved."""
    yield inp.resolve()
    if not inp.is_dir():
        return
    for root, dirs, files in os.walk(inp):
        for name in dirs + files:
            entry = Path(root, name)
            if entry.is_symlink():
                yield entry.resolve()


def _file_ids(inp: Path) -> set[tuple[int, int]]:
    paths = [inp] if not inp.is_dir() else [Path(r, f) for r, _, fs in os.walk(inp, followlinks=False) for f in fs]
    ids = set()
    for f in paths:
        with contextlib.suppress(OSError):
            st = os.stat(f)
            ids.add((st.st_dev, st.st_ino))
    return ids


def _check_inputs(p: Path, target: Path, inputs: list[str | os.PathLike]) -> None:
    never = "inputs are never overwritten, choose another -o"
    out_id = None
    if target.is_file():
        st = os.stat(target)
        out_id = (st.st_dev, st.st_ino)
    for inp in inputs:
        src = Path(inp)
        if not _lexists(src):
            continue  # the reader reports it
        for real in _input_paths(src):
            if target == real:
                raise LoraToolsError(f"{p}: output is the input {inp}; {never}")
            if target in real.parents:
                raise LoraToolsError(f"{p}: output holds the input {inp}, replacing it would delete it; {never}")
            if real.is_dir() and real in target.parents:
                raise LoraToolsError(f"{p}: output is inside the input folder {inp}; {never}")
        if out_id is not None and out_id in _file_ids(src):
            raise LoraToolsError(f"{p}: output is the input {inp} (the same file, a hard link); {never}")


def _check_parent(p: Path) -> None:
    """The nearest existing ancestor of the output must be a folder (missing ones are created later)."""
    for anc in Path(os.path.abspath(p)).parents:
        if _lexists(anc):
            if not anc.is_dir():
                raise LoraToolsError(f"{anc}: not a folder, cannot hold the output {p}")
            return


def _check_replaceable(p: Path, is_dir: bool | None, known_names: Iterable[str] = ()) -> None:
    """``p`` exists: refuse unless ``--force`` may replace it (see the module doc)."""
    if p.is_symlink():
        raise LoraToolsError(f"{p}: is a symbolic link; {FORCE_RULE}")
    if p.is_file():
        if is_dir:
            raise LoraToolsError(f"{p}: is a file but the output is a folder; {FORCE_RULE}")
        return
    if not p.is_dir():
        raise LoraToolsError(f"{p}: is not a regular file or folder; {FORCE_RULE}")
    if is_dir is False:
        raise LoraToolsError(f"{p}: is a folder but the output is a file; {FORCE_RULE}")
    reason = _not_ours(p, set(known_names))
    if reason:
        raise LoraToolsError(f"{p}: folder {reason}; {FORCE_RULE}")


def _not_ours(folder: Path, known: set[str]) -> str | None:
    """Why ``folder`` is not an empty or adapter/checkpoint folder; None if it is one. Subfolders are accepted
    only under a ``known`` name (a pipeline folder's components) and holding such files themselves."""
    reason, weights, entries = _scan(folder, known)
    if reason:
        return reason
    if entries and not weights:
        return "holds no adapter or model weights"
    return None


def _scan(folder: Path, known: set[str], under: str = "") -> tuple[str | None, bool, bool]:
    """(why not ours or None, whether weights were seen, whether anything was there) of ``folder``'s tree;
    ``known`` holds paths relative to the output folder (``unet``, ``unet/config.json``), ``under`` is where
    ``folder`` is in it."""
    try:
        entries = sorted(os.scandir(folder), key=lambda e: e.name)
    except OSError as exc:
        return f"cannot be listed ({exc.strerror})", False, True
    weights = False
    for e in entries:
        if e.is_symlink():
            return f"holds the link {e.name}", weights, True
        rel = under + e.name
        if e.is_dir():
            if rel not in known:
                return f"holds the subfolder {rel}", weights, True
            reason, sub_weights, _ = _scan(Path(e.path), known, rel + "/")
            if reason:
                return reason, weights, True
            weights = weights or sub_weights
            continue
        suffix = Path(e.name).suffix
        if not e.is_file() or (rel not in known and suffix not in FOLDER_SUFFIXES):
            return f"holds {rel}, which is not an adapter or checkpoint file", weights, True
        weights = weights or suffix in WEIGHT_SUFFIXES
    return None, weights, bool(entries)


def _make_parents(parent: Path) -> list[Path]:
    """Create the missing folders above the output; returns those created (deepest last)."""
    missing = []
    for d in [parent, *parent.parents]:
        if _lexists(d):
            break
        missing.append(d)
    created = []
    for d in reversed(missing):
        try:
            d.mkdir()
        except FileExistsError:
            if not d.is_dir():
                _remove_created(created)
                raise LoraToolsError(f"{d}: not a folder, cannot hold the output") from None
            continue
        except OSError as exc:
            _remove_created(created)
            raise LoraToolsError(f"{d}: cannot create the output folder: {exc.strerror or exc}") from None
        created.append(d)
    return created


def _remove_created(created: list[Path]) -> None:
    for d in reversed(created):
        with contextlib.suppress(OSError):
            d.rmdir()


def _pid_alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:
        return True  # exists, owned by someone else
    return True


def sweep_stale_temps(parent: Path, name: str) -> list[Path]:
    """Remove temps of ours for output ``name`` in ``parent`` whose process (on this host) is gone."""
    if os.name != "posix":  # os.kill(pid, 0) is no liveness probe elsewhere
        return []
    pattern = re.compile(rf"\.{re.escape(name)}\.loratools-{re.escape(_host())}-(\d+)-[a-z0-9_]+\.tmp\Z")
    removed = []
    try:
        entries = list(os.scandir(parent))
    except OSError:
        return []
    for e in entries:
        m = pattern.match(e.name)
        if m is None or _pid_alive(int(m.group(1))):
            continue
        path = Path(e.path)
        with contextlib.suppress(OSError):
            if e.is_dir(follow_symlinks=False):
                shutil.rmtree(path)
            else:
                path.unlink()
            removed.append(path)
    return removed


@contextlib.contextmanager
def atomic_path(out: str | os.PathLike, force: bool, is_dir: bool, known_names: Iterable[str] = ()) -> Iterator[Path]:
    """Yield a temporary sibling path; on success rename it onto ``out`` (see the module doc).

    On any error (or SIGINT/SIGTERM) the temporary file or folder, and any parent folder this call
    created, are removed and ``out`` is left as it was. OS errors become one-line LoraToolsErrors.
    """
    out = Path(out)
    known = list(known_names)
    check_output(out, force, is_dir=is_dir, known_names=known)
    full = Path(os.path.abspath(out))
    created = _make_parents(full.parent)
    sweep_stale_temps(full.parent, full.name)
    tmp: Path | None = None
    try:
        if is_dir:
            tmp = Path(tempfile.mkdtemp(prefix=_temp_prefix(full.name), suffix=".tmp", dir=full.parent))
        else:
            fd, name = tempfile.mkstemp(prefix=_temp_prefix(full.name), suffix=".tmp", dir=full.parent)
            os.close(fd)
            tmp = Path(name)
        yield tmp
        _umask_perms(tmp, is_dir)
        _commit(tmp, out, force, is_dir, known)
    except BaseException as exc:
        if tmp is not None:
            _remove(tmp)
        _remove_created(created)
        if isinstance(exc, OSError):
            raise _write_error(exc, out, tmp) from None
        raise


def _write_error(exc: OSError, out: Path, tmp: Path | None) -> LoraToolsError:
    reason = exc.strerror or str(exc) or type(exc).__name__
    name = exc.filename
    if name is not None and tmp is not None and not str(name).startswith(str(tmp)) and Path(name) != out:
        return LoraToolsError(f"{name}: {reason}")  # an input that failed to read mid-write
    return LoraToolsError(f"{out}: cannot write: {reason}; nothing was written")


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        with contextlib.suppress(OSError):
            path.unlink()


def _commit(tmp: Path, out: Path, force: bool, is_dir: bool, known: list[str]) -> None:
    """Move the finished temp onto ``out``: never over what appeared meanwhile without --force; with
    --force only over what is (still) replaceable."""
    appeared = LoraToolsError(f"{out}: output appeared while this run was writing; nothing was replaced "
                              "(use --force to replace it)")
    if not _lexists(out):
        try:
            rename_noreplace(tmp, out)
        except FileExistsError:
            raise appeared from None
        return
    if not force:
        raise appeared
    _check_replaceable(out, is_dir, known)
    if not is_dir:
        os.replace(tmp, out)
        return
    if _exchange(tmp, out):  # the old folder now sits at tmp
        shutil.rmtree(tmp, ignore_errors=True)
        return
    trash = Path(tempfile.mkdtemp(prefix=_temp_prefix(out.name), suffix=".tmp", dir=out.parent)) / "old"
    os.rename(out, trash)
    try:
        rename_noreplace(tmp, out)
    except BaseException:
        os.rename(trash, out)
        raise
    finally:
        shutil.rmtree(trash.parent, ignore_errors=True)


def _renameat2(src: Path, dst: Path, flags: int) -> bool:
    """True if done; False if renameat2 (or this flag on this filesystem) is unavailable; raises OSError."""
    if _RENAMEAT2 is None:
        return False
    if _RENAMEAT2(_AT_FDCWD, os.fsencode(src), _AT_FDCWD, os.fsencode(dst), flags) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP, errno.ENOTSUP):
        return False
    if err in (errno.EEXIST, errno.ENOTEMPTY):
        raise FileExistsError(err, os.strerror(err), str(dst))
    raise OSError(err, os.strerror(err), str(dst))


def _exchange(a: Path, b: Path) -> bool:
    return _renameat2(a, b, _RENAME_EXCHANGE)


def rename_noreplace(src: Path, dst: Path) -> None:
    """Rename ``src`` to ``dst``, raising FileExistsError if ``dst`` exists (even if it appears meanwhile)."""
    if _renameat2(src, dst, _RENAME_NOREPLACE):
        return
    if src.is_dir():
        os.mkdir(dst)  # claims the name; FileExistsError if taken
        try:
            os.rename(src, dst)  # replaces only our own empty folder
        except OSError:
            with contextlib.suppress(OSError):
                os.rmdir(dst)
            raise
        return
    try:
        os.link(src, dst)
    except FileExistsError:
        raise
    except OSError:  # no hard links on this filesystem: best effort
        if _lexists(dst):
            raise FileExistsError(errno.EEXIST, os.strerror(errno.EEXIST), str(dst)) from None
        os.rename(src, dst)
        return
    os.unlink(src)


def _umask_perms(path: Path, is_dir: bool) -> None:
    """mkstemp/mkdtemp create private (0600/0700) entries; give outputs the usual umask permissions."""
    mask = os.umask(0)
    os.umask(mask)
    os.chmod(path, (0o777 if is_dir else 0o666) & ~mask)
    if is_dir:
        for child in path.rglob("*"):
            os.chmod(child, (0o777 if child.is_dir() else 0o666) & ~mask)
