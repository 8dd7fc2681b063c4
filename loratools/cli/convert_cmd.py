"""``loratools convert``: rewrite an adapter in another format (bit-exact weights, metadata kept)."""

from __future__ import annotations

import click

from loratools.cli.common import (
    dtype_option,
    echo_warnings,
    emit_json,
    force_option,
    format_option,
    handle_errors,
    json_option,
    main,
    nonfinite_option,
    parse_dtype,
)
from loratools.formats import FORMATS, load_adapter, save_adapter
from loratools.formats.common import check_output


@main.command("convert")
@click.argument("adapter", type=click.Path())
@click.option("--to", "to_format", required=True, type=click.Choice(FORMATS), help="Output format.")
@click.option("-o", "--output", "out", required=True, type=click.Path(), help="Output file (kohya, diffusers) or folder (peft).")
@click.option("--base", type=click.Path(), default=None, help="Base checkpoint to resolve kohya names to module paths.")
@format_option
@dtype_option
@force_option
@click.option("--kohya-prefix", default=None, help="Prefix for kohya names of layers with no component (default lora_unet_).")
@nonfinite_option
@json_option
@handle_errors
def convert_command(adapter, to_format, out, base, in_format, dtype, force, kohya_prefix, allow_nonfinite, as_json):
    """Convert ADAPTER to --to format. Weights are copied bit-exactly unless --dtype is given."""
    out_path = check_output(out, force)
    dt = parse_dtype(dtype)
    ad = load_adapter(adapter, format=in_format, base=base, allow_nonfinite=allow_nonfinite)
    save_adapter(ad, out_path, to_format, force=force, dtype=dt, kohya_prefix=kohya_prefix)
    doc = {"input": str(adapter), "input_format": ad.format, "output": str(out_path), "format": to_format,
           "layers": len(ad.layers), "params": ad.num_params, "warnings": ad.warnings}
    if as_json:
        emit_json(doc)
        return
    click.echo(f"wrote {to_format} adapter with {len(ad.layers)} layers ({ad.num_params:,} params) to {out_path}")
    echo_warnings(ad.warnings)
