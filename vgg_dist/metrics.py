"""Accuracy and the per-class report, from a confusion matrix (rows: true class, columns: predicted)."""

from __future__ import annotations

Confusion = list[list[int]]


def sample_count(confusion: Confusion) -> int:
    return sum(map(sum, confusion))


def accuracy(confusion: Confusion) -> float:
    """Share of samples on the diagonal; 0.0 for an empty matrix."""
    total = sample_count(confusion)
    return sum(confusion[i][i] for i in range(len(confusion))) / total if total else 0.0


def per_class_report(confusion: Confusion, class_names: list[str]) -> dict:
    """report.json's contents: overall accuracy, per-class recall and precision, and the matrix."""
    classes = []
    for index, name in enumerate(class_names):
        support = sum(confusion[index])
        predicted = sum(row[index] for row in confusion)
        classes.append({
            "class": name,
            "support": support,
            "recall": confusion[index][index] / support if support else None,
            "precision": confusion[index][index] / predicted if predicted else None,
        })
    return {"test_acc": accuracy(confusion), "test_samples": sample_count(confusion), "classes": classes,
            "confusion": {"rows": "true class", "columns": "predicted class", "class_names": list(class_names),
                          "matrix": confusion}}
