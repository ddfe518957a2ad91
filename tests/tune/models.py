"""Small models for the tuner tests: FFN stacks whose layers differ in how much sparsity hurts."""

import torch
from torch import nn

from tests import zoo


class Stack(nn.Module):
    """Residual stack of gated and plain FFNs; ``loud`` layers get scaled-up down weights (sensitive layers)."""

    def __init__(self, hidden=32, inner=64, layers=4, loud=(1,), seed=0):
        super().__init__()
        torch.manual_seed(seed)
        blocks = []
        for i in range(layers):
            ffn = zoo.GatedSiluFFN(hidden, inner) if i % 2 else zoo.PlainGeluFFN(hidden, inner)
            if i in loud:
                with torch.no_grad():
                    (ffn.down_proj if i % 2 else ffn.fc2).weight.mul_(8.0)
            blocks.append(ffn)
        self.layers = nn.ModuleList(blocks)

    def forward(self, x):
        for layer in self.layers:
            x = x + layer(x)
        return x


class AttnStack(nn.Module):
    """Two zoo transformer blocks (SDPA attention + gated FFN), for tuning attention and FFN together."""

    def __init__(self, hidden=32, heads=4, seed=0):
        super().__init__()
        torch.manual_seed(seed)
        self.blocks = nn.ModuleList(zoo.Block(zoo.SdpaAttention, zoo.GatedSiluFFN, hidden, heads, heads, 64, False)
                                    for _ in range(2))

    def forward(self, x):
        for block in self.blocks:
            x = block(x)
        return x


def batches(n=3, tokens=16, hidden=32, seed=1):
    """Calibration batches: random [2, tokens, hidden] inputs."""
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(2, tokens, hidden, generator=g) for _ in range(n)]
