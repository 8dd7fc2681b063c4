"""``loratools doctor``: what a serving target refuses or computes differently, and ``--fix`` for it."""

from __future__ import annotations

import click
from tabulate import tabulate

from loratools.cli.common import (
    clean_floats,
    dtype_option,
    echo_warnings,
    emit_json,
    family_option,
    fmt,
    force_option,
    handle_errors,
    in_format_option,
    json_option,
    main,
    nonfinite_option,
    parse_dtype,
    quiet_option,
)

# kept equal to loratools.doctor_rules.TARGETS by tests/test_doctor.py (importing it here is cheap, but keep the
# CLI module free of library imports like the others)
TARGETS = ("vllm", "sglang", "llama.cpp", "tensorrt-llm", "peft", "diffusers", "comfyui")


def _finding_lines(findings) -> list[str]:
    return [f"{f.severity}: [{f.rule}] {f.message}\n  fix: {f.fix}" for f in findings]


@main.command("doctor")
@click.argument("adapter", type=click.Path())
@click.option("--target", required=True, type=click.Choice(TARGETS), help="The engine or library that will load it.")
@click.option("--base", type=click.Path(), default=None,
              help="Base checkpoint: coverage checks, kohya names, and needed by --fix to fold DoRA.")
@click.option("--fix", is_flag=True, help="Write an adapter the target loads (needs -o).")
@click.option("-o", "--output", "out", type=click.Path(), default=None, help="Output of --fix (file or folder).")
@click.option("--max-rank", type=int, default=None,
              help="The rank cap the server runs with (vLLM: one of its max_lora_rank values); --fix truncates to it "
                   "and folds DoRA at this rank.")
@in_format_option
@family_option
@dtype_option
@force_option
@nonfinite_option
@json_option
@quiet_option
@handle_errors
def doctor_command(adapter, target, base, fix, out, max_rank, in_format, family, dtype, force, allow_nonfinite, as_json,
                   quiet):
    """Check ADAPTER against the rules of --target: one line per broken rule, with what to do.

    Exit 0 when nothing is broken (warnings and notes may remain), 1 when a rule is broken. With --fix -o OUT,
    write an adapter the target loads that computes the same thing (DoRA folded, rsLoRA and per-module alphas
    folded into the factors, LoHa/LoKr made plain LoRA), or the closest one with the loss per layer (ranks above
    the target's cap truncated optimally), dropping what it cannot hold with a warning naming it; the output is
    checked again and the command fails if anything is still broken.
    """
    from loratools.doctor import check_target_max_rank

    if fix and out is None:
        raise click.UsageError("--fix needs -o/--output OUT")
    if out is not None and not fix:
        raise click.UsageError("-o/--output is only used with --fix")
    why = check_target_max_rank(target, max_rank)
    if why:
        raise click.BadParameter(why, param_hint="'--max-rank'")

    from loratools.checkpoint import Checkpoint
    from loratools.doctor import Context, broken, diagnose, fix_adapter, load_for_doctor
    from loratools.formats import check_output_name, output_is_folder, save_adapter
    from loratools.formats.common import check_output

    dt = parse_dtype(dtype)
    ckpt = Checkpoint(base) if base else None
    ad, zero, unmatched = load_for_doctor(adapter, in_format, ckpt, family, allow_nonfinite)
    ctx = Context(ad, target, ckpt, zero, max_rank, unmatched)
    findings = diagnose(ctx)
    doc: dict = {"target": target, "input": str(adapter), "format": ad.format,
                 "findings": [vars(f) for f in findings], "ok": not broken(findings)}
    if not fix:
        if as_json:
            emit_json(clean_floats(doc))
        else:
            for line in _finding_lines(findings):
                click.echo(line)
            state = "broken" if broken(findings) else "ok"
            click.echo(f"{adapter}: {state} for {target} ({sum(f.severity == 'error' for f in findings)} error(s), "
                       f"{sum(f.severity == 'warning' for f in findings)} warning(s))")
        return 1 if broken(findings) else 0

    fixed, rows, warnings, out_format = fix_adapter(ctx, findings)
    out_path = check_output(out, force, [adapter, base], is_dir=output_is_folder(out_format))
    check_output_name(out_format, out_path)
    save_adapter(fixed, out_path, out_format, force=force, dtype=dt)
    ad2, zero2, unmatched2 = load_for_doctor(out_path, out_format, ckpt, family, allow_nonfinite)
    after = diagnose(Context(ad2, target, ckpt, zero2, max_rank, unmatched2))
    warnings = warnings + [w for w in fixed.warnings if w not in ad.warnings]
    doc.update(output=str(out_path), output_format=out_format, per_layer=rows, warnings=warnings,
               findings_after=[vars(f) for f in after], ok=not broken(after))
    if as_json:
        emit_json(clean_floats(doc))
    else:
        for line in _finding_lines(findings):
            click.echo(line)
        changed = [r for r in rows if r["action"] != "kept"]
        if changed:
            click.echo("")
            click.echo(tabulate([[r["name"], r["source_type"], r["source_rank"], r["rank"], r["action"],
                                  fmt(r["retained_energy"], 6), fmt(r["relative_error"], 3)] for r in changed],
                                headers=["layer", "type", "src rank", "rank", "action", "energy", "rel.err"],
                                disable_numparse=True))
        click.echo("")
        click.echo(f"wrote {out_format} adapter with {len(fixed.layers)} layers to {out_path}")
        for line in _finding_lines(after):
            click.echo("after fix: " + line)
        click.echo(f"{out_path}: {'broken' if broken(after) else 'ok'} for {target}")
    echo_warnings(warnings)
    return 1 if broken(after) else 0
