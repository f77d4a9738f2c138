"""Small models for the tests (defined here so tests don't depend on s2h.models)."""

import torch
from torch import nn


def plain_cnn(in_chans: int = 3, num_classes: int = 10,
              widths: tuple[int, int, int] = (16, 32, 32)) -> nn.Sequential:
    """conv-BN-ReLU x3 (the second with stride 2), pool, linear. Its prunable groups are the
    outputs of the convs "0", "3" and "6"; ``widths`` builds the plain network a pruned one
    is equivalent to (the tests' FLOP references)."""
    a, b, c = widths
    return nn.Sequential(
        nn.Conv2d(in_chans, a, 3, padding=1), nn.BatchNorm2d(a), nn.ReLU(),
        nn.Conv2d(a, b, 3, padding=1, stride=2), nn.BatchNorm2d(b), nn.ReLU(),
        nn.Conv2d(b, c, 3, padding=1), nn.BatchNorm2d(c), nn.ReLU(),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(c, num_classes),
    )


def mlp(in_features=20, num_classes=5):
    return nn.Sequential(
        nn.Linear(in_features, 64), nn.ReLU(), nn.Linear(64, 48), nn.GELU(),
        nn.Linear(48, num_classes),
    )


class DepthwiseNet(nn.Module):
    """conv -> BN -> depthwise -> BN -> pointwise, plus a squeeze-excite style gate multiply."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 16, 3, padding=1)
        self.bn0 = nn.BatchNorm2d(16)
        self.dw = nn.Conv2d(16, 16, 3, padding=1, groups=16)
        self.bn1 = nn.BatchNorm2d(16)
        self.se_reduce = nn.Conv2d(16, 8, 1)
        self.se_expand = nn.Conv2d(8, 16, 1)
        self.pw = nn.Conv2d(16, 24, 1)
        self.bn2 = nn.BatchNorm2d(24)
        self.fc = nn.Linear(24, 10)

    def forward(self, x):
        x = torch.relu(self.bn0(self.stem(x)))
        x = torch.relu(self.bn1(self.dw(x)))
        s = x.mean((2, 3), keepdim=True)
        s = torch.sigmoid(self.se_expand(torch.relu(self.se_reduce(s))))
        x = x * s
        x = torch.relu(self.bn2(self.pw(x)))
        return self.fc(x.mean((2, 3)))


class ConcatNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = nn.Conv2d(3, 8, 3, padding=1)
        self.b = nn.Conv2d(3, 8, 3, padding=1)
        self.c = nn.Conv2d(16, 16, 3, padding=1)
        self.fc = nn.Linear(16, 4)

    def forward(self, x):
        x = torch.cat([self.a(x), self.b(x)], 1)
        return self.fc(self.c(x).mean((2, 3)))


class GroupedNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = nn.Conv2d(3, 16, 3, padding=1)
        self.g = nn.Conv2d(16, 16, 3, padding=1, groups=4)
        self.b = nn.Conv2d(16, 16, 3, padding=1)
        self.fc = nn.Linear(16, 4)

    def forward(self, x):
        x = torch.relu(self.b(torch.relu(self.g(torch.relu(self.a(x))))))
        return self.fc(x.mean((2, 3)))


class FlattenNet(nn.Module):
    """A classifier on the flattened (C*H*W) features (each channel owns h*w columns)."""

    def __init__(self):
        super().__init__()
        self.a = nn.Conv2d(3, 8, 3, padding=1)
        self.b = nn.Conv2d(8, 8, 3, padding=1)
        self.fc = nn.Linear(8 * 4 * 4, 4)

    def forward(self, x):
        x = torch.relu(self.b(torch.relu(self.a(x))))
        return self.fc(x.flatten(1))


class ResBlock(nn.Module):
    """conv-bn-relu-conv-bn plus the identity, then relu: a residual block (STP drops it)."""

    def __init__(self, c: int) -> None:
        super().__init__()
        self.conv1, self.bn1 = nn.Conv2d(c, c, 3, padding=1, bias=False), nn.BatchNorm2d(c)
        self.conv2, self.bn2 = nn.Conv2d(c, c, 3, padding=1, bias=False), nn.BatchNorm2d(c)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.relu(x + self.bn2(self.conv2(torch.relu(self.bn1(self.conv1(x))))))
