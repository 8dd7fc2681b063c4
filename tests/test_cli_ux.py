"""CLI contract: fast --help, --from/--to, canonical --json fields, JSON errors, exit codes, progress, plots."""

from __future__ import annotations

import json
import math
import subprocess
import sys

import pytest

from tests.conftest import PROGRESS_LINE, ROOT, SAMPLES, error_line

COMMANDS = ["inspect", "extract", "spectrum", "resize", "merge", "convert", "bake", "verify", "doctor"]


def _run(*args: str, close_stdout: bool = False) -> subprocess.CompletedProcess:
    proc = subprocess.Popen([sys.executable, *args], cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    if close_stdout:  # the reader goes away before the command writes anything, like `| head -c0`
        proc.stdout.close()
        err = proc.stderr.read()
        proc.wait()
        return subprocess.CompletedProcess(proc.args, proc.returncode, "", err)
    out, err = proc.communicate(timeout=120)
    return subprocess.CompletedProcess(proc.args, proc.returncode, out, err)


# --- 1. start-up: --help never imports torch --------------------------------------------------------------------

@pytest.mark.parametrize("argv", [["--help"], *([c, "--help"] for c in COMMANDS)])
def test_help_does_not_import_torch(argv):
    code = ("import sys\nfrom loratools.cli import main\n"
            f"try:\n    main({argv!r})\nexcept SystemExit as e:\n    assert e.code == 0, e.code\n"
            "print('TORCH', 'torch' in sys.modules, file=sys.stderr)")
    res = _run("-c", code)
    assert res.returncode == 0, res.stderr
    assert "Usage:" in res.stdout
    assert "TORCH False" in res.stderr


def test_library_names_are_still_importable():
    res = _run("-c", "import sys, loratools\nassert 'torch' not in sys.modules\n"
                     "from loratools import Adapter, LoraLayer, load_adapter, save_adapter\n"
                     "print(load_adapter.__module__, 'torch' in sys.modules)")
    assert res.returncode == 0, res.stderr
    assert res.stdout.split() == ["loratools.formats", "True"]


def test_cli_choice_lists_match_the_library():
    from loratools.cli import common
    from loratools.formats import FORMATS
    from loratools.formats.common import COMPONENTS
    from loratools.merge import METHODS

    assert common.FORMATS == FORMATS and common.COMPONENTS == COMPONENTS and common.MERGE_METHODS == METHODS
    from loratools.families import FAMILIES

    assert common.FAMILIES == tuple(FAMILIES)


# --- 2. --from / --to, old spellings kept ----------------------------------------------------------------------

def test_from_and_format_are_the_same_input_option(cli):
    for flag in ("--from", "--format"):
        doc = json.loads(cli.ok("inspect", SAMPLES / "peft_lora", flag, "peft", "--json", "-q").stdout)
        assert doc["format"] == "peft"
        cli.fails("inspect", SAMPLES / "peft_lora", flag, "kohya", match="peft_lora")


def test_to_names_the_output_everywhere(cli, tmp_path):
    kohya = SAMPLES / "kohya_lora.safetensors"
    for i, flag in enumerate(("--to", "--format")):  # merge and extract: --format was the output format
        out = tmp_path / f"m{i}.safetensors"
        assert json.loads(cli.ok("merge", kohya, kohya, "-o", out, flag, "kohya", "--json", "-q").stdout)["format"] == "kohya"
        out = tmp_path / f"e{i}.safetensors"
        doc = json.loads(cli.ok("extract", "--base", SAMPLES / "base", "--tuned", SAMPLES / "tuned", "-o", out,
                                flag, "kohya", "--rank", "2", "--json", "-q").stdout)
        assert doc["summary"]["format"] == "kohya" and out.is_file()
    doc = json.loads(cli.ok("resize", SAMPLES / "peft_lora", "--from", "peft", "--to", "kohya", "--rank", "2",
                            "-o", tmp_path / "r.safetensors", "--json", "-q").stdout)
    assert doc["format"] == "kohya"
    doc = json.loads(cli.ok("convert", kohya, "--from", "kohya", "--to", "peft", "--base", SAMPLES / "base",
                            "-o", tmp_path / "c", "--json", "-q").stdout)
    assert doc["input_format"] == "kohya" and doc["format"] == "peft"
    cli.fails("merge", kohya, "--from", "peft", "-o", tmp_path / "x", match="kohya_lora")


# --- 2b. canonical --json field names ----------------------------------------------------------------------------

def _json(cli, *args):
    return json.loads(cli.ok(*args, "--json", "-q").stdout)


def test_json_rows_have_the_canonical_fields(cli, tmp_path):
    peft, base, tuned = SAMPLES / "peft_lora", SAMPLES / "base", SAMPLES / "tuned"
    docs = {
        "inspect": _json(cli, "inspect", peft)["layers"],
        "extract": _json(cli, "extract", "--base", base, "--tuned", tuned, "-o", tmp_path / "e", "--rank", "2")["layers"],
        "spectrum": _json(cli, "spectrum", "--base", base, "--tuned", tuned)["layers"],
        "resize": _json(cli, "resize", peft, "-o", tmp_path / "r", "--rank", "2")["layers"],
        "merge": _json(cli, "merge", peft, f"{peft}:0.5", "-o", tmp_path / "m")["layers"],
        "convert": _json(cli, "convert", peft, "--to", "kohya", "-o", tmp_path / "c.safetensors", "--rank", "2")["per_layer"],
    }
    canonical = {"name", "shape", "rank", "relative_error", "retained_energy", "sigma_1", "fro_norm", "type",
                 "source_type", "source_rank", "kind", "relative_norm"}
    required = {
        "inspect": {"name", "shape", "rank", "type", "sigma_1", "fro_norm"},
        "extract": {"name", "shape", "rank", "kind", "retained_energy", "relative_error", "sigma_1", "fro_norm"},
        "spectrum": {"name", "shape", "kind", "sigma_1", "fro_norm"},
        "resize": {"name", "shape", "rank", "source_rank", "source_type", "retained_energy", "relative_error", "fro_norm"},
        "merge": {"name", "shape", "rank", "relative_error", "fro_norm"},
        "convert": {"name", "shape", "rank", "source_rank", "source_type", "retained_energy", "relative_error"},
    }
    for command, rows in docs.items():
        assert rows, command
        for row in rows:
            assert required[command] <= set(row), (command, required[command] - set(row))
            assert isinstance(row["name"], str) and isinstance(row["shape"], list)
            if "rank" in row:
                assert isinstance(row["rank"], int)
        assert required[command] <= canonical
    # the old names stay, equal to the new ones, for one release
    for row in docs["inspect"]:
        assert row["spectral_norm"] == row["sigma_1"]
    for row in docs["resize"]:
        assert (row["new_rank"], row["old_rank"], row["kind"]) == (row["rank"], row["source_rank"], row["source_type"])
        assert row["rank"] == 2
    for row in docs["spectrum"]:
        for cell in row["rank_table"].values():
            assert cell["energy"] == cell["retained_energy"]


# --- 3. errors under --json ----------------------------------------------------------------------------------------

def test_json_error_document_on_stdout(cli, tmp_path):
    res = cli("inspect", tmp_path / "missing", "--json")
    assert res.exit_code == 1
    doc = json.loads(res.stdout)
    assert doc == {"error": error_line(res.stderr).removeprefix("error: "), "exit_code": 1}
    assert "missing" in doc["error"]
    # a mistyped command line keeps exit 2, and still one JSON document
    res = cli("inspect", SAMPLES / "peft_lora", "--json", "--top", "-1")
    assert res.exit_code == 2
    assert json.loads(res.stdout)["exit_code"] == 2 and "--top" in json.loads(res.stdout)["error"]
    # without --json stdout stays empty
    res = cli("inspect", tmp_path / "missing")
    assert res.exit_code == 1 and res.stdout == ""


# --- 4. exit codes: OS errors name the file, bugs exit 1, a closed pipe exits quietly ------------------------------

def test_os_error_names_the_file_and_exits_1(cli, tmp_path, monkeypatch):
    import loratools.formats as formats

    (tmp_path / "ro").mkdir()
    target = tmp_path / "ro" / "out.safetensors"

    def denied(*args, **kwargs):
        raise PermissionError(13, "Permission denied", str(target))

    monkeypatch.setattr(formats, "save_adapter", denied)
    res = cli.fails("convert", SAMPLES / "peft_lora", "--to", "kohya", "-o", target, match="permission denied")
    assert res.exit_code == 1
    assert error_line(res.stderr) == f"error: {target}: Permission denied"


def test_unexpected_exception_exits_1_not_2(cli, monkeypatch):
    import loratools.inspect as inspect_mod

    def bug(*args, **kwargs):
        raise TypeError("unsupported operand")

    monkeypatch.setattr(inspect_mod, "inspect_adapter", bug)
    res = cli.fails("inspect", SAMPLES / "peft_lora", match="unexpected TypeError")
    assert res.exit_code == 1


@pytest.mark.parametrize("argv", [["inspect", "samples/peft_lora", "--json"], ["inspect", "samples/peft_lora"],
                                  ["--help"]])
def test_closed_pipe_exits_quietly(argv):
    res = _run("-m", "loratools", *argv, close_stdout=True)
    assert res.returncode == 1
    assert "Traceback" not in res.stderr and "Exception ignored" not in res.stderr and "error" not in res.stderr
    assert all(PROGRESS_LINE.match(line) for line in res.stderr.splitlines()), res.stderr


# --- 5. option validation --------------------------------------------------------------------------------------------

@pytest.mark.parametrize("flag", ["--threshold", "--ratio", "--energy"])
@pytest.mark.parametrize("value", ["nan", "inf"])
def test_non_finite_rule_values_are_refused(cli, tmp_path, flag, value):
    res = cli("resize", SAMPLES / "peft_lora", "-o", tmp_path / "o", flag, value)
    assert res.exit_code == 2
    assert flag in error_line(res.stderr) and "finite" in res.stderr
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize("kind", ["energy", "ratio", "threshold"])
def test_rank_rule_refuses_nan(kind):
    from loratools.errors import LoraToolsError
    from loratools.linalg import RankRule

    for value in (math.nan, math.inf):
        with pytest.raises(LoraToolsError, match=f"--{kind} must be a finite number"):
            RankRule(kind, value)


def test_conv_rank_zero_names_conv_rank(cli, tmp_path):
    res = cli.fails("resize", SAMPLES / "locon.safetensors", "-o", tmp_path / "o.safetensors", "--conv-rank", "0",
                    match="--conv-rank")
    assert "--rank " not in res.stderr
    cli.fails("extract", "--base", SAMPLES / "base", "--tuned", SAMPLES / "tuned", "-o", tmp_path / "e",
              "--conv-rank", "0", match="--conv-rank must be a positive integer")


# --- 6. progress lines on a non-terminal stderr ------------------------------------------------------------------

def test_progress_lines_when_stderr_is_not_a_terminal(cli, tmp_path):
    res = cli.ok("inspect", SAMPLES / "peft_lora")
    lines = res.stderr.splitlines()
    assert lines and all(PROGRESS_LINE.match(line) for line in lines), lines
    assert lines[-1] == "inspect: 14/14 layers (100%)"
    assert 2 <= len(lines) <= 11
    # --json: stdout is still one JSON document, the lines stay on stderr
    res = cli.ok("inspect", SAMPLES / "peft_lora", "--json")
    json.loads(res.stdout)
    assert res.stderr.splitlines()[-1] == "inspect: 14/14 layers (100%)"
    # --quiet: nothing
    assert cli.ok("inspect", SAMPLES / "peft_lora", "--quiet").stderr == ""
    assert cli.ok("resize", SAMPLES / "peft_lora", "--rank", "2", "-o", tmp_path / "r", "-q").stderr == ""


def test_progress_lines_every_ten_percent(capsys):
    from loratools.cli.common import progress_lines

    assert list(progress_lines(range(120), 120, "extract")) == list(range(120))
    lines = capsys.readouterr().err.splitlines()
    assert lines[0] == "extract: 12/120 layers (10%)" and lines[-1] == "extract: 120/120 layers (100%)"
    assert len(lines) == 10
    list(progress_lines(iter(range(25)), None, "bake", unit="files"))
    assert capsys.readouterr().err.splitlines() == ["bake: 10 files", "bake: 20 files", "bake: 25 files"]


# --- 7. plots ------------------------------------------------------------------------------------------------------

def test_natural_sort_and_blocks():
    from loratools.plot import block_and_module, natural_sorted

    names = [f"model.layers.{i}.self_attn.q_proj" for i in (10, 2, 1, 11, 0)]
    assert natural_sorted(names) == [f"model.layers.{i}.self_attn.q_proj" for i in (0, 1, 2, 10, 11)]
    assert natural_sorted(["b2", "a10", "a9", "b10"]) == ["a9", "a10", "b2", "b10"]
    assert block_and_module("model.layers.12.self_attn.q_proj") == ("model.layers.12", "self_attn.q_proj")
    assert block_and_module("lm_head") == ("-", "lm_head")


def _synthetic_rows(blocks: int, modules: list[str]) -> list[dict]:
    rows = []
    for b in range(blocks):
        for j, m in enumerate(modules):
            sv = [math.exp(-(i + 1) / (3 + (b + j) % 7)) for i in range(32)]
            rows.append({"name": f"model.layers.{b}.{m}", "singular_values": sv, "effective_rank": 4.0 + (b * j) % 13,
                         "rank90": 2 + (b + 2 * j) % 20, "rank": 16})
    return rows


@pytest.mark.parametrize("blocks", [2, 8, 43])
def test_plot_height_is_bounded(tmp_path, blocks):
    pytest.importorskip("matplotlib")
    from PIL import Image

    from loratools.plot import MAX_HEIGHT_PX, plot_spectra

    rows = _synthetic_rows(blocks, ["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
                                    "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj"])
    png = tmp_path / "p.png"
    plot_spectra(rows, png, title="ΔW = tuned − base", outline_key="rank90", outline_label="90 % energy rank")
    width, height = Image.open(png).size
    assert 300 < height <= MAX_HEIGHT_PX and width <= 2000, (blocks, width, height)
