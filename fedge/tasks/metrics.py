"""Classification metrics: AUC (macro one-vs-rest for multi-class) and accuracy."""

from __future__ import annotations

import numpy as np
from sklearn.metrics import roc_auc_score


def softmax(logits: np.ndarray) -> np.ndarray:
    z = logits - logits.max(axis=1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=1, keepdims=True)


def classification_metrics(logits: np.ndarray, labels: np.ndarray) -> dict[str, float]:
    logits = np.asarray(logits, dtype=np.float64)
    labels = np.asarray(labels).reshape(-1)
    probs = softmax(logits)
    accuracy = float((probs.argmax(axis=1) == labels).mean()) if len(labels) else float("nan")
    present = np.unique(labels)
    if len(present) < 2:
        auc = float("nan")  # AUC is undefined on a single-class set
    elif probs.shape[1] == 2:
        auc = float(roc_auc_score(labels, probs[:, 1]))
    else:
        auc = float(roc_auc_score(labels, probs, multi_class="ovr", average="macro", labels=np.arange(probs.shape[1])))
    return {"auc": auc, "accuracy": accuracy}
