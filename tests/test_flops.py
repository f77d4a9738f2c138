"""The pruner's FLOPs ratio against torch's counter on the exported model, for layers whose
FLOPs scale with a group outside their own channel dims (a token-mixing MLP, as in MLP-Mixer)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from s2h import S2HPruner
from s2h.flops import count_flops


class MixerBlock(nn.Module):
    """Token mixing (a linear across the tokens, the channels in its row dim), then channel
    mixing, each with a residual."""

    def __init__(self, tokens: int, dim: int) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.tok1, self.tok2 = nn.Linear(tokens, 2 * tokens), nn.Linear(2 * tokens, tokens)
        self.norm2 = nn.LayerNorm(dim)
        self.ch1, self.ch2 = nn.Linear(dim, 4 * dim), nn.Linear(4 * dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        t = self.norm1(x).transpose(1, 2)  # (B, dim, tokens): the channels are rows here
        x = x + self.tok2(torch.relu(self.tok1(t))).transpose(1, 2)
        return x + self.ch2(torch.relu(self.ch1(self.norm2(x))))


class Mixer(nn.Module):
    def __init__(self, tokens: int = 12, dim: int = 32) -> None:
        super().__init__()
        self.embed = nn.Linear(6, dim)
        self.blocks = nn.Sequential(MixerBlock(tokens, dim), MixerBlock(tokens, dim))
        self.head = nn.Linear(dim, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.blocks(self.embed(x)).mean(1))


@pytest.mark.parametrize("widths", [0.7, 0.4])
def test_token_mixing_flops_scale_with_the_embedding_width(widths):
    torch.manual_seed(0)
    model = Mixer()
    x = torch.randn(2, 12, 6)
    dense = count_flops(model, x)
    pruner = S2HPruner(model, (x,), 0.5, divisor=4, warn=False)
    assert pruner.dense_flops == dense
    assert "embed" in pruner.widths()  # the embedding width (residual stream) is a group
    pruner.set_widths(widths)
    assert pruner.widths()["embed"] < 32
    exported = pruner.export()
    torch.testing.assert_close(exported(x), pruner.hard_forward(x), rtol=1e-5, atol=1e-6)
    assert pruner.hard_flops_ratio() == pytest.approx(count_flops(exported, x) / dense, rel=1e-9)
