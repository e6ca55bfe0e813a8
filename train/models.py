"""Model registry: name -> builder(tiny=False, **options) -> nn.Module, (N, 3, D, H, W) -> (N, 1) logits.

All networks are MONAI's (`monai.networks.nets`), built 3-D with 3 input channels and one output.
Each has a tiny flavor (a few channels and blocks) that runs in milliseconds on 16x32x32 on a CPU.

| name               | MONAI network                          | role                                      |
|--------------------|----------------------------------------|-------------------------------------------|
| resnet3d50         | ResNet, bottleneck blocks [3, 4, 6, 3] | the seed's model                          |
| resnet3d18         | ResNet, basic blocks [2, 2, 2, 2]      | phase 2: shallower, 1/3 of the parameters |
| densenet121-3d     | DenseNet121                            | phase 2: dense connectivity, 11 M params  |
| efficientnet-b0-3d | EfficientNetBN("efficientnet-b0")      | phase 2: depthwise MBConv + squeeze-excite |

The ResNets' stem. MONAI's default stem (7^3 conv, stride 1) keeps the full 32x256x256 resolution
into the first bottlenecks: ~2.6 GiB of bf16 activations per patch, ~169 GiB at batch 64 (README, "Models").
We use stride (1, 2, 2) instead: it halves H and W but keeps the depth, which is already 8x smaller
than H and W in a 32x256x256 patch (and usually the coarser axis of a stack). `model_card` measures
~0.67 GiB per patch, so batch 64 needs ~43 GiB of activations in bf16: within 80 GB. Stride 2 in all
three axes (`options = {stem_stride = 2}`) halves both memory and FLOPs again.
`model_card(name, patch)` gives parameters, FLOPs and activation memory of any registered model.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from stacktrain.errors import ModelError

RESNET_STEM_STRIDE = (1, 2, 2)
TINY_WIDTHS = [4, 8, 16, 32]




def _stride(stem_stride: int | list[int] | tuple[int, ...]) -> tuple[int, int, int]:
    s = (stem_stride,) * 3 if isinstance(stem_stride, int) else tuple(stem_stride)
    if len(s) != 3 or not all(isinstance(v, int) and v >= 1 for v in s):
        raise ModelError(f"model.options.stem_stride = {stem_stride!r}; give an integer or 3 integers >= 1")
    return s


def _resnet(block: str, layers: list[int], tiny: bool, stem_stride) -> nn.Module:
    from monai.networks.nets.resnet import ResNet, get_inplanes
    return ResNet(block, [1, 1, 1, 1] if tiny else layers, TINY_WIDTHS if tiny else get_inplanes(),
                  spatial_dims=3, n_input_channels=3, conv1_t_size=7, conv1_t_stride=_stride(stem_stride),
                  num_classes=1)


def resnet3d50(tiny: bool = False, *, stem_stride=RESNET_STEM_STRIDE) -> nn.Module:
    """The seed's ResNet3D-50: bottleneck blocks [3, 4, 6, 3], widths 64..512 (x4), one logit."""
    return _resnet("bottleneck", [3, 4, 6, 3], tiny, stem_stride)


def resnet3d18(tiny: bool = False, *, stem_stride=RESNET_STEM_STRIDE) -> nn.Module:
    """ResNet3D-18: basic blocks [2, 2, 2, 2], widths 64..512, one logit."""
    return _resnet("basic", [2, 2, 2, 2], tiny, stem_stride)


def densenet121_3d(tiny: bool = False, *, dropout: float = 0.0) -> nn.Module:
    """DenseNet-121 (blocks 6, 12, 24, 16; growth 32) in 3-D; its stem is 7^3 stride 2 + max-pool.

    It divides every axis by 32, so the patch depth must be >= 32 (the tiny flavor: >= 16).
    """
    from monai.networks.nets import DenseNet
    if tiny:  # three blocks, so that a 16-deep patch survives the pooling
        return DenseNet(spatial_dims=3, in_channels=3, out_channels=1, init_features=8, growth_rate=4,
                        block_config=(1, 1, 1), bn_size=2, dropout_prob=dropout)
    return DenseNet(spatial_dims=3, in_channels=3, out_channels=1, dropout_prob=dropout)


def efficientnet_b0_3d(tiny: bool = False) -> nn.Module:
    """EfficientNet-B0 in 3-D (MBConv blocks with squeeze-excitation), random init, one logit."""
    from monai.networks.nets import EfficientNet, EfficientNetBN
    if tiny:  # two MBConv stages at a quarter of the width
        return EfficientNet(["r1_k3_s11_e1_i32_o16_se0.25", "r1_k3_s22_e6_i16_o24_se0.25"],
                            spatial_dims=3, in_channels=3, num_classes=1, width_coefficient=0.25,
                            depth_coefficient=1.0, image_size=32)
    return EfficientNetBN("efficientnet-b0", pretrained=False, spatial_dims=3, in_channels=3, num_classes=1)


MODELS: dict[str, Callable[..., nn.Module]] = {
    "resnet3d50": resnet3d50,
    "resnet3d18": resnet3d18,
    "densenet121-3d": densenet121_3d,
    "efficientnet-b0-3d": efficientnet_b0_3d,
}


def check_model(name: str, options: dict[str, Any] | None = None) -> None:
    """Refuse an unknown model name or builder option, listing the valid ones."""
    if name not in MODELS:
        raise ModelError(f"model.name = {name!r}; registered models: {', '.join(MODELS)}")
    valid = [p for p in inspect.signature(MODELS[name]).parameters if p != "tiny"]
    unknown = sorted(set(options or {}) - set(valid))
    if unknown:
        raise ModelError(f"model.options {', '.join(unknown)} not understood by {name}; "
                         f"valid options: {', '.join(valid) or 'none'}")


def build_model(name: str, *, tiny: bool = False, options: dict[str, Any] | None = None) -> nn.Module:
    """Build a registered model; unknown names and options are errors that list the valid ones."""
    check_model(name, options)
    return MODELS[name](tiny, **dict(options or {}))


# -- cost of a model -------------------------------------------------------------------------------
def saved_activation_bytes(model: nn.Module, x: torch.Tensor) -> int:
    """Bytes of the tensors autograd keeps for backward during `model(x)`, each storage once,
    leaving out the model's parameters (they are not activations).

    Works on the meta device (no memory, no compute): there a tensor's identity stands in for its
    storage address, which meta tensors do not have.
    """
    sizes: dict[Any, int] = {}
    with torch.autograd.graph.saved_tensors_hooks(*_saved_bytes_hooks(model, sizes)):
        out = model(x)
    del out
    return sum(sizes.values())


def _saved_bytes_hooks(model: nn.Module, sizes: dict[Any, int]):
    def key(t: torch.Tensor) -> Any:
        return id(t) if t.device.type == "meta" else t.untyped_storage().data_ptr()

    params = {key(p) for p in model.parameters()}

    def pack(t: torch.Tensor) -> torch.Tensor:
        k = key(t)
        if k not in params:
            sizes[k] = max(sizes.get(k, 0), t.untyped_storage().nbytes())
        return t

    return pack, lambda t: t


def _conv_backward_flop(grad_out_shape, x_shape, w_shape, _bias, _stride, _padding, _dilation, transposed,
                        _output_padding, _groups, output_mask, out_shape=None, **_) -> int:
    """grad_input and grad_weight each cost one forward convolution. (torch's own formula ignores
    `groups` for grad_weight and so counts a depthwise conv's backward `groups` times too high.)"""
    from torch.utils.flop_counter import conv_flop_count
    forward = conv_flop_count(x_shape, w_shape, grad_out_shape, transposed)
    return forward * (int(output_mask[0]) + int(output_mask[1]))


def model_card(name: str, patch: tuple[int, int, int] = (32, 256, 256), *, tiny: bool = False,
               options: dict[str, Any] | None = None, batch: int = 64) -> dict[str, Any]:
    """Parameters, FLOPs per patch and a bf16 training-memory estimate, computed on the meta device.

    activation bytes = what autograd saves for backward at batch 1 (parameters left out), times
    the batch; training state = fp32 weights + grads + Adam moments = 16 bytes per parameter.
    """
    from torch.utils.flop_counter import FlopCounterMode

    with torch.device("meta"):
        model = build_model(name, tiny=tiny, options=options).to(torch.bfloat16).train()
        x = torch.empty(1, 3, *patch, dtype=torch.bfloat16)
    params = sum(p.numel() for p in model.parameters())
    fix = {torch.ops.aten.convolution_backward: _conv_backward_flop}
    sizes: dict[Any, int] = {}
    with FlopCounterMode(display=False, custom_mapping=fix) as counter:
        with torch.autograd.graph.saved_tensors_hooks(*_saved_bytes_hooks(model, sizes)):
            out = model(x)
        forward = counter.get_total_flops()
        out.float().sum().backward()
    train = counter.get_total_flops()
    per_patch = sum(sizes.values())
    state = 16 * params
    gib = 2 ** 30
    return {"name": name, "tiny": tiny, "patch": list(patch), "params": params,
            "forward_gflop": forward / 1e9, "train_gflop": train / 1e9,
            "activation_gib_per_patch": per_patch / gib, "batch": batch,
            "activation_gib_at_batch": batch * per_patch / gib, "state_gib": state / gib,
            "train_memory_gib_at_batch": (batch * per_patch + state) / gib}
