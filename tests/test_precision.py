"""Mixed precision keeps the prototype scores float32 (swavctl.train.precision)."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from swavctl.clustering.sinkhorn_knopp import sinkhorn
from swavctl.config import resolve
from swavctl.model.swav import SwAV
from swavctl.train.build import build_model


def _model_and_crops() -> tuple[SwAV, list[torch.Tensor]]:
    settings = resolve(preset="smoke", overrides=["model.prototypes=300", "model.embedding_dim=32"])
    model = build_model(settings).eval()
    g = torch.Generator().manual_seed(0)
    crops = [torch.randn(16, 3, s, s, generator=g) for s in (16, 16, 8, 8)]
    return model, crops


def test_scores_under_bf16_autocast_are_the_fp32_product_of_the_embeddings() -> None:
    model, crops = _model_and_crops()
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        embeddings, scores = model(crops)
    assert scores.dtype == torch.float32
    exact = embeddings.double() @ model.prototypes.weight.double().t()
    # fp32 rounding only (about 1e-7); bf16 scores would be off by up to 2^-9 relative.
    torch.testing.assert_close(scores.double(), exact, rtol=0, atol=1e-6)


def test_codes_from_autocast_scores_are_close_to_the_fp32_codes() -> None:
    """Sinkhorn multiplies score errors by 1/epsilon before exp: the codes follow the fp32 codes
    to within the embeddings' bf16 rounding (here under 0.5% of a code's weight)."""
    model, crops = _model_and_crops()
    with torch.no_grad():
        # Prototypes at the first crop's embeddings (as after training): scores near 1, where
        # bf16's absolute rounding is largest.
        embeddings, _ = model(crops)
        model.prototypes.weight.copy_(
            F.normalize(embeddings[:16].repeat(19, 1)[:300] + 0.05 * torch.randn(300, 32), dim=1)
        )
        _, scores32 = model(crops)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            _, scores16 = model(crops)
    codes32 = sinkhorn(scores32[:16].double(), epsilon=0.05)
    codes16 = sinkhorn(scores16[:16].double(), epsilon=0.05)
    top = codes32.argmax(dim=1, keepdim=True)
    relative = (codes16.gather(1, top) - codes32.gather(1, top)).abs() / codes32.gather(1, top)
    assert float(relative.max()) < 5e-3


def test_the_state_dict_and_the_parameter_are_those_of_the_plain_model() -> None:
    model, _ = _model_and_crops()
    plain = SwAV("convnet-tiny", 32, 32, 300)
    assert list(model.state_dict()) == list(plain.state_dict())
    weight = model.prototypes.weight
    assert isinstance(weight, torch.nn.Parameter) and weight.requires_grad
    model.load_state_dict(plain.state_dict())  # strict
    torch.testing.assert_close(model.prototypes.weight, plain.prototypes.weight)


def test_gradients_reach_the_prototypes_through_the_fp32_scores() -> None:
    model, crops = _model_and_crops()
    model.train()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        _, scores = model(crops)
    scores.logsumexp(dim=1).mean().backward()
    grad = model.prototypes.weight.grad
    assert grad is not None and grad.dtype == torch.float32 and float(grad.abs().sum()) > 0


def test_the_compiled_model_keeps_the_scores_fp32() -> None:
    torch._dynamo.reset()
    model, crops = _model_and_crops()
    compiled = torch.compile(model, backend="eager")  # dynamo's graph capture, without a compiler
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        embeddings, scores = compiled(crops)
    assert embeddings.dtype == torch.bfloat16 and scores.dtype == torch.float32
    torch.testing.assert_close(scores, embeddings.float() @ model.prototypes.weight.t(), rtol=0, atol=1e-6)
