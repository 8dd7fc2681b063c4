"""``loratools merge``: weighted merges of adapters with PEFT's ``add_weighted_adapter`` methods."""

from __future__ import annotations

import click
from tabulate import tabulate

from loratools.cli.common import (
    FORMATS,
    MERGE_METHODS,
    clean_floats,
    dtype_option,
    echo_warnings,
    emit_json,
    expert_layout_option,
    family_option,
    fmt,
    force_option,
    from_option,
    handle_errors,
    json_option,
    kohya_style_option,
    main,
    nonfinite_option,
    parse_dtype,
    progress,
    quiet_option,
)
from loratools.cli.parallel import data_parallel, distributed_report, worker_done
from loratools.errors import LoraToolsError

HELP = """Merge weighted adapters A[:W] B[:W] ... into one LoRA (PEFT add_weighted_adapter semantics).

\b
Exact methods (the delta is Σ wᵢ·ΔWᵢ; computed on the factors, no dense ΔW):
  svd (default)  concatenate the weighted factors (rank Σrᵢ), QR + small SVD, keep --rank
                 (default: the largest input rank); exact when --rank ≥ the merged rank,
                 otherwise the best rank-k approximation (Eckart–Young)
  cat            concatenate the weighted factors: rank Σrᵢ, exact; with --rank: as svd
\b
Approximations (PEFT semantics; the report gives their relative error vs Σ wᵢ·ΔWᵢ):
  linear, ties, dare_linear, dare_ties, magnitude_prune
                 combine the A's and the B's separately (√(w·scale) weights, sign on A):
                 the product has cross terms BᵢAⱼ; need equal ranks
  ties_svd, dare_linear_svd, dare_ties_svd, magnitude_prune_svd
                 prune / elect signs on the dense per-layer ΔWᵢ (streamed layer by layer on
                 --device), then truncated SVD back to --rank
\b
Modules are the union of the inputs (a missing module counts as zero). Kohya and PEFT inputs can
be mixed; names are matched by their mangled form, or resolved against --base.
"""


@main.command("merge", help=HELP)
@click.argument("specs", nargs=-1, required=True, metavar="A[:W] B[:W] ...")
@click.option("-o", "--output", "out", required=True, type=click.Path(), help="Output file or folder.")
@click.option("--method", default="svd", show_default=True, type=click.Choice(MERGE_METHODS), help="Merge method.")
@click.option("--rank", type=int, default=None, help="Output rank (svd family: default max input rank).")
@click.option("--density", type=float, default=None, help="Fraction kept by ties/dare/magnitude_prune, in (0, 1].")
@click.option("--majority-sign", default="total", show_default=True, type=click.Choice(["total", "frequency"]),
              help="TIES sign election.")
@click.option("--seed", type=int, default=0, show_default=True, help="Seed for DARE draws and randomized SVD.")
@click.option("--device", default="auto", show_default=True, help="auto, cpu or cuda[:N] for the dense per-layer work.")
@click.option("--exact-svd", is_flag=True, help="Full SVD instead of a randomized sketch for the dense *_svd methods.")
@click.option("--to", "--format", "out_format", default=None, type=click.Choice(FORMATS),
              help="Output format (default: the first input's). --format is the older spelling.")
@from_option
@click.option("--base", type=click.Path(), default=None, help="Base checkpoint to resolve kohya names.")
@dtype_option
@force_option
@nonfinite_option
@family_option
@kohya_style_option
@expert_layout_option
@json_option
@quiet_option
@handle_errors
@data_parallel("out")
def merge_command(specs, out, method, rank, density, majority_sign, seed, device, exact_svd, out_format, in_format,
                  base, dtype, force, allow_nonfinite, family, kohya_style, expert_layout, as_json, quiet):
    from loratools.checkpoint import Checkpoint
    from loratools.device import resolve_device
    from loratools.formats import (
        check_base_for,
        check_output_name,
        fuse_for,
        load_adapter,
        output_is_folder,
        save_adapter,
    )
    from loratools.formats.common import check_output
    from loratools.merge import merge_adapters, parse_weighted_spec

    parsed = [parse_weighted_spec(s) for s in specs]
    out_path = check_output(out, force, [p for p, _ in parsed] + [base],
                            is_dir=output_is_folder(out_format))
    dt = parse_dtype(dtype)
    dev = str(resolve_device(device))
    ckpt = Checkpoint(base) if base else None
    if out_format:
        check_output_name(out_format, out_path)
        check_base_for(out_format, base)
    inputs = [(load_adapter(p, format=in_format, base=ckpt, allow_nonfinite=allow_nonfinite, family=family), w) for p, w in parsed]
    check_output_name(out_format or inputs[0][0].format, out_path)
    for ad, _ in inputs:  # the output stores a DiT family's fused tensors: merge (and truncate) their fused ΔW
        fuse_for(ad, out_format or inputs[0][0].format, kohya_style)
    merged, report = merge_adapters(
        inputs, method=method, rank=rank, density=density, majority_sign=majority_sign, seed=seed, device=dev,
        exact_svd=exact_svd, labels=[p for p, _ in parsed],
        progress=lambda it, n: progress(it, n, "merge", quiet),
    )
    if worker_done():
        return
    if not merged.layers:
        raise LoraToolsError("the weighted adapters cancel out: every merged layer is zero, nothing to write")
    fmt_out = out_format or merged.format
    from loratools.formats.experts import set_layout

    set_layout(merged, expert_layout, fmt_out)
    save_adapter(merged, out_path, fmt_out, force=force, dtype=dt, kohya_style=kohya_style, base=ckpt)
    doc = {"inputs": [{"path": p, "weight": w, "format": ad.format, "layers": len(ad.layers)}
                      for (p, w), (ad, _) in zip(parsed, inputs)],
           "output": str(out_path), "format": fmt_out, "params": merged.num_params, **report.as_dict()}
    doc["warnings"] = merged.warnings
    for row in doc["layers"]:
        layer = merged.layers.get(row["name"])
        row.setdefault("shape", list(layer.shape) if layer is not None else None)
    if as_json:
        emit_json(clean_floats({**doc, "distributed": distributed_report()}))
        return
    rows = [[r.name, r.inputs, r.rank, fmt(r.fro_norm), fmt(r.relative_error, 3)] for r in report.layers]
    click.echo(tabulate(rows, headers=["layer", "inputs", "rank", "‖Σ wᵢΔWᵢ‖F", "rel. error"], disable_numparse=True))
    t = report.totals()
    click.echo("")
    click.echo(tabulate([
        ("method", f"{report.method} ({'exact' if report.exact else 'approximation'})"),
        ("inputs", ", ".join(f"{p} × {w:g}" for p, w in parsed)),
        ("layers", t["layers"]),
        ("ranks", ", ".join(map(str, t["ranks"]))),
        ("relative error vs Σ wᵢΔWᵢ", f"{fmt(t['relative_error'], 3)} (max layer {fmt(t['max_layer_relative_error'], 3)})"),
        ("params", f"{merged.num_params:,}"),
        ("device", report.device),
        ("output", f"{out_path} ({fmt_out})"),
    ], tablefmt="plain"))
    echo_warnings(merged.warnings)
