"""Figures of an evaluation: confusion matrices and ROC curves, drawn from plain numpy arrays.

Every function takes arrays, not models or data modules, so any pipeline that has targets and scores
(evaluate.py, the W&B figures of training, the classical feature-extractor + SVM pipeline) draws the same
figures: `save_figures` writes the pair each of them writes.
"""

from collections.abc import Sequence
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only: evaluation runs on servers without a display

import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402
from matplotlib.axes import Axes  # noqa: E402
from torchmetrics.functional.classification import binary_auroc, binary_roc  # noqa: E402

from ich.core.tasks import Task  # noqa: E402
from ich.evaluation.operating import (called, calibration_bins, expected_calibration_error, one_vs_rest,  # noqa: E402
                                      probabilities)


def confusion_counts(y_true: np.ndarray, y_pred: np.ndarray, num_classes: int) -> np.ndarray:
    """Counts of (true class, predicted class) pairs: rows are the truth, columns the prediction."""
    counts = np.zeros((num_classes, num_classes), dtype=np.int64)
    np.add.at(counts, (np.asarray(y_true, dtype=np.int64), np.asarray(y_pred, dtype=np.int64)), 1)
    return counts


def draw_confusion(ax: Axes, counts: np.ndarray, class_names: Sequence[str], title: str) -> None:
    """One matrix on `ax`, coloured and annotated by the row-normalised rate (recall of each true class)."""
    totals = counts.sum(axis=1, keepdims=True)
    rates = np.divide(counts, totals, out=np.zeros(counts.shape), where=totals > 0)
    ax.imshow(rates, cmap="Blues", vmin=0.0, vmax=1.0)
    size = len(class_names)
    font = 11 if size <= 2 else 9
    for row in range(size):
        for col in range(size):
            colour = "white" if rates[row, col] > 0.5 else "black"
            rate = f"{rates[row, col]:.0%}" if totals[row, 0] else "-"
            text = f"{counts[row, col]}\n{rate}"
            ax.text(col, row, text, ha="center", va="center", color=colour, fontsize=font)
    ax.set_xticks(range(size), class_names, rotation=30 if size > 2 else 0, ha="right" if size > 2 else "center")
    ax.set_yticks(range(size), class_names)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    ax.set_title(title)


def save_confusion_matrices(path: Path, panels: Sequence[tuple[str, np.ndarray, Sequence[str]]]) -> None:
    """Write one figure with a matrix per panel (title, counts, class names), three panels per row."""
    columns = min(3, len(panels))
    rows = -(-len(panels) // columns)
    side = 4.5 if max(len(names) for _, _, names in panels) <= 2 else 6.5
    fig, axes = plt.subplots(rows, columns, figsize=(side * columns, side * rows), squeeze=False)
    for ax, (title, counts, names) in zip(axes.flat, panels):
        draw_confusion(ax, counts, names, title)
    for ax in axes.flat[len(panels) :]:
        ax.axis("off")
    fig.suptitle("count and % of the true class (each row sums to 100%)", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def save_roc_curves(path: Path, targets: np.ndarray, scores: np.ndarray, names: Sequence[str]) -> None:
    """One ROC curve per column of `scores` against the 0/1 column of `targets`, AUROC in the legend.

    A column whose targets hold a single class has no ROC curve; it is listed in the legend as n/a
    rather than drawn as a misleading line.
    """
    fig, ax = plt.subplots(figsize=(6.5, 6.0))
    ax.plot([0, 1], [0, 1], linestyle="--", color="grey", label="chance (AUROC 0.500)")
    for k, name in enumerate(names):
        truth = torch.as_tensor(targets[:, k], dtype=torch.long)
        score = torch.as_tensor(scores[:, k], dtype=torch.float32)
        positives = int(truth.sum())
        colour = f"C{k}"  # a fixed colour per output, so figures of different runs compare at a glance
        if positives in (0, len(truth)):
            ax.plot([], [], color=colour, label=f"{name}: n/a (only one class present)")
            continue
        fpr, tpr, _ = binary_roc(score, truth)
        auroc = float(binary_auroc(score, truth))
        label = f"{name} (AUROC {auroc:.3f}, n+={positives})"
        ax.plot(fpr.numpy(), tpr.numpy(), color=colour, linewidth=1.8, label=label)
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1.01)
    ax.set_aspect("equal")
    ax.set_xlabel("false positive rate (1 - specificity)")
    ax.set_ylabel("true positive rate (sensitivity)")
    ax.set_title("ROC curves")
    ax.grid(alpha=0.3)
    ax.legend(loc="lower right", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def save_figures(output_dir: Path, task: Task, threshold: float, probs: torch.Tensor, targets: torch.Tensor) -> None:
    """confusion_matrix.png (one matrix per sigmoid output, or one over the subtypes) and roc.png."""
    scores = probs.numpy()
    if task.loss == "ce":
        truth = targets.numpy()
        counts = confusion_counts(truth, scores.argmax(axis=1), task.num_outputs)
        panels = [("subtype (highest probability)", counts, task.outputs)]
        one_vs_rest = np.eye(task.num_outputs, dtype=np.int64)[truth]
    else:
        one_vs_rest = targets.numpy().astype(np.int64)
        predicted = called(scores, threshold)
        panels = [
            (f"{name} (threshold {threshold:g})", confusion_counts(truth, predicted[:, k], 2), ("no", "yes"))
            for k, (name, truth) in enumerate(zip(task.outputs, one_vs_rest.T))
        ]
    save_confusion_matrices(output_dir / "confusion_matrix.png", panels)
    save_roc_curves(output_dir / "roc.png", one_vs_rest, scores, task.outputs)


def save_reliability_diagram(path: Path, task: Task, logits: torch.Tensor, targets: torch.Tensor,
                             temperature: float) -> None:
    """reliability.png: observed frequency against mean predicted probability in equal-mass bins, one curve per
    output, its ECE in the legend; dotted, the same before temperature scaling when the temperature is not 1."""
    truth = one_vs_rest(task, targets.numpy())
    fig, ax = plt.subplots(figsize=(6.5, 6.0))
    shown = [(temperature, "-", "")] + ([(1.0, ":", " before scaling")] if temperature != 1 else [])
    curves = []
    for scale, style, note in shown:
        probs = probabilities(task, logits.float(), scale).numpy()
        curves += [(f"{name}{note}", probs[:, k], truth[:, k], style, k) for k, name in enumerate(task.outputs)]
    draw_reliability(ax, curves)
    ax.set_title("Reliability" + (f" (temperature {temperature:.3g})" if temperature != 1 else ""))
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def draw_reliability(ax, curves: list[tuple[str, np.ndarray, np.ndarray, str, int]]) -> None:
    """A reliability diagram on `ax`: the diagonal, and per (label, probabilities, 0/1 truth, line style, colour
    index) the observed frequency against the mean probability of equal-mass bins, its ECE in the legend."""
    ax.plot([0, 1], [0, 1], linestyle="--", color="grey", label="calibrated")
    for label, probs, truth, style, colour in curves:
        mean_prob, frequency, _ = calibration_bins(probs, truth)
        ax.plot(mean_prob, frequency, style, marker="o", markersize=3, color=f"C{colour}",
                label=f"{label} (ECE {expected_calibration_error(probs, truth):.3f})")
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1.01)
    ax.set_aspect("equal")
    ax.set_xlabel("mean predicted probability (equal-mass bins)")
    ax.set_ylabel("observed frequency")
    ax.grid(alpha=0.3)
    ax.legend(loc="upper left", fontsize=8)
