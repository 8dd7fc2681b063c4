"""``loratools convert``: rewrite an adapter as plain LoRA in another format.

Plain LoRA layers are copied bit-exactly (unless --dtype or a rank rule is given); LoHa, LoKr, Tucker
and full layers become exact plain LoRA (structural rank), or the optimal truncation under a rank rule.
DoRA magnitudes move between PEFT and LyCORIS; --fold-dora folds them into plain LoRA.
"""

from __future__ import annotations

import click
from tabulate import tabulate

from loratools.cli.common import (
    COMPONENTS,
    FORMATS,
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
    make_rule,
    nonfinite_option,
    parse_dtype,
    progress,
    quiet_option,
    rank_rule_options,
)
from loratools.errors import LoraToolsError


@main.command("convert")
@click.argument("adapter", type=click.Path())
@click.option("--to", "to_format", required=True, type=click.Choice(FORMATS), help="Output format.")
@click.option("-o", "--output", "out", required=True, type=click.Path(), help="Output file (kohya, diffusers, comfy: .safetensors; gguf: .gguf) or folder (peft).")
@click.option("--base", type=click.Path(), default=None,
              help="Base checkpoint: resolves kohya/LyCORIS names, gives conv kernel shapes, exact DoRA moves, --fold-dora; "
                   "--to gguf needs it (the HF folder: its config.json).")
@in_format_option
@rank_rule_options
@click.option("--fold-dora", is_flag=True, help="Fold DoRA magnitudes into plain LoRA (needs --base).")
@dtype_option
@force_option
@click.option("--kohya-prefix", default=None, help="Prefix for kohya names of layers with no component (default lora_unet_).")
@click.option("--component", type=click.Choice(COMPONENTS), default=None,
              help="Pipeline component of every layer in kohya/diffusers output (e.g. transformer for a Flux LoRA stored "
                   "with lora_unet_ keys). Default: the input's own components; where it has none, guessed from the "
                   "module paths (DiT blocks → transformer, CLIP text_model → text_encoder), else unet.")
@nonfinite_option
@family_option
@kohya_style_option
@expert_layout_option
@quiet_option
@json_option
@handle_errors
def convert_command(adapter, to_format, out, base, in_format, rank, energy, ratio, threshold, max_rank, fold_dora,
                    dtype, force, kohya_prefix, component, allow_nonfinite, family, kohya_style, expert_layout, quiet,
                    as_json):
    """Convert ADAPTER (PEFT LoRA/LoHa/LoKr/DoRA, kohya, LyCORIS, diffusers) to plain LoRA in --to format.

    Without a rank rule the conversion is exact; with --rank/--energy/--ratio/--threshold each layer is the
    optimal truncation of its exact spectrum (computed from the factors, never from the dense ΔW).
    """
    from loratools.checkpoint import Checkpoint
    from loratools.convert import check_convertible, convert_adapter
    from loratools.formats import (
        check_base_for,
        check_output_name,
        fuse_for,
        load_adapter,
        output_is_folder,
        save_adapter,
    )
    from loratools.formats.common import check_output
    from loratools.formats.experts import layout_report, set_layout

    out_path = check_output(out, force, [adapter, base], is_dir=output_is_folder(to_format))
    check_output_name(to_format, out_path)
    check_base_for(to_format, base)
    if fold_dora and base is None:
        raise LoraToolsError("--fold-dora needs --base CKPT (the DoRA norm is taken over W + ΔW)")
    rule = make_rule(rank, energy, ratio, threshold, max_rank)
    dt = parse_dtype(dtype)
    ckpt = Checkpoint(base) if base else None
    ad = load_adapter(adapter, format=in_format, base=ckpt, allow_nonfinite=allow_nonfinite, family=family)
    if rule is not None:  # a fused output's rank rule truncates the fused ΔW it stores (optimal for that tensor)
        fuse_for(ad, to_format, kohya_style)
    check_convertible(ad, to_format, fold_dora, ckpt)
    new, rows = convert_adapter(ad, to_format, rule=rule, fold_dora=fold_dora, base=ckpt, dtype=dt,
                                progress=lambda it, n: progress(it, n, "convert", quiet))
    set_layout(new, expert_layout, to_format)
    experts = layout_report(new)
    save_adapter(new, out_path, to_format, force=force, dtype=dt, kohya_prefix=kohya_prefix, component=component,
                 force_component=bool(component), kohya_style=kohya_style, base=ckpt)
    doc = {"input": str(adapter), "input_format": ad.format, "output": str(out_path), "format": to_format,
           "rule": rule.describe() if rule else "exact", "layers": len(new.layers), "params": new.num_params,
           "source_params": ad.num_params, "per_layer": rows, "warnings": new.warnings}
    if experts is not None:
        doc["expert_layout"] = experts
    if as_json:
        emit_json(clean_floats(doc))
        return
    # a plain format change (every layer copied) needs no table; otherwise show every layer, copies included
    changed = rows if any(r["action"] != "copied" for r in rows) else []
    if changed:
        table = [[r["name"], r["source_type"], "×".join(map(str, r["shape"])), r["source_rank"], r["rank"],
                  r["action"], fmt(r["retained_energy"], 6), fmt(r["relative_error"], 3), fmt(r["optimal_error"], 3)]
                 for r in changed]
        click.echo(tabulate(table, headers=["layer", "type", "shape", "src rank", "rank", "action", "energy",
                                            "rel.err", "optimum"], disable_numparse=True))
    click.echo(f"wrote {to_format} adapter with {len(new.layers)} layers ({new.num_params:,} params) to {out_path}")
    if experts is not None:
        changed = [p for p in experts["parameters"] if p["rank_changed"]]
        click.echo(f"experts: {experts['source_layout']} -> {experts['layout']}"
                   + (f", {len(experts['parameters'])} fused parameter(s), rank changed in {len(changed)} (see warnings)"
                      if experts["parameters"] else ""))
    echo_warnings(new.warnings)
