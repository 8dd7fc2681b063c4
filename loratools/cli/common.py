"""Shared CLI plumbing: the group, error handling, shared options, progress and rendering."""

from __future__ import annotations

import functools
import json
import math
import os
import signal
import sys
from collections.abc import Callable, Iterable, Iterator
from typing import Any, TypeVar

import click
import torch

from loratools import __version__
from loratools.errors import LoraToolsError
from loratools.linalg import RankRule

T = TypeVar("T")

DTYPES = {
    "fp32": torch.float32, "float32": torch.float32, "fp16": torch.float16, "float16": torch.float16,
    "half": torch.float16, "bf16": torch.bfloat16, "bfloat16": torch.bfloat16, "fp64": torch.float64,
    "float64": torch.float64,
}


class Terminated(SystemExit):
    """Raised by the SIGTERM handler: unwinds like Ctrl-C, so atomic writers remove their temp outputs."""

    def __init__(self) -> None:
        super().__init__(128 + signal.SIGTERM)


def _on_sigterm(signum: int, frame: Any) -> None:
    signal.signal(signal.SIGTERM, signal.SIG_IGN)  # a second TERM must not cut the cleanup short
    raise Terminated()


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
        try:
            rv = super().main(*args, **kwargs)
        except click.exceptions.NoArgsIsHelpError as exc:
            exc.show()
            sys.exit(2)
        except click.UsageError as exc:
            command = exc.ctx.command_path if exc.ctx is not None else "loratools"
            click.echo(f"error: {exc.format_message()} (see '{command} --help')", err=True)
            sys.exit(exc.exit_code)
        except click.ClickException as exc:
            click.echo(f"error: {exc.format_message()}", err=True)
            sys.exit(exc.exit_code)
        except click.Abort:
            click.echo("error: aborted; nothing was written", err=True)
            sys.exit(1)
        sys.exit(rv if isinstance(rv, int) else 0)


@click.group(cls=OneLineErrors, context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 110})
@click.version_option(__version__, prog_name="loratools")
def main() -> None:
    """Extract, resize, merge, convert and inspect LoRA adapters (PEFT, kohya, diffusers)."""


def fail(message: str, code: int = 1) -> None:
    click.echo(f"error: {message}", err=True)
    sys.exit(code)


def handle_errors(fn: Callable[..., Any]) -> Callable[..., Any]:
    """Turn library errors into one line on stderr and exit 1; never a traceback (unless LORATOOLS_DEBUG)."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except LoraToolsError as exc:
            if os.environ.get("LORATOOLS_DEBUG"):
                raise
            fail(str(exc).replace("\n", " "))
        except KeyboardInterrupt:
            fail("interrupted; nothing was written", 130)
        except (click.exceptions.Exit, click.ClickException, SystemExit):
            raise
        except Exception as exc:  # a bug or an input we did not anticipate: still one line
            if os.environ.get("LORATOOLS_DEBUG"):
                raise
            fail(f"unexpected {type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''} "
                 "(set LORATOOLS_DEBUG=1 for a traceback)", 2)

    return wrapper


def parse_dtype(name: str | None) -> torch.dtype | None:
    if name is None:
        return None
    try:
        return DTYPES[name.lower()]
    except KeyError:
        raise LoraToolsError(f"unknown dtype {name!r}; expected one of fp32, fp16, bf16, fp64") from None


dtype_option = click.option("--dtype", default=None, metavar="DTYPE",
                            help="Output dtype: fp32, fp16, bf16 (default: keep the input's).")
force_option = click.option("--force", is_flag=True, help="Replace an existing output.")
json_option = click.option("--json", "as_json", is_flag=True, help="Print one JSON document to stdout.")
quiet_option = click.option("--quiet", "-q", is_flag=True, help="No progress bar.")
format_option = click.option("--format", "in_format", default="auto",
                             type=click.Choice(["auto", "peft", "kohya", "diffusers"]),
                             help="Input adapter format (default: detect).")
nonfinite_option = click.option("--allow-nonfinite", is_flag=True,
                                help="Warn about NaN/Inf in weights instead of refusing.")


def rank_rule_options(fn: Callable[..., Any]) -> Callable[..., Any]:
    """--rank / --energy / --ratio / --threshold / --max-rank (at most one rule)."""
    for opt in reversed([
        click.option("--rank", type=int, default=None, help="Keep a fixed rank N."),
        click.option("--energy", type=float, default=None, help="Keep the smallest rank with this fraction of ‖ΔW‖_F²."),
        click.option("--ratio", type=float, default=None, help="Keep σᵢ ≥ σ₁ / R."),
        click.option("--threshold", type=float, default=None, help="Keep σᵢ ≥ T."),
        click.option("--max-rank", type=int, default=None, help="Cap every layer's rank."),
    ]):
        fn = opt(fn)
    return fn


def make_rule(rank: int | None, energy: float | None, ratio: float | None, threshold: float | None,
              max_rank: int | None, default: RankRule | None = None) -> RankRule | None:
    given = {k: v for k, v in (("rank", rank), ("energy", energy), ("ratio", ratio), ("threshold", threshold)) if v is not None}
    if len(given) > 1:
        raise LoraToolsError(f"choose one rank rule, got {', '.join('--' + k for k in given)}")
    if given:
        kind, value = next(iter(given.items()))
        return RankRule(kind, float(value), max_rank)
    if max_rank is not None:
        return RankRule("full", 0.0, max_rank)
    return default


def progress(items: Iterable[T], length: int | None, label: str, quiet: bool) -> Iterator[T]:
    """A progress bar on stderr when it is a terminal and not --quiet; a plain iterator otherwise."""
    if quiet or not sys.stderr.isatty():
        yield from items
        return
    with click.progressbar(items, length=length, label=label, file=sys.stderr, show_pos=True) as bar:
        yield from bar


def emit_json(doc: Any) -> None:
    click.echo(json.dumps(doc, indent=2, default=_json_default, allow_nan=False))


def _json_default(obj: Any) -> Any:
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


def echo_warnings(warnings: list[str]) -> None:
    for w in warnings:
        click.echo(f"warning: {w}", err=True)
