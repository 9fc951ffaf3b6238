"""Classification metrics: AUC (macro one-vs-rest for multi-class) and accuracy."""

from __future__ import annotations

import numpy as np


def softmax(logits: np.ndarray) -> np.ndarray:
    z = logits - logits.max(axis=1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=1, keepdims=True)


def classification_metrics(logits: np.ndarray, labels: np.ndarray) -> dict[str, float]:
    logits = np.asarray(logits, dtype=np.float64)
    labels = np.asarray(labels).reshape(-1)
    bad = int((~np.isfinite(logits)).any(axis=1).sum()) if logits.ndim == 2 else 0
    if bad:
        raise ValueError(
            f"the model outputs NaN or Inf for {bad} of {len(logits)} images: training diverged or an update broke "
            "the model (e.g. a negative BatchNorm variance). Lower --lr or use a less lossy codec, and restart from "
            "the last checkpoint (the server keeps the round before this one)"
        )
    from sklearn.metrics import roc_auc_score  # here, not at import: a second of every agent's start, and ldct never needs it

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
