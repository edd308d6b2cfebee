"""Per-class accuracy from a confusion matrix."""

from __future__ import annotations


def per_class_report(confusion: list[list[int]], class_names: list[str]) -> dict:
    """report.json's contents: overall and per-class accuracy, and the matrix (rows: true class)."""
    total = sum(map(sum, confusion))
    correct = sum(confusion[i][i] for i in range(len(class_names)))
    classes = []
    for index, name in enumerate(class_names):
        support = sum(confusion[index])
        predicted = sum(row[index] for row in confusion)
        classes.append({
            "class": name,
            "support": support,
            "accuracy": confusion[index][index] / support if support else None,  # recall
            "precision": confusion[index][index] / predicted if predicted else None,
        })
    return {"test_acc": correct / total if total else 0.0, "test_samples": total, "classes": classes,
            "confusion": {"rows": "true class", "columns": "predicted class", "class_names": list(class_names),
                          "matrix": confusion}}
