"""One training step, the only one: the loop (`train.loop.train_epoch`) and `stacktrain bench train` both
call it, so the benchmark measures exactly what training does.

Images move to the device (non-blocking), the forward pass runs under the run's autocast, the loss is
BCE with logits in fp32, and the backward pass and Adam step go through `Precision` (a GradScaler for
fp16). The loss comes back detached and on the device: summing it there costs no synchronisation.
"""

from __future__ import annotations

import torch
from torch import nn

from stacktrain.train.precision import Precision


def to_model_input(images: torch.Tensor, device: torch.device, prec: Precision) -> torch.Tensor:
    """A batch's images on the device, in the dtype the model computes in (fp32 runs take fp32)."""
    images = images.to(device, non_blocking=True)
    return images.float() if prec.name == "fp32" else images  # e.g. a bf16 loader on the CPU


class TrainStep:
    def __init__(self, net: nn.Module, optimizer: torch.optim.Optimizer, criterion: nn.Module, prec: Precision,
                 device: torch.device):
        self.net, self.optimizer, self.criterion, self.prec, self.device = net, optimizer, criterion, prec, device

    def __call__(self, images: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        with self.prec.autocast():
            logits = self.net(to_model_input(images, self.device, self.prec))[:, 0]
        loss = self.criterion(logits.float(), labels.to(self.device, non_blocking=True))
        self.prec.backward_step(loss, self.optimizer)
        return loss.detach()
