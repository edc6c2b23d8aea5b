"""Multi-crop: the SwAV views of an image, made in loader workers or in one batch on the device.

SwAV (Caron et al. 2020, arXiv 2006.09882, section 3.2 and appendix A) views every image through
several crops: by default 2 crops of 224 px with area scale (0.14, 1.0) followed by 6 crops of
96 px with area scale (0.05, 0.14). Every crop gets its own independent draw of:

1. RandomResizedCrop, aspect ratio in (3/4, 4/3), bilinear with antialiasing;
2. horizontal flip, p = 0.5;
3. ColorJitter(0.8, 0.8, 0.8, 0.2) applied with p = 0.8, the four ops in a random order;
4. grayscale, p = 0.2;
5. Gaussian blur, p = 0.5, sigma ~ U(0.1, 2.0) in pixels of the output crop;
6. normalisation with mean (0.485, 0.456, 0.406) and std (0.228, 0.224, 0.225) (the official code
   uses 0.228 for red, not torchvision's 0.229; we follow it).

The parts, in the order an image meets them:

* :mod:`.spec`: the crops (:class:`CropSpec`, from the ``data.crop_*`` lists) and the
  augmentation settings (:data:`AugmentSpec`, which is ``config.AugmentSettings``);
* :mod:`.draws`: one table of uniforms per image, drawn from that image's generator, and how it
  is read: the boxes, flips, jitter factors and order, grayscale and blur of every crop;
* :mod:`.photometric`: brightness, contrast, saturation, hue, grayscale, blur and the
  normalisation, written once (torchvision's formulas on float images) for both paths;
* :mod:`.per_image`: the worker path, :class:`MultiCrop` (one image, torchvision's uint8 resize);
* :mod:`.batched`: the device path, :func:`batch_multicrop` (a batch, float resize matrices).

For the same seed both paths draw the same crops, and give the same pixels up to the resize's
rounding (``tests/test_multicrop_paths.py``). The torchvision ``transforms.v2`` pipeline the
recipe is checked against lives with the tests (``tests/multicrop_oracle.py``).
"""

from swavctl.data.multicrop.batched import PAD_SLACK, apply_draws, batch_multicrop, size_groups
from swavctl.data.multicrop.draws import CropDraws, draw_batch, draw_image
from swavctl.data.multicrop.per_image import MultiCrop
from swavctl.data.multicrop.spec import (
    ASPECT_RATIO,
    AugmentConfigError,
    AugmentSpec,
    CropSpec,
    blur_kernel_size,
    check_image,
    crop_specs,
    expand_crops,
    jitter_ranges,
)

__all__ = [
    "ASPECT_RATIO",
    "PAD_SLACK",
    "AugmentConfigError",
    "AugmentSpec",
    "CropDraws",
    "CropSpec",
    "MultiCrop",
    "apply_draws",
    "batch_multicrop",
    "blur_kernel_size",
    "check_image",
    "crop_specs",
    "draw_batch",
    "draw_image",
    "expand_crops",
    "jitter_ranges",
    "size_groups",
]
