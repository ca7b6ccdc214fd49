"""DeepMind-style WideResNet, state-dict compatible with RobustBench's ``DMWideResNet``.

Differences from RobustBench's class, none of which change the function computed:
- the activation is ``nn.SiLU`` (RobustBench's custom Swish autograd function uses the removed
  ``ctx.saved_variables`` and fails in backward on current PyTorch);
- mean/std are non-persistent buffers that follow ``.to(device)``; inputs are [0, 1] NCHW images.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .registry import ModelInfo, Variant

ACTIVATIONS = {"silu": nn.SiLU, "swish": nn.SiLU, "relu": nn.ReLU}


class _Block(nn.Module):
    """Pre-activation residual block; TF-style 'SAME' padding on the first conv."""

    def __init__(self, in_planes: int, out_planes: int, stride: int, act: type[nn.Module]):
        super().__init__()
        if stride not in (1, 2):
            raise ValueError(f"unsupported stride {stride}")
        self.batchnorm_0 = nn.BatchNorm2d(in_planes)
        self.relu_0 = act()
        self.conv_0 = nn.Conv2d(in_planes, out_planes, 3, stride=stride, padding=0, bias=False)
        self.batchnorm_1 = nn.BatchNorm2d(out_planes)
        self.relu_1 = act()
        self.conv_1 = nn.Conv2d(out_planes, out_planes, 3, stride=1, padding=1, bias=False)
        self.has_shortcut = in_planes != out_planes
        self.shortcut = nn.Conv2d(in_planes, out_planes, 1, stride=stride, bias=False) if self.has_shortcut else None
        self._pad = (1, 1, 1, 1) if stride == 1 else (0, 1, 0, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        pre = self.relu_0(self.batchnorm_0(x))
        if self.has_shortcut:
            x = pre  # the projection shortcut sees the activated input, as in the DeepMind code
        out = self.conv_0(F.pad(pre, self._pad))
        out = self.conv_1(self.relu_1(self.batchnorm_1(out)))
        return (self.shortcut(x) if self.has_shortcut else x) + out


class _BlockGroup(nn.Module):
    def __init__(self, num_blocks: int, in_planes: int, out_planes: int, stride: int, act: type[nn.Module]):
        super().__init__()
        self.block = nn.Sequential(*[
            _Block(in_planes if i == 0 else out_planes, out_planes, stride if i == 0 else 1, act)
            for i in range(num_blocks)
        ])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.block(x)


class WideResNet(nn.Module):
    """WideResNet-depth-width taking [0, 1] images and normalising internally."""

    def __init__(self, num_classes: int = 10, depth: int = 28, width: int = 10, activation: str = "silu",
                 mean: tuple[float, ...] = (0.4914, 0.4822, 0.4465),
                 std: tuple[float, ...] = (0.2471, 0.2435, 0.2616)):
        super().__init__()
        if (depth - 4) % 6 != 0 or depth < 10:
            raise ValueError(f"depth must be 6k+4 with k >= 1, got {depth}")
        if activation not in ACTIVATIONS:
            raise ValueError(f"activation must be one of {sorted(ACTIVATIONS)}, got {activation!r}")
        act = ACTIVATIONS[activation]
        self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32).view(-1, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(std, dtype=torch.float32).view(-1, 1, 1), persistent=False)
        channels = [16, 16 * width, 32 * width, 64 * width]
        n = (depth - 4) // 6
        self.init_conv = nn.Conv2d(3, channels[0], 3, stride=1, padding=1, bias=False)
        self.layer = nn.Sequential(
            _BlockGroup(n, channels[0], channels[1], 1, act),
            _BlockGroup(n, channels[1], channels[2], 2, act),
            _BlockGroup(n, channels[2], channels[3], 2, act),
        )
        self.batchnorm = nn.BatchNorm2d(channels[3])
        self.relu = act()
        self.logits = nn.Linear(channels[3], num_classes)
        self.num_classes = num_classes

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.init_conv((x - self.mean) / self.std)
        out = self.relu(self.batchnorm(self.layer(out)))
        out = F.adaptive_avg_pool2d(out, 1).flatten(1)
        return self.logits(out)


def build_model(model: ModelInfo, variant: Variant) -> WideResNet:
    """An untrained network with the registry entry's architecture and normalisation, in eval mode."""
    arch = model.architecture
    if arch.name != "dm_wide_resnet":
        raise ValueError(f"unsupported architecture {arch.name!r}")
    net = WideResNet(num_classes=variant.num_classes, depth=arch.depth, width=arch.width,
                     activation=arch.activation, mean=variant.mean, std=variant.std)
    return net.eval()
