"""spectrum: per-layer ΔW spectra of a fine-tune against float64 SVD; randomized top-K; CLI table/JSON/plot."""

from __future__ import annotations

import json
import math

import pytest
import torch
from test_extract import big_pair, llama_pair  # noqa: F401  (fixtures)

from loratools.errors import LoraToolsError
from loratools.extract import TABLE_RANKS, spectrum


def ref_stats(diff: torch.Tensor) -> dict:
    s = torch.linalg.svdvals(diff.double().reshape(diff.shape[0], -1))
    e = s.square()
    cum = torch.cumsum(e, 0) / e.sum()
    p = s[s > 0] / s.sum()
    return {
        "s": s, "cum": cum, "stable": float(e.sum() / e[0]), "eff": math.exp(float(-(p * p.log()).sum())),
        "r": {t: int((cum < t - 1e-12).sum()) + 1 for t in (0.5, 0.9, 0.99)},
    }


def test_spectrum_matches_float64_svd(llama_pair):  # noqa: F811
    root = llama_pair["root"]
    rep = spectrum(root / "base", root / "tuned")
    b, t = llama_pair["base"].state_dict(), llama_pair["tuned"].state_dict()
    assert len(rep["layers"]) == 16 and all(r["exact"] for r in rep["layers"])
    assert len(rep["changed_vectors"]) == 5
    for row in rep["layers"]:
        ref = ref_stats(t[row["key"]] - b[row["key"]])
        assert row["sigma_1"] == pytest.approx(float(ref["s"][0]), rel=1e-5)
        assert row["stable_rank"] == pytest.approx(ref["stable"], rel=1e-5)
        assert row["effective_rank"] == pytest.approx(ref["eff"], rel=1e-4)
        assert row["energy_rank"] == {str(k): v for k, v in ref["r"].items()}
        m, n = row["shape"]
        for r in TABLE_RANKS:
            if r > min(m, n):
                assert str(r) not in row["rank_table"]
                continue
            cell = row["rank_table"][str(r)]
            assert cell["params"] == r * (m + n)
            assert cell["energy"] == pytest.approx(float(ref["cum"][r - 1]), rel=1e-5)


def test_randomized_top_k(big_pair):  # noqa: F811
    root, base, tuned = big_pair
    rep = spectrum(root / "base.safetensors", root / "tuned.safetensors", top=20, exact_below=100,
                   include=["blocks.*"])
    assert [r["name"] for r in rep["layers"]] == ["blocks.0.proj", "blocks.1.proj"]
    for row in rep["layers"]:
        assert not row["exact"] and len(row["singular_values"]) == 20
        ref = ref_stats(tuned[row["key"]] - base[row["key"]])
        assert torch.allclose(torch.tensor(row["singular_values"], dtype=torch.float64), ref["s"][:20], rtol=1e-3)
        assert row["stable_rank"] == pytest.approx(ref["stable"], rel=1e-4)  # exact: uses exact ‖ΔW‖²
        assert row["effective_rank"] is None  # needs the whole spectrum
        for t, r in ref["r"].items():  # decided inside the top 20, or honestly undecided
            assert row["energy_rank"][str(t)] == (r if r <= 20 else None)
        assert row["rank_table"]["16"]["energy"] == pytest.approx(float(ref["cum"][15]), rel=1e-4)
        assert row["rank_table"]["32"]["energy"] is None
    exact = spectrum(root / "base.safetensors", root / "tuned.safetensors", top=20, exact=True, include=["blocks.*"])
    assert all(r["exact"] for r in exact["layers"])
    # a --top too large for the Krylov space of the layer (320×512, top 100): the exact, complete spectrum
    wide = spectrum(root / "base.safetensors", root / "tuned.safetensors", top=100, exact_below=100,
                    include=["blocks.1.*"])
    (row,) = wide["layers"]
    assert row["exact"] and len(row["singular_values"]) == 320 and row["effective_rank"] is not None


def test_spectrum_cli_table_json_plot(llama_pair, cli, tmp_path):  # noqa: F811
    root = llama_pair["root"]
    res = cli.ok("spectrum", "--base", root / "base", "--tuned", root / "tuned")
    for text in ("stable", "eff.rank", "r@50/90/99%", "energy kept at rank r", "r=4", "r=256", "total params",
                 "changed 1-D tensors", "model.norm.weight"):
        assert text in res.stdout
    res = cli.ok("spectrum", "--base", root / "base", "--tuned", root / "tuned", "--json", "--include", "*mlp*")
    doc = json.loads(res.stdout)
    assert {r["name"].split(".")[-1] for r in doc["layers"]} == {"gate_proj", "up_proj", "down_proj"}
    png = tmp_path / "s.png"
    cli.ok("spectrum", "--base", root / "base", "--tuned", root / "tuned", "--plot", png, "--quiet")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    cli.fails("spectrum", "--base", root / "base", "--tuned", root / "tuned", "--plot", png, match="already exists")
    assert list(tmp_path.iterdir()) == [png]


def test_spectrum_bad_inputs(llama_pair, cli, tmp_path):  # noqa: F811
    root = llama_pair["root"]
    cli.fails("spectrum", "--base", root / "base", "--tuned", tmp_path / "nope", match="no such file")
    cli.fails("spectrum", "--base", root / "base", "--tuned", root / "base", "--top", "0", match="--top")
    with pytest.raises(LoraToolsError, match="architecture mismatch"):
        from safetensors.torch import save_file

        save_file({"x.weight": torch.ones(3, 3)}, str(tmp_path / "x.safetensors"))
        spectrum(root / "base", tmp_path / "x.safetensors")
