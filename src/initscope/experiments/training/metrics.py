"""Classification metrics of a split: accuracy, macro precision, recall and F1 (torchmetrics), mean loss.

Accuracy is the fraction of correct predictions. The macro scores average the per-class scores over
the ``K`` classes: :math:`P = \\frac1K \\sum_c \\frac{TP_c}{TP_c + FP_c}`,
:math:`R = \\frac1K \\sum_c \\frac{TP_c}{TP_c + FN_c}`, :math:`F_1 = \\frac1K \\sum_c \\frac{2 P_c R_c}{P_c + R_c}`
(a class never predicted scores precision 0). The loss is the mean cross-entropy per sample.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def classification_metrics(logits: torch.Tensor, targets: torch.Tensor, num_classes: int) -> dict[str, float]:
    """``accuracy``, ``precision``, ``recall``, ``f1`` (macro) and ``loss`` of ``logits`` (N, K) against ``targets``."""
    from torchmetrics.functional.classification import (
        multiclass_accuracy,
        multiclass_f1_score,
        multiclass_precision,
        multiclass_recall,
    )

    logits, targets = logits.float(), targets.long()
    preds = logits.argmax(dim=1)
    kw = dict(num_classes=num_classes, average="macro")
    return {
        "accuracy": float(multiclass_accuracy(preds, targets, num_classes=num_classes, average="micro")),
        "precision": float(multiclass_precision(preds, targets, **kw)),
        "recall": float(multiclass_recall(preds, targets, **kw)),
        "f1": float(multiclass_f1_score(preds, targets, **kw)),
        "loss": float(F.cross_entropy(logits, targets)),
    }
