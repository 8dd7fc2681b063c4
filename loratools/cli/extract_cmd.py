"""``loratools extract``: a LoRA adapter from a full fine-tune (BASE vs TUNED checkpoints)."""

from __future__ import annotations

from pathlib import Path

import click
from tabulate import tabulate

from loratools.cli.common import (
    FORMATS,
    clean_floats,
    dtype_option,
    echo_warnings,
    emit_json,
    family_option,
    fmt,
    force_option,
    handle_errors,
    json_option,
    kohya_style_option,
    main,
    make_conv_rule,
    make_rule,
    parse_dtype,
    progress,
    quiet_option,
    rank_rule_options,
    skipped_table,
)
from loratools.cli.parallel import data_parallel, distributed_report, worker_done

DEFAULT_RANK = 16


def checkpoint_options(fn):
    """--base / --tuned / --include / --exclude / --device / --seed / --family, shared with ``spectrum``."""
    for opt in reversed([
        click.option("--base", required=True, type=click.Path(), help="Base checkpoint (HF folder, sharded folder or .safetensors)."),
        click.option("--tuned", required=True, type=click.Path(), help="Fine-tuned checkpoint of the same architecture."),
        click.option("--include", multiple=True, metavar="GLOB", help="Only modules/keys matching this glob (repeatable)."),
        click.option("--exclude", multiple=True, metavar="GLOB", help="Skip modules/keys matching this glob (repeatable)."),
        click.option("--device", default="auto", type=click.Choice(["auto", "cpu", "cuda"]), show_default=True,
                     help="Where the diffs and SVDs are computed (layer by layer; results come back to CPU)."),
        click.option("--seed", default=0, show_default=True, type=int, help="Seed of the randomized SVD sketch."),
        family_option,
    ]):
        fn = opt(fn)
    return fn


@main.command("extract")
@checkpoint_options
@click.option("-o", "--output", "--out", "out", required=True, type=click.Path(), help="Output: PEFT folder or kohya .safetensors file.")
@rank_rule_options
@click.option("--conv-rank", type=int, default=None, help="Fixed rank for conv layers (default: the main rule).")
@click.option("--expert-rank", type=click.IntRange(min=1), default=None,
              help="Fixed rank for each routed MoE expert (default: the main rule, applied to each expert alone).")
@click.option("--router", type=click.Choice(["full", "skip", "lora"]), default="full", show_default=True,
              help="MoE router (mlp.gate): saved in full (PEFT modules_to_save), skipped, or decomposed as a LoRA.")
@click.option("--to", "--format", "out_format", default=FORMATS[0], type=click.Choice(FORMATS), show_default=True,
              help="Output format. --format is the older spelling.")
@dtype_option
@click.option("--exact", is_flag=True, help="Exact thin SVD for every layer instead of the randomized one.")
@click.option("--power-iters", type=click.IntRange(0, 20), default=6, show_default=True,
              help="Most power iterations of the randomized SVD (fewer: faster, further from the optimal error).")
@click.option("--power-tol", type=click.FloatRange(0, 1), default=0.005, show_default=True,
              help="Stop the power iterations once one improves the squared error by less than this fraction "
                   "(0: always run --power-iters).")
@click.option("--clamp-quantile", type=float, default=None, metavar="Q",
              help="Clip the factors at the Q-quantile of their |values| (off by default; hurts fidelity).")
@click.option("--save-full", multiple=True, metavar="GLOB",
              help="Store matching modules in full (PEFT modules_to_save), e.g. '*norm*' or lm_head.")
@click.option("--min-diff", type=float, default=0.0, show_default=True,
              help="Skip layers with ‖ΔW‖/‖W_base‖ below this (exactly unchanged layers are always skipped).")
@kohya_style_option
@json_option
@force_option
@quiet_option
@handle_errors
@data_parallel("out")
def extract_command(base, tuned, include, exclude, device, seed, out, rank, energy, ratio, threshold, max_rank,
                    conv_rank, expert_rank, router, out_format, dtype, exact, power_iters, power_tol, clamp_quantile, save_full, min_diff,
                    family, kohya_style, as_json, force, quiet):
    """Extract a LoRA approximating TUNED − BASE by (randomized) truncated SVD, layer by layer.

    Rank rule: --rank N (default 16), --energy F (keep F of ‖ΔW‖_F²), --ratio R (σᵢ ≥ σ₁/R) or
    --threshold T (σᵢ ≥ T), capped by --max-rank. The report gives each layer's rank, retained
    energy Σσᵢ²/‖ΔW‖² and relative Frobenius error (the Eckart–Young optimum for that rank).

    Two-expert pipelines (Wan 2.2 A14B folders with transformer and transformer_2) give two adapters in one run:
    OUT_high_noise… (transformer) and OUT_low_noise… (transformer_2); --json reports them under "experts".
    """
    from loratools.extract import ExtractOptions, extract, output_size
    from loratools.formats import check_base_for, check_output_name, output_is_folder, save_adapter
    from loratools.formats.common import check_output
    from loratools.formats.resolve import check_family
    from loratools.linalg import RankRule
    from loratools.noise_experts import expert_output, expert_pairs

    experts = expert_pairs(base, tuned)  # Wan 2.2 A14B pipeline folders: one adapter per expert transformer
    out_path = check_output(out, force, [base, tuned], is_dir=output_is_folder(out_format))
    check_output_name(out_format, out_path)
    check_base_for(out_format, base)
    for label, _, _ in experts:
        check_output(expert_output(out_path, label), force, [base, tuned], is_dir=output_is_folder(out_format))
    rule = make_rule(rank, energy, ratio, threshold, max_rank, default=RankRule("rank", DEFAULT_RANK, max_rank))
    check_family(base, family)
    options = ExtractOptions(
        rule=rule, conv_rule=make_conv_rule(conv_rank, max_rank),
        include=list(include), exclude=list(exclude), save_full=list(save_full), device=device,
        dtype=parse_dtype(dtype), exact=exact, seed=seed, clamp_quantile=clamp_quantile, min_diff=min_diff,
        format=out_format, power_iters=power_iters, power_tol=power_tol,
        expert_rule=RankRule("rank", expert_rank, max_rank) if expert_rank else None, router=router,
    )
    if experts:
        reports = []
        for label, b, t in experts:
            result = extract(b, t, options, progress=lambda it, n: progress(it, n, "extract", quiet))
            if worker_done():
                return
            path = expert_output(out_path, label)
            save_adapter(result.adapter, path, out_format, force=force, kohya_style=kohya_style, base=b)
            s = {**result.summary, "expert": label, "component": b.name, "output": str(path),
                 "file_size_bytes": output_size(path)}
            reports.append({"layers": result.layers, "skipped": result.skipped, "summary": s,
                            "warnings": result.adapter.warnings})
        if as_json:
            emit_json(clean_floats({"experts": reports, "distributed": distributed_report()}))
            return
        for r in reports:
            s = r["summary"]
            click.echo(f"{s['expert']} expert ({s['component']}): {s['output']} ({s['format']}, "
                       f"{s['file_size_bytes']:,} bytes), {s['layers']} LoRA layers, retained energy mean "
                       f"{s['mean_retained_energy']:.4f}, min {s['min_retained_energy']:.4f}")
            echo_warnings(r["warnings"])
        return
    result = extract(base, tuned, options, progress=lambda it, n: progress(it, n, "extract", quiet))
    if worker_done():
        return
    save_adapter(result.adapter, out_path, out_format, force=force, kohya_style=kohya_style, base=base)
    s = result.summary
    s["output"] = str(out_path)
    s["file_size_bytes"] = output_size(Path(out_path))
    if as_json:
        emit_json(clean_floats({"layers": result.layers, "skipped": result.skipped,
                                "changed_vectors": result.changed_vectors, "summary": s,
                                "warnings": result.adapter.warnings, "distributed": distributed_report()}))
        return
    rows = [[r["name"], r["kind"], "×".join(map(str, r["shape"])), r["rank"], f"{r['retained_energy']:.4f}",
             fmt(r["relative_error"], 3), fmt(r["relative_norm"], 3)] for r in result.layers]
    click.echo(tabulate(rows, headers=["layer", "kind", "shape", "rank", "energy kept", "rel. error", "‖ΔW‖/‖W‖"],
                        disable_numparse=True))
    if result.changed_vectors:
        click.echo("\nchanged 1-D tensors (" + ("saved in full" if any(v["saved"] for v in result.changed_vectors)
                                               else "not in the adapter; --save-full GLOB stores them") + "):")
        click.echo(tabulate([[v["name"], fmt(v["relative_norm"], 3), "yes" if v["saved"] else "no"]
                             for v in result.changed_vectors], headers=["tensor", "‖Δ‖/‖W‖", "saved"],
                            disable_numparse=True))
    if result.skipped:
        click.echo("\nskipped:")
        click.echo(skipped_table(result.skipped))
    click.echo("")
    lines = [
        ("output", f"{s['output']} ({s['format']}, {s['file_size_bytes']:,} bytes)"),
        ("rule", s["rule"] + (f"; conv: {s['conv_rule']}" if s["conv_rule"] else "")),
        ("layers", f"{s['layers']} LoRA, {len(s['saved_full'])} module(s) in full, {s['skipped']} skipped"),
        ("adapter params", f"{s['params']:,} ({s['lora_params']:,} LoRA + {s['full_params']:,} full)"),
        ("retained energy", f"mean {s['mean_retained_energy']:.4f}, min {s['min_retained_energy']:.4f}"),
        ("wall time", f"{s['wall_time_s']:.2f} s on {s['device']}"),
    ]
    if s.get("experts"):
        ex = s["experts"]
        routers = ", ".join(sorted({r["handled"] for r in ex["routers"]})) or "none found"
        lines.append(("experts", f"{ex['modules']} expert modules from {ex['tensors']} tensor(s), rule "
                                 f"{s['expert_rule']}; router ({ex['router']}): {routers}"))
    if "clipped_values" in s:
        lines.append(("clamp", f"{s['clipped_values']:,} factor values clipped at quantile {clamp_quantile}"))
    click.echo(tabulate(lines, tablefmt="plain"))
    echo_warnings(result.adapter.warnings)
