"""Shared fixtures: paths to the bundled samples, a CLI runner, tiny models built in-process."""

from __future__ import annotations

import os
import re
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner

from loratools.cli import main

ROOT = Path(__file__).resolve().parent.parent
SAMPLES = ROOT / "samples"

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")


@pytest.fixture
def samples() -> Path:
    return SAMPLES


# ``extract: 12/120 layers (10%)`` — what ``progress`` prints on a non-terminal stderr
PROGRESS_LINE = re.compile(r"^[a-z]+: \d+(/\d+)? [a-z]+( \(\d+%\))?$")


def error_line(stderr: str) -> str:
    """The one ``error:`` line of a failed run: the last line of stderr, and only progress lines before it."""
    lines = stderr.strip().splitlines()
    assert lines and lines[-1].startswith("error: "), stderr
    assert all(PROGRESS_LINE.match(line) for line in lines[:-1]), stderr
    return lines[-1]


class Cli:
    """Runs ``loratools ...`` in-process; ``ok`` asserts exit 0, ``fails`` asserts a one-line error."""

    def __init__(self) -> None:
        self.runner = CliRunner()

    def __call__(self, *args: str):
        return self.runner.invoke(main, [str(a) for a in args], catch_exceptions=False)

    def ok(self, *args: str):
        res = self(*args)
        assert res.exit_code == 0, f"exit {res.exit_code}: {res.output}"
        return res

    def fails(self, *args: str, match: str = ""):
        res = self(*args)
        assert res.exit_code != 0, res.output
        err = error_line(res.stderr)
        assert "Traceback" not in res.output
        assert match.lower() in err.lower(), err
        return res


@pytest.fixture
def cli() -> Cli:
    return Cli()


def tiny_llama(seed: int = 0, **overrides):
    """A tiny random LlamaForCausalLM (no download)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = dict(vocab_size=96, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
               num_key_value_heads=2, max_position_embeddings=64, tie_word_embeddings=False)
    cfg.update(overrides)
    model = LlamaForCausalLM(LlamaConfig(**cfg))
    model.eval()
    return model


def sample_llama():
    """The bundled samples/base model, loaded by transformers."""
    from transformers import LlamaForCausalLM

    model = LlamaForCausalLM.from_pretrained(str(SAMPLES / "base"))
    model.eval()
    return model


def tokens(vocab: int = 96, n: int = 12, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, vocab, (2, n), generator=g)
