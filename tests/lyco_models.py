"""Tiny models wrapped by the real LyCORIS / PEFT, with non-zero factors, and probes of their forward pass."""

from __future__ import annotations

import logging
import math
from pathlib import Path

import torch
from safetensors.torch import save_file
from torch import nn

logging.getLogger("LyCORIS").setLevel(logging.ERROR)

SHAPES = {"lin": (24, 16), "conv": (32, 16, 3, 3), "pw": (32, 16, 1, 1)}


class Net(nn.Module):
    """A Linear 16→24, a 3x3 conv 16→32 (padding 0) and a 1x1 conv 16→32."""

    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(16, 24)
        self.conv = nn.Conv2d(16, 32, 3, padding=0)
        self.pw = nn.Conv2d(16, 32, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # pragma: no cover - modules are probed one by one
        return x


def probe(mod: nn.Module, shape: tuple[int, ...]) -> torch.Tensor:
    """The weight a (wrapped) module effectively applies, from one-hot inputs (bias removed)."""
    out_c, in_c, *k = shape
    n = in_c * math.prod(k)
    x = torch.eye(n) if not k else torch.eye(n).reshape(n, in_c, *k)
    with torch.no_grad():
        y = (mod(x) - mod(torch.zeros_like(x))).reshape(n, out_c)
    return y.T.reshape(shape)


def lycoris_net(algo: str, seed: int = 0, dim: int = 4, alpha: float = 2, bias: bool = False, **kw):
    """(model, network, base weights) for ``create_lycoris(algo, ...)`` with every factor made non-zero."""
    from lycoris import LycorisNetwork, create_lycoris

    logging.getLogger("LyCORIS").setLevel(logging.ERROR)
    torch.manual_seed(seed)
    model = Net()
    base = {n: m.weight.detach().clone() for n, m in model.named_children()}
    LycorisNetwork.apply_preset({"target_name": list(SHAPES)})
    net = create_lycoris(model, 1.0, linear_dim=dim, linear_alpha=alpha, conv_dim=dim, conv_alpha=alpha,
                         algo=algo, **kw)
    net.apply_to()
    with torch.no_grad():
        for lora in net.loras:
            for n, p in lora.named_parameters():
                if n == "weight" or (n == "bias" and bias):
                    p.add_(torch.randn_like(p) * 0.1)  # algo=full holds the absolute weight
                elif n == "dora_scale":
                    p.mul_(1 + 0.2 * torch.rand_like(p))
                elif n != "bias":
                    p.copy_(torch.randn_like(p) * 0.3)
    net.set_multiplier(1.0)
    return model, net, base


def effective(model: nn.Module, base: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """ΔW_eff = W_eff − W of every module, through LyCORIS's forward."""
    return {n: probe(getattr(model, n), tuple(base[n].shape)) - base[n] for n in base}


def save_lycoris(net, base: dict[str, torch.Tensor], tmp: Path, dtype: torch.dtype = torch.float32,
                 rename: str | None = None) -> tuple[Path, Path]:
    """Write the network's state dict (what ``save_weights`` writes) and the base weights."""
    sd = {k: v.detach().to(dtype).contiguous() for k, v in net.state_dict().items()}
    if rename:
        sd = {k.replace("lycoris_", rename, 1): v for k, v in sd.items()}
    f = tmp / "lyco.safetensors"
    save_file(sd, str(f), metadata={"ss_network_module": "lycoris.kohya"})
    b = tmp / "base.safetensors"
    save_file({f"{n}.weight": w.contiguous() for n, w in base.items()}, str(b))
    return f, b


def lycoris_loaded_effective(path: Path, base: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """ΔW_eff of every module after LyCORIS's own loader (create_lycoris_from_weights) applies ``path``."""
    from lycoris import create_lycoris_from_weights

    fresh = Net()
    with torch.no_grad():
        for n, w in base.items():
            getattr(fresh, n).weight.copy_(w)
    net, _ = create_lycoris_from_weights(1.0, str(path), fresh)
    net.apply_to()
    return effective(fresh, base)
