"""Shared CLI plumbing: the group, error handling, shared options, progress and rendering.

Nothing here imports torch or the numeric library at module level: ``loratools --help`` (and
``loratools CMD --help``) must stay fast, so commands import what they need when they run.
"""

from __future__ import annotations

import errno
import functools
import json
import math
import os
import signal
import sys
from collections.abc import Callable, Iterable, Iterator
from typing import TYPE_CHECKING, Any, NoReturn, TypeVar

import click

from loratools import __version__
from loratools.errors import LoraToolsError

if TYPE_CHECKING:
    import torch

    from loratools.linalg import RankRule

T = TypeVar("T")

# Choices shown in --help; kept equal to the library's tuples by tests/test_cli_ux.py (importing the
# library here would import torch for every --help).
FORMATS = ("peft", "kohya", "diffusers", "comfy", "gguf")  # loratools.formats.FORMATS
MERGE_METHODS = ("svd", "cat", "linear", "ties", "dare_linear", "dare_ties", "magnitude_prune", "ties_svd",
                 "dare_linear_svd", "dare_ties_svd", "magnitude_prune_svd")  # loratools.merge.METHODS
COMPONENTS = ("unet", "text_encoder", "text_encoder_2", "text_encoder_3", "transformer")  # formats.common.COMPONENTS
FAMILIES = ("sd15", "sd2", "sdxl", "sdxl_refiner", "flux_dev", "flux_schnell", "sd3", "sd35_medium", "sd35_large",
            "wan21", "wan22", "qwen_image", "hunyuan_video")  # loratools.families.FAMILIES
FAMILY_ALIASES = ("flux", "sd3.5", "sd35", "wan", "qwen", "qwen-image", "hunyuan", "hunyuan-video")  # loratools.families.ALIASES

DTYPES = {
    "fp32": "float32", "float32": "float32", "fp16": "float16", "float16": "float16", "half": "float16",
    "bf16": "bfloat16", "bfloat16": "bfloat16", "fp64": "float64", "float64": "float64",
}


class Terminated(SystemExit):
    """Raised by the SIGTERM handler: unwinds like Ctrl-C, so atomic writers remove their temp outputs."""

    def __init__(self) -> None:
        super().__init__(128 + signal.SIGTERM)


def _on_sigterm(signum: int, frame: Any) -> None:
    signal.signal(signal.SIGTERM, signal.SIG_IGN)  # a second TERM must not cut the cleanup short
    raise Terminated()


def _wants_json(argv: Any) -> bool:
    """True when ``--json`` is among the raw arguments (before a ``--`` separator)."""
    if not isinstance(argv, list | tuple):
        return False
    args = list(argv)
    return "--json" in (args[:args.index("--")] if "--" in args else args)


class OneLineErrors(click.Group):
    """A group whose usage errors (unknown flag, bad choice, missing argument) are one ``error:`` line, exit 2.

    SIGTERM (``timeout``, schedulers, ``docker stop``) is handled like SIGINT: temp outputs are removed,
    one ``error:`` line, exit 143.
    """

    def main(self, *args: Any, **kwargs: Any) -> Any:
        try:
            previous = signal.signal(signal.SIGTERM, _on_sigterm)
        except ValueError:  # not the main thread: leave signals alone
            previous = None
        try:
            return self._main(*args, **kwargs)
        except Terminated as exc:
            click.echo("error: terminated; nothing was written", err=True)
            sys.exit(exc.code)
        finally:
            if previous is not None:
                signal.signal(signal.SIGTERM, previous)

    def _main(self, *args: Any, **kwargs: Any) -> Any:
        kwargs["standalone_mode"] = False
        as_json = _wants_json(kwargs["args"] if "args" in kwargs else (args[0] if args else sys.argv[1:]))
        try:
            rv = super().main(*args, **kwargs)
        except click.exceptions.NoArgsIsHelpError as exc:
            exc.show()
            sys.exit(2)
        except click.ClickException as exc:
            fail(click_message(exc), exc.exit_code, as_json)
        except click.Abort:
            fail("aborted; nothing was written", 1, as_json)
        flush_stdout()
        sys.exit(rv if isinstance(rv, int) else 0)


@click.group(cls=OneLineErrors, context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 110})
@click.version_option(__version__, prog_name="loratools")
def main() -> None:
    """Extract, resize, merge, convert and inspect LoRA adapters (PEFT, kohya, diffusers).

    \b
    Formats: --from FORMAT names the input adapter format (inspect, convert, resize, merge;
    default: detect), --to FORMAT the output format (extract, convert, resize, merge).
    The older --format spelling still works where it existed.
    """


def closed_pipe() -> NoReturn:
    """Stdout's reader went away (``| head``): exit 1 quietly, as Python's docs advise.

    Pointing stdout at /dev/null stops the interpreter's final flush from raising a second
    BrokenPipeError. Exit 1 (not 0): the output was not delivered in full.
    """
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
    except (OSError, ValueError):  # no real file descriptor (e.g. a test runner's buffer)
        pass
    sys.exit(1)


def flush_stdout() -> None:
    """Flush stdout now, inside our handlers, so a closed pipe is caught here and not at interpreter exit."""
    try:
        sys.stdout.flush()
    except BrokenPipeError:
        closed_pipe()
    except (OSError, ValueError):
        pass


def click_message(exc: click.ClickException) -> str:
    """Click's message; a usage error points at the command's --help."""
    if isinstance(exc, click.UsageError):
        command = exc.ctx.command_path if exc.ctx is not None else "loratools"
        return f"{exc.format_message()} (see '{command} --help')"
    return exc.format_message()


def fail(message: str, code: int = 1, as_json: bool = False) -> NoReturn:
    """One ``error: ...`` line on stderr and exit ``code``; with ``--json`` also ``{"error", "exit_code"}`` on stdout."""
    if as_json:
        try:
            click.echo(json.dumps({"error": message, "exit_code": code}))
            sys.stdout.flush()
        except BrokenPipeError:
            closed_pipe()
        except (OSError, ValueError):
            pass
    click.echo(f"error: {message}", err=True)
    sys.exit(code)


def os_error_message(exc: OSError) -> str:
    """``FILE: reason`` for an OSError (``FILE -> OTHER: reason`` for a rename); the reason alone without a file."""
    reason = exc.strerror or str(exc) or type(exc).__name__
    if exc.errno == errno.ENOSPC and not exc.filename:
        reason += " (while writing the output)"
    if exc.filename is None:
        return reason
    where = os.fsdecode(exc.filename) if isinstance(exc.filename, str | bytes) else str(exc.filename)
    if exc.filename2 is not None:
        where += f" -> {os.fsdecode(exc.filename2) if isinstance(exc.filename2, str | bytes) else exc.filename2}"
    return f"{where}: {reason}"


def handle_errors(fn: Callable[..., Any]) -> Callable[..., Any]:
    """Turn every failure of a command into one ``error:`` line on stderr, never a traceback.

    Exit 1 for any failure while running (library errors, OS errors, bugs); exit 2 stays reserved for
    a mistyped command line (Click's usage errors). A closed stdout pipe exits 1 quietly. With
    ``--json`` the error is also printed on stdout as ``{"error": ..., "exit_code": ...}``.
    ``LORATOOLS_DEBUG=1`` re-raises instead, for a traceback.
    """

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        as_json = bool(kwargs.get("as_json"))
        debug = bool(os.environ.get("LORATOOLS_DEBUG"))
        try:
            rv = fn(*args, **kwargs)
            flush_stdout()
            return rv
        except (click.exceptions.Exit, click.exceptions.Abort, SystemExit):
            raise
        except click.ClickException as exc:  # a UsageError raised by a command body keeps its exit 2
            fail(click_message(exc), exc.exit_code, as_json)
        except KeyboardInterrupt:
            fail("interrupted; nothing was written", 130, as_json)
        except BrokenPipeError:
            closed_pipe()
        except LoraToolsError as exc:
            if debug:
                raise
            if getattr(exc, "quiet", False):  # another torchrun rank's failure: rank 0 reports it
                sys.exit(1)
            fail(str(exc).replace("\n", " "), 1, as_json)
        except OSError as exc:
            if debug:
                raise
            fail(os_error_message(exc), 1, as_json)
        except Exception as exc:  # a bug or an input we did not anticipate: still one line
            if debug:
                raise
            fail(f"unexpected {type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''} "
                 "(set LORATOOLS_DEBUG=1 for a traceback)", 1, as_json)

    return wrapper


def parse_dtype(name: str | None) -> torch.dtype | None:
    if name is None:
        return None
    try:
        canonical = DTYPES[name.lower()]
    except KeyError:
        raise LoraToolsError(f"unknown dtype {name!r}; expected one of fp32, fp16, bf16, fp64") from None
    import torch

    return getattr(torch, canonical)


class FiniteFloat(click.ParamType):
    """A float that is not NaN or ±inf (Click's FLOAT accepts 'nan' and 'inf')."""

    name = "float"

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> float:
        try:
            x = float(value)
        except (TypeError, ValueError):
            self.fail(f"{value!r} is not a valid float.", param, ctx)
        if not math.isfinite(x):
            self.fail(f"{value!r} is not a finite number.", param, ctx)
        return x


FINITE_FLOAT = FiniteFloat()


def in_format_option(fn: Callable[..., Any]) -> Callable[..., Any]:
    """``--from`` (alias ``--format``, the old spelling): the input adapter format."""
    return click.option("--from", "--format", "in_format", default="auto", type=click.Choice(["auto", *FORMATS]),
                        help="Input adapter format (default: detect). --format is the older spelling.")(fn)


def from_option(fn: Callable[..., Any]) -> Callable[..., Any]:
    """``--from`` alone, for commands whose ``--format`` already names the output format (merge)."""
    return click.option("--from", "in_format", default="auto", type=click.Choice(["auto", *FORMATS]),
                        help="Input adapter format of every input (default: detect each).")(fn)


format_option = in_format_option  # the old name, for plugins importing it
family_option = click.option(
    "--family", default="auto", type=click.Choice(["auto", *FAMILIES, *FAMILY_ALIASES]), show_default=True,
    help="Model family whose names the adapter/base use (auto: from the base checkpoint, else the adapter's keys).")
kohya_style_option = click.option(
    "--kohya-style", type=click.Choice(["diffusers", "original"]), default=None,
    help="kohya stems for SD UNets: diffusers (lora_unet_down_blocks_…; loaded by ComfyUI, A1111/Forge, diffusers) or "
         "original (lora_unet_input_blocks_…). Default: each layer's source stem, else diffusers.")
dtype_option = click.option("--dtype", default=None, metavar="DTYPE",
                            help="Output dtype: fp32, fp16, bf16 (default: keep the input's).")
force_option = click.option("--force", is_flag=True, help="Replace an existing output.")
json_option = click.option("--json", "as_json", is_flag=True,
                           help='Print one JSON document to stdout (on failure: {"error": ..., "exit_code": ...}).')
quiet_option = click.option("--quiet", "-q", is_flag=True, help="No progress bar or progress lines on stderr.")
nonfinite_option = click.option("--allow-nonfinite", is_flag=True,
                                help="Warn about NaN/Inf in weights instead of refusing.")
expert_layout_option = click.option(
    "--expert-layout", type=click.Choice(["per-expert", "fused", "fused-concat", "fused-interleaved"]), default=None,
    help="MoE expert LoRA layout of the output (default: the input's): per-expert 2-D modules (experts.N.gate_proj), or "
         "fused PEFT target_parameters on the 3-D expert tensors (gate_up_proj in the model's gate/up order; "
         "fused-concat / fused-interleaved force gate-then-up or GPT-OSS alternating rows). --to peft only for fused.")


def rank_rule_options(fn: Callable[..., Any]) -> Callable[..., Any]:
    """--rank / --energy / --ratio / --threshold / --max-rank (at most one rule)."""
    for opt in reversed([
        click.option("--rank", type=int, default=None, help="Keep a fixed rank N."),
        click.option("--energy", type=FINITE_FLOAT, default=None,
                     help="Keep the smallest rank with this fraction of ‖ΔW‖_F²."),
        click.option("--ratio", type=FINITE_FLOAT, default=None, help="Keep σᵢ ≥ σ₁ / R."),
        click.option("--threshold", type=FINITE_FLOAT, default=None, help="Keep σᵢ ≥ T."),
        click.option("--max-rank", type=int, default=None, help="Cap every layer's rank."),
    ]):
        fn = opt(fn)
    return fn


def make_rule(rank: int | None, energy: float | None, ratio: float | None, threshold: float | None,
              max_rank: int | None, default: RankRule | None = None) -> RankRule | None:
    from loratools.linalg import RankRule

    given = {k: v for k, v in (("rank", rank), ("energy", energy), ("ratio", ratio), ("threshold", threshold)) if v is not None}
    if len(given) > 1:
        raise LoraToolsError(f"choose one rank rule, got {', '.join('--' + k for k in given)}")
    if given:
        kind, value = next(iter(given.items()))
        return RankRule(kind, float(value), max_rank)
    if max_rank is not None:
        return RankRule("full", 0.0, max_rank)
    return default


def make_conv_rule(conv_rank: int | None, max_rank: int | None) -> RankRule | None:
    """The fixed-rank rule of ``--conv-rank`` (errors name --conv-rank, not --rank)."""
    if conv_rank is None:
        return None
    if conv_rank < 1:
        raise LoraToolsError(f"--conv-rank must be a positive integer, got {conv_rank}")
    from loratools.linalg import RankRule

    return RankRule("rank", float(conv_rank), max_rank)


def progress(items: Iterable[T], length: int | None, label: str, quiet: bool, unit: str = "layers") -> Iterator[T]:
    """Progress on stderr unless ``--quiet``: a bar on a terminal, otherwise one line per 10 % step.

    The lines (``extract: 12/120 layers (10%)``) are for logs and CI, where a bar would be noise;
    they go to stderr, so stdout (tables, ``--json``) is unaffected.
    """
    if quiet:
        yield from items
        return
    if sys.stderr.isatty():
        with click.progressbar(items, length=length, label=label, file=sys.stderr, show_pos=True) as bar:
            yield from bar
        return
    yield from progress_lines(items, length, label, unit)


def progress_lines(items: Iterable[T], length: int | None, label: str, unit: str = "layers",
                   step: int = 10) -> Iterator[T]:
    """Yield ``items``; after each one that crosses a ``step`` % mark print ``label: i/n unit (p%)`` to stderr.

    Without a length, a line every 10 items and one at the end.
    """
    shown = -1
    done = 0
    for done, item in enumerate(items, 1):
        yield item
        if length:
            mark = min(done * 100 // length, 100) // step * step
            if mark > shown and (mark > 0 or done == length):
                shown = mark
                click.echo(f"{label}: {done}/{length} {unit} ({done * 100 // length}%)", err=True)
        elif done % 10 == 0:
            click.echo(f"{label}: {done} {unit}", err=True)
    if not length and done % 10:
        click.echo(f"{label}: {done} {unit}", err=True)


def canonical_fields(rows: Iterable[dict], renames: dict[str, str]) -> None:
    """Give each ``--json`` row the canonical field names (README, "JSON fields"), in place.

    ``renames`` maps an old name to its canonical one; the old key stays, right before the new one,
    as a deprecated alias for one release.
    """
    for row in rows:
        if not any(old in row and new not in row for old, new in renames.items()):
            continue
        items = list(row.items())
        row.clear()
        for key, value in items:
            row[key] = value
            if key in renames and renames[key] not in dict(items):
                row[renames[key]] = value


def emit_json(doc: Any) -> None:
    click.echo(json.dumps(doc, indent=2, default=_json_default, allow_nan=False))


def _json_default(obj: Any) -> Any:
    torch = sys.modules.get("torch")  # a tensor or dtype can only exist once torch is imported
    if torch is not None:
        if isinstance(obj, torch.dtype):
            return str(obj).replace("torch.", "")
        if isinstance(obj, torch.Tensor):
            return obj.tolist()
    return str(obj)


def clean_floats(obj: Any) -> Any:
    """Replace NaN/Inf with None so the JSON stays valid."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {k: clean_floats(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [clean_floats(v) for v in obj]
    return obj


def fmt(x: Any, digits: int = 4) -> str:
    if x is None:
        return "-"
    if isinstance(x, float):
        return f"{x:.{digits}g}"
    return str(x)


#: skipped tensors listed one by one up to this many; beyond, reasons shared by many tensors are counted
SKIPPED_LISTED = 30


def skipped_table(skipped: list[dict]) -> str:
    """``tensor | reason`` rows; a reason shared by more than a few tensors is one counted row once the list is long
    (a Stable Diffusion file has hundreds of unchanged tensors). ``--json`` always lists every one."""
    from collections import Counter

    from tabulate import tabulate

    if len(skipped) <= SKIPPED_LISTED:
        return tabulate([[k["name"], k["reason"]] for k in skipped], headers=["tensor", "reason"])
    counts = Counter(k["reason"] for k in skipped)
    rows = [[k["name"], k["reason"]] for k in skipped if counts[k["reason"]] <= 3]
    rows += [[f"({n} tensors)", reason] for reason, n in counts.most_common() if n > 3]
    return tabulate(rows, headers=["tensor", "reason"])


def echo_warnings(warnings: list[str]) -> None:
    for w in warnings:
        click.echo(f"warning: {w}", err=True)
