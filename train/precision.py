"""Mixed precision: bf16 autocast on GPUs that support it, fp16 with a GradScaler otherwise, fp32 on CPU.

    prec = Precision.create(cfg.train.precision, device)
    with prec.autocast():
        loss = criterion(model(x)[:, 0].float(), y)
    prec.backward_step(loss, optimizer)       # scaler.scale / step / update for fp16
"""

from __future__ import annotations

import contextlib
import dataclasses

import torch

from stacktrain.train.config import ConfigError, resolve_precision

AUTOCAST_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


@dataclasses.dataclass
class Precision:
    name: str  # bf16 | fp16 | fp32 (resolved)
    device: torch.device
    scaler: torch.amp.GradScaler | None = None

    @classmethod
    def create(cls, precision: str, device: torch.device) -> Precision:
        bf16_ok = device.type == "cuda" and torch.cuda.is_bf16_supported()
        name = resolve_precision(precision, device.type, bf16_ok)
        if name != "fp32" and device.type != "cuda":
            raise ConfigError(f"train.precision = {precision!r} on the CPU; CPU training runs in fp32: set "
                              "train.precision = \"fp32\" or \"auto\"")
        if name == "bf16" and not bf16_ok:
            raise ConfigError(f"train.precision = \"bf16\" but {torch.cuda.get_device_name(device)} has no "
                              "bf16; use \"auto\" (fp16 with a GradScaler) or \"fp16\"")
        scaler = torch.amp.GradScaler("cuda") if name == "fp16" else None
        return cls(name, device, scaler)

    def autocast(self):
        if self.name == "fp32":
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=AUTOCAST_DTYPES[self.name])

    def backward_step(self, loss: torch.Tensor, optimizer: torch.optim.Optimizer) -> None:
        optimizer.zero_grad(set_to_none=True)
        if self.scaler is None:
            loss.backward()
            optimizer.step()
            return
        self.scaler.scale(loss).backward()
        self.scaler.step(optimizer)  # skips the step when the fp16 gradients overflowed
        self.scaler.update()
