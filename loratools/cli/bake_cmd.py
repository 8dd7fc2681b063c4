"""``loratools bake``: base checkpoint + Σ wᵢ·ΔWᵢ, written in the base's layout, shard by shard."""

from __future__ import annotations

import click

from loratools.cli.common import (
    dtype_option,
    echo_warnings,
    emit_json,
    family_option,
    force_option,
    handle_errors,
    json_option,
    main,
    nonfinite_option,
    parse_dtype,
    progress,
    quiet_option,
)
from loratools.cli.parallel import data_parallel, distributed_report, worker_done


@main.command("bake")
@click.argument("specs", nargs=-1, required=True, metavar="ADAPTER[:W] ...")
@click.option("--base", required=True, type=click.Path(), help="Base checkpoint (HF folder, shards or single file).")
@click.option("-o", "--output", "out", required=True, type=click.Path(),
              help="Output: a folder for a folder base, a file for a single-file base.")
@dtype_option
@force_option
@json_option
@quiet_option
@nonfinite_option
@family_option
@click.option("--device", default="cpu", show_default=True,
              help="auto, cpu or cuda: where the touched tensors are updated (under torchrun: each rank's own GPU).")
@handle_errors
@data_parallel("out")
def bake_command(specs, base, out, dtype, force, as_json, quiet, allow_nonfinite, family, device):
    """Write BASE + Σ wᵢ·ΔWᵢ as a full checkpoint (same files, keys, dtype; configs copied).

    Adapters apply in the order given, like PEFT's merge_and_unload; DoRA layers use their source
    library's formula: PEFT m·(W + w·ΔW)/‖W + w·ΔW‖, LyCORIS V·(w·(m/(‖V‖+eps) − 1) + 1) with V = W + ΔW.
    Kohya names are resolved against BASE.
    """
    from loratools.bake import bake
    from loratools.merge import parse_weighted_spec

    parsed = [parse_weighted_spec(s) for s in specs]
    doc = bake(base, parsed, out, dtype=parse_dtype(dtype), force=force,
               progress=lambda it, n: progress(it, n, "bake", quiet, unit="files"), allow_nonfinite=allow_nonfinite, family=family,
               device=device)
    if worker_done():
        return
    if as_json:
        emit_json({**doc, "distributed": distributed_report()})
        return
    click.echo(f"baked {len(parsed)} adapter(s) ({doc['layers']} layers) into {doc['modified']} of {doc['tensors']} "
               f"tensors in {doc['files']} file(s); dtype {doc['dtype']}; wrote {doc['output']}")
    echo_warnings(doc["warnings"])
