"""Evaluation: (label, bias) count matrices on the device, and the metrics of docs/method.md.

All metrics derive from two matrices, correct[y, b] and total[y, b], accumulated on the device and
summed over ranks, so sharded evaluation gives exactly the single-process numbers. Percentages:
accuracy (plain), unbiased (mean over the (y, b) cells present), aligned (samples with y = b),
conflicting (samples with y != b) and worst_group (lowest cell accuracy).
"""
from __future__ import annotations

import torch

METRICS = ("accuracy", "unbiased", "aligned", "conflicting", "worst_group")


@torch.no_grad()
def evaluate(method, loader, num_classes: int, num_biases: int) -> dict[str, float]:
    """Return the metrics of the method's predictions over a loader's split, from the count
    matrices (summed over the ranks when the loader is sharded across them)."""
    device = method.device
    correct = torch.zeros(num_classes * num_biases, dtype=torch.int64, device=device)
    total = torch.zeros_like(correct)
    was_training = method.model.training
    method.model.eval()
    try:
        for batch in loader:
            cell = batch.label * num_biases + batch.bias
            hit = (method.predict(batch.image).argmax(1) == batch.label).to(torch.int64)
            correct.index_add_(0, cell, hit)
            total.index_add_(0, cell, torch.ones_like(hit))
    finally:
        method.model.train(was_training)
    if getattr(loader, "sharded", False):
        both = torch.stack([correct, total])
        torch.distributed.all_reduce(both)
        correct, total = both
    shape = (num_classes, num_biases)
    return metrics_from_counts(correct.view(shape), total.view(shape))


def metrics_from_counts(correct: torch.Tensor, total: torch.Tensor) -> dict[str, float]:
    """Return the metrics (percent) of count matrices; a subset without samples gives NaN."""
    correct, total = correct.double().cpu(), total.double().cpu()
    present = total > 0
    cell_acc = correct[present] / total[present]
    aligned = torch.eye(*total.shape, dtype=torch.bool) if total.shape[0] == total.shape[1] \
        else torch.zeros_like(present)

    def share(mask: torch.Tensor) -> float:
        n = total[mask].sum()
        return float(100 * correct[mask].sum() / n) if n > 0 else float("nan")
    return {
        "accuracy": share(torch.ones_like(present)),
        "unbiased": float(100 * cell_acc.mean()),
        "aligned": share(aligned),
        "conflicting": share(~aligned),
        "worst_group": float(100 * cell_acc.min()),
    }
