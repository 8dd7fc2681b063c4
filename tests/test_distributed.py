"""torchrun data-parallel runs (CPU, gloo): byte-identical outputs, resume after a kill, failure of one rank.

Every run here pins ``OMP_NUM_THREADS=1``: CPU BLAS sums in an order that depends on its thread count, so a run
matches a single-process run *with the same threads per process* byte for byte (torchrun itself sets 1 thread per
process when it starts several, unless told otherwise).
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from safetensors.torch import load_file, save_file

from loratools.cli import main
from loratools.distributed import balance

ROOT = Path(__file__).resolve().parents[1]
SAMPLES = ROOT / "samples"
BASE, TUNED = SAMPLES / "base", SAMPLES / "tuned"

pytestmark = pytest.mark.skipif(
    not __import__("torch.distributed", fromlist=["is_available"]).is_available(),
    reason="torch.distributed (torchrun) is not available in this build",
)


def _env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("LORATOOLS_TEST_", "TORCHELASTIC_"))}
    env.update(PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1", LORATOOLS_DIST_TIMEOUT_S="120", **extra)
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(k, None)
    return env


def single(*args: str) -> subprocess.CompletedProcess:
    """A single-process run, in this process (one math thread, as every rank under torchrun here)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        res = CliRunner().invoke(main, list(args))
    finally:
        torch.set_num_threads(threads)
    return subprocess.CompletedProcess(args, res.exit_code, res.stdout, res.stderr)


def torchrun_cmd(nproc: int, *args: str, launcher: tuple[str, ...] = ("--standalone",)) -> list[str]:
    return [sys.executable, "-m", "torch.distributed.run", *launcher, "--nproc-per-node", str(nproc),
            "-m", "loratools", *args]


def torchrun(nproc: int, *args: str, **env: str) -> subprocess.CompletedProcess:
    return subprocess.run(torchrun_cmd(nproc, *args), capture_output=True, text=True, env=_env(**env), timeout=180,
                          cwd=ROOT)


def ok(proc: subprocess.CompletedProcess) -> subprocess.CompletedProcess:
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


def same_tree(a: Path, b: Path) -> None:
    """Both outputs hold the same files with the same bytes."""
    fa = sorted(p.relative_to(a) for p in a.rglob("*") if p.is_file()) if a.is_dir() else [Path()]
    fb = sorted(p.relative_to(b) for p in b.rglob("*") if p.is_file()) if b.is_dir() else [Path()]
    assert fa == fb
    for rel in fa:
        assert (a / rel).read_bytes() == (b / rel).read_bytes(), rel


def without_timing(doc):
    """A report with its timings (and the world it ran in) left out: what must not depend on the world size."""
    if isinstance(doc, dict):
        return {k: without_timing(v) for k, v in doc.items()
                if k not in ("time_s", "wall_time_s", "seconds", "distributed", "output")}
    if isinstance(doc, list):
        return [without_timing(v) for v in doc]
    return doc


EXTRACT = ("extract", "--base", str(BASE), "--tuned", str(TUNED), "--rank", "8", "--device", "cpu", "--quiet")


@pytest.fixture(scope="module")
def reference(tmp_path_factory) -> Path:
    """A single-process extract (the bytes every distributed run must reproduce)."""
    out = tmp_path_factory.mktemp("ref") / "one"
    ok(single(*EXTRACT, "-o", str(out), "--json"))
    return out


def test_balance_is_greedy_lpt_and_deterministic():
    assert balance([5, 5, 3, 3, 1, 1, 1], 2) == [0, 1, 0, 1, 0, 1, 0]
    owner = balance([100, 1, 1, 1, 1, 60, 40], 2)
    loads = [sum(c for c, o in zip([100, 1, 1, 1, 1, 60, 40], owner) if o == r) for r in range(2)]
    assert sorted(loads) == [102, 102]  # by cost, not by count: the rank with the 100 gets two units
    assert balance([1.0] * 5, 1) == [0] * 5


def test_extract_two_ranks_byte_identical(tmp_path, reference):
    out = tmp_path / "two"
    proc = ok(torchrun(2, *EXTRACT, "-o", str(out), "--json"))
    same_tree(reference, out)
    doc = json.loads(proc.stdout)  # rank 0 only prints: one JSON document
    dist = doc["distributed"]
    assert dist["world_size"] == 2
    assert [r["rank"] for r in dist["per_rank"]] == [0, 1]
    assert all(r["layers"] > 0 for r in dist["per_rank"])
    assert sum(r["layers"] for r in dist["per_rank"]) == len(doc["layers"]) + len(doc["skipped"]) + len(
        doc["changed_vectors"])
    assert not list(tmp_path.glob("*.loratools-journal"))
    one = json.loads(ok(single(*EXTRACT, "-o", str(tmp_path / "again"), "--json")).stdout)
    assert one["distributed"] == {"world_size": 1, "per_rank": [
        {"rank": 0, "layers": dist["per_rank"][0]["layers"] + dist["per_rank"][1]["layers"],
         "seconds": one["distributed"]["per_rank"][0]["seconds"]}]}
    assert without_timing(one) == without_timing(doc)


def test_two_nodes_on_localhost_byte_identical(tmp_path, reference):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    out = tmp_path / "nodes"
    procs = [subprocess.Popen(torchrun_cmd(1, *EXTRACT, "-o", str(out), launcher=(
        "--nnodes", "2", "--node-rank", str(node), "--rdzv-backend", "c10d", "--rdzv-id", "t2",
        "--rdzv-endpoint", f"127.0.0.1:{port}")), env=_env(), cwd=ROOT, stdout=subprocess.PIPE,
        stderr=subprocess.PIPE, text=True) for node in (0, 1)]
    results = [p.communicate(timeout=180) for p in procs]
    assert [p.returncode for p in procs] == [0, 0], [r[1][-2000:] for r in results]
    same_tree(reference, out)


def test_spectrum_and_resize_reports_equal(tmp_path, reference):
    spec = ("spectrum", "--base", str(BASE), "--tuned", str(TUNED), "--device", "cpu", "--json", "--quiet",
            "--top", "8", "--exact-below", "16")
    one, two = json.loads(ok(single(*spec)).stdout), json.loads(ok(torchrun(2, *spec)).stdout)
    assert without_timing(one) == without_timing(two)
    assert two["distributed"]["world_size"] == 2 and one["distributed"]["world_size"] == 1
    resize = ("resize", str(reference), "--rank", "4", "--json", "--quiet")
    r1 = json.loads(ok(single(*resize, "-o", str(tmp_path / "r1"))).stdout)
    r2 = json.loads(ok(torchrun(2, *resize, "-o", str(tmp_path / "r2"))).stdout)
    assert without_timing(r1) == without_timing(r2)
    same_tree(tmp_path / "r1", tmp_path / "r2")


def test_merge_two_ranks_byte_identical(tmp_path, reference):
    small = tmp_path / "small"
    ok(single("resize", str(reference), "--rank", "3", "-o", str(small), "--quiet"))
    merge = ("merge", f"{reference}:0.7", f"{small}:-0.4", "--method", "svd", "--rank", "6", "--device", "cpu",
             "--json", "--quiet")
    m1 = json.loads(ok(single(*merge, "-o", str(tmp_path / "m1"))).stdout)
    m2 = json.loads(ok(torchrun(2, *merge, "-o", str(tmp_path / "m2"))).stdout)
    same_tree(tmp_path / "m1", tmp_path / "m2")
    assert without_timing(m1) == without_timing(m2)
    assert [r["layers"] > 0 for r in m2["distributed"]["per_rank"]] == [True, True]


def _sharded_base(folder: Path) -> Path:
    """samples/base split into three shards with an index (bake's unit is a weight file)."""
    folder.mkdir()
    state = load_file(BASE / "model.safetensors")
    keys = list(state)
    shards = [keys[i::3] for i in range(3)]
    weight_map = {}
    for i, ks in enumerate(shards):
        name = f"model-{i + 1:05d}-of-00003.safetensors"
        save_file({k: state[k] for k in ks}, folder / name, metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(ks, name))
    size = sum(t.numel() * t.element_size() for t in state.values())
    (folder / "model.safetensors.index.json").write_text(json.dumps({"metadata": {"total_size": size},
                                                                      "weight_map": weight_map}))
    shutil.copy(BASE / "config.json", folder / "config.json")
    return folder


def test_bake_two_ranks_byte_identical(tmp_path, reference):
    base = _sharded_base(tmp_path / "sharded")
    b1, b2 = tmp_path / "b1", tmp_path / "b2"
    d1 = json.loads(ok(single("bake", f"{reference}:0.5", "--base", str(base), "-o", str(b1), "--json",
                              "--quiet")).stdout)
    d2 = json.loads(ok(torchrun(2, "bake", f"{reference}:0.5", "--base", str(base), "-o", str(b2), "--json",
                                "--quiet")).stdout)
    same_tree(b1, b2)
    assert sorted(p.name for p in b2.iterdir()) == sorted(p.name for p in base.iterdir())
    assert d2["modified"] == d1["modified"] > 0
    assert [r["layers"] for r in d2["distributed"]["per_rank"]] in ([2, 1], [1, 2])  # shards split by bytes
    baked = load_file(b2 / "model-00001-of-00003.safetensors")
    assert any(not torch.equal(baked[k], load_file(base / "model-00001-of-00003.safetensors")[k]) for k in baked)


def _wait_paused(proc: subprocess.Popen, log: Path, count: int) -> list[int]:
    """pids of the ranks the pause hook stopped, once ``count`` of them have."""
    deadline = time.time() + 90
    while time.time() < deadline:
        lines = [ln for ln in log.read_text().splitlines() if "paused after" in ln]
        if len(lines) >= count:
            return [int(ln.split(" pid ")[1].split()[0]) for ln in lines]
        assert proc.poll() is None, log.read_text()[-3000:]
        time.sleep(0.2)
    raise AssertionError("the ranks never paused: " + log.read_text()[-3000:])


def test_killed_rank_then_resume_byte_identical(tmp_path, reference):
    out = tmp_path / "killed"
    log = tmp_path / "run.log"
    with open(log, "w") as fh:
        proc = subprocess.Popen(torchrun_cmd(2, *EXTRACT, "-o", str(out)), env=_env(LORATOOLS_TEST_PAUSE_AFTER="3"),
                                cwd=ROOT, stdout=fh, stderr=subprocess.STDOUT, text=True)
        pids = _wait_paused(proc, log, 2)
        os.kill(pids[-1], signal.SIGKILL)  # one rank dies mid-run; torchrun stops the other
        assert proc.wait(timeout=120) != 0
    journal = Path(str(out) + ".loratools-journal")
    assert not out.exists() and journal.is_dir()
    assert len(list(journal.glob("*.pt"))) == 6  # 3 committed units per rank
    stale = single(*EXTRACT, "-o", str(out))
    assert stale.returncode == 1 and "pass --resume" in stale.stderr and not out.exists()
    doc = json.loads(ok(torchrun(2, *EXTRACT, "-o", str(out), "--resume", "--json")).stdout)
    same_tree(reference, out)
    assert sum(r["layers"] for r in doc["distributed"]["per_rank"]) == 21 - 6  # the committed units were skipped
    assert not journal.exists()


def test_single_process_killed_then_resume(tmp_path, reference):
    out = tmp_path / "one"
    log = tmp_path / "run.log"
    with open(log, "w") as fh:
        proc = subprocess.Popen([sys.executable, "-m", "loratools", *EXTRACT, "-o", str(out)],
                                env=_env(LORATOOLS_TEST_PAUSE_AFTER="5"), cwd=ROOT, stdout=fh,
                                stderr=subprocess.STDOUT, text=True)
        _wait_paused(proc, log, 1)
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
    journal = Path(str(out) + ".loratools-journal")
    assert journal.is_dir() and not out.exists()
    # a torn record (wrong digest) is ignored and its unit recomputed
    victim = sorted(journal.glob("*.pt"))[0]
    victim.write_bytes(victim.read_bytes()[:-3] + b"xyz")
    stale = single(*EXTRACT, "-o", str(out))
    assert stale.returncode == 1 and "pass --resume" in stale.stderr and str(journal) in stale.stderr
    other = single(*EXTRACT, "-o", str(out), "--resume", "--rank", "4")
    assert other.returncode == 1 and "other arguments" in other.stderr
    doc = json.loads(ok(single(*EXTRACT, "-o", str(out), "--resume", "--json")).stdout)
    assert doc["distributed"]["per_rank"][0]["layers"] == 21 - 4
    same_tree(reference, out)
    assert not journal.exists()


def test_failing_rank_leaves_no_output(tmp_path):
    out = tmp_path / "failed"
    proc = torchrun(2, *EXTRACT, "-o", str(out), LORATOOLS_TEST_FAIL_RANK="1")
    assert proc.returncode != 0
    errors = [ln for ln in proc.stderr.splitlines() if ln.startswith("error:")]
    assert len(errors) == 1 and "rank 1: test hook LORATOOLS_TEST_FAIL_RANK: rank 1 failed on" in errors[0], errors
    assert sorted(p.name for p in tmp_path.iterdir()) == []  # no output, no temp, no journal


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (DEVELOPERS.md: GPU checks)")
def test_cuda_ranks_byte_identical(tmp_path):
    """``--device cuda``: each rank on ``cuda:LOCAL_RANK`` (shared round-robin when there are fewer GPUs)."""
    args = ("extract", "--base", str(BASE), "--tuned", str(TUNED), "--rank", "8", "--device", "cuda", "--quiet")
    ok(single(*args, "-o", str(tmp_path / "one")))
    doc = json.loads(ok(torchrun(2, *args, "-o", str(tmp_path / "two"), "--json")).stdout)
    same_tree(tmp_path / "one", tmp_path / "two")
    assert doc["summary"]["device"].startswith("cuda")


def test_bake_killed_then_resume_keeps_finished_shards(tmp_path, reference):
    """bake journals its finished shards (digested): a resumed run bakes only the others, same bytes."""
    base = _sharded_base(tmp_path / "sharded")
    ok(single("bake", f"{reference}:0.5", "--base", str(base), "-o", str(tmp_path / "ref"), "--quiet"))
    out, log = tmp_path / "baked", tmp_path / "run.log"
    with open(log, "w") as fh:
        proc = subprocess.Popen([sys.executable, "-m", "loratools", "bake", f"{reference}:0.5", "--base", str(base),
                                 "-o", str(out), "--quiet"], env=_env(LORATOOLS_TEST_PAUSE_AFTER="2"), cwd=ROOT,
                                stdout=fh, stderr=subprocess.STDOUT, text=True)
        _wait_paused(proc, log, 1)
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
    journal = Path(str(out) + ".loratools-journal")
    assert len(list((journal / "files").glob("*.safetensors"))) == 2 and not out.exists()
    doc = json.loads(ok(single("bake", f"{reference}:0.5", "--base", str(base), "-o", str(out), "--resume",
                               "--json", "--quiet")).stdout)
    assert doc["distributed"]["per_rank"][0]["layers"] == 1
    same_tree(tmp_path / "ref", out)
    assert not journal.exists()
