"""One training step, the only one: the loop (`train.loop.train_epoch`) and `stacktrain bench train` both
call it, so the benchmark measures exactly what training does.

The input step (`to_model_input`, also the eval path's) moves a batch's raw patches (store dtype) and
normalisation parameters to the device (non-blocking) and normalises them there with the pipelines'
one normalisation (`pipelines.normalize.normalize_images`: one fused kernel on CUDA). The forward pass
runs under the run's autocast, the loss is BCE with logits in fp32, and the backward pass and Adam
step go through `Precision` (a GradScaler for fp16). The loss comes back detached and on the device:
summing it there costs no synchronisation.
"""

from __future__ import annotations

import torch
from torch import nn

from stacktrain.pipelines.contract import Batch
from stacktrain.pipelines.normalize import normalize_images
from stacktrain.train.precision import Precision


def to_model_input(batch: Batch, device: torch.device, prec: Precision) -> torch.Tensor:
    """A batch's images normalised on `device`, in the loader's dtype (fp32 runs take fp32)."""
    raw = batch.images.to(device, non_blocking=True)
    dtype = torch.float32 if prec.name == "fp32" else batch.norm.dtype  # e.g. a bf16 loader on the CPU
    return normalize_images(raw, batch.lo.to(device, non_blocking=True), batch.mul.to(device, non_blocking=True),
                            clip=batch.norm.clip, dtype=dtype, channels_last=batch.norm.channels_last)


class TrainStep:
    def __init__(self, net: nn.Module, optimizer: torch.optim.Optimizer, criterion: nn.Module, prec: Precision,
                 device: torch.device):
        self.net, self.optimizer, self.criterion, self.prec, self.device = net, optimizer, criterion, prec, device

    def __call__(self, batch: Batch) -> torch.Tensor:
        images = to_model_input(batch, self.device, self.prec)
        with self.prec.autocast():
            logits = self.net(images)[:, 0]
        loss = self.criterion(logits.float(), batch.labels.to(self.device, non_blocking=True))
        self.prec.backward_step(loss, self.optimizer)
        return loss.detach()
