"""``loratools resize``: exact factored rank reduction, pruning and filtering of an adapter."""

from __future__ import annotations

import click
from tabulate import tabulate

from loratools.cli.common import (
    FORMATS,
    canonical_fields,
    clean_floats,
    dtype_option,
    echo_warnings,
    emit_json,
    expert_layout_option,
    family_option,
    fmt,
    force_option,
    handle_errors,
    in_format_option,
    json_option,
    kohya_style_option,
    main,
    make_conv_rule,
    make_rule,
    nonfinite_option,
    parse_dtype,
    progress,
    quiet_option,
    rank_rule_options,
)
from loratools.cli.parallel import data_parallel, distributed_report, worker_done
from loratools.errors import LoraToolsError


def _size(n: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.2f} {unit}"
        n /= 1024
    return str(n)  # pragma: no cover


@main.command("resize")
@click.argument("adapter", type=click.Path())
@click.option("-o", "--output", "out", required=True, type=click.Path(), help="Output file or folder (same format).")
@rank_rule_options
@click.option("--conv-rank", type=int, default=None, help="Fixed rank for conv layers (other rules apply to linears).")
@click.option("--prune-below", default=None, metavar="NORM",
              help="Drop layers with ‖ΔW‖_F below NORM; 'N%' (or --prune-relative) is relative to the largest layer.")
@click.option("--prune-relative", is_flag=True, help="Read --prune-below as a fraction of the largest ‖ΔW‖_F.")
@click.option("--include", multiple=True, metavar="GLOB", help="Keep only layers whose name matches (repeatable).")
@click.option("--exclude", multiple=True, metavar="GLOB", help="Drop layers whose name matches (repeatable).")
@click.option("--to", "to_format", default=None, type=click.Choice(FORMATS), help="Output format (default: the input's).")
@click.option("--base", type=click.Path(), default=None, help="Base checkpoint to resolve kohya names (optional).")
@in_format_option
@dtype_option
@force_option
@nonfinite_option
@family_option
@kohya_style_option
@expert_layout_option
@click.option("--device", default="cpu", show_default=True,
              help="cpu, cuda[:N] or auto for the factored SVDs (under torchrun: each rank's own GPU).")
@json_option
@quiet_option
@handle_errors
@data_parallel("out")
def resize_command(adapter, out, rank, energy, ratio, threshold, max_rank, conv_rank, prune_below, prune_relative,
                   include, exclude, to_format, base, in_format, dtype, force, allow_nonfinite, family, kohya_style,
                   expert_layout, device, as_json, quiet):
    """Resize ADAPTER exactly in factored space (QR of both factors + small SVD; ΔW is never formed).

    Each kept layer becomes the best rank-k approximation of its ΔW (Eckart–Young), stored as
    up = U√Σ, down = √Σ Vᵀ with alpha = k (scale 1; rsLoRA adapters keep rsLoRA with alpha = √k).
    Layers whose rank does not change are copied bit-exactly. Format and metadata are kept
    (kohya ss_network_dim/alpha and PEFT r/lora_alpha/rank_pattern are updated).
    """
    from loratools.formats import (
        check_base_for,
        check_output_name,
        fuse_for,
        load_adapter,
        output_is_folder,
        save_adapter,
    )
    from loratools.formats.common import check_output
    from loratools.resize import Prune, adapter_bytes, resize_adapter

    out_path = check_output(out, force, [adapter, base], is_dir=output_is_folder(to_format))
    rule = make_rule(rank, energy, ratio, threshold, max_rank)
    conv_rule = make_conv_rule(conv_rank, max_rank)
    prune = Prune.parse(prune_below, prune_relative) if prune_below is not None else None
    if rule is None and conv_rule is None and prune is None and not include and not exclude:
        raise LoraToolsError("nothing to do: give a rank rule (--rank/--energy/--ratio/--threshold/--max-rank), "
                             "--conv-rank, --prune-below or --include/--exclude")
    dt = parse_dtype(dtype)
    if to_format:
        check_output_name(to_format, out_path)
        check_base_for(to_format, base)
    ad = load_adapter(adapter, format=in_format, base=base, allow_nonfinite=allow_nonfinite, family=family)
    check_output_name(to_format or ad.format, out_path)
    if rule is not None:  # a fused output (Flux in sd-scripts / ComfyUI names): the rule acts on the fused ΔW it stores
        fuse_for(ad, to_format or ad.format, kohya_style)
    new, report = resize_adapter(ad, rule, conv_rule, prune, list(include), list(exclude),
                                 progress=lambda it, n: progress(it, n, "resize", quiet), device=device)
    if worker_done():
        return
    fmt_out = to_format or ad.format
    from loratools.formats.experts import set_layout

    set_layout(new, expert_layout, fmt_out)
    save_adapter(new, out_path, fmt_out, force=force, dtype=dt, kohya_style=kohya_style, base=base)
    totals = report.totals(adapter_bytes(ad), adapter_bytes(new, dt))
    warnings = list(new.warnings) + report.warnings  # the input's, then the writer's (new.warnings), then resize's
    if as_json:
        doc = {"input": str(adapter), "output": str(out_path), "format": fmt_out, **report.as_dict(), "totals": totals,
               "warnings": warnings}
        canonical_fields(doc["layers"], {"kind": "source_type", "old_rank": "source_rank", "new_rank": "rank"})
        emit_json(clean_floats({**doc, "distributed": distributed_report()}))
        return
    rows = [[r.name, r.kind, "×".join(map(str, r.shape)), f"{r.old_rank} -> {r.new_rank}", fmt(r.fro_norm),
             fmt(r.retained_energy, 6), fmt(r.relative_error, 4), r.action] for r in report.layers]
    click.echo(tabulate(rows, headers=["layer", "type", "shape", "rank", "‖ΔW‖F", "retained energy",
                                       "rel. error", "action"], disable_numparse=True))
    t = totals
    click.echo("")
    click.echo(tabulate([
        ("rule", report.rule),
        ("layers", f"{t['layers_in']} -> {t['layers_out']} ({t['resized']} resized, {t['pruned']} pruned, "
                   f"{t['excluded']} excluded)"),
        ("params", f"{t['params_before']:,} -> {t['params_after']:,}"),
        ("size", f"{_size(t['bytes_before'])} -> {_size(t['bytes_after'])}"),
        ("retained energy", fmt(t["retained_energy"], 6)),
        ("relative error", fmt(t["relative_error"], 4)),
        ("output", f"{out_path} ({fmt_out})"),
    ], tablefmt="plain"))
    echo_warnings(warnings)
