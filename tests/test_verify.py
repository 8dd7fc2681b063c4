"""verify: seeded faults are caught and named; clean pairs across formats give no false alarm; every writer of
ours is checked with ``verify`` against its input."""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from loratools.formats import FORMATS, READ_FORMATS
from tests.conftest import SAMPLES

BASE = SAMPLES / "base"
UNET_BASE = SAMPLES / "unet_base.safetensors"
PREFIX = "base_model.model."
Q0 = "model.layers.0.self_attn.q_proj"
V0 = "model.layers.0.self_attn.v_proj"
O1 = "model.layers.1.self_attn.o_proj"
UP1 = "model.layers.1.mlp.up_proj"


def peft_copy(tmp_path: Path, name: str, config: dict | None = None, edit=None, src: Path = SAMPLES / "peft_lora") -> Path:
    """A copy of a PEFT sample folder with ``config`` keys replaced and ``edit(tensors)`` applied."""
    out = tmp_path / name
    shutil.copytree(src, out)
    if config is not None:
        cfg = json.loads((out / "adapter_config.json").read_text())
        cfg.update(config)
        (out / "adapter_config.json").write_text(json.dumps(cfg))
    if edit is not None:
        tensors = load_file(out / "adapter_model.safetensors")
        edit(tensors)
        save_file({k: v.contiguous() for k, v in tensors.items()}, out / "adapter_model.safetensors", metadata={"format": "pt"})
    return out


def verify(cli, a, b, *extra):
    res = cli("verify", a, b, "--json", "-q", *extra)
    doc = json.loads(res.stdout)
    assert res.exit_code == (0 if doc["equal"] else 1), res.output
    return res.exit_code, doc


def failing(doc) -> set[str]:
    return {m["name"] for m in doc["modules"] if not m["within_tol"]}


def module(doc, name):
    return next(m for m in doc["modules"] if m["name"] == name)


def notes(doc, name) -> str:
    return " ".join(module(doc, name)["notes"])


# --- clean pairs: no false alarms --------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
    """peft_lora written as kohya and diffusers (fp32, exact copies of the factors)."""
    from click.testing import CliRunner

    from loratools.cli import main

    tmp = tmp_path_factory.mktemp("verify_clean")
    runner = CliRunner()
    out = {"peft": SAMPLES / "peft_lora"}
    for fmt in ("kohya", "diffusers"):
        path = tmp / f"lora_{fmt}.safetensors"
        res = runner.invoke(main, ["convert", str(SAMPLES / "peft_lora"), "--to", fmt, "-o", str(path), "-q"])
        assert res.exit_code == 0, res.output
        out[fmt] = path
    return out


@pytest.mark.parametrize("a,b", [("peft", "peft"), ("peft", "kohya"), ("kohya", "peft"), ("peft", "diffusers"),
                                 ("kohya", "diffusers")])
def test_clean_pairs_are_equal(cli, converted, a, b):
    code, doc = verify(cli, converted[a], converted[b], "--base", BASE)
    assert code == 0, [(m["name"], m["relative_difference"], m["notes"]) for m in doc["modules"] if not m["within_tol"]]
    assert doc["only_in_a"] == doc["only_in_b"] == [] and doc["worst"] == []
    assert len(doc["modules"]) == 14
    assert all(m["relative_difference"] <= 1e-6 and m["only_in"] is None for m in doc["modules"])
    assert set(doc["conventions"]) == {"a", "b"}
    assert doc["conventions"]["a"]["scale_rules"] == {"alpha/r": 14}


def test_kohya_stems_pair_without_base(cli, converted):
    res = cli("verify", converted["peft"], converted["kohya"], "-q")
    assert res.exit_code == 0, res.output
    assert "paired by mangled module path" in res.stderr
    assert "equal" in res.stdout


def test_fp16_sample_is_rounding_only(cli):
    """The bundled kohya sample is the PEFT sample in fp16: 3e-4 relative at the default tol, fine at 1e-3."""
    code, doc = verify(cli, SAMPLES / "peft_lora", SAMPLES / "kohya_lora.safetensors", "--base", BASE)
    assert code == 1 and len(failing(doc)) == 14
    assert "float16 rounding" in notes(doc, Q0)
    code, doc = verify(cli, SAMPLES / "peft_lora", SAMPLES / "kohya_lora.safetensors", "--base", BASE, "--tol", "1e-3")
    assert code == 0


# --- seeded faults: each exits 1 and names the module ------------------------------------------------------------


def test_rslora_dropped(cli, tmp_path):
    truth = peft_copy(tmp_path, "rs", {"use_rslora": True})
    dropped = peft_copy(tmp_path, "plain", {"use_rslora": False})
    code, doc = verify(cli, truth, dropped)
    assert code == 1 and Q0 in failing(doc) and len(failing(doc)) == 14
    assert "ΔW_B = 0.353553 × ΔW_A" in notes(doc, Q0) and "rsLoRA" in notes(doc, Q0)  # 1/√8
    assert doc["conventions"]["a"]["scale_rules"] == {"alpha/sqrt(r)": 14}
    assert doc["conventions"]["b"]["scale_rules"] == {"alpha/r": 14}
    assert doc["worst"][0] in failing(doc)


def test_alpha_changed_in_config(cli, tmp_path):
    code, doc = verify(cli, SAMPLES / "peft_lora", peft_copy(tmp_path, "alpha", {"lora_alpha": 32}))
    assert code == 1
    # v_proj takes its alpha from alpha_pattern: unchanged
    assert failing(doc) == {n for n in (m["name"] for m in doc["modules"]) if not n.endswith("v_proj")}
    assert module(doc, Q0)["relative_difference"] == pytest.approx(1.0, rel=1e-6)
    assert "ΔW_B = 2 × ΔW_A" in notes(doc, Q0) and "alpha 16 / 8" in notes(doc, Q0)


def test_alpha_pattern_entry_lost(cli, tmp_path):
    code, doc = verify(cli, SAMPLES / "peft_lora", peft_copy(tmp_path, "pattern", {"alpha_pattern": {}}))
    assert code == 1
    assert failing(doc) == {V0, "model.layers.1.self_attn.v_proj"}
    assert doc["conventions"]["a"]["config"]["alpha_pattern"] == {"v_proj": 8}


def test_kohya_per_layer_alpha_lost(cli, converted, tmp_path):
    tensors = load_file(converted["kohya"])
    del tensors["lora_unet_model_layers_1_mlp_up_proj.alpha"]
    bad = tmp_path / "no_alpha.safetensors"
    save_file(tensors, bad)
    code, doc = verify(cli, converted["kohya"], bad, "--base", BASE)
    assert code == 1 and failing(doc) == {UP1}
    assert "scale difference" in notes(doc, UP1) and "no alpha" in notes(doc, UP1)
    assert doc["conventions"]["b"]["scale_rules"] == {"alpha/r": 13, "1 (no alpha)": 1}


def test_lora_a_b_swapped_is_a_shape_finding(cli, tmp_path):
    def swap(t):
        a, b = PREFIX + Q0 + ".lora_A.weight", PREFIX + Q0 + ".lora_B.weight"
        t[a], t[b] = t[b], t[a]

    res = cli("verify", SAMPLES / "peft_lora", peft_copy(tmp_path, "swap", edit=swap), "-q")
    assert res.exit_code == 1 and "Traceback" not in res.output
    assert Q0 in res.stdout and "shape mismatch" in res.stdout
    code, doc = verify(cli, SAMPLES / "peft_lora", peft_copy(tmp_path, "swap2", edit=swap))
    assert failing(doc) == {Q0}
    m = module(doc, Q0)
    assert m["relative_difference"] is None and m["shape_a"] == [64, 64] and m["shape_b"] == [8, 8]
    assert doc["worst"] == [Q0]


def test_transposed_square_pair(cli, tmp_path):
    def transpose(t):
        a, b = PREFIX + O1 + ".lora_A.weight", PREFIX + O1 + ".lora_B.weight"
        t[a], t[b] = t[b].T, t[a].T  # ΔW' = Aᵀ Bᵀ = ΔWᵀ: same 64×64 shape, different matrix

    code, doc = verify(cli, SAMPLES / "peft_lora", peft_copy(tmp_path, "tr", edit=transpose))
    assert code == 1 and failing(doc) == {O1}
    assert module(doc, O1)["relative_difference"] > 0.5
    assert "transposed" in notes(doc, O1)


def test_missing_module(cli, tmp_path):
    def drop(t):
        for k in [k for k in t if UP1 in k]:
            del t[k]

    b = peft_copy(tmp_path, "missing", edit=drop)
    code, doc = verify(cli, SAMPLES / "peft_lora", b)
    assert code == 1 and doc["only_in_a"] == [UP1] and doc["only_in_b"] == []
    assert module(doc, UP1)["only_in"] == "A" and doc["worst"] == [UP1]
    code, doc = verify(cli, b, SAMPLES / "peft_lora")
    assert code == 1 and doc["only_in_b"] == [UP1]
    res = cli("verify", SAMPLES / "peft_lora", b, "-q")
    assert res.exit_code == 1 and UP1 in res.stdout and "only in A" in res.stdout


@pytest.mark.parametrize("size,expect", [(1e-4, 1), (1e-8, 0)])
def test_tiny_perturbation(cli, tmp_path, size, expect):
    def nudge(t):
        k = PREFIX + Q0 + ".lora_B.weight"
        g = torch.Generator().manual_seed(0)
        t[k] = t[k] + size * t[k].norm() / math.sqrt(t[k].numel()) * torch.randn(t[k].shape, generator=g)

    code, doc = verify(cli, SAMPLES / "peft_lora", peft_copy(tmp_path, "nudge", edit=nudge))
    assert code == expect
    if expect:
        assert failing(doc) == {Q0} and 1e-5 < module(doc, Q0)["relative_difference"] < 1e-3
    code, _ = verify(cli, SAMPLES / "peft_lora", peft_copy(tmp_path, "nudge2", edit=nudge), "--tol", "1e-2")
    assert code == 0


@pytest.fixture(scope="module")
def dora_kohya(tmp_path_factory):
    """peft_dora written as a kohya file (LyCORIS ``dora_scale`` [out, 1]) and a copy with q_proj's on the input axis."""
    from click.testing import CliRunner

    from loratools.cli import main

    tmp = tmp_path_factory.mktemp("verify_dora")
    good = tmp / "dora.safetensors"
    res = CliRunner().invoke(main, ["convert", str(SAMPLES / "peft_dora"), "--to", "kohya", "-o", str(good),
                                    "--base", str(BASE), "-q"])
    assert res.exit_code == 0, res.output
    tensors = load_file(good)
    key = "lora_unet_model_layers_0_self_attn_q_proj.dora_scale"
    assert tensors[key].shape == (64, 1)
    tensors[key] = tensors[key].reshape(1, 64)  # q_proj is 64×64: the same values fit the input axis
    bad = tmp / "dora_in_axis.safetensors"
    save_file(tensors, bad)
    return good, bad


def test_dora_clean_pair_peft_vs_lycoris(cli, dora_kohya):
    good, _ = dora_kohya
    code, doc = verify(cli, SAMPLES / "peft_dora", good, "--base", BASE)
    assert code == 0
    assert all(m["compared"] == "effective" for m in doc["modules"])
    assert doc["conventions"]["a"]["dora"]["convention"] == {"peft": 4}
    assert doc["conventions"]["b"]["dora"]["convention"] == {"lycoris": 4}


@pytest.mark.parametrize("with_base", [True, False])
def test_dora_magnitude_on_wrong_axis(cli, dora_kohya, with_base):
    good, bad = dora_kohya
    extra = ("--base", BASE) if with_base else ()
    code, doc = verify(cli, good, bad, *extra)
    name = Q0 if with_base else "lora_unet_" + Q0.replace(".", "_")  # two kohya files: stems without --base
    assert code == 1 and failing(doc) == {name}
    assert doc["conventions"]["b"]["dora"]["axis"] == {"in": 1, "out": 3}
    m = module(doc, name)
    if with_base:
        assert m["compared"] == "effective" and m["relative_difference"] > 1e-3
    else:
        assert m["relative_difference"] is None and "different axes" in notes(doc, name)
        assert m["delta_relative_difference"] == 0.0  # ΔW itself is identical


def test_dora_magnitude_compared_without_base(cli, tmp_path):
    def scale_mag(t):
        k = PREFIX + V0 + ".lora_magnitude_vector"
        t[k] = t[k] * 1.01

    b = peft_copy(tmp_path, "mag", edit=scale_mag, src=SAMPLES / "peft_dora")
    code, doc = verify(cli, SAMPLES / "peft_dora", b)
    assert code == 1 and failing(doc) == {V0}
    m = module(doc, V0)
    assert m["compared"] == "delta+magnitude" and m["delta_relative_difference"] == 0.0
    assert m["magnitude_relative_difference"] == pytest.approx(0.01, rel=1e-4)
    assert "without --base" in notes(doc, V0)


def test_table_and_usage_errors(cli, tmp_path):
    res = cli("verify", SAMPLES / "peft_lora", peft_copy(tmp_path, "alpha", {"lora_alpha": 32}), "-q")
    assert res.exit_code == 1
    assert res.stdout.splitlines()[0].split() == ["module", "relative", "difference", "note"]
    assert "DIFFERENT" in res.stdout
    res = cli("verify", SAMPLES / "peft_lora", SAMPLES / "peft_lora", "-q")
    assert res.exit_code == 0 and "verdict   equal" in res.stdout
    assert cli("verify", SAMPLES / "peft_lora", "--tol", "nan").exit_code == 2
    cli.fails("verify", SAMPLES / "peft_lora", tmp_path / "nope", match="no such file")


# --- every writer of ours is checked with verify against its input -----------------------------------------------

SOURCES = {
    "peft_lora": (SAMPLES / "peft_lora", BASE, ()),
    "kohya_lora": (SAMPLES / "kohya_lora.safetensors", BASE, ()),
    "peft_dora": (SAMPLES / "peft_dora", BASE, ()),
    "locon": (SAMPLES / "locon.safetensors", UNET_BASE, ()),
    # LoHa/LoKr/Tucker/full layers become new LoRA factors, stored in the input's fp16: ~3e-4 relative rounding
    "lycoris": (SAMPLES / "lycoris.safetensors", UNET_BASE, ("--tol", "1e-3")),
}


def _out(tmp_path: Path, fmt: str) -> Path:
    return tmp_path / ("out" if fmt == "peft" else "out.safetensors")


@pytest.mark.parametrize("fmt", [f for f in FORMATS if f in READ_FORMATS])  # what can be read back
@pytest.mark.parametrize("src", SOURCES)
def test_every_writer_verifies_against_its_input(cli, tmp_path, src, fmt):
    path, base, tol = SOURCES[src]
    out = _out(tmp_path, fmt)
    res = cli("convert", path, "--to", fmt, "-o", out, "--base", base, "-q")
    if res.exit_code != 0:
        # only a refusal the target states is acceptable (comfy: ComfyUI keys exist for SD families only)
        assert "cannot be written" in res.stderr or "needs a Stable Diffusion family" in res.stderr, res.output
        pytest.skip(res.stderr.strip())
    code, doc = verify(cli, path, out, "--base", base, *tol)
    assert code == 0, [(m["name"], m["relative_difference"], m["notes"]) for m in doc["modules"] if not m["within_tol"]]


@pytest.mark.parametrize("src", SOURCES)
def test_resize_without_rank_change_verifies(cli, tmp_path, src):
    path, base, tol = SOURCES[src]
    out = _out(tmp_path, "peft" if path.is_dir() else "kohya")
    res = cli("resize", path, "-o", out, "--max-rank", "100000", "--base", base, "-q")
    if res.exit_code != 0:
        assert "dora" in res.stderr.lower(), res.output  # resize refuses DoRA rather than guess
        pytest.skip(res.stderr.strip())
    code, doc = verify(cli, path, out, "--base", base, *tol)
    assert code == 0, [(m["name"], m["relative_difference"], m["notes"]) for m in doc["modules"] if not m["within_tol"]]


def test_convert_dtype_fp32_of_fp16_structured_layers_is_exact(cli, tmp_path):
    out = tmp_path / "o.safetensors"
    cli.ok("convert", SAMPLES / "lycoris.safetensors", "--to", "kohya", "-o", out, "--base", UNET_BASE,
           "--dtype", "fp32", "-q")
    code, doc = verify(cli, SAMPLES / "lycoris.safetensors", out, "--base", UNET_BASE)
    assert code == 0, failing(doc)


def test_help_does_not_import_torch_and_json_errors(cli, tmp_path):
    import subprocess
    import sys

    code = ("import sys\nfrom loratools.cli import main\ntry:\n    main(['verify', '--help'])\n"
            "except SystemExit as e:\n    assert e.code == 0, e.code\nprint('TORCH', 'torch' in sys.modules, file=sys.stderr)")
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert res.returncode == 0 and "Usage:" in res.stdout and "TORCH False" in res.stderr, res.stderr
    res = cli("verify", SAMPLES / "peft_lora", tmp_path / "missing", "--json")
    assert res.exit_code == 1 and json.loads(res.stdout)["exit_code"] == 1
    res = cli("verify", SAMPLES / "peft_lora", SAMPLES / "peft_lora", "--tol", "-1")
    assert res.exit_code == 2 and "--tol" in res.stderr
