"""Linear probe on frozen features with a learning-rate sweep; the LR is chosen on held-out train, never on val.

The sweep follows DINOv2's `eval/linear.py`: one linear head per learning rate, all trained together on the
same batches (SGD with a per-head LR, momentum 0.9, weight decay 0, on the sum of
the heads' cross-entropies, a cosine schedule over iterations to 0), heads initialised N(0, 0.01) with zero
bias as in DINO's `eval_linear.py`. Two grids:
- `dinov2`: the 13 values 1e-5 ... 0.1, each scaled by batch_size / 256 (DINOv2's linear scaling rule);
- `sefa`: the SeFA paper's 45 values log-spaced over [1e-4, 10], used as they are.

DINOv2 picks the head with the best top-1 on the split it then reports. Here, as in DINOv2's
`log_regression.py`, the LR is chosen on a seeded, stratified `holdout` fraction of train (10% by
default), and the probe is then retrained on all of train at that LR before it is scored on val and any
extra labelled sets: the held-out images are labelled training data, so the reported probe uses them.
An extra set can carry a class mask (e.g. ImageNet-R/A's 200 classes): logits of the other classes are
ignored, so top-1 is the best of the classes the set contains.

Deterministic on CPU: the heads' initialisation and every epoch's order come from one seeded generator.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any, NamedTuple

import numpy as np
import torch
import torch.nn.functional as F
from sklearn.model_selection import train_test_split

from distillery.errors import DistilleryError

DINOV2_LRS = (1e-5, 2e-5, 5e-5, 1e-4, 2e-4, 5e-4, 1e-3, 2e-3, 5e-3, 1e-2, 2e-2, 5e-2, 0.1)  # dinov2/eval/linear.py
GRIDS = ("dinov2", "sefa")


@dataclass(frozen=True)
class LinearConfig:
    grid: str = "dinov2"
    epochs: int = 100  # DINO eval_linear.py trains 100 epochs
    batch_size: int = 256
    holdout: float = 0.1  # fraction of train the LR is chosen on (DINOv2 log_regression.py: 10%)
    seed: int = 0

    def __post_init__(self) -> None:
        if self.grid not in GRIDS:
            raise DistilleryError(f"unknown LR grid {self.grid!r}; choose {' or '.join(GRIDS)}")
        if not 0 < self.holdout < 1:
            raise DistilleryError(f"the held-out fraction of train must be in (0, 1), got {self.holdout}")
        if self.epochs < 1 or self.batch_size < 1:
            raise DistilleryError(f"epochs and batch size must be positive, got {self.epochs} and {self.batch_size}")

    def learning_rates(self) -> list[float]:
        if self.grid == "dinov2":
            return [lr * self.batch_size / 256 for lr in DINOV2_LRS]
        return np.logspace(-4, 1, 45).tolist()  # SeFA: 45 values log-spaced in [1e-4, 10]


class LabelledSet(NamedTuple):
    features: np.ndarray  # [N, D]
    labels: np.ndarray  # int64 [N], in the train label space
    class_mask: np.ndarray | None = None  # bool [num_classes]: the classes this set contains


class LinearHeads(NamedTuple):
    weight: torch.Tensor  # [H, C, D]
    bias: torch.Tensor  # [H, C]

    def logits(self, features: torch.Tensor) -> torch.Tensor:
        """[H, N, C] logits of every head."""
        return torch.einsum("nd,hcd->hnc", features, self.weight) + self.bias[:, None]


def train_heads(features: np.ndarray, labels: np.ndarray, num_classes: int, lrs: list[float],
                config: LinearConfig, device: str = "cpu") -> LinearHeads:
    """One linear head per learning rate, trained together for `config.epochs` epochs on the same batches.

    The heads live in one [H, C, D] tensor and take torch SGD's update (momentum 0.9, dampening 0, no
    Nesterov: buf = 0.9 buf + grad, w -= lr_t buf) with a per-head LR, written out because torch's SGD
    would need a parameter group per head, which is 20x slower on CPU for heads this small. lr_t follows
    CosineAnnealingLR's closed form over all iterations, to 0."""
    x = torch.as_tensor(features, dtype=torch.float32, device=device)
    y = torch.as_tensor(labels, dtype=torch.int64, device=device)
    generator = torch.Generator().manual_seed(config.seed)
    weight = (torch.randn(len(lrs), num_classes, x.shape[1], generator=generator) * 0.01).to(device).requires_grad_()
    bias = torch.zeros(len(lrs), num_classes, device=device, requires_grad=True)
    base_lrs = torch.tensor(lrs, dtype=torch.float32, device=device)
    momentum = [torch.zeros_like(weight), torch.zeros_like(bias)]
    total_steps = config.epochs * math.ceil(len(x) / config.batch_size)
    step = 0
    for _ in range(config.epochs):
        order = torch.randperm(len(x), generator=generator).to(device)
        for start in range(0, len(x), config.batch_size):
            batch = order[start:start + config.batch_size]
            logits = LinearHeads(weight, bias).logits(x[batch])
            # mean over heads of each head's mean cross-entropy, times the head count: the sum of the heads' losses
            loss = F.cross_entropy(logits.flatten(0, 1), y[batch].repeat(len(lrs))) * len(lrs)
            gradients = torch.autograd.grad(loss, (weight, bias))
            lr = base_lrs * 0.5 * (1 + math.cos(math.pi * step / total_steps))
            with torch.no_grad():
                for parameter, buffer, gradient in zip((weight, bias), momentum, gradients):
                    buffer.mul_(0.9).add_(gradient)
                    parameter.sub_(lr.view(-1, *[1] * (parameter.ndim - 1)) * buffer)
            step += 1
    return LinearHeads(weight.detach(), bias.detach())


def accuracy(logits: torch.Tensor, labels: np.ndarray, class_mask: np.ndarray | None = None) -> dict[str, float]:
    """Top-1 and top-5 (fractions) of logits [N, C]; classes outside `class_mask` cannot be predicted."""
    if class_mask is not None:
        logits = logits.masked_fill(~torch.as_tensor(class_mask, dtype=torch.bool), float("-inf"))
        available = int(class_mask.sum())
    else:
        available = logits.shape[1]
    truth = torch.as_tensor(labels, dtype=torch.int64)[:, None]
    top = logits.topk(min(5, available), dim=1).indices
    return {"top1": float((top[:, :1] == truth).any(1).float().mean()),
            "top5": float((top == truth).any(1).float().mean())}


def holdout_split(labels: np.ndarray, fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """(fit, held-out) indices: a seeded split of `fraction` of the samples, stratified by label."""
    try:
        fit, held = train_test_split(np.arange(len(labels)), test_size=fraction, random_state=seed, stratify=labels)
    except ValueError as error:
        raise DistilleryError(f"linear probe: cannot hold out a stratified {fraction:.0%} of train ({error})") from error
    return np.sort(fit), np.sort(held)


def linear_probe(train: LabelledSet, val: LabelledSet, num_classes: int, config: LinearConfig = LinearConfig(),
                 extra: dict[str, LabelledSet] | None = None,
                 device: str = "cpu") -> tuple[dict[str, Any], LinearHeads]:
    """Sweep the LR grid on train minus a held-out split, pick the LR with the best held-out top-1 (the smaller
    LR on ties), retrain on all of train at that LR, and score val and every extra set. Returns the metrics
    and the final probe (one head)."""
    with _single_thread_on_cpu(device):
        return _linear_probe(train, val, num_classes, config, extra or {}, device)


@contextlib.contextmanager
def _single_thread_on_cpu(device: str) -> Iterator[None]:
    """Probe heads are tiny matrices: with several threads the per-op synchronisation costs more than the work
    (measured: 0.9 ms per step on one thread, 20-100x that with two threads on a busy 2-core machine)."""
    if torch.device(device).type != "cpu":
        yield
        return
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def _linear_probe(train: LabelledSet, val: LabelledSet, num_classes: int, config: LinearConfig,
                  extra: dict[str, LabelledSet], device: str) -> tuple[dict[str, Any], LinearHeads]:
    lrs = config.learning_rates()
    fit, held = holdout_split(train.labels, config.holdout, config.seed)
    sweep = train_heads(train.features[fit], train.labels[fit], num_classes, lrs, config, device)
    held_logits = sweep.logits(torch.as_tensor(train.features[held], dtype=torch.float32, device=device)).cpu()
    held_top1 = [accuracy(logits, train.labels[held])["top1"] for logits in held_logits]
    best = int(np.argmax(held_top1))
    final = train_heads(train.features, train.labels, num_classes, [lrs[best]], config, device)

    def score(labelled: LabelledSet) -> dict[str, float]:
        logits = final.logits(torch.as_tensor(labelled.features, dtype=torch.float32, device=device))[0].cpu()
        return accuracy(logits, labelled.labels, labelled.class_mask)

    return ({"chosen_lr": lrs[best], "holdout_top1_at_chosen_lr": held_top1[best],
             "sweep": [{"lr": lr, "holdout_top1": top1} for lr, top1 in zip(lrs, held_top1)],
             "val": score(val), "extra": {name: score(labelled) for name, labelled in extra.items()}},
            LinearHeads(final.weight.cpu(), final.bias.cpu()))
