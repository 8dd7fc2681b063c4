"""``loratools verify``: are two adapter files (any formats we read) the same weight change?"""

from __future__ import annotations

import click
from tabulate import tabulate

from loratools.cli.common import (
    FINITE_FLOAT,
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

#: failing modules shown in the table (``--json`` lists every one)
SHOWN = 20


def _side(c: dict) -> str:
    parts = [c["format"], "scale " + ", ".join(f"{k} ×{v}" for k, v in c["scale_rules"].items())]
    if c["alphas"]:
        parts.append("alpha " + "/".join(f"{a:g}" for a in c["alphas"]))
    parts.append("rank " + "/".join(map(str, c["ranks"])))
    if c["rslora"]:
        parts.append("rsLoRA")
    if c["dora"]:
        d = c["dora"]
        parts.append(f"DoRA {d['layers']} layer(s): " + ", ".join(f"{k}" for k in d["convention"])
                     + " on axis " + "/".join(d["axis"]))
    if not c["names_resolved"]:
        parts.append("names unresolved (kohya stems)")
    return "; ".join(parts)


@main.command("verify")
@click.argument("a", type=click.Path())
@click.argument("b", type=click.Path())
@click.option("--base", type=click.Path(), default=None,
              help="Base checkpoint: resolves kohya/LyCORIS names; DoRA layers are compared through W' − W.")
@click.option("--tol", type=FINITE_FLOAT, default=1e-5, show_default=True,
              help="Largest relative Frobenius difference ‖ΔW_A − ΔW_B‖/‖ΔW_A‖ accepted per module.")
@in_format_option
@family_option
@nonfinite_option
@quiet_option
@json_option
@handle_errors
def verify_command(a, b, base, tol, in_format, family, allow_nonfinite, quiet, as_json):
    """Check that adapters A and B (any formats) are the same weight change, module by module.

    \b
    Per module: ‖ΔW_A − ΔW_B‖_F / ‖ΔW_A‖_F, computed from the factors (never the dense ΔW); DoRA
    magnitudes too (with --base: the effective W' − W through each side's DoRA formula). Modules in
    only one adapter, shape mismatches and DoRA magnitudes on another axis are findings.
    Exit 0 when every module is within --tol and both have the same modules, 1 otherwise.
    --from applies to both inputs (default: detect each).
    """
    from loratools.errors import LoraToolsError
    from loratools.verify import verify_adapters

    if tol < 0:
        raise click.BadParameter(f"{tol} is negative", param_hint="'--tol'")
    if a is None or b is None:  # pragma: no cover - click requires both
        raise LoraToolsError("verify needs two adapters")
    report = verify_adapters(a, b, base=base, tol=tol, format=in_format, family=family,
                             allow_nonfinite=allow_nonfinite,
                             progress=lambda it, n: progress(it, n, "verify", quiet))
    warnings = [f"A: {w}" for w in report["conventions"]["a"]["warnings"]]
    warnings += [f"B: {w}" for w in report["conventions"]["b"]["warnings"]] + report["warnings"]
    if as_json:
        emit_json(clean_floats(report))
        echo_warnings(warnings)
        return 0 if report["equal"] else 1
    by_name = {m["name"]: m for m in report["modules"]}
    s = report["summary"]
    if report["worst"]:
        rows = []
        for name in report["worst"][:SHOWN]:
            m = by_name[name]
            rel = m["relative_difference"]
            shown = f"only in {m['only_in']}" if m["only_in"] else ("not comparable" if rel is None else fmt(rel, 4))
            rows.append([name, shown, "; ".join(m["notes"])])
        click.echo(tabulate(rows, headers=["module", "relative difference", "note"], disable_numparse=True,
                            maxcolwidths=[None, None, 80]))
        if len(report["worst"]) > SHOWN:
            click.echo(f"… and {len(report['worst']) - SHOWN} more (--json lists every module)")
        click.echo("")
    c = report["conventions"]
    lines = [
        ("A", f"{a}: {_side(c['a'])}"),
        ("B", f"{b}: {_side(c['b'])}"),
        ("compared", f"{s['compared']} module(s), {s['within_tol']} within tol {tol:g} "
                     f"(max relative difference {fmt(s['max_relative_difference'], 3)}, relative to ‖ΔW_A‖_F)"),
    ]
    if report["only_in_a"] or report["only_in_b"]:
        lines.append(("only in A / B", f"{len(report['only_in_a'])} / {len(report['only_in_b'])}"))
    verdict = "equal" if report["equal"] else f"DIFFERENT ({len(report['worst'])} module(s))"
    lines.append(("verdict", verdict))
    click.echo(tabulate(lines, tablefmt="plain"))
    echo_warnings(warnings)
    return 0 if report["equal"] else 1
