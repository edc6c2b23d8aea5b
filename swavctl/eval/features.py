"""Frozen-backbone features: the global-average-pooled output of the backbone in eval mode.

This is what the paper's linear evaluation trains on (Caron et al. 2020, Sec. 4.1: "we train a
linear classifier on top of frozen features ... from the global average pooling"). Batch norm
uses its running statistics (eval mode) and no gradient is kept.
"""

from __future__ import annotations

import torch
from torch import nn

from swavctl.distributed import dist
from swavctl.eval.dataset import LabelledImages, make_loader
from swavctl.eval.sharding import chunks, gather_in_order, rank_share
from swavctl.eval.views import Normalizer
from swavctl.reporting.progress import QuietStages, StageReporter


@torch.no_grad()
def backbone_features(backbone: nn.Module, images: torch.Tensor, normalize: Normalizer) -> torch.Tensor:
    """Features (B, d) of uint8 ``images`` (B, 3, H, W) already on the backbone's device, in float32."""
    return backbone(normalize(images)).float()


@torch.no_grad()
def extract_features(
    backbone: nn.Module,
    dataset: LabelledImages,
    *,
    normalize: Normalizer,
    device: torch.device,
    batch_size: int,
    feature_dim: int,
    workers: int = 0,
    reporter: StageReporter | None = None,
    name: str = "features",
) -> tuple[torch.Tensor, torch.Tensor]:
    """Features of every readable image of ``dataset``, in dataset order, on every rank.

    Under a process group each rank computes the features of its share of the images
    (:func:`~swavctl.eval.sharding.rank_share`) and the shares are gathered, so every rank returns
    what a single process would. Returns (features (M, d) float32 on ``device``, kept dataset
    indices (M,) int64 on the CPU); M < len(dataset) only when some files could not be decoded.
    """
    report: StageReporter = reporter or QuietStages()
    was_training = backbone.training
    backbone.eval()
    share = rank_share(len(dataset), dist.rank(), dist.world_size())
    loader = make_loader(
        dataset, batch_sampler=chunks(share, batch_size), workers=workers, pin_memory=device.type == "cuda"
    )
    parts: list[torch.Tensor] = [torch.empty(0, feature_dim, device=device)]
    kept: list[torch.Tensor] = [torch.empty(0, dtype=torch.int64)]
    if dist.world_size() > 1:  # the progress line is rank 0's: say it counts its share
        name = f"{name} (rank {dist.rank()}'s share of {len(dataset)})"
    try:
        with report.stage(name, len(share), "images") as advance:
            for batch in loader:
                if batch.images is not None:
                    images = batch.images.to(device, non_blocking=True)
                    parts.append(backbone_features(backbone, images, normalize))
                    kept.append(batch.indices)
                advance(len(batch.indices))
    finally:
        backbone.train(was_training)
    features, indices = gather_in_order(torch.cat(parts), torch.cat(kept))
    if features.shape[0] == 0:
        raise ValueError("no readable images")
    return features, indices
