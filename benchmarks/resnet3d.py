"""A torch-only ResNet3D-50 for the GPU script where MONAI is not installed.

Layer for layer what `train.models.resnet3d50` builds through MONAI (bottleneck blocks [3, 4, 6, 3],
widths 64..512 x4, 7^3 stem with stride (1, 2, 2), 3^3 max-pool, shortcut type B, one logit): same
parameter count and same FLOPs (tests/test_benchmarks.py checks both), so the model numbers compare.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn


class Bottleneck(nn.Module):
    expansion = 4

    def __init__(self, inplanes: int, planes: int, stride: int):
        super().__init__()
        out = planes * self.expansion
        self.conv1, self.bn1 = nn.Conv3d(inplanes, planes, 1, bias=False), nn.BatchNorm3d(planes)
        self.conv2, self.bn2 = nn.Conv3d(planes, planes, 3, stride, 1, bias=False), nn.BatchNorm3d(planes)
        self.conv3, self.bn3 = nn.Conv3d(planes, out, 1, bias=False), nn.BatchNorm3d(out)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = None
        if stride != 1 or inplanes != out:
            # biased, as MONAI
            self.downsample = nn.Sequential(nn.Conv3d(inplanes, out, 1, stride), nn.BatchNorm3d(out))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.relu(self.bn1(self.conv1(x)))
        y = self.relu(self.bn2(self.conv2(y)))
        y = self.bn3(self.conv3(y))
        return self.relu(y + (x if self.downsample is None else self.downsample(x)))


class ResNet3D50(nn.Module):
    def __init__(self, stem_stride=(1, 2, 2), in_channels: int = 3):
        super().__init__()
        self.conv1 = nn.Conv3d(in_channels, 64, 7, stem_stride, 3, bias=False)
        self.bn1, self.relu = nn.BatchNorm3d(64), nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool3d(3, 2, 1)
        layers, inplanes = [], 64
        for planes, blocks, stride in ((64, 3, 1), (128, 4, 2), (256, 6, 2), (512, 3, 2)):
            stage = []
            for i in range(blocks):
                stage.append(Bottleneck(inplanes, planes, stride if i == 0 else 1))
                inplanes = planes * Bottleneck.expansion
            layers.append(nn.Sequential(*stage))
        self.layer1, self.layer2, self.layer3, self.layer4 = layers
        self.avgpool = nn.AdaptiveAvgPool3d(1)
        self.fc = nn.Linear(inplanes, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        return self.fc(torch.flatten(self.avgpool(x), 1))


def card(patch=(32, 256, 256), batch: int = 64) -> dict[str, Any]:
    """Parameters and FLOPs per patch (forward, forward+backward) counted on the meta device."""
    from torch.utils.flop_counter import FlopCounterMode
    with torch.device("meta"):
        model = ResNet3D50().train()
        x = torch.empty(2, 3, *patch)  # batch 2: BatchNorm needs more than one value; FLOPs are per patch
    with FlopCounterMode(display=False) as counter:
        out = model(x)
        forward = counter.get_total_flops()
        out.sum().backward()
    return {"name": "resnet3d50", "params": sum(p.numel() for p in model.parameters()),
            "forward_gflop": forward / 2 / 1e9, "train_gflop": counter.get_total_flops() / 2 / 1e9,
            "train_memory_gib_at_batch": None, "batch": batch}
