"""A small model zoo for the CIFAR-style experiments (timm has no CIFAR ResNets).

Plain ``nn.Module`` s built from torch layers only, traceable by ``torch.fx.symbolic_trace`` (no
data-dependent control flow). Every constructor takes ``num_classes`` and ``in_chans``; every
model maps float ``(B, in_chans, H, W)`` to logits float ``(B, num_classes)``. The convolutional
models end in global average pooling, so any input size of at least 8x8 works (``mlp`` is
built for one ``image_size``). ReLUs are not in-place, so forward/backward hooks on any module
see tensors nobody overwrites.

- ``resnet20/32/56/110`` (and ``cifar_resnet(depth)``, depth = 6n+2): He et al. 2016, section
  4.2 -- a 3x3 stem conv + BN + ReLU, three stages of n BasicBlocks with 16/32/64 channels
  (times ``width``), projection shortcuts (1x1 conv stride 2 + BN, "option B") where the shape
  changes. Stage 1 has no projection, so the stem's channels join the residual group of
  stage 1.
- ``wrn28_10`` and ``wide_resnet(depth, widen_factor)`` (depth = 6n+4): Zagoruyko & Komodakis
  2016, pre-activation blocks BN-ReLU-conv3x3-BN-ReLU-(dropout)-conv3x3, 1x1 conv shortcuts
  where the shape changes, final BN-ReLU-pool-linear.
- ``small_cnn`` and ``mlp``: tiny models for tests.

:func:`create_model` records how a model was built in ``model.s2h_builder`` (a JSON-serialisable
dict) so that :func:`rebuild_model` can recreate the architecture without pickle.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import nn

__all__ = [
    "MLP",
    "BasicBlock",
    "CifarResNet",
    "SmallCNN",
    "WideBasicBlock",
    "WideResNet",
    "cifar_resnet",
    "create_model",
    "list_models",
    "mlp",
    "rebuild_model",
    "resnet20",
    "resnet32",
    "resnet56",
    "resnet110",
    "small_cnn",
    "wide_resnet",
    "wrn28_10",
]

BUILDER_KIND = "s2h.models"


def _conv3x3(in_channels: int, out_channels: int, stride: int = 1) -> nn.Conv2d:
    return nn.Conv2d(in_channels, out_channels, 3, stride=stride, padding=1, bias=False)


def _init_weights(model: nn.Module) -> None:
    """He (fan-out) init for convs, BN to identity, PyTorch's default for linear layers."""
    for module in model.modules():
        if isinstance(module, nn.Conv2d):
            nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, nn.BatchNorm2d):
            nn.init.ones_(module.weight)
            nn.init.zeros_(module.bias)


# --------------------------------------------------------------------------------------------
# CIFAR ResNets (He et al. 2016)
# --------------------------------------------------------------------------------------------


class BasicBlock(nn.Module):
    """conv3x3-BN-ReLU-conv3x3-BN, plus the shortcut, then ReLU.

    The shortcut is the identity when shapes match, else 1x1 conv (stride ``stride``) + BN.
    Input float ``(B, in_channels, H, W)``, output ``(B, out_channels, H/stride, W/stride)``.
    """

    def __init__(self, in_channels: int, out_channels: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = _conv3x3(in_channels, out_channels, stride)
        self.bn1 = nn.BatchNorm2d(out_channels)
        self.relu1 = nn.ReLU()
        self.conv2 = _conv3x3(out_channels, out_channels)
        self.bn2 = nn.BatchNorm2d(out_channels)
        if stride != 1 or in_channels != out_channels:
            self.shortcut: nn.Module = nn.Sequential(
                nn.Conv2d(in_channels, out_channels, 1, stride=stride, bias=False),
                nn.BatchNorm2d(out_channels),
            )
        else:
            self.shortcut = nn.Identity()
        self.relu2 = nn.ReLU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.relu1(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu2(out + self.shortcut(x))


class CifarResNet(nn.Module):
    """ResNet for 32x32 inputs: stem, 3 stages of ``blocks_per_stage`` BasicBlocks, pool, fc.

    Stage widths are ``round(16 * width)``, ``round(32 * width)``, ``round(64 * width)``; the
    second and third stages halve the resolution. Input float ``(B, in_chans, H, W)``, output
    logits float ``(B, num_classes)``.
    """

    def __init__(
        self,
        blocks_per_stage: int,
        num_classes: int = 10,
        in_chans: int = 3,
        width: float = 1.0,
    ) -> None:
        super().__init__()
        if blocks_per_stage < 1:
            raise ValueError(f"blocks_per_stage must be >= 1, got {blocks_per_stage}")
        channels = [max(1, round(c * width)) for c in (16, 32, 64)]
        self.conv1 = _conv3x3(in_chans, channels[0])
        self.bn1 = nn.BatchNorm2d(channels[0])
        self.relu = nn.ReLU()
        stages = []
        in_channels = channels[0]
        for stage, out_channels in enumerate(channels):
            blocks = []
            for block in range(blocks_per_stage):
                stride = 2 if stage > 0 and block == 0 else 1
                blocks.append(BasicBlock(in_channels, out_channels, stride))
                in_channels = out_channels
            stages.append(nn.Sequential(*blocks))
        self.layer1, self.layer2, self.layer3 = stages
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.flatten = nn.Flatten(1)
        self.fc = nn.Linear(channels[2], num_classes)
        _init_weights(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.relu(self.bn1(self.conv1(x)))
        x = self.layer3(self.layer2(self.layer1(x)))
        return self.fc(self.flatten(self.pool(x)))


def cifar_resnet(
    depth: int, num_classes: int = 10, in_chans: int = 3, width: float = 1.0
) -> CifarResNet:
    """CIFAR ResNet of ``depth`` = 6n+2 layers (20, 32, 44, 56, 110, ...)."""
    if depth < 8 or (depth - 2) % 6:
        raise ValueError(f"CIFAR ResNet depth must be 6n+2 (20, 32, 56, 110, ...), got {depth}")
    return CifarResNet((depth - 2) // 6, num_classes, in_chans, width)


def resnet20(num_classes: int = 10, in_chans: int = 3, width: float = 1.0) -> CifarResNet:
    """ResNet-20 (0.27M parameters at width 1, 10 classes)."""
    return cifar_resnet(20, num_classes, in_chans, width)


def resnet32(num_classes: int = 10, in_chans: int = 3, width: float = 1.0) -> CifarResNet:
    """ResNet-32 (0.46M parameters at width 1, 10 classes)."""
    return cifar_resnet(32, num_classes, in_chans, width)


def resnet56(num_classes: int = 10, in_chans: int = 3, width: float = 1.0) -> CifarResNet:
    """ResNet-56 (0.85M parameters at width 1, 10 classes)."""
    return cifar_resnet(56, num_classes, in_chans, width)


def resnet110(num_classes: int = 10, in_chans: int = 3, width: float = 1.0) -> CifarResNet:
    """ResNet-110 (1.7M parameters at width 1, 10 classes)."""
    return cifar_resnet(110, num_classes, in_chans, width)


# --------------------------------------------------------------------------------------------
# Wide ResNets (Zagoruyko & Komodakis 2016)
# --------------------------------------------------------------------------------------------


class WideBasicBlock(nn.Module):
    """Pre-activation block: BN-ReLU-conv3x3(stride)-BN-ReLU-[dropout]-conv3x3, plus shortcut.

    When the shape changes the shortcut is a 1x1 conv applied to the pre-activated input
    ``relu(bn1(x))`` (as in the reference implementation); otherwise it is ``x`` itself.
    Input float ``(B, in_channels, H, W)``, output ``(B, out_channels, H/stride, W/stride)``.
    """

    def __init__(
        self, in_channels: int, out_channels: int, stride: int = 1, dropout: float = 0.0
    ) -> None:
        super().__init__()
        self.bn1 = nn.BatchNorm2d(in_channels)
        self.relu1 = nn.ReLU()
        self.conv1 = _conv3x3(in_channels, out_channels, stride)
        self.bn2 = nn.BatchNorm2d(out_channels)
        self.relu2 = nn.ReLU()
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.conv2 = _conv3x3(out_channels, out_channels)
        self.projection = stride != 1 or in_channels != out_channels
        self.shortcut = (
            nn.Conv2d(in_channels, out_channels, 1, stride=stride, bias=False)
            if self.projection
            else nn.Identity()
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        activated = self.relu1(self.bn1(x))
        out = self.conv1(activated)
        out = self.conv2(self.dropout(self.relu2(self.bn2(out))))
        # ``projection`` is a python bool fixed at construction: fx sees a single path.
        residual = self.shortcut(activated) if self.projection else x
        return out + residual


class WideResNet(nn.Module):
    """WRN-``depth``-``widen_factor``: conv3x3 stem (16), three stages of n = (depth-4)/6 wide
    blocks with 16k/32k/64k channels (k = ``widen_factor``), BN-ReLU, pool, fc.

    Input float ``(B, in_chans, H, W)``, output logits float ``(B, num_classes)``.
    """

    def __init__(
        self,
        depth: int = 28,
        widen_factor: int = 10,
        num_classes: int = 10,
        in_chans: int = 3,
        dropout: float = 0.0,
    ) -> None:
        super().__init__()
        if depth < 10 or (depth - 4) % 6:
            raise ValueError(f"WideResNet depth must be 6n+4 (16, 22, 28, 40, ...), got {depth}")
        blocks_per_stage = (depth - 4) // 6
        channels = [16 * widen_factor, 32 * widen_factor, 64 * widen_factor]
        self.conv1 = _conv3x3(in_chans, 16)
        stages = []
        in_channels = 16
        for stage, out_channels in enumerate(channels):
            blocks = []
            for block in range(blocks_per_stage):
                stride = 2 if stage > 0 and block == 0 else 1
                blocks.append(WideBasicBlock(in_channels, out_channels, stride, dropout))
                in_channels = out_channels
            stages.append(nn.Sequential(*blocks))
        self.layer1, self.layer2, self.layer3 = stages
        self.bn = nn.BatchNorm2d(channels[2])
        self.relu = nn.ReLU()
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.flatten = nn.Flatten(1)
        self.fc = nn.Linear(channels[2], num_classes)
        _init_weights(self)
        nn.init.zeros_(self.fc.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.conv1(x)
        x = self.layer3(self.layer2(self.layer1(x)))
        x = self.relu(self.bn(x))
        return self.fc(self.flatten(self.pool(x)))


def wide_resnet(
    depth: int,
    widen_factor: int,
    num_classes: int = 10,
    in_chans: int = 3,
    dropout: float = 0.0,
) -> WideResNet:
    """WideResNet-``depth``-``widen_factor`` (depth = 6n+4)."""
    return WideResNet(depth, widen_factor, num_classes, in_chans, dropout)


def wrn28_10(num_classes: int = 10, in_chans: int = 3, dropout: float = 0.0) -> WideResNet:
    """WideResNet-28-10 (36.5M parameters, 10 classes)."""
    return WideResNet(28, 10, num_classes, in_chans, dropout)


# --------------------------------------------------------------------------------------------
# Tiny models for tests
# --------------------------------------------------------------------------------------------


class SmallCNN(nn.Module):
    """``len(channels)`` conv3x3-BN-ReLU layers (every layer after the first has stride 2),
    global average pool, linear. Input float ``(B, in_chans, H, W)``, output
    ``(B, num_classes)``."""

    def __init__(
        self,
        num_classes: int = 10,
        in_chans: int = 3,
        channels: Sequence[int] = (16, 32, 64),
    ) -> None:
        super().__init__()
        if not channels:
            raise ValueError("channels must name at least one layer")
        layers: list[nn.Module] = []
        in_channels = in_chans
        for index, out_channels in enumerate(channels):
            layers += [
                _conv3x3(in_channels, int(out_channels), stride=1 if index == 0 else 2),
                nn.BatchNorm2d(int(out_channels)),
                nn.ReLU(),
            ]
            in_channels = int(out_channels)
        self.features = nn.Sequential(*layers)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.flatten = nn.Flatten(1)
        self.fc = nn.Linear(in_channels, num_classes)
        _init_weights(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.flatten(self.pool(self.features(x))))


def small_cnn(
    num_classes: int = 10, in_chans: int = 3, channels: Sequence[int] = (16, 32, 64)
) -> SmallCNN:
    """A few conv-BN-ReLU layers, global average pool, linear."""
    return SmallCNN(num_classes, in_chans, channels)


class MLP(nn.Module):
    """Flatten, then (Linear-ReLU) per hidden size, then a linear classifier.

    Input float ``(B, in_chans, image_size, image_size)`` (or any shape with
    ``in_chans * image_size**2`` features per sample), output ``(B, num_classes)``.
    """

    def __init__(
        self,
        num_classes: int = 10,
        in_chans: int = 3,
        image_size: int = 32,
        hidden: Sequence[int] = (256, 128),
    ) -> None:
        super().__init__()
        self.flatten = nn.Flatten(1)
        layers: list[nn.Module] = []
        in_features = in_chans * image_size * image_size
        for width in hidden:
            layers += [nn.Linear(in_features, int(width)), nn.ReLU()]
            in_features = int(width)
        self.hidden = nn.Sequential(*layers)
        self.fc = nn.Linear(in_features, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.hidden(self.flatten(x)))


def mlp(
    num_classes: int = 10,
    in_chans: int = 3,
    image_size: int = 32,
    hidden: Sequence[int] = (256, 128),
) -> MLP:
    """Linear-ReLU stack on flattened ``in_chans x image_size x image_size`` inputs."""
    return MLP(num_classes, in_chans, image_size, hidden)


# --------------------------------------------------------------------------------------------
# Registry
# --------------------------------------------------------------------------------------------

_MODELS: dict[str, Callable[..., nn.Module]] = {
    "resnet20": resnet20,
    "resnet32": resnet32,
    "resnet56": resnet56,
    "resnet110": resnet110,
    "cifar_resnet": cifar_resnet,
    "wrn28_10": wrn28_10,
    "wide_resnet": wide_resnet,
    "small_cnn": small_cnn,
    "mlp": mlp,
}


def list_models() -> list[str]:
    """Names :func:`create_model` accepts, sorted."""
    return sorted(_MODELS)


def _canonical_model_name(name: str) -> str:
    key = str(name).strip().lower().replace("-", "_")
    if key not in _MODELS:
        raise ValueError(f"unknown model {name!r}; known models: {', '.join(list_models())}")
    return key


def create_model(name: str, **kwargs: Any) -> nn.Module:
    """Build model ``name`` (see :func:`list_models`; ``-`` and ``_`` are interchangeable).

    ``kwargs`` go to the constructor (``num_classes``, ``in_chans``, ``width``, ...) and must be
    JSON-serialisable. The model gets ``model.s2h_builder = {"kind": "s2h.models", "name": ...,
    "kwargs": ...}`` (kwargs as they read back from JSON), from which :func:`rebuild_model`
    recreates the same architecture.
    """
    key = _canonical_model_name(name)
    try:
        plain_kwargs = json.loads(json.dumps(kwargs))
    except (TypeError, ValueError) as exc:
        raise TypeError(f"create_model({name!r}): kwargs must be JSON-serialisable: {exc}") from exc
    model = _MODELS[key](**plain_kwargs)
    model.s2h_builder = {"kind": BUILDER_KIND, "name": key, "kwargs": plain_kwargs}
    return model


def rebuild_model(builder: dict[str, Any]) -> nn.Module:
    """The model described by a ``s2h_builder`` dict (e.g. read back from JSON), freshly
    initialised. Raises ``ValueError`` for a dict that :func:`create_model` did not write."""
    if not isinstance(builder, dict) or builder.get("kind") != BUILDER_KIND:
        raise ValueError(f"not an s2h.models builder description: {builder!r}")
    return create_model(builder["name"], **dict(builder.get("kwargs") or {}))
