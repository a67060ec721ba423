"""The three ways the papers frame the problem, in one table.

Everything that differs between binary, subtype and multilabel (which labels are predicted,
how many outputs, which loss and activation, which torchmetrics task) is read from here,
by the data module and by the LightningModule alike.
"""

from dataclasses import dataclass

LABELS = ("any", "epidural", "intraparenchymal", "intraventricular", "subarachnoid", "subdural")
SUBTYPES = LABELS[1:]

# Weighted multilabel log loss of the RSNA 2019 challenge: 2 on `any`, 1 on each subtype.
RSNA_LABEL_WEIGHTS = (2.0, 1.0, 1.0, 1.0, 1.0, 1.0)


@dataclass(frozen=True)
class Task:
    name: str
    outputs: tuple[str, ...]  # one name per model output
    loss: str  # "bce" (sigmoid per output) or "ce" (softmax over outputs)
    metric_task: str  # torchmetrics task argument

    @property
    def num_outputs(self) -> int:
        return len(self.outputs)


TASKS = {
    "binary": Task("binary", outputs=("any",), loss="bce", metric_task="binary"),
    # softmax over the five subtypes, on positive slices that carry exactly one subtype
    "subtype": Task("subtype", outputs=SUBTYPES, loss="ce", metric_task="multiclass"),
    "multilabel": Task("multilabel", outputs=LABELS, loss="bce", metric_task="multilabel"),
}


def get_task(name: str, label: str | None = None) -> Task:
    """Look up a task by name; an unknown name gets one sentence listing the choices.

    `label` picks the one label a binary task predicts (`any` by default): one paper trained a binary
    model per label, which is `task=binary task.label=<label>` for each of the six.
    """
    if name not in TASKS:
        raise ValueError(f"Unknown task '{name}': choose task=binary, task=subtype or task=multilabel.")
    task = TASKS[name]
    if label is None or (label,) == task.outputs:
        return task
    if name != "binary":
        raise ValueError(f"task.label={label} picks the label of a binary task; task={name} predicts {', '.join(task.outputs)}.")
    if label not in LABELS:
        raise ValueError(f"Unknown task.label '{label}': choose one of {', '.join(LABELS)}.")
    return Task("binary", outputs=(label,), loss="bce", metric_task="binary")
