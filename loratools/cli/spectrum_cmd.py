"""``loratools spectrum``: the spectrum of TUNED − BASE per layer, to choose an extraction rank."""

from __future__ import annotations

import click
from tabulate import tabulate

from loratools.cli.common import (
    canonical_fields,
    clean_floats,
    emit_json,
    fmt,
    handle_errors,
    json_option,
    main,
    progress,
    quiet_option,
    skipped_table,
)
from loratools.cli.extract_cmd import checkpoint_options
from loratools.cli.parallel import data_parallel, distributed_report, worker_done


@main.command("spectrum")
@checkpoint_options
@json_option
@click.option("--plot", type=click.Path(), default=None, help="Write spectra + effective-rank plots to this PNG.")
@click.option("--top", type=int, default=256, show_default=True,
              help="Singular values computed (randomized) for layers larger than --exact-below.")
@click.option("--exact", is_flag=True, help="Exact svdvals for every layer, however large.")
@click.option("--exact-below", type=int, default=1024, show_default=True,
              help="Exact svdvals for layers with min(m, n) up to this.")
@quiet_option
@click.option("--force", is_flag=True, help="Replace an existing --plot file.")
@handle_errors
@data_parallel(None)
def spectrum_command(base, tuned, include, exclude, device, seed, family, as_json, plot, top, exact, exact_below, quiet,
                     force):
    """Per-layer spectrum of ΔW = TUNED − BASE, without writing an adapter.

    σ₁, stable rank ‖ΔW‖²/σ₁², entropy effective rank, ranks keeping 50/90/99 % of ‖ΔW‖², and
    "rank r → energy kept / params" for r = 4…256. ‖ΔW‖² is exact; a randomized top-K spectrum
    leaves undecided values (beyond σ_K) empty.
    """
    from loratools.extract import spectrum
    from loratools.formats.common import check_output

    if plot:
        check_output(plot, force, [base, tuned], is_dir=False)
    from loratools.formats.resolve import check_family

    check_family(base, family)
    report = spectrum(base, tuned, include=include, exclude=exclude, top=top, exact=exact, exact_below=exact_below,
                      device=device, seed=seed, progress=lambda it, n: progress(it, n, "spectrum", quiet))
    if worker_done():
        return
    if plot:
        from loratools.plot import plot_spectra

        rows = [dict(r, rank90=r["energy_rank"]["0.9"]) for r in report["layers"]]
        plot_spectra(rows, plot, title=f"ΔW = {tuned} − {base}", force=force, outline_key="rank90",
                     outline_label="90 % energy rank")
    if as_json:
        for r in report["layers"]:
            canonical_fields(r["rank_table"].values(), {"energy": "retained_energy"})
        emit_json(clean_floats({**report, "distributed": distributed_report()}))
        return
    layers = report["layers"]
    ranks = report["table_ranks"]
    rows = []
    for r in layers:
        er = r["energy_rank"]
        rows.append([r["name"], "×".join(map(str, r["shape"])), fmt(r["relative_norm"], 3), fmt(r["sigma_1"]),
                     fmt(r["stable_rank"], 3), fmt(r["effective_rank"], 3),
                     "/".join(str(er[k]) if er[k] is not None else f">{len(r['singular_values'])}"
                              for k in ("0.5", "0.9", "0.99")),
                     "exact" if r["exact"] else f"top {len(r['singular_values'])}"])
    click.echo(tabulate(rows, headers=["layer", "shape", "‖ΔW‖/‖W‖", "σ₁", "stable", "eff.rank", "r@50/90/99%", "σ"],
                        disable_numparse=True))
    click.echo("\nenergy kept at rank r (LoRA params):")
    table = []
    for r in layers:
        cells = []
        for k in ranks:
            cell = r["rank_table"].get(str(k))
            cells.append("-" if cell is None else
                         f"{'?' if cell['energy'] is None else format(cell['energy'], '.4f')} ({_short(cell['params'])})")
        table.append([r["name"], *cells])
    totals = []
    for k in ranks:
        cells = [r["rank_table"].get(str(k)) for r in layers]
        params = sum(c["params"] if c else 0 for c in cells)
        totals.append(_short(params) if params else "-")
    table.append(["total params", *totals])
    click.echo(tabulate(table, headers=["layer", *[f"r={k}" for k in ranks]], disable_numparse=True))
    if report["changed_vectors"]:
        click.echo(f"\nchanged 1-D tensors: {', '.join(v['name'] for v in report['changed_vectors'])}")
    if report["skipped"]:
        click.echo("\nskipped:")
        click.echo(skipped_table(report["skipped"]))
    s = report["summary"]
    click.echo(f"\n{s['layers']} layers ({s['exact_layers']} exact), {s['skipped']} skipped, "
               f"{s['wall_time_s']:.2f} s" + (f"; plot written to {plot}" if plot else ""))


def _short(n: int) -> str:
    return f"{n / 1e6:.1f}M" if n >= 1e6 else (f"{n / 1e3:.0f}k" if n >= 1e3 else str(n))
