"""The GPU against the CPU on small inputs: Sinkhorn codes, a SwAV step's loss, nvJPEG, the hand-over.

These were the correctness checks of ``bench/gpu_bench.py``'s ``core`` phase; the bench's
``gpu_tests`` phase now runs them by name (``GPU_TESTS`` in ``bench/gpu_config.py``), with the
suite's other CUDA tests. Without a CUDA device each one skips. The checks already covered by an
older CUDA test are not repeated here: the batched augmentation on CUDA against the CPU
(``tests/test_multicrop.py::test_cuda_matches_cpu``) and without a host sync
(``tests/test_host_reads.py::test_batched_augmentation_on_cuda_never_synchronises``).
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
import torch

from swavctl.bench.jpegs import write_jpeg
from swavctl.bench.sinkhorn import official_sinkhorn, realistic_scores
from swavctl.bench.step import StepRunner
from swavctl.clustering.sinkhorn_knopp import sinkhorn
from swavctl.config import Settings, resolve
from swavctl.data.dataset import Batch, decode_images
from swavctl.data.images import decode_file
from swavctl.data.multicrop import AugmentSpec, CropSpec
from swavctl.train.device_batch import batch_crops, decode_batch

pytestmark = [
    pytest.mark.cuda,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device (GPU against CPU)"),
]

#: Luma weights (ITU-R BT.601), as a [3, 1, 1] tensor.
LUMA = (0.299, 0.587, 0.114)


def _device() -> torch.device:
    # With its index: tensors report cuda:0, and torch.device("cuda") != torch.device("cuda:0").
    return torch.device("cuda", torch.cuda.current_device())


def test_sinkhorn_codes_on_cuda_match_the_cpu() -> None:
    """B=1024, K=3000, fp32: the codes on the GPU equal the CPU's and the official formula's (fp64)."""
    scores = realistic_scores(1024, 3000, device=torch.device("cpu"))
    cpu_codes = sinkhorn(scores)
    gpu_codes = sinkhorn(scores.to(_device()))
    assert gpu_codes.is_cuda
    official = official_sinkhorn(scores.double()).float()
    diff = float((cpu_codes - gpu_codes.cpu()).abs().max())
    diff_official = float((gpu_codes.cpu() - official).abs().max())
    print(f"max abs difference: GPU vs CPU {diff:.1e}, GPU vs the official fp64 codes {diff_official:.1e}")
    assert diff < 1e-5
    assert diff_official < 1e-5


def _step_settings(gpus: int, *, fp32: bool) -> Settings:
    """ResNet-50, batch 8, crops 2x96 + 2x64, 300 prototypes (the bench's check, small enough for
    a CPU); fp32 with channels_last off, or the GPU defaults (bf16 autocast + channels_last)."""
    extra = ["data.crop_sizes=[96, 64]", "data.crop_counts=[2, 2]", "model.prototypes=300"]
    if fp32:
        extra += ["train.precision=fp32", "train.channels_last=false"]
    flags = {"model.arch": "resnet50", "train.batch_size": 8, "dist.gpus": gpus}
    return resolve(flags=flags, overrides=extra)


@contextmanager
def _no_tf32() -> Iterator[None]:
    """True fp32 on the GPU (cuDNN convolutions default to TF32)."""
    before = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
    try:
        yield
    finally:
        torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = before


def test_swav_step_losses_on_cuda_match_the_cpu() -> None:
    """The same weights and crops: GPU fp32 steps 1 and 2 against the CPU's, then one GPU step in
    bf16 + channels_last against the CPU's first (fp32)."""
    cpu_losses, gpu_losses = [], []
    with _no_tf32():
        cpu_run, gpu_run = StepRunner(_step_settings(0, fp32=True)), StepRunner(_step_settings(1, fp32=True))
        assert gpu_run.device.type == "cuda" and cpu_run.device.type == "cpu"
        for _ in range(2):
            cpu_run.step()
            gpu_run.step()
            cpu_losses.append(cpu_run.loss)
            gpu_losses.append(gpu_run.loss)
    bf16 = StepRunner(_step_settings(1, fp32=False))
    assert bf16.amp_dtype == torch.bfloat16 and bf16.channels_last
    bf16.step()
    rel = [abs(a - b) / abs(a) for a, b in zip(cpu_losses, gpu_losses, strict=True)]
    rel_bf16 = abs(cpu_losses[0] - bf16.loss) / abs(cpu_losses[0])
    print(f"losses: CPU {cpu_losses}, GPU fp32 {gpu_losses}, GPU bf16 {bf16.loss}")
    print(f"relative differences: fp32 {rel}, bf16 + channels_last (step 1) {rel_bf16:.1e}")
    assert rel[0] < 1e-3 and rel[1] < 5e-3
    assert rel_bf16 < 3e-2


def _jpegs(folder: Path) -> list[Path]:
    """Landscape, portrait, odd-sized and small JPEGs (4:2:0 chroma)."""
    paths = []
    for i, (w, h) in enumerate([(500, 375), (375, 500), (333, 500), (64, 48)]):
        path = folder / f"d{i}.jpg"
        write_jpeg(path, seed=100 + i, width=w, height=h)
        paths.append(path)
    return paths


def _encoded(path: Path) -> torch.Tensor:
    return torch.frombuffer(bytearray(path.read_bytes()), dtype=torch.uint8)


def test_nvjpeg_decodes_as_the_cpu_decoder_does(tmp_path: Path) -> None:
    """nvJPEG decodes every file, to the CPU decoder's luma within 1.5 levels on average.

    Decoders may upsample the 4:2:0 chroma differently (libjpeg-turbo's "fancy" upsampling vs
    nvJPEG's), which moves R, G and B by several levels on these noisy synthetic images; luma is
    stored at full resolution, so it must agree to about a level (IDCT rounding)."""
    paths = _jpegs(tmp_path)
    images, failures, cpu_decoded = decode_images([_encoded(p) for p in paths], _device())
    assert not failures and cpu_decoded == 0  # nvJPEG's own: the CPU fallback would also be on CUDA
    luma = torch.tensor(LUMA).view(3, 1, 1)
    for path, image in zip(paths, images, strict=True):
        reference = decode_file(path).float()
        assert image.is_cuda and image.dtype == torch.uint8 and image.shape == reference.shape
        got = image.cpu().float()
        luma_diff = float(((got * luma).sum(0) - (reference * luma).sum(0)).abs().mean())
        rgb = (got - reference).abs()
        print(f"{path.name}: luma mean abs {luma_diff:.2f}, RGB mean {rgb.mean():.2f}, max {rgb.max():.0f}")
        assert luma_diff < 1.5, path.name


def test_the_loop_hands_jpeg_bytes_and_decoded_images_to_crops_on_cuda(tmp_path: Path) -> None:
    """A device-augmentation batch of two JPEGs' bytes and one decoded image: decoded onto the GPU
    (:func:`decode_batch`), then cropped there (:func:`batch_crops`)."""
    device = _device()
    paths = _jpegs(tmp_path)[:3]
    images = [_encoded(paths[0]), _encoded(paths[1]), decode_file(paths[2])]
    batch = decode_batch(Batch(crops=None, images=images, indices=[0, 1, 2]), [str(p) for p in paths], device)
    assert not batch.skipped and batch.cpu_decoded == 0
    spec = [CropSpec(224, 0.14, 1.0), CropSpec(96, 0.05, 0.14)]
    out = batch_crops(batch, spec, AugmentSpec(), device, 0, 0)
    assert [tuple(o.shape) for o in out] == [(3, 3, 224, 224), (3, 3, 96, 96)]
    assert all(o.is_cuda and bool(torch.isfinite(o).all()) for o in out)
