"""Benchmark models: an MLP, a small CNN and a CIFAR-style ResNet-18.

:func:`build_model` creates the parameters on the ``meta`` device and initialises them from an
explicit ``torch.Generator`` (PyTorch's default schemes), so two runs with the same seed start from
the same weights and the global RNG is never touched.
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from ._checks import check_choice, check_int, resolve_device

__all__ = ["MLP", "SmallCNN", "ResNet18", "MODELS", "build_model", "init_weights"]


class MLP(nn.Module):
    """Flatten, then fully connected layers with ReLU.

    Args:
        in_shape: (C, H, W) of one input.
        num_classes: outputs.
        hidden: hidden widths. Default ``(512, 256)``.
    """

    def __init__(self, in_shape: tuple[int, int, int], num_classes: int,
                 hidden: tuple[int, ...] = (512, 256)) -> None:
        super().__init__()
        layers: list[nn.Module] = [nn.Flatten()]
        width = math.prod(in_shape)
        for h in hidden:
            layers += [nn.Linear(width, h), nn.ReLU(inplace=True)]
            width = h
        layers.append(nn.Linear(width, num_classes))
        self.net = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


def _conv_bn(cin: int, cout: int, stride: int = 1) -> list[nn.Module]:
    return [nn.Conv2d(cin, cout, 3, stride=stride, padding=1, bias=False), nn.BatchNorm2d(cout),
            nn.ReLU(inplace=True)]


class SmallCNN(nn.Module):
    """Three 3x3 conv-BN-ReLU stages (32, 64, 128 channels; max-pool after the first two), global
    average pooling and a linear head. Works for any input size of 4x4 and up."""

    def __init__(self, in_shape: tuple[int, int, int], num_classes: int, width: int = 32) -> None:
        super().__init__()
        c = in_shape[0]
        self.features = nn.Sequential(
            *_conv_bn(c, width), nn.MaxPool2d(2),
            *_conv_bn(width, 2 * width), nn.MaxPool2d(2),
            *_conv_bn(2 * width, 4 * width), nn.AdaptiveAvgPool2d(1), nn.Flatten())
        self.head = nn.Linear(4 * width, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))


class _BasicBlock(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, stride=1, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.shortcut = nn.Sequential()
        if stride != 1 or cin != cout:
            self.shortcut = nn.Sequential(nn.Conv2d(cin, cout, 1, stride=stride, bias=False),
                                          nn.BatchNorm2d(cout))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return F.relu(out + self.shortcut(x))


class ResNet18(nn.Module):
    """ResNet-18 in its CIFAR form (He et al. 2016; 3x3 stem, stride 1, no max-pool), for GPUs.

    Four stages of two basic blocks (``width`` x 1, 2, 4, 8 channels, strides 1, 2, 2, 2), global
    average pooling and a linear head: about 11.2 M parameters for 3-channel 10-class input at
    the standard ``width=64``. A smaller width keeps the architecture and shrinks the cost by
    about ``(width / 64)**2`` (dry runs use it).
    """

    def __init__(self, in_shape: tuple[int, int, int], num_classes: int, width: int = 64) -> None:
        super().__init__()
        check_int("width", width, minimum=1)
        self.stem = nn.Sequential(*_conv_bn(in_shape[0], width))
        blocks, cin = [], width
        for mult, stride in ((1, 1), (2, 2), (4, 2), (8, 2)):
            cout = mult * width
            blocks += [_BasicBlock(cin, cout, stride), _BasicBlock(cout, cout, 1)]
            cin = cout
        self.blocks = nn.Sequential(*blocks)
        self.head = nn.Linear(8 * width, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.blocks(self.stem(x))
        return self.head(torch.flatten(F.adaptive_avg_pool2d(x, 1), 1))


#: model name -> class
MODELS: dict[str, type[nn.Module]] = {"mlp": MLP, "cnn": SmallCNN, "resnet18": ResNet18}


@torch.no_grad()
def init_weights(model: nn.Module, generator: torch.Generator) -> nn.Module:
    """(Re-)initialise every parameter from ``generator`` with PyTorch's default schemes.

    Linear and conv weights: Kaiming-uniform with ``a = sqrt(5)``; their biases uniform in
    ``+-1/sqrt(fan_in)``; batch norm: weight 1, bias 0, running statistics reset.

    Raises:
        TypeError: a module with parameters of another kind (its init would be unknown).
    """
    for m in model.modules():
        if isinstance(m, (nn.Linear, nn.Conv2d)):
            w = _cpu_draw(m.weight, generator,
                          lambda t: nn.init.kaiming_uniform_(t, a=math.sqrt(5), generator=generator))
            m.weight.copy_(w)
            if m.bias is not None:
                fan_in = m.weight[0].numel()
                bound = 1.0 / math.sqrt(fan_in) if fan_in > 0 else 0.0
                m.bias.copy_(_cpu_draw(m.bias, generator,
                                       lambda t: nn.init.uniform_(t, -bound, bound, generator=generator)))
        elif isinstance(m, nn.BatchNorm2d):
            m.reset_parameters()       # deterministic: ones, zeros, running stats reset
        elif any(True for _ in m.parameters(recurse=False)):
            raise TypeError(f"init_weights does not know how to initialise {type(m).__name__}")
    return model


def _cpu_draw(param: torch.Tensor, generator: torch.Generator, fill) -> torch.Tensor:
    """Draw on the CPU generator (so CPU and GPU runs start from the same weights), then move."""
    t = torch.empty(param.shape, dtype=param.dtype, device="cpu")
    fill(t)
    return t.to(param.device)


def build_model(name: str, in_shape: tuple[int, int, int], num_classes: int,
                generator: torch.Generator, device: torch.device | str = "cpu",
                width: int | None = None) -> nn.Module:
    """A freshly initialised model on ``device``.

    Args:
        name: ``"mlp"``, ``"cnn"`` or ``"resnet18"``.
        in_shape: (C, H, W) of one input.
        num_classes: number of outputs.
        generator: CPU generator the initial weights are drawn from.
        device: where the model lives. Default ``"cpu"``.
        width: base width of ``"cnn"`` (default 32) or ``"resnet18"`` (default 64); ``None``
            (default) keeps the model's own. The MLP takes none.

    Raises:
        ValueError: an unknown name, a bad shape, or a width for the MLP.
    """
    check_choice("model", name, MODELS)
    check_int("num_classes", num_classes, minimum=2)
    if len(in_shape) != 3:
        raise ValueError(f"in_shape must be (C, H, W), got in_shape={in_shape!r}")
    kwargs = {}
    if width is not None:
        if name == "mlp":
            raise ValueError(f"width applies to 'cnn' and 'resnet18', not model='mlp' "
                             f"(got width={width})")
        kwargs["width"] = check_int("width", width, minimum=1)
    dev = resolve_device(device)
    with torch.device("meta"):
        model = MODELS[name](tuple(in_shape), num_classes, **kwargs)
    model = model.to_empty(device=dev)
    return init_weights(model, generator)
