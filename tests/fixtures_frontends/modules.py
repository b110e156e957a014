"""Torch factories for the torch-frontend tests (``tests.fixtures_frontends.modules:mlp``)."""

from __future__ import annotations

import torch


class MLP(torch.nn.Module):
    """Two linear layers with a GELU; ``forward(x) -> y``."""

    def __init__(self, width: int = 16, hidden: int = 32, out: int = 8):
        super().__init__()
        self.fc1 = torch.nn.Linear(width, hidden)
        self.fc2 = torch.nn.Linear(hidden, out)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(torch.nn.functional.gelu(self.fc1(x)))


class TwoHeads(torch.nn.Module):
    """Two inputs, a dict of two outputs."""

    def __init__(self):
        super().__init__()
        self.proj = torch.nn.Linear(8, 4)

    def forward(self, x: torch.Tensor, scale: torch.Tensor) -> dict[str, torch.Tensor]:
        y = self.proj(x)
        return {"y": y * scale, "norm": y.norm(dim=-1)}


def mlp() -> torch.nn.Module:
    torch.manual_seed(0)
    return MLP()


def mlp_with_inputs() -> tuple[torch.nn.Module, tuple[torch.Tensor, ...]]:
    torch.manual_seed(0)
    return MLP(), (torch.randn(3, 16),)


def two_heads() -> torch.nn.Module:
    torch.manual_seed(0)
    return TwoHeads()


def not_a_module() -> int:
    return 3


def broken() -> torch.nn.Module:
    raise RuntimeError("factory exploded")
