"""Outputs never touch inputs; --force replaces only what loratools writes; concurrent runs, SIGTERM, missing
parents, write errors and bake's un-baked weight files (the "Trust first" issue)."""

from __future__ import annotations

import errno
import hashlib
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import textwrap
import time
from pathlib import Path

import pytest
import torch

import loratools.output as output
from tests.conftest import ROOT, SAMPLES, error_line

INPUTS = ["base", "tuned", "peft_lora", "kohya_lora.safetensors", "locon.safetensors", "unet_base.safetensors"]


@pytest.fixture
def ws(tmp_path) -> Path:
    """tmp_path/in holds copies of the samples (the inputs); outputs go next to it."""
    (tmp_path / "in").mkdir()
    for name in INPUTS:
        src = SAMPLES / name
        (shutil.copytree if src.is_dir() else shutil.copy)(src, tmp_path / "in" / name)
    shutil.copytree(SAMPLES / "peft_lora", tmp_path / "in" / "peft_lora2")
    return tmp_path


def snapshot(root: Path) -> dict[str, str]:
    """Every entry under ``root``: folders, links and the hash of every file's bytes."""
    snap = {}
    for p in sorted(root.rglob("*")):
        rel = str(p.relative_to(root))
        if p.is_symlink():
            snap[rel] = "link:" + os.readlink(p)
        elif p.is_dir():
            snap[rel] = "dir"
        else:
            snap[rel] = hashlib.sha256(p.read_bytes()).hexdigest()
    return snap


def strays(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if p.name.startswith("."))


# command → (argv with {out}, its inputs relative to ws/in); every command that writes
COMMANDS = {
    "convert-kohya": (["convert", "{in}/peft_lora", "--to", "kohya", "-o", "{out}"], ["peft_lora"]),
    "convert-peft": (["convert", "{in}/kohya_lora.safetensors", "--to", "peft", "--base", "{in}/base", "-o", "{out}"],
                     ["kohya_lora.safetensors", "base"]),
    "extract": (["extract", "--base", "{in}/base", "--tuned", "{in}/tuned", "--rank", "2", "-o", "{out}"],
                ["base", "tuned"]),
    "extract-kohya": (["extract", "--base", "{in}/base", "--tuned", "{in}/tuned", "--rank", "2", "--format", "kohya",
                       "-o", "{out}"], ["base", "tuned"]),
    "resize": (["resize", "{in}/peft_lora", "--rank", "2", "-o", "{out}"], ["peft_lora"]),
    "merge": (["merge", "{in}/peft_lora", "{in}/peft_lora2:0.5", "-o", "{out}"], ["peft_lora", "peft_lora2"]),
    "bake": (["bake", "--base", "{in}/base", "{in}/peft_lora", "-o", "{out}"], ["base", "peft_lora"]),
    "bake-file": (["bake", "--base", "{in}/unet_base.safetensors", "{in}/locon.safetensors:0.8", "-o", "{out}"],
                  ["unet_base.safetensors", "locon.safetensors"]),
    "inspect-plot": (["inspect", "{in}/peft_lora", "--plot", "{out}"], ["peft_lora"]),
    "spectrum-plot": (["spectrum", "--base", "{in}/base", "--tuned", "{in}/tuned", "--plot", "{out}"],
                      ["base", "tuned"]),
}


def argv(command: str, ws: Path, out: Path) -> list[str]:
    return [a.format(**{"in": ws / "in", "out": out}) for a in COMMANDS[command][0]]


def destructive_outputs(ws: Path, inputs: list[str], kind: str) -> list[Path]:
    """Outputs that would destroy an input if replaced (links are created here)."""
    paths = [ws / "in" / name for name in inputs]
    if kind == "same":
        return paths
    if kind == "inside":
        return [p / f for p in paths if p.is_dir() for f in (sorted(os.listdir(p))[-1], "new_output")]
    if kind == "parent":
        return [ws / "in"]
    if kind == "symlink":
        links = []
        for i, p in enumerate(paths):
            link = ws / f"link{i}"
            link.symlink_to(p)
            links.append(link)
        return links
    if kind == "hardlink":
        files = [f for p in paths for f in ([p] if p.is_file() else sorted(p.iterdir()))]
        links = []
        for i, f in enumerate(files):
            link = ws / f"hard{i}{f.suffix}"
            os.link(f, link)
            links.append(link)
        return links
    raise AssertionError(kind)


@pytest.mark.parametrize("kind", ["same", "inside", "parent", "symlink", "hardlink"])
@pytest.mark.parametrize("command", sorted(COMMANDS))
def test_outputs_that_would_destroy_an_input_are_refused(cli, ws, command, kind):
    before = snapshot(ws / "in")
    targets = destructive_outputs(ws, COMMANDS[command][1], kind)
    if not targets:
        pytest.skip("no input folder to write into")
    for out in targets:
        for force in ([], ["--force"]):
            res = cli.fails(*argv(command, ws, out), *force, match="input")
            assert res.exit_code == 1
            assert str(out) in res.stderr
    assert snapshot(ws / "in") == before
    assert strays(ws) == [] and strays(ws / "in") == []


def test_issue_examples_are_refused(cli, ws):
    """The reports verbatim: PEFT weights, the tuned model, the base weights, the adapter itself."""
    i = ws / "in"
    before = snapshot(i)
    cli.fails("convert", i / "peft_lora", "--to", "kohya", "-o", i / "peft_lora/adapter_model.safetensors", "--force",
              match="inside the input folder")
    cli.fails("extract", "--base", i / "base", "--tuned", i / "tuned", "-o", i / "tuned/model.safetensors",
              "--format", "kohya", "--force", match="inside the input folder")
    cli.fails("bake", "--base", i / "base", i / "peft_lora", "-o", i / "base/model.safetensors", "--force",
              match="inside the input folder")
    cli.fails("inspect", i / "kohya_lora.safetensors", "--plot", i / "kohya_lora.safetensors", "--force",
              match="output is the input")
    assert snapshot(i) == before


def test_force_refuses_a_folder_that_is_not_ours(cli, ws):
    out = ws / "project"
    (out / "src").mkdir(parents=True)
    (out / "notes.txt").write_text("mine")
    (out / "adapter_model.safetensors").write_bytes(b"x")
    (out / "src" / "main.py").write_text("print()")
    before = snapshot(out)
    res = cli.fails("convert", ws / "in/peft_lora", "--to", "peft", "-o", out, "--force", match="subfolder src")
    assert res.exit_code == 1
    shutil.rmtree(out / "src")
    (out / "report.docx").write_text("x")
    cli.fails("convert", ws / "in/peft_lora", "--to", "peft", "-o", out, "--force", match="report.docx")
    (out / "report.docx").unlink()
    (out / "adapter_model.safetensors").unlink()
    cli.fails("convert", ws / "in/peft_lora", "--to", "peft", "-o", out, "--force", match="no adapter or model weights")
    (out / "link.json").symlink_to(ws / "in/peft_lora/adapter_config.json")
    cli.fails("convert", ws / "in/peft_lora", "--to", "peft", "-o", out, "--force", match="link")
    (out / "link.json").unlink()
    (out / "src").mkdir()
    (out / "src" / "main.py").write_text("print()")
    (out / "adapter_model.safetensors").write_bytes(b"x")
    assert snapshot(out) == before
    # a file where a folder goes, a folder where a file goes, a link: refused too
    shutil.copytree(ws / "in/peft_lora", ws / "adapter")
    cli.fails("convert", ws / "in/peft_lora", "--to", "kohya", "-o", ws / "adapter", "--force",
              match="is a folder but the output is a file")
    (ws / "file").write_bytes(b"data")
    cli.fails("convert", ws / "in/peft_lora", "--to", "peft", "-o", ws / "file", "--force",
              match="is a file but the output is a folder")
    (ws / "elsewhere.safetensors").write_bytes(b"other")
    (ws / "k.safetensors").symlink_to(ws / "elsewhere.safetensors")
    cli.fails("convert", ws / "in/peft_lora", "--to", "kohya", "-o", ws / "k.safetensors", "--force",
              match="symbolic link")
    assert (ws / "file").read_bytes() == b"data" and (ws / "elsewhere.safetensors").read_bytes() == b"other"
    assert sorted(os.listdir(ws / "adapter")) == ["adapter_config.json", "adapter_model.safetensors"]
    assert strays(ws) == []


def test_force_replaces_what_loratools_writes(cli, ws):
    adapter = ws / "adapter"
    shutil.copytree(ws / "in/peft_lora", adapter)
    (adapter / "README.md").write_text("card")
    cli.ok("convert", ws / "in/peft_lora", "--to", "peft", "-o", adapter, "--force")
    assert sorted(os.listdir(adapter)) == ["adapter_config.json", "adapter_model.safetensors"]
    (ws / "empty").mkdir()
    cli.ok("convert", ws / "in/peft_lora", "--to", "peft", "-o", ws / "empty", "--force")
    (ws / "k.safetensors").write_bytes(b"old")
    cli.ok("convert", ws / "in/peft_lora", "--to", "kohya", "-o", ws / "k.safetensors", "--force")
    assert (ws / "k.safetensors").read_bytes() != b"old"
    # a bake output folder holds the base's own files: baking again over it is allowed
    (ws / "in/base/tokenizer.model").write_bytes(b"tok")
    (ws / "in/base/LICENSE").write_text("license")
    cli.ok("bake", "--base", ws / "in/base", ws / "in/peft_lora", "-o", ws / "baked")
    cli.ok("bake", "--base", ws / "in/base", ws / "in/peft_lora2", "-o", ws / "baked", "--force")
    assert sorted(os.listdir(ws / "baked")) == ["LICENSE", "config.json", "model.safetensors", "tokenizer.model"]
    assert strays(ws) == []


@pytest.mark.parametrize("native", [True, False], ids=["renameat2", "fallback"])
def test_force_replaces_a_folder_without_strays(cli, ws, monkeypatch, native):
    if not native:
        monkeypatch.setattr(output, "_RENAMEAT2", None)
    shutil.copytree(SAMPLES / "peft_dora", ws / "adapter")
    cli.ok("convert", ws / "in/peft_lora", "--to", "peft", "-o", ws / "adapter", "--force")
    assert sorted(os.listdir(ws / "adapter")) == ["adapter_config.json", "adapter_model.safetensors"]
    weights = (ws / "adapter/adapter_model.safetensors").read_bytes()
    assert weights != (SAMPLES / "peft_dora/adapter_model.safetensors").read_bytes()
    assert strays(ws) == []


@pytest.mark.parametrize("out", [".", "..", "sub/.."])
def test_current_folder_is_never_an_output(cli, ws, monkeypatch, out):
    work = ws / "work"
    (work / "sub").mkdir(parents=True)
    shutil.copy(ws / "in/kohya_lora.safetensors", work / "model.safetensors")
    monkeypatch.chdir(work)
    before = snapshot(ws)
    res = cli.fails("convert", ws / "in/peft_lora", "--to", "peft", "-o", out, "--force", match="current folder")
    assert res.exit_code == 1
    assert snapshot(ws) == before
    assert strays(ws) == [] and strays(work) == []


@pytest.mark.parametrize("to", ["kohya", "peft"])
def test_output_that_appears_meanwhile_is_not_replaced(cli, ws, monkeypatch, to):
    """Two runs to one output: the one that finishes second fails cleanly instead of replacing the first's."""
    import loratools.formats.kohya as kohya
    import loratools.formats.peft as peft

    module = kohya if to == "kohya" else peft
    out = ws / ("theirs.safetensors" if to == "kohya" else "theirs")
    real = module.save_safetensors

    def other_run_finishes_first(*args, **kwargs):
        real(*args, **kwargs)
        if to == "kohya":
            out.write_bytes(b"theirs")
        else:
            shutil.copytree(ws / "in/peft_lora", out)

    monkeypatch.setattr(module, "save_safetensors", other_run_finishes_first)
    res = cli.fails("convert", ws / "in/peft_lora", "--to", to, "-o", out, match="appeared while this run was writing")
    assert res.exit_code == 1
    if to == "kohya":
        assert out.read_bytes() == b"theirs"
    else:
        assert snapshot(out) == snapshot(ws / "in/peft_lora")
    assert strays(ws) == []
    # with --force, what appeared is replaced only if it is of the kind --force may replace
    shutil.rmtree(out) if out.is_dir() else out.unlink()

    def foreign_folder_appears(*args, **kwargs):
        real(*args, **kwargs)
        out.mkdir()
        (out / "notes.txt").write_text("x")

    monkeypatch.setattr(module, "save_safetensors", foreign_folder_appears)
    res = cli.fails("convert", ws / "in/peft_lora", "--to", to, "-o", out, "--force", match="folder")
    assert res.exit_code == 1
    assert os.listdir(out) == ["notes.txt"] and strays(ws) == []


@pytest.mark.parametrize("native", [True, False], ids=["renameat2", "fallback"])
@pytest.mark.parametrize("is_dir", [False, True])
def test_rename_noreplace(tmp_path, monkeypatch, native, is_dir):
    if not native:
        monkeypatch.setattr(output, "_RENAMEAT2", None)
    src, dst = tmp_path / "src", tmp_path / "dst"
    if is_dir:
        src.mkdir()
        (src / "a").write_text("new")
        dst.mkdir()  # even an empty folder that appeared is not replaced
    else:
        src.write_text("new")
        dst.write_text("old")
    with pytest.raises(FileExistsError):
        output.rename_noreplace(src, dst)
    assert src.exists() and (list(dst.iterdir()) == [] if is_dir else dst.read_text() == "old")
    shutil.rmtree(dst) if is_dir else dst.unlink()
    output.rename_noreplace(src, dst)
    assert not src.exists() and (dst / "a" if is_dir else dst).read_text() == "new"


WRAPPER = """
import sys, time
from pathlib import Path
import loratools.formats.kohya as kohya
import loratools.formats.peft as peft
from loratools.cli import main

ready, go = Path(sys.argv[1]), Path(sys.argv[2])
real = kohya.save_safetensors

def slow(*args, **kwargs):
    real(*args, **kwargs)  # the temp output is on disk: wait here
    ready.touch()
    for _ in range(1200):
        if go.exists():
            return
        time.sleep(0.05)

kohya.save_safetensors = peft.save_safetensors = slow
sys.argv = ["loratools", *sys.argv[3:]]
main()
"""


def start(tmp_path: Path, tag: str, *args) -> tuple[subprocess.Popen, Path]:
    script = tmp_path / "wrapper.py"
    script.write_text(textwrap.dedent(WRAPPER))
    ready = tmp_path / f"ready-{tag}"
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    proc = subprocess.Popen([sys.executable, str(script), str(ready), str(tmp_path / "go"), *map(str, args)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env, cwd=ROOT)
    return proc, ready


def wait_for(paths: list[Path], procs: list[subprocess.Popen], timeout: float = 120) -> None:
    end = time.monotonic() + timeout
    while not all(p.exists() for p in paths):
        for proc in procs:
            if proc.poll() is not None:
                raise AssertionError(f"exited early: {proc.communicate()}")
        assert time.monotonic() < end, "timed out waiting for the writers"
        time.sleep(0.05)


def test_two_processes_writing_one_output(ws):
    out = ws / "out.safetensors"
    procs = [start(ws, tag, "convert", ws / "in/peft_lora", "--to", "kohya", "-o", out, "--quiet") for tag in "ab"]
    wait_for([ready for _, ready in procs], [p for p, _ in procs])  # both passed the existence check
    (ws / "go").touch()
    results = [p.communicate(timeout=120) + (p.returncode,) for p, _ in procs]
    codes = sorted(rc for _, _, rc in results)
    assert codes == [0, 1], results
    err = next(e for _, e, rc in results if rc == 1).strip()
    assert err.startswith("error: ") and len(err.splitlines()) == 1 and "appeared" in err, err
    assert out.read_bytes()[8:9] == b"{" and strays(ws) == []


@pytest.mark.parametrize("to", ["kohya", "peft"])
def test_sigterm_leaves_no_temp_output(ws, to):
    out = ws / "new" / "deeper" / ("out.safetensors" if to == "kohya" else "out")
    proc, ready = start(ws, "a", "convert", ws / "in/peft_lora", "--to", to, "-o", out, "--quiet")
    wait_for([ready], [proc])
    assert strays(out.parent)  # the temp output is there
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 143, err
    assert err.strip() == "error: terminated; nothing was written"
    assert not (ws / "new").exists()  # the temp, and the parents this run created, are gone
    assert strays(ws) == []


def test_stale_temps_of_dead_runs_are_swept(cli, ws):
    dead = subprocess.Popen(["true"])
    dead.wait()
    host = output._host()
    stale_file = ws / f".out.safetensors.loratools-{host}-{dead.pid}-abc123.tmp"
    stale_dir = ws / f".out.safetensors.loratools-{host}-{dead.pid}-def456.tmp"
    live = ws / f".out.safetensors.loratools-{host}-{os.getpid()}-ghi789.tmp"
    other_host = ws / f".out.safetensors.loratools-otherhost-{dead.pid}-jkl012.tmp"
    not_ours = [ws / ".out.safetensors.abc123.tmp", ws / f".other.loratools-{host}-{dead.pid}-abc123.tmp"]
    stale_file.write_bytes(b"x" * 100)
    stale_dir.mkdir()
    (stale_dir / "adapter_model.safetensors").write_bytes(b"x")
    for p in [live, other_host, *not_ours]:
        p.write_bytes(b"keep")
    cli.ok("convert", ws / "in/peft_lora", "--to", "kohya", "-o", ws / "out.safetensors")
    assert not stale_file.exists() and not stale_dir.exists()
    assert all(p.read_bytes() == b"keep" for p in [live, other_host, *not_ours])


def test_missing_parent_folders_are_created(cli, ws):
    cli.ok("convert", ws / "in/peft_lora", "--to", "kohya", "-o", ws / "out/a/k.safetensors")
    cli.ok("convert", ws / "in/peft_lora", "--to", "peft", "-o", ws / "out/b/adapter")
    cli.ok("extract", "--base", ws / "in/base", "--tuned", ws / "in/tuned", "--rank", "2", "-o", ws / "out/c/x")
    assert (ws / "out/a/k.safetensors").is_file() and (ws / "out/b/adapter/adapter_config.json").is_file()
    assert (ws / "out/c/x/adapter_model.safetensors").is_file()
    (ws / "afile").write_text("x")
    res = cli.fails("convert", ws / "in/peft_lora", "--to", "kohya", "-o", ws / "afile/sub/k.safetensors",
                    match="not a folder")
    assert res.exit_code == 1 and str(ws / "afile") in res.stderr


@pytest.mark.parametrize("code", [errno.ENOSPC, errno.EROFS, errno.EACCES])
def test_write_errors_are_one_line_naming_the_output(cli, ws, monkeypatch, code):
    import loratools.formats.common as common

    def fail(*args, **kwargs):
        raise OSError(code, os.strerror(code))

    monkeypatch.setattr(common, "_write_tensor", fail)
    out = ws / "new" / "k.safetensors"
    res = cli.fails("convert", ws / "in/peft_lora", "--to", "kohya", "-o", out, match=os.strerror(code))
    assert res.exit_code == 1 and error_line(res.stderr).startswith(f"error: {out}: cannot write")
    assert not (ws / "new").exists() and strays(ws) == []
    # the temp file cannot even be created (read-only folder, full disk)
    monkeypatch.undo()

    def no_temp(*args, dir=None, **kwargs):
        raise OSError(code, os.strerror(code), str(Path(dir) / ".k.safetensors.tmp"))

    monkeypatch.setattr(tempfile, "mkstemp", no_temp)
    monkeypatch.setattr(tempfile, "mkdtemp", no_temp)
    for to, name in (("kohya", "k.safetensors"), ("peft", "adapter")):
        res = cli.fails("convert", ws / "in/peft_lora", "--to", to, "-o", ws / name, match=os.strerror(code))
        assert res.exit_code == 1 and error_line(res.stderr).startswith(f"error: {ws / name}: cannot write")
    assert strays(ws) == []


@pytest.mark.skipif(os.name != "posix" or os.geteuid() == 0, reason="root writes into read-only folders")
def test_read_only_output_folder(cli, ws):
    ro = ws / "ro"
    ro.mkdir()
    ro.chmod(0o555)
    try:
        res = cli.fails("convert", ws / "in/peft_lora", "--to", "kohya", "-o", ro / "k.safetensors",
                        match="permission denied")
        assert res.exit_code == 1
        assert list(ro.iterdir()) == []
    finally:
        ro.chmod(0o755)


def test_bake_writes_only_the_weights_it_baked(cli, ws):
    base = ws / "in/base"
    from safetensors.torch import load_file

    torch.save(load_file(str(base / "model.safetensors")), base / "pytorch_model.bin")
    (base / "flax_model.msgpack").write_bytes(b"msgpack")
    (base / "tf_model.h5").write_bytes(b"h5")
    (base / "tokenizer.json").write_text("{}")
    before = snapshot(ws / "in")
    res = cli.ok("bake", "--base", base, ws / "in/peft_lora", "-o", ws / "baked")
    assert sorted(os.listdir(ws / "baked")) == ["config.json", "model.safetensors", "tokenizer.json"]
    assert "warning: left out 3 weight file(s)" in res.stderr
    assert "pytorch_model.bin" in res.stderr and "tf_model.h5" in res.stderr
    assert snapshot(ws / "in") == before


def test_trailing_slash_output_and_nothing_left_by_a_failed_run(cli, samples, tmp_path):
    """``-o DIR/`` is the folder DIR (its resume journal beside it, never inside); a run that fails on its inputs
    leaves no folder behind, not even the output's missing parents or a journal."""
    out = tmp_path / "o4"
    cli.ok("extract", "--base", samples / "base", "--tuned", samples / "tuned", "--rank", "2", "-o", f"{out}/", "-q")
    assert (out / "adapter_config.json").is_file() and not (out / ".loratools-journal").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["o4"]
    cli.fails("extract", "--base", samples / "base", "--tuned", tmp_path / "nope", "-o",
              tmp_path / "newdir" / "sub" / "out", match="nope")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["o4"]
