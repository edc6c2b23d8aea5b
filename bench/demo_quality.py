"""Quality of the CPU demo: pretrain on the built-in digits, then score the held-out val digits.

Reproducible command (the figures in docs/benchmarks.md come from it)::

    SWAVCTL_CACHE=/tmp/swcache python bench/demo_quality.py --json

It runs ``swavctl pretrain --preset demo --gpus 0`` through the library (same code path as the
CLI), loads the run folder with :func:`swavctl.weights.model_io.load_model`, and measures on the 359
val digits, against a randomly initialised model of the same architecture built in the same run
(the baseline):

* **NMI** between the labels and the prototype assignments ``argmax_k z . c_k`` (scores
  ``z C^T`` of the L2-normalised embedding z and the unit-norm prototypes; SwAV, arXiv
  2006.09882), with scikit-learn's arithmetic-mean normalisation. With K prototypes and 10
  balanced classes the best reachable NMI is ``2 ln 10 / (ln 10 + ln K)``, so K near 10 is
  needed for NMI near 1.
* **cluster accuracy**: accuracy after the best one-to-one matching of prototypes to labels
  (Hungarian); prototypes left unmatched count as errors. Reported, not gated.
* **20-NN accuracy** on frozen backbone features (DINO's protocol, Caron et al. 2021):
  L2-normalised features, the train/ digits as the bank, cosine similarity, the 20 nearest
  neighbours vote with weight ``exp(sim / 0.07)``.

**Eval view.** Each 32 px digit is used whole, resized (bilinear, antialiased) to the first
crop size of the run (``data.crop_sizes[0]``) and normalised with the run's mean/std: the
training high-resolution crops cover 40-100% of the image at that size, so the whole image at
that size is the in-distribution "centre/full" view. No flip or jitter.

Wall time is the pretraining's alone (data set cache writing and evaluation excluded); the
process CPU time and the 1-minute load average before and after are printed with it, because on
a shared machine the wall time is inflated by other processes.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import resource
import sys
import time
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torchvision.transforms.v2 import functional as TF

KNN_K = 20
KNN_TEMPERATURE = 0.07


def _load_split(root: Path) -> tuple[torch.Tensor, torch.Tensor]:
    """All images of an ImageFolder split as uint8 ``[N, 3, H, W]`` and their int64 labels."""
    from swavctl.data.images import decode_file
    from swavctl.files.image_folder import list_images

    paths = list_images(root)
    images = torch.stack([decode_file(p) for p in paths])
    labels = torch.tensor([int(p.parent.name) for p in paths], dtype=torch.int64)
    return images, labels


def eval_view(images: torch.Tensor, size: int, mean: Any, std: Any) -> torch.Tensor:
    """The whole image resized to ``size`` (bilinear, antialiased) and normalised: float ``[N, 3, s, s]``."""
    x = images.to(torch.float32).div_(255.0)
    if x.shape[-1] != size or x.shape[-2] != size:
        x = TF.resize(x, [size, size], antialias=True)
    m = torch.as_tensor(mean, dtype=x.dtype).view(1, -1, 1, 1)
    s = torch.as_tensor(std, dtype=x.dtype).view(1, -1, 1, 1)
    return (x - m) / s


@torch.no_grad()
def _outputs(model: Any, x: torch.Tensor, batch: int = 512) -> tuple[torch.Tensor, torch.Tensor]:
    """Backbone features and prototype scores ``z C^T`` (prototype rows normalised first); with
    several prototype sets (DeepCluster-v2, SeLa-v2), the scores of set 0, as ``inspect-clusters``
    shows by default."""
    model.eval()
    model.normalize_prototypes()
    feats, scores = [], []
    for chunk in x.split(batch):
        f = model.backbone(chunk)
        feats.append(f)
        chunk_scores = model.prototypes(model.embed(f))
        scores.append(chunk_scores[0] if isinstance(chunk_scores, list) else chunk_scores)
    return torch.cat(feats), torch.cat(scores)


def knn_accuracy(
    bank: torch.Tensor,
    bank_labels: torch.Tensor,
    query: torch.Tensor,
    query_labels: torch.Tensor,
    *,
    k: int = KNN_K,
    temperature: float = KNN_TEMPERATURE,
) -> float:
    """DINO's weighted k-NN: cosine similarity, the k nearest vote with weight ``exp(sim / T)``."""
    bank = F.normalize(bank.double(), dim=1)
    query = F.normalize(query.double(), dim=1)
    sim = query @ bank.T
    top, idx = sim.topk(k, dim=1)
    classes = int(max(bank_labels.max(), query_labels.max())) + 1
    votes = torch.zeros(query.shape[0], classes, dtype=torch.float64)
    votes.scatter_add_(1, bank_labels[idx], (top / temperature).exp())
    return float((votes.argmax(dim=1) == query_labels).double().mean())


def cluster_metrics(labels: torch.Tensor, assignments: torch.Tensor) -> dict[str, float]:
    """NMI (arithmetic) and Hungarian cluster accuracy of ``assignments`` against ``labels``."""
    import numpy as np
    from scipy.optimize import linear_sum_assignment
    from sklearn.metrics import normalized_mutual_info_score

    y = labels.numpy()
    c = assignments.numpy()
    table = np.zeros((int(c.max()) + 1, int(y.max()) + 1), dtype=np.int64)
    np.add.at(table, (c, y), 1)
    rows, cols = linear_sum_assignment(-table)
    return {
        "nmi": float(normalized_mutual_info_score(y, c)),
        "cluster_acc": float(table[rows, cols].sum() / len(y)),
        "clusters_used": int(np.unique(c).size),
    }


def evaluate(model: Any, settings: Any, data_root: Path) -> dict[str, float]:
    """NMI, cluster accuracy and 20-NN accuracy of ``model`` on the demo val split (see module doc)."""
    size = settings.data.crop_sizes[0]
    mean, std = settings.data.augment.mean, settings.data.augment.std
    train_images, train_labels = _load_split(data_root / "train")
    val_images, val_labels = _load_split(data_root / "val")
    train_feats, _ = _outputs(model, eval_view(train_images, size, mean, std))
    val_feats, val_scores = _outputs(model, eval_view(val_images, size, mean, std))
    result = cluster_metrics(val_labels, val_scores.argmax(dim=1))
    result["knn20"] = knn_accuracy(train_feats, train_labels, val_feats, val_labels)
    return result


def random_init_baseline(settings: Any, data_root: Path) -> dict[str, float]:
    """The same figures for the same architecture at its seeded random initialisation."""
    from swavctl.model.swav import SwAV

    torch.manual_seed(settings.train.seed)
    m = settings.model
    model = SwAV(m.arch, m.hidden_dim, m.embedding_dim, m.prototypes)
    return evaluate(model, settings, data_root)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--preset", default="demo", help="Preset name or TOML path (default: demo).")
    parser.add_argument("--out", default=None, help="Run folder (default: a fresh temporary folder).")
    parser.add_argument("--max-steps", type=int, default=None, help="Stop after this many steps.")
    parser.add_argument("--set", dest="overrides", action="append", default=[], help="KEY=VALUE override.")
    parser.add_argument("--eval-only", action="store_true", help="Only evaluate the run folder --out.")
    parser.add_argument("--no-baseline", action="store_true", help="Skip the random-init baseline.")
    parser.add_argument(
        "--threads", type=int, default=None, help="torch intra-op threads (default: torch's, one per core)."
    )
    parser.add_argument("--json", action="store_true", help="Print one JSON object on stdout.")
    args = parser.parse_args(argv)
    if args.threads is not None:
        torch.set_num_threads(args.threads)

    from swavctl import config
    from swavctl.data.demo import demo_dataset
    from swavctl.reporting.progress import RichReporter
    from swavctl.train.loop import pretrain
    from swavctl.weights.model_io import load_model

    data_root = demo_dataset()  # written once, outside the timed part
    figures: dict[str, Any] = {}
    if args.eval_only:
        if args.out is None:
            parser.error("--eval-only needs --out RUN_DIR")
        run_dir = Path(args.out)
    else:
        import tempfile

        out = args.out or tempfile.mkdtemp(prefix="swavctl-demo-quality-")
        settings = config.resolve(
            preset=args.preset,
            flags={"out": out, "dist.gpus": 0, "train.max_steps": args.max_steps},
            overrides=args.overrides,
        )
        load_before = os.getloadavg()[0]
        cpu_before = resource.getrusage(resource.RUSAGE_SELF)
        started = time.perf_counter()
        summary = pretrain(settings, reporter=RichReporter(quiet=args.json), fresh=True)
        wall = time.perf_counter() - started
        cpu_after = resource.getrusage(resource.RUSAGE_SELF)
        run_dir = Path(summary.out_dir)
        figures.update(
            train_wall_s=round(wall, 2),
            train_cpu_s=round(
                (cpu_after.ru_utime - cpu_before.ru_utime) + (cpu_after.ru_stime - cpu_before.ru_stime), 2
            ),
            load_1min_before=round(load_before, 2),
            load_1min_after=round(os.getloadavg()[0], 2),
            torch_threads=torch.get_num_threads(),
            steps=summary.steps,
            epochs_done=round(summary.epochs_done, 3),
            samples_per_s=round(summary.samples_per_s, 1),
            final_loss=summary.final_loss,
        )
    loaded = load_model(run_dir)
    figures["run_dir"] = str(run_dir)
    figures["arch"] = loaded.settings.model.arch
    figures["prototypes"] = loaded.settings.model.prototypes
    figures["eval_size"] = loaded.settings.data.crop_sizes[0]
    figures.update(evaluate(loaded.model, loaded.settings, data_root))
    if not args.no_baseline:
        base = random_init_baseline(loaded.settings, data_root)
        figures.update({f"random_init_{k}": v for k, v in base.items()})
    if args.json:
        print(json.dumps(figures))
    else:
        width = max(len(k) for k in figures)
        for key, value in figures.items():
            shown = f"{value:.4f}" if isinstance(value, float) and not math.isnan(value) else value
            print(f"{key:<{width}}  {shown}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
