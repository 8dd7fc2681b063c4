"""``loratools inspect``: per-layer spectra and statistics of an adapter."""

from __future__ import annotations

import click
from tabulate import tabulate

from loratools.cli.common import (
    canonical_fields,
    clean_floats,
    echo_warnings,
    emit_json,
    family_option,
    fmt,
    handle_errors,
    in_format_option,
    json_option,
    main,
    nonfinite_option,
    progress,
    quiet_option,
)


@main.command("inspect")
@click.argument("adapter", type=click.Path())
@click.option("--base", type=click.Path(), default=None, help="Base checkpoint: resolves kohya names, adds ‖ΔW‖/‖W‖.")
@in_format_option
@json_option
@click.option("--plot", type=click.Path(), default=None, help="Write spectra + effective-rank plots to this PNG.")
@click.option("--top", type=click.IntRange(min=0), default=3, show_default=True, help="Singular values shown per layer in the table.")
@nonfinite_option
@family_option
@quiet_option
@click.option("--force", is_flag=True, help="Replace an existing --plot file.")
@handle_errors
def inspect_command(adapter, base, in_format, as_json, plot, top, allow_nonfinite, family, quiet, force):
    """Per-layer rank, norms, stable/effective rank, energy ranks and singular values.

    Singular values are exact and computed from the factors (QR + small SVD), never from the dense ΔW.
    """
    from loratools.formats.common import check_output
    from loratools.inspect import inspect_adapter

    if plot:
        check_output(plot, force, [adapter, base], is_dir=False)
    report = inspect_adapter(
        adapter, base=base, format=in_format, allow_nonfinite=allow_nonfinite, family=family,
        progress=lambda it, n: progress(it, n, "inspect", quiet),
    )
    if plot:
        from loratools.plot import plot_spectra

        plot_spectra(report["layers"], plot, title=str(adapter), force=force)
    if as_json:
        canonical_fields(report["layers"], {"spectral_norm": "sigma_1"})
        emit_json(clean_floats(report))
        echo_warnings(report["summary"]["warnings"])
        return
    rows = []
    for r in report["layers"]:
        top_sv = ", ".join(f"{x:.3g}" for x in r["singular_values"][:top])
        row = [r["name"], r["type"], "×".join(map(str, r["shape"])), r["rank"], fmt(r["alpha"]), fmt(r["scale"]),
               fmt(r["fro_norm"]), fmt(r["spectral_norm"]), fmt(r["stable_rank"], 3), fmt(r["effective_rank"], 3),
               "/".join(str(r["energy_rank"][k]) for k in ("0.5", "0.9", "0.99")), top_sv]
        if "relative_norm" in r:
            row.append(fmt(r["relative_norm"], 3))
        rows.append(row)
    headers = ["layer", "type", "shape", "rank", "alpha", "scale", "‖ΔW‖F", "σ₁", "stable", "eff.rank",
               "r@50/90/99%", f"top {top} σ"]
    if report["layers"] and "relative_norm" in report["layers"][0]:
        headers.append("‖ΔW‖/‖W‖")
    click.echo(tabulate(rows, headers=headers, disable_numparse=True))
    s = report["summary"]
    click.echo("")
    lines = [
        ("format", s["format"]), ("family", f"{s['family'] or 'none recognised'} (names: {s['convention']})"),
        *([("written by", s["trainer"])] if s.get("trainer") else []),
        ("layers", s["layers"]), ("conv layers", s["conv_layers"]),
        ("params", f"{s['params']:,}"), ("ranks", ", ".join(map(str, s["ranks"]))),
        ("names resolved", "yes" if s["names_resolved"] else "no (kohya stems; pass --base to resolve)"),
    ]
    if s["metadata"]:
        lines.append(("metadata", ", ".join(f"{k}={v}" for k, v in s["metadata"].items())))
    if s["config"]:
        lines.append(("config", ", ".join(f"{k}={v}" for k, v in s["config"].items())))
    if s["extra_tensors"]:
        lines.append(("extra tensors", f"{len(s['extra_tensors'])} (modules_to_save / saved base layers)"))
    if "unmatched" in s:
        lines.append(("unmatched in base", ", ".join(s["unmatched"]) or "none"))
    if s.get("experts"):
        ex = s["experts"]
        lines.append(("experts touched", f"{ex['experts_touched']} of {ex['experts_total']} in {len(ex['modules'])} MoE "
                                         f"layer(s), {ex['param_fraction']:.1%} of expert parameters"))
        for m in ex["modules"]:
            lines.append((f"  {m['module']}", f"{m['experts_touched']}/{m['experts_total']} experts "
                                              f"({m['total_from']}), {m['param_fraction']:.1%} of parameters, "
                                              f"{', '.join(m['projections']) or 'no projection'}"))
    click.echo(tabulate(lines, tablefmt="plain"))
    if plot:
        click.echo(f"plot written to {plot}")
    echo_warnings(s["warnings"])
