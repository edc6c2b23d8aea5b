"""The worker path: one decoded image in, its multi-crop out, on one CPU thread of a loader worker.

For each crop, in order: the box and flip of its row of draws (:mod:`.draws`), cut and resized by
torchvision's uint8 antialiased bilinear ``resized_crop`` (the kernel ``transforms.v2`` calls;
rounding the crop to whole grey levels, as the official PIL pipeline does), then converted to
float32 in [0, 1], then the shared photometric stage (:func:`.photometric.photometric`, with one
row) and the normalisation.

The device path (:mod:`.batched`) resizes with float weight matrices instead and does not round:
that, and float rounding, is the only difference between the two for the same draws. The uint8
kernel stays here because it is what makes one image's crops cheap on a CPU
(``bench/multicrop_paths.py``, docs/benchmarks.md).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F

from swavctl.data.multicrop.draws import CropDraws, draw_image
from swavctl.data.multicrop.photometric import normalize, photometric
from swavctl.data.multicrop.spec import (
    AugmentConfigError,
    AugmentSpec,
    CropSpec,
    blur_kernel_size,
    check_image,
)

__all__ = ["MultiCrop", "resized_crop"]


def resized_crop(image: torch.Tensor, box: Sequence[int], size: int, flip: bool) -> torch.Tensor:
    """The worker path's geometry: ``box`` (top, left, height, width) of uint8 ``image`` resized to
    ``size x size``, then mirrored if ``flip``; float32 in [0, 1].

    The resize is the call ``torchvision.transforms.v2.functional.resized_crop(..., BILINEAR,
    antialias=True)`` makes for a uint8 image on the CPU (ATen's uint8 antialiased bilinear
    kernel), made directly: torchvision's dispatch costs a fifth of a 96 px crop's resize.
    """
    top, left, height, width = box
    crop = image[None, :, top : top + height, left : left + width]
    crop = F.interpolate(crop, size=[size, size], mode="bilinear", align_corners=False, antialias=True)[0]
    if flip:
        crop = crop.flip(-1)
    return crop.to(torch.float32).mul_(1.0 / 255.0)


class MultiCrop:
    """The multi-crop transform the loader workers run: a uint8 image in, one float32 crop per spec.

    ``MultiCrop(crops, augment)(image, generator=g)`` returns one normalised ``[3, s, s]`` tensor
    per :class:`CropSpec`, in order, every random choice read from one table of uniforms drawn
    from ``g`` (the generator given at construction, else torch's default, when ``None``).
    """

    def __init__(
        self, crops: Sequence[CropSpec], augment: AugmentSpec, *, generator: torch.Generator | None = None
    ) -> None:
        if len(crops) == 0:
            raise AugmentConfigError("at least one crop is needed")
        self.crops: tuple[CropSpec, ...] = tuple(crops)
        self.augment = augment
        self.generator = generator
        self._kernels = {c.size: blur_kernel_size(c.size, augment.blur_sigma_max) for c in self.crops}
        self._mean = torch.tensor(augment.mean, dtype=torch.float32).view(3, 1, 1)
        self._std = torch.tensor(augment.std, dtype=torch.float32).view(3, 1, 1)

    def draw(self, height: int, width: int, generator: torch.Generator | None = None) -> CropDraws:
        """The draws of a ``height x width`` image's crops (row c for crop c)."""
        return draw_image(height, width, self.crops, self.augment, generator or self.generator)

    def apply(self, image: torch.Tensor, draws: CropDraws) -> list[torch.Tensor]:
        """The crops of ``image`` (uint8 ``[3, H, W]``) for given ``draws``."""
        image = check_image(image)
        boxes, flips = draws.boxes.tolist(), draws.flip.tolist()
        out = []
        for c, crop in enumerate(self.crops):
            x = resized_crop(image, boxes[c], crop.size, flips[c]).unsqueeze(0)
            x = photometric(x, draws.take(slice(c, c + 1)), self.augment, self._kernels[crop.size])
            out.append(normalize(x[0], self._mean, self._std))
        return out

    def __call__(
        self, image: torch.Tensor, *, generator: torch.Generator | None = None
    ) -> list[torch.Tensor]:
        """Return one normalised float32 ``[3, s, s]`` tensor per crop, in crop order.

        ``image`` is uint8 ``[3, H, W]`` (or ``[1, H, W]``) of any size, smaller than the crop
        included (the resize then upsamples).
        """
        image = check_image(image)
        return self.apply(image, self.draw(int(image.shape[-2]), int(image.shape[-1]), generator))

    def __repr__(self) -> str:
        return f"{type(self).__name__}(crops={list(self.crops)!r}, augment={self.augment!r})"
