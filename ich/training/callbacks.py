"""Callbacks of a training run: stop on a non-finite loss, figures and slices for W&B, W&B run ids in
checkpoints, and a Hydra callback that readies the sweep folder for an Optuna study."""

import logging
import math
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")  # files only: training runs on servers without a display

import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pytorch_lightning as pl  # noqa: E402
import torch  # noqa: E402
from hydra.experimental.callback import Callback as HydraCallback  # noqa: E402
from omegaconf import DictConfig  # noqa: E402
from pytorch_lightning.loggers import WandbLogger  # noqa: E402
from torchmetrics.utilities import dim_zero_cat  # noqa: E402

from ich.data.windows import to_unit_float  # noqa: E402
from ich.evaluation.plots import save_figures  # noqa: E402

log = logging.getLogger(__name__)

# The checkpoint key that carries the W&B run id, read back when a run resumes from that checkpoint.
WANDB_RUN_ID_KEY = "wandb_run_id"


class FiniteLossCheck(pl.Callback):
    """Stop at the first NaN or infinite training loss instead of training on garbage for hours.

    The error is a ValueError, so a single run ends with one sentence and a sweep scores the trial as
    its worst value and goes on. Under DDP every rank stops together, so none waits forever for the others.
    """

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        loss = outputs["loss"] if isinstance(outputs, dict) else outputs
        if loss is None:
            return
        value = float(loss.detach())
        if not trainer.strategy.reduce_boolean_decision(not math.isfinite(value), all=False):
            return
        lr = trainer.optimizers[0].param_groups[0]["lr"] if trainer.optimizers else float("nan")
        raise ValueError(
            f"train/loss became {value} at step {trainer.global_step} (learning rate {lr:.3g}): lower optimizer.lr "
            "or set trainer.gradient_clip_val=1.0."
        )


def wandb_loggers(trainer: pl.Trainer) -> list[WandbLogger]:
    return [logger for logger in trainer.loggers if isinstance(logger, WandbLogger)]


class WandbFigures(pl.Callback):
    """With logger=wandb: confusion matrices and ROC curves after every validation and test epoch, and a grid
    of the first validation slices with their labels and predicted probabilities (slice models only: stage 2
    sees embeddings, so its runs get the matrices and curves alone).

    The figures are drawn by ich.evaluation.plots (the same as evaluate.py writes) into <run>/figures/<stage>/ and
    logged from there. Slices carry no identifier, not even the image id: a hospital's file names may be UIDs.
    """

    def __init__(self, num_slices: int = 8) -> None:
        self.num_slices = num_slices

    def on_validation_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any,
                                batch_idx: int, dataloader_idx: int = 0) -> None:
        if batch_idx != 0 or dataloader_idx != 0 or trainer.sanity_checking or self.num_slices <= 0:
            return
        if not trainer.is_global_zero or not wandb_loggers(trainer) or "image" not in batch:
            return  # stage 2 (model=sequence) batches hold series of embeddings: no slices to show
        images = batch["image"][: self.num_slices]
        with torch.no_grad():
            probs = pl_module.probabilities(pl_module(images).float()).cpu().numpy()
        path = _figure_dir(trainer, "val") / "slices.png"
        targets = batch["target"][: len(images)].cpu().numpy()
        slices = _display_channel(images, trainer).cpu().numpy()
        save_slice_grid(path, slices, targets, probs, pl_module.task.outputs, pl_module.task.loss == "ce")
        caption = f"epoch {trainer.current_epoch}: truth and predicted probabilities of the first validation slices"
        for logger in wandb_loggers(trainer):
            logger.log_image(key="val/slices", images=[str(path)], step=trainer.global_step, caption=[caption])

    def on_validation_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if not trainer.sanity_checking:
            self._log_figures(trainer, pl_module, "val")

    def on_test_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._log_figures(trainer, pl_module, "test")

    def _log_figures(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if not wandb_loggers(trainer):  # the same answer on every rank: no rank enters the gather alone
            return
        probs, targets = _epoch_predictions(pl_module, stage)
        if not trainer.is_global_zero or len(probs) == 0:
            return
        task = pl_module.task
        if task.loss == "ce":
            targets = targets.argmax(dim=1)  # the metric keeps one-hot rows; the figures take class indices
        folder = _figure_dir(trainer, stage)
        save_figures(folder, task, float(pl_module.hparams.threshold), probs, targets)
        for name in ("confusion_matrix", "roc"):
            for logger in wandb_loggers(trainer):
                logger.log_image(key=f"{stage}/{name}", images=[str(folder / f"{name}.png")], step=trainer.global_step)


def _epoch_predictions(pl_module: pl.LightningModule, stage: str) -> tuple[torch.Tensor, torch.Tensor]:
    """This epoch's probabilities and one-hot targets of every rank, read from the stage's AUROC metric, which
    keeps them all until the module computes and resets it right after the callbacks: nothing runs twice."""
    auroc = getattr(pl_module, f"{stage}_metrics")[f"{stage}/auroc"]
    with auroc.sync_context():
        if len(auroc.probs) == 0:  # a list of batches, or one tensor after the gather
            return torch.empty(0), torch.empty(0)
        return dim_zero_cat(auroc.probs).float().cpu(), dim_zero_cat(auroc.target).cpu()


def _figure_dir(trainer: pl.Trainer, stage: str) -> Path:
    folder = Path(trainer.default_root_dir) / "figures" / stage
    folder.mkdir(parents=True, exist_ok=True)
    return folder


def _display_channel(images: torch.Tensor, trainer: pl.Trainer) -> torch.Tensor:
    """The centre slice's first window (the brain window by default): channels run neighbour by neighbour."""
    datamodule = trainer.datamodule
    channel = datamodule.context * len(datamodule.model_windows or datamodule.windows) if hasattr(datamodule, "windows") else 0
    return to_unit_float(images[:, channel])


def save_slice_grid(path: Path, slices: np.ndarray, targets: np.ndarray, probs: np.ndarray, names: tuple[str, ...],
                    single_class: bool) -> None:
    """Slices [N, H, W] in grey, each titled with its true labels and the probabilities of the likeliest outputs."""
    columns = min(4, len(slices))
    rows = -(-len(slices) // columns)
    fig, axes = plt.subplots(rows, columns, figsize=(3.2 * columns, 3.6 * rows), squeeze=False)
    for ax, image, target, prob in zip(axes.flat, slices, targets, probs):
        truth = [names[int(target)]] if single_class else [n for n, t in zip(names, np.atleast_1d(target)) if t > 0.5]
        likeliest = np.argsort(prob)[::-1][:2]
        predicted = ", ".join(f"{names[k]} {prob[k]:.2f}" for k in likeliest)
        ax.imshow(image, cmap="gray", vmin=0.0, vmax=1.0)
        ax.set_title(f"true: {', '.join(truth) or 'none'}\np: {predicted}", fontsize=8)
    for ax in axes.flat:
        ax.axis("off")
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


class WandbRunId(pl.Callback):
    """Write the W&B run id into every checkpoint, so that a run resumed from it logs to the same W&B run."""

    def on_save_checkpoint(self, trainer: pl.Trainer, pl_module: pl.LightningModule, checkpoint: dict) -> None:
        for logger in wandb_loggers(trainer):
            if logger.version:
                checkpoint[WANDB_RUN_ID_KEY] = logger.version


class SweepFolder(HydraCallback):
    """Create the sweep folder before the sweeper starts: the Optuna study's sqlite file lives in it, and
    Hydra's launcher would only create it after the study is opened."""

    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        Path(config.hydra.sweep.dir).mkdir(parents=True, exist_ok=True)
