"""Backbones by name, with torchvision's parameter names.

Every backbone maps images (N x 3 x H x W) to globally average-pooled features (N x d) and has no
classifier: torchvision ResNets get ``fc = Identity()``, so a saved state dict loads strictly into
``torchvision.models.resnetXX()`` once its ``fc`` is replaced by ``Identity``.

- ``resnet18``, ``resnet34``, ``resnet50``: torchvision's layouts.
- ``resnet50w2``, ``resnet50w4``, ``resnet50w5``: the official SwAV wide ResNet-50s (every stage
  ``w`` times wider, features 2048*w), with torchvision's key names.
- ``<name>-small``: the same network with a small-image stem (3x3 stride-1 first convolution and
  no max-pool), for data of 64 px or less.
- ``convnet-tiny``: a five-layer VGG-style convnet for CPU demos and tests.
"""

from __future__ import annotations

# torchvision (about 1 to 3 s to import) is imported only when a ResNet is built.
import functools
from collections.abc import Callable

import torch
from torch import nn


class TinyConvNet(nn.Module):
    """A small VGG-style convnet: 3 stages of conv-BN-ReLU, global average pool to ``4 * width``."""

    def __init__(self, width: int = 32) -> None:
        super().__init__()

        def block(cin: int, cout: int) -> list[nn.Module]:
            return [
                nn.Conv2d(cin, cout, 3, padding=1, bias=False),
                nn.BatchNorm2d(cout),
                nn.ReLU(inplace=True),
            ]

        self.features = nn.Sequential(
            *block(3, width),
            *block(width, 2 * width),
            nn.MaxPool2d(2),
            *block(2 * width, 2 * width),
            *block(2 * width, 4 * width),
            nn.MaxPool2d(2),
            *block(4 * width, 4 * width),
        )
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.out_dim = 4 * width

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.flatten(self.pool(self.features(x)), 1)


def _wide_resnet50(widen: int) -> nn.Module:
    """ResNet-50 with every stage ``widen`` times wider (official SwAV ``resnet50w{2,4,5}``)."""
    from torchvision.models.resnet import Bottleneck, ResNet

    class WideResNet50(ResNet):
        def __init__(self, widen: int) -> None:
            nn.Module.__init__(self)
            self._norm_layer = nn.BatchNorm2d
            self.inplanes = 64 * widen
            self.dilation = 1
            self.groups = 1
            self.base_width = 64
            self.conv1 = nn.Conv2d(3, self.inplanes, kernel_size=7, stride=2, padding=3, bias=False)
            self.bn1 = nn.BatchNorm2d(self.inplanes)
            self.relu = nn.ReLU(inplace=True)
            self.maxpool = nn.MaxPool2d(kernel_size=3, stride=2, padding=1)
            self.layer1 = self._make_layer(Bottleneck, 64 * widen, 3)
            self.layer2 = self._make_layer(Bottleneck, 128 * widen, 4, stride=2)
            self.layer3 = self._make_layer(Bottleneck, 256 * widen, 6, stride=2)
            self.layer4 = self._make_layer(Bottleneck, 512 * widen, 3, stride=2)
            self.avgpool = nn.AdaptiveAvgPool2d((1, 1))
            self.fc = nn.Identity()  # type: ignore[assignment]
            for module in self.modules():
                if isinstance(module, nn.Conv2d):
                    nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")
                elif isinstance(module, nn.BatchNorm2d):
                    nn.init.constant_(module.weight, 1)
                    nn.init.constant_(module.bias, 0)

    return WideResNet50(widen)


def _torchvision(name: str) -> Callable[[], nn.Module]:
    """torchvision's ``name`` ResNet without its classifier (torchvision is imported when built)."""

    def build() -> nn.Module:
        from torchvision.models import resnet

        model: nn.Module = getattr(resnet, name)()
        model.fc = nn.Identity()
        return model

    return build


_FACTORIES: dict[str, tuple[Callable[[], nn.Module], int]] = {
    "resnet18": (_torchvision("resnet18"), 512),
    "resnet34": (_torchvision("resnet34"), 512),
    "resnet50": (_torchvision("resnet50"), 2048),
    "resnet50w2": (lambda: _wide_resnet50(2), 4096),
    "resnet50w4": (lambda: _wide_resnet50(4), 8192),
    "resnet50w5": (lambda: _wide_resnet50(5), 10240),
    "convnet-tiny": (lambda: TinyConvNet(32), 128),
}

TORCHVISION_ARCHS = ("resnet18", "resnet34", "resnet50")


def available_backbones() -> list[str]:
    """All accepted backbone names."""
    small = [f"{name}-small" for name in _FACTORIES if name.startswith("resnet")]
    return sorted([*_FACTORIES, *small])


def _small_stem(model: nn.Module) -> None:
    conv1 = model.conv1
    assert isinstance(conv1, nn.Conv2d)
    stem_width = conv1.out_channels
    model.conv1 = nn.Conv2d(3, stem_width, kernel_size=3, stride=1, padding=1, bias=False)
    nn.init.kaiming_normal_(model.conv1.weight, mode="fan_out", nonlinearity="relu")
    model.maxpool = nn.Identity()


def build_backbone(name: str) -> tuple[nn.Module, int]:
    """Build the backbone ``name``; returns (module, feature dimension)."""
    base, small = (name[: -len("-small")], True) if name.endswith("-small") else (name, False)
    if base not in _FACTORIES or (small and not base.startswith("resnet")):
        import difflib

        close = difflib.get_close_matches(name, available_backbones(), n=1)
        hint = f"; did you mean '{close[0]}'?" if close else ""
        raise ValueError(f"unknown backbone '{name}'{hint} (available: {', '.join(available_backbones())})")
    factory, dim = _FACTORIES[base]
    model = factory()
    if small:
        _small_stem(model)
    return model, dim


@functools.cache
def backbone_shapes(name: str) -> tuple[tuple[str, tuple[int, ...]], ...]:
    """Every state-dict key of the backbone ``name`` with its shape, in order (no classifier).

    Built once per name on the meta device: no memory, no initialisation cost, even for resnet50w5.
    """
    with torch.device("meta"):
        module, _ = build_backbone(name)
    return tuple((key, tuple(value.shape)) for key, value in module.state_dict().items())


def backbone_basic_block(name: str) -> type[nn.Module]:
    """The residual block type of a ResNet backbone (for documentation and import checks)."""
    from torchvision.models.resnet import BasicBlock, Bottleneck

    return BasicBlock if name.split("-")[0] in ("resnet18", "resnet34") else Bottleneck


def check_backbone_name(name: str, where: str = "'model.arch'") -> None:
    """Raise a one-line :class:`~swavctl.errors.UserError` for an unknown backbone name; ``where``
    names what set it (the setting, or the ``--arch`` flag typed)."""
    from swavctl.errors import UserError

    names = available_backbones()
    if name not in names:
        import difflib

        close = difflib.get_close_matches(name, names, n=1)
        hint = f"; did you mean '{close[0]}'?" if close else f" (available: {', '.join(names)})"
        raise UserError(f"invalid value for {where}: unknown backbone '{name}'{hint}")
