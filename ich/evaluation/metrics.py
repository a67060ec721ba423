"""Evaluation metrics: one torchmetrics collection per stage, keyed by the names that appear in the logs.

Every collection takes probabilities [B, K] (or [B, 1] for binary) and integer targets, so the module
updates them the same way for the three tasks; the task table decides the torchmetrics flavour.
"""

import torch
import torch.nn.functional as F
from torchmetrics import Accuracy, F1Score, Metric, MetricCollection, Precision, Recall, Specificity
from torchmetrics.functional.classification import binary_auroc
from torchmetrics.utilities import dim_zero_cat
from torchmetrics.wrappers import ClasswiseWrapper

from ich.core.tasks import LABELS, RSNA_LABEL_WEIGHTS, Task, get_task

# Thresholded metrics: logged name -> (torchmetrics class, average over outputs); `auroc` is OneVsRestAUROC.
# `acc` is micro: the fraction of correct slices for subtype and, since every label sees every slice,
# the mean per-label accuracy for multilabel.
METRICS = {
    "acc": (Accuracy, "micro"),
    "sensitivity": (Recall, "macro"),
    "specificity": (Specificity, "macro"),
    "precision": (Precision, "macro"),
    "f1": (F1Score, "macro"),
}


class OneVsRestAUROC(Metric):
    """AUROC of each output against the rest, NaN where the targets hold one class only; macro skips the NaNs.

    torchmetrics scores such an output 0 (and warns on every call), which drags the macro average down
    whenever a rare subtype (epidural is 0.4% of slices) is missing from a small validation set.
    """

    is_differentiable = False
    higher_is_better = True
    full_state_update = False

    def __init__(self, num_outputs: int, average: str | None = "macro") -> None:
        super().__init__()
        self.num_outputs = num_outputs
        self.average = average
        self.add_state("probs", default=[], dist_reduce_fx="cat")
        self.add_state("target", default=[], dist_reduce_fx="cat")

    def update(self, probs: torch.Tensor, target: torch.Tensor) -> None:
        """probs [B, K] (or [B, 1]); target of the same shape, or class indices [B] (turned one-hot)."""
        if target.ndim < probs.ndim:
            target = F.one_hot(target, self.num_outputs)
        self.probs.append(probs.reshape(len(probs), -1))
        self.target.append(target.reshape(len(target), -1))

    def compute(self) -> torch.Tensor:
        probs, target = dim_zero_cat(self.probs), dim_zero_cat(self.target)
        scores = torch.stack([self._auroc(probs[:, k], target[:, k]) for k in range(self.num_outputs)])
        return scores if self.average is None else scores.nanmean()

    @staticmethod
    def _auroc(probs: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        positives = int(target.sum())
        if positives in (0, len(target)):
            return torch.tensor(float("nan"), device=probs.device)
        return binary_auroc(probs, target)


class RSNALogLoss(Metric):
    """The RSNA 2019 challenge metric: per-label log loss weighted by RSNA_LABEL_WEIGHTS, normalised by their sum.

    Takes probabilities; each log term is clipped at `eps` like the challenge scorer, so a confident
    mistake costs a large but finite amount.
    """

    is_differentiable = False
    higher_is_better = False
    full_state_update = False

    def __init__(self, weights: tuple[float, ...] = RSNA_LABEL_WEIGHTS, eps: float = 1e-15) -> None:
        super().__init__()
        self.eps = eps
        self.register_buffer("weights", torch.tensor(weights, dtype=torch.float64), persistent=False)
        self.add_state("total", default=torch.tensor(0.0, dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("count", default=torch.tensor(0), dist_reduce_fx="sum")

    def update(self, probs: torch.Tensor, target: torch.Tensor) -> None:
        p, y = probs.double(), target.double()
        per_label = -(y * p.clamp(min=self.eps).log() + (1 - y) * (1 - p).clamp(min=self.eps).log())
        self.total += (per_label * self.weights).sum() / self.weights.sum()
        self.count += probs.shape[0]

    def compute(self) -> torch.Tensor:
        return (self.total / self.count).float()


def build_metrics(task: str | Task, threshold: float = 0.5, prefix: str = "") -> MetricCollection:
    """All metrics of one stage; `prefix` is the stage with its slash ("val/"). Build one per stage, never share.

    Tasks with several outputs also get every metric per class as `<metric>_<label>`; the six-label
    task also gets the RSNA challenge metric, `logloss_weighted`.
    """
    task = get_task(task) if isinstance(task, str) else task
    metrics: dict[str, Metric] = {}
    for name, (metric_class, average) in METRICS.items():
        metrics[name] = _make(metric_class, task, threshold, average)
        if task.num_outputs > 1:
            per_class = _make(metric_class, task, threshold, average=None)
            metrics[f"{name}_per_class"] = _classwise(per_class, task, name)
    metrics["auroc"] = OneVsRestAUROC(task.num_outputs)
    if task.num_outputs > 1:
        metrics["auroc_per_class"] = _classwise(OneVsRestAUROC(task.num_outputs, average=None), task, "auroc")
    if task.outputs == LABELS:
        metrics["logloss_weighted"] = RSNALogLoss()
    # Compute groups would share states with the metric inside each ClasswiseWrapper without counting its
    # updates, and torchmetrics then warns on every compute; the states here are small enough to keep apart.
    return MetricCollection(metrics, prefix=prefix, compute_groups=False)


def metrics_at_once(task: Task, threshold: float, probs: torch.Tensor, targets: torch.Tensor,
                    prefix: str) -> dict[str, float]:
    """One stage's collection over all its predictions in one update, as plain floats named as the stage logs
    them: what evaluate.py and fit_classical.py report beside training's figures (NaN where a class is absent)."""
    collection = build_metrics(task, threshold, prefix=prefix)
    collection.update(probs.float(), targets.long())
    return {name: float(value) for name, value in sorted(collection.compute().items())}


def _make(metric_class: type, task: Task, threshold: float, average: str | None) -> Metric:
    """One thresholded torchmetrics metric in the task's flavour (binary, multiclass or multilabel)."""
    k = task.num_outputs
    return metric_class(task=task.metric_task, num_classes=k, num_labels=k, average=average, threshold=threshold)


def _classwise(metric: Metric, task: Task, name: str) -> ClasswiseWrapper:
    """Per-output values logged as `<stage>/<name>_<label>`."""
    return ClasswiseWrapper(metric, labels=list(task.outputs), prefix=f"{name}_")
