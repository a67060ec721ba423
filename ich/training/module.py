"""One LightningModule for the three tasks: a timm backbone, a small head, and the loss the task table names.

It takes plain values only and saves them, so `ICHLitModule.load_from_checkpoint(path)` rebuilds the
model with nothing else at hand: no config, no network, no weights file.
"""

import inspect
from collections.abc import Callable
import logging
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pytorch_lightning as pl
import torch
from hydra.utils import instantiate
from torch import nn
from torch.utils.data import DataLoader
from torchmetrics import MaxMetric

from ich.core.tasks import LABELS, RSNA_LABEL_WEIGHTS, Task, get_task
from ich.data.windows import to_unit_float
from ich.evaluation.metrics import build_metrics
from ich.evaluation.operating import OPERATING_POINTS, choose_thresholds, fit_temperature, one_vs_rest, probabilities
from ich.models import build_head, create_backbone

log = logging.getLogger(__name__)

FREEZE_MODES = ("none", "backbone", "backbone_except_bn")
NORMALIZE_MODES = ("auto", "pretrained", "none")
BATCHNORMS = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d, nn.SyncBatchNorm)
STAGES = ("train", "val", "test")
DEFAULT_OPTIMIZER = {"_target_": "torch.optim.AdamW", "_partial_": True, "lr": 1e-3}
# Keys of a scheduler config that tell Lightning when to step it; the other keys build the scheduler.
SCHEDULER_STEPPING_KEYS = ("interval", "frequency", "monitor")


class SliceClassifier(pl.LightningModule):
    """What every LightningModule of ich that scores slices shares (ICHLitModule, stage 2's SequenceLitModule):
    one metric collection per stage and the best validation AUROC, logged under the same names; the temperature
    and per-output operating thresholds, chosen on validation after training and kept in buffers; the steps
    through `_step`; the optimizer and scheduler of the hparams `optimizer` and `scheduler`.

    A subclass saves its hyperparameters (with task, threshold, operating_point, target_sensitivity, calibrate,
    optimizer, scheduler), sets `self.task`, calls `track_outputs`, and writes `_step(batch, stage)` -> loss.
    """

    # What choose_operating_points writes into a checkpoint after training.
    OPERATING_BUFFERS: tuple[str, ...] = ("op_thresholds", "temperature")

    def track_outputs(self, threshold: float) -> None:
        """The operating buffers and the metrics of `self.task`; `threshold` is the fixed one of the metrics."""
        self.register_buffer("op_thresholds", torch.full((self.task.num_outputs,), float(threshold)))
        self.register_buffer("temperature", torch.ones(()))
        for stage in STAGES:
            setattr(self, f"{stage}_metrics", build_metrics(self.task, threshold, prefix=f"{stage}/"))
        self.val_auroc_best = MaxMetric(nan_strategy="ignore")
        self.val_auroc_best.persistent(True)  # in the checkpoint: a resumed run remembers its best epoch

    def probabilities(self, logits: torch.Tensor) -> torch.Tensor:
        """The task's softmax or sigmoids of the logits at the model's temperature (1 unless calibrated)."""
        return probabilities(self.task, logits, self.temperature.to(logits.device))

    def choose_operating_point(self, logits: torch.Tensor, targets: torch.Tensor) -> None:
        """Fit the temperature (with `calibrate`), then choose one threshold per output, on validation logits
        [N, K] and targets; both are kept in buffers."""
        logits = logits.float().to(self.temperature.device)
        self.temperature.fill_(fit_temperature(logits, targets, self.task.loss) if self.hparams.calibrate else 1.0)
        thresholds = self.choose_thresholds(logits, targets)
        log.info("Operating point (%s) on %d validation slices: thresholds %s, temperature %.3f",
                 self.hparams.operating_point, len(logits), ", ".join(f"{name} {t:.4f}" for name, t in
                                                                      zip(self.task.outputs, thresholds)),
                 float(self.temperature))

    def choose_thresholds(self, logits: torch.Tensor, targets: torch.Tensor) -> np.ndarray:
        """One threshold per output by the model's rule (operating_point, target_sensitivity) on these logits [N, K]
        and targets at its temperature, kept in its buffer; returned too."""
        thresholds = choose_thresholds(
            self.probabilities(logits).cpu().numpy(),
            one_vs_rest(self.task, targets.cpu().numpy()),
            self.hparams.operating_point,
            self.hparams.target_sensitivity,
            fallback=self.hparams.threshold,
        )
        self.op_thresholds.copy_(torch.as_tensor(thresholds))
        return thresholds

    def exam_rows(self, trainer: pl.Trainer, loader: DataLoader, ids: list[str], logits: torch.Tensor,
                  targets: torch.Tensor) -> tuple[list[str], np.ndarray, np.ndarray] | None:
        """What an exam's probability is the highest of (ich.evaluation.exam), from a stage's slice predictions: for a slice
        model its slices, as ids, probabilities [N, K] and 0/1 truth [N, K]. None where there is no exam level."""
        return ids, self.probabilities(logits).numpy(), one_vs_rest(self.task, targets.numpy())

    def exam_thresholds(self) -> np.ndarray:
        """The thresholds exams are called at [K]: a slice model's exam is its highest slice, called as a slice is."""
        return self.op_thresholds.cpu().numpy()

    def choose_operating_points(self, trainer: pl.Trainer, loader: DataLoader, table: pd.DataFrame) -> None:
        """Everything `OPERATING_BUFFERS` holds, chosen on the validation predictions of `trainer` over `loader`
        (`table`: the validation slices). A slice model's exams take its slice thresholds: nothing more."""
        _, logits, targets = predict_logits(trainer, self, loader)
        self.choose_operating_point(logits, targets)

    def on_fit_start(self) -> None:
        """Train and validate as the plain model: a run resumed from a calibrated checkpoint chooses again."""
        self.temperature.fill_(1.0)
        self.op_thresholds.fill_(self.hparams.threshold)

    # --- steps ----------------------------------------------------------------------------------------

    def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        return self._step(batch, "train")

    def validation_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        return self._step(batch, "val")

    def test_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        return self._step(batch, "test")

    # --- epoch ends: metrics --------------------------------------------------------------------------
    # Lightning cannot log a ClasswiseWrapper object (its compute returns a dict), so each collection is
    # computed, logged and reset here, once per epoch.

    def on_train_epoch_end(self) -> None:
        self._log_metrics("train")

    def on_validation_epoch_end(self) -> None:
        values = self._log_metrics("val")
        if not self.trainer.sanity_checking:  # the untrained model's AUROC is no epoch's best
            self.val_auroc_best(values["val/auroc"])
            self.log("val/auroc_best", self.val_auroc_best.compute(), sync_dist=True)

    def on_test_epoch_end(self) -> None:
        self._log_metrics("test")

    def _log_metrics(self, stage: str) -> dict[str, torch.Tensor]:
        metrics = getattr(self, f"{stage}_metrics")
        values = metrics.compute()
        metrics.reset()
        values.update(self.epoch_metrics(stage))
        # torchmetrics already gathered every rank; sync_dist spares the per-key DDP advice, at negligible cost
        self.log_dict(values, sync_dist=True)
        return values

    def epoch_metrics(self, stage: str) -> dict[str, torch.Tensor]:
        """A subclass's own epoch values beside the collection's (computed and reset here); none by default."""
        return {}

    def configure_optimizers(self) -> Any:
        """Build the optimizer, over all parameters so that unfreezing needs no new one, and the scheduler.

        Frozen parameters get no gradient, which every torch optimizer skips.
        """
        return configure_optimization(self, self.hparams.optimizer, self.hparams.scheduler)


class ICHLitModule(SliceClassifier):
    """Classify CT slices for `task` (binary, subtype or multilabel; see ich.core.tasks) with any timm backbone.

    Args:
        task: a name in ich.core.tasks.TASKS; sets the outputs, the loss and the metrics.
        label: the label a binary task predicts (`any` when None).
        backbone: a timm model name; in_chans: number of image channels.
        pretrained: ImageNet weights from the hub (or its local cache); weights: a local weights file instead.
        init_from: a checkpoint of ours to start from (backbone always, head when its shape fits the task).
        head: build_head arguments {hidden, dropout, batchnorm}; None gives a plain linear classifier.
        freeze: none | backbone | backbone_except_bn; unfreeze_at_epoch: train everything from that epoch.
        optimizer, scheduler: Hydra `_target_` dicts, built as partials in configure_optimizers.
        pos_weight: BCE positive weight per output; class_weights: CE weight per subtype.
        rsna_weights: weight the multilabel loss 2 on `any`, 1 on subtypes, like the challenge metric.
        threshold: probability cut-off of the thresholded metrics (and the operating threshold until one is chosen).
        operating_point: how `choose_operating_point` picks each output's threshold on validation: `sensitivity`
            (the most specific threshold that reaches `target_sensitivity`) or `youden`.
        calibrate: fit a temperature on validation first (temperature scaling).
        channels_last, compile: speed options for GPUs.
        normalize: auto (the backbone's pretrained mean/std when its weights come from pretraining, none
            from scratch) | pretrained (that mean/std always) | none. The values are buffers, so they
            travel in the checkpoint with the weights.
        precision: the trainer's precision its test stage predicted at (`bf16-mixed`, `32-true`, ...), which
            prediction (ich.inference.deploy) takes too, so that a study gets the test stage's probabilities.
        inputs: how the data module shapes a slice (ICHDataModule.inputs: the source's encoding, the windows (None:
            images of an unknown window), context, image size, channels) and what the model was trained on (its
            training source and the figures of its training series, ich.data.seen); data: the training run's data
            config. Both only travel in the checkpoint, so evaluation and prediction need nothing but the .ckpt file.
    """

    def __init__(
        self,
        task: str = "binary",
        label: str | None = None,
        backbone: str = "resnet18",
        in_chans: int = 3,
        pretrained: bool = False,
        weights: str | None = None,
        init_from: str | None = None,
        head: dict | None = None,
        freeze: str = "none",
        unfreeze_at_epoch: int | None = None,
        optimizer: dict | None = None,
        scheduler: dict | None = None,
        pos_weight: list[float] | None = None,
        class_weights: list[float] | None = None,
        rsna_weights: bool = False,
        threshold: float = 0.5,
        operating_point: str = "sensitivity",
        target_sensitivity: float = 0.95,
        calibrate: bool = False,
        channels_last: bool = False,
        compile: bool = False,
        normalize: str = "auto",
        precision: str = "32-true",
        inputs: dict | None = None,
        data: dict | None = None,
    ) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.task = get_task(task, label)
        if operating_point not in OPERATING_POINTS:
            raise ValueError(f"Unknown task.operating_point={operating_point}: choose one of {', '.join(OPERATING_POINTS)}.")
        if not 0 < target_sensitivity <= 1:
            raise ValueError(f"task.target_sensitivity={target_sensitivity} is a fraction of positives: give it in (0, 1].")
        self._freeze = "none"
        self.backbone = create_backbone(backbone, in_chans, pretrained, weights)
        # timm's num_features is the width before a pre-logits block (VGG, MobileNetV3); head_hidden_size after it
        width = getattr(self.backbone, "head_hidden_size", None) or self.backbone.num_features
        self.head = build_head(width, self.task.num_outputs, **(head or {}))
        mean, std = input_normalization(self.backbone, in_chans, normalize, pretrained or weights is not None)
        self.register_buffer("input_mean", mean)
        self.register_buffer("input_std", std)
        # Chosen on the validation patients after training (choose_operating_point); buffers, so the checkpoint
        # carries them and every later prediction applies them.
        self.track_outputs(threshold)
        if init_from is not None:
            self._init_from(Path(init_from))
        self.criterion = build_loss(self.task, pos_weight, class_weights, rsna_weights)
        self.set_freeze(freeze)
        if channels_last:
            self.to(memory_format=torch.channels_last)
        if compile:
            self.backbone.compile()  # in place: state-dict keys stay those of the plain backbone

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        """float32 logits [B, num_outputs] of images [B, C, H, W]: windowed uint8 as the data modules give
        them, or floats in [0, 1]."""
        features = self.features(image)
        # The head in float32 even under bf16 autocast: bf16 logits have 8 bits of mantissa, so nearby
        # slices would tie, and AUROC would blur, whatever is cast afterwards.
        with torch.autocast(device_type=features.device.type, enabled=False):
            return self.head(features.float())

    def features(self, image: torch.Tensor) -> torch.Tensor:
        """The backbone's pooled features [B, D] of images as `forward` takes them, normalised here and
        nowhere else: training, evaluation, prediction and feature extraction all pass through this."""
        # Batches arrive laid out channels-last (see collate_skipping); the plain layout is restored for
        # models that were not converted, so either way input and weights agree.
        layout = torch.channels_last if self.hparams.channels_last else torch.contiguous_format
        image = ((to_unit_float(image) - self.input_mean) / self.input_std).contiguous(memory_format=layout)
        return self.backbone(image)

    # --- freezing -------------------------------------------------------------------------------------

    def set_freeze(self, mode: str) -> None:
        """Choose which backbone parameters train; the head always trains."""
        if mode not in FREEZE_MODES:
            raise ValueError(f"Unknown model.freeze={mode}: choose one of {', '.join(FREEZE_MODES)}.")
        self.backbone.requires_grad_(mode == "none")
        if mode == "backbone_except_bn":
            for module in self.backbone.modules():
                if isinstance(module, BATCHNORMS):
                    module.requires_grad_(True)
        self._freeze = mode
        trainable = sum(p.numel() for p in self.parameters() if p.requires_grad)
        total = sum(p.numel() for p in self.parameters())
        log.info("Trainable parameters: %s of %s (freeze=%s)", f"{trainable:,}", f"{total:,}", mode)

    def train(self, mode: bool = True) -> "ICHLitModule":
        """A fully frozen backbone stays in eval mode, so its BatchNorm statistics cannot drift either."""
        super().train(mode)
        if self._freeze == "backbone":
            self.backbone.eval()
        return self

    def on_train_start(self) -> None:
        # Applied here rather than at construction: Lightning warns about modules in eval mode just before.
        self.train()

    def on_train_epoch_start(self) -> None:
        """Head first, then everything (fastai style): unfreeze at `unfreeze_at_epoch`, also after a resume."""
        start = self.hparams.unfreeze_at_epoch
        if start is not None and self.current_epoch >= start and self._freeze != "none":
            self.set_freeze("none")
            self.train()

    # --- steps ----------------------------------------------------------------------------------------

    def predict_step(self, batch: dict, batch_idx: int) -> dict[str, Any]:
        """Per-image logits and probabilities [B, K] with their ids (and targets when the data has them)."""
        logits = self(batch["image"]).float()
        return {"image_id": batch["image_id"], "logits": logits, "probs": self.probabilities(logits),
                "target": batch.get("target")}

    def _step(self, batch: dict, stage: str) -> torch.Tensor:
        logits = self(batch["image"])
        target = batch["target"]
        loss = self.criterion(logits, target)
        metrics = getattr(self, f"{stage}_metrics")
        # float32 before the activation: bf16 probabilities would tie and blur AUROC
        metrics.update(self.probabilities(logits.detach().float()), target.long())
        # Under DDP the epoch mean must cover every rank's batches; per training step a rank's own loss will do.
        self.log(f"{stage}/loss", loss, prog_bar=True, batch_size=len(logits), sync_dist=stage != "train")
        return loss

    # --- checkpoints ----------------------------------------------------------------------------------

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """Save the arguments that rebuild this model anywhere: the state dict carries the weights, so
        load_from_checkpoint must not fetch the hub or read a weights file or checkpoint again (they may be
        gone, the machine offline), nor compile for the training GPU. The running module keeps its own."""
        checkpoint["hyper_parameters"] = portable_hparams(checkpoint["hyper_parameters"])

    def _init_from(self, path: Path) -> None:
        """Start from one of our checkpoints: its backbone always, its head only when the shapes fit the task."""
        if not path.is_file():
            raise FileNotFoundError(
                f"model.init_from={path} does not exist: pass a .ckpt file written by ich training."
            )
        state = torch.load(path, weights_only=True, map_location="cpu")
        if "state_dict" not in state:
            raise ValueError(
                f"model.init_from={path} is not a Lightning checkpoint: pass a .ckpt file written by ich training."
            )
        for name in ("input_mean", "input_std"):  # the inputs that checkpoint's weights were trained on
            if name in state["state_dict"] and state["state_dict"][name].shape == getattr(self, name).shape:
                setattr(self, name, state["state_dict"][name].clone())
        backbone_state = _strip_prefix(state["state_dict"], "backbone.")
        try:
            self.backbone.load_state_dict(backbone_state)
        except RuntimeError as err:
            raise ValueError(
                f"model.init_from={path} holds another backbone than {self.hparams.backbone} "
                f"with {self.hparams.in_chans} channels: set model.backbone and data channels as in that run."
            ) from err
        head_state = _strip_prefix(state["state_dict"], "head.")
        own = self.head.state_dict()
        if head_state.keys() == own.keys() and all(head_state[k].shape == own[k].shape for k in own):
            self.head.load_state_dict(head_state)
            log.info("Initialised backbone and head from %s", path)
        else:
            log.info("Initialised the backbone from %s; its head does not fit task %s: new head", path, self.task.name)


def portable_hparams(hparams: dict) -> dict:
    """ICHLitModule arguments that rebuild a trained model anywhere once its state dict is loaded: no hub, weights
    file or checkpoint to start from, no compilation for the training GPU."""
    return {**hparams, "pretrained": False, "weights": None, "init_from": None, "compile": False}


def input_normalization(backbone: nn.Module, channels: int, mode: str, pretrained: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean and std [C, 1, 1] that images in [0, 1] are normalised by before the backbone.

    Pretrained weights expect the mean/std of their pretraining (timm's `pretrained_cfg`, ImageNet's for
    most); a backbone trained from scratch needs none. Channel c takes the statistics of colour c mod 3:
    windows take the colour channels' place, and context slices repeat the windows in the same order.
    """
    if mode not in NORMALIZE_MODES:
        raise ValueError(f"Unknown model.normalize={mode}: choose one of {', '.join(NORMALIZE_MODES)}.")
    config = getattr(backbone, "pretrained_cfg", None) or {}
    if mode == "pretrained" and "mean" not in config:
        raise ValueError("model.normalize=pretrained, but this backbone has no pretraining mean/std: use auto or none.")
    if mode == "none" or (mode == "auto" and not pretrained) or "mean" not in config:
        return torch.zeros(channels, 1, 1), torch.ones(channels, 1, 1)
    picks = [c % len(config["mean"]) for c in range(channels)]
    mean = torch.tensor([config["mean"][c] for c in picks], dtype=torch.float32)
    std = torch.tensor([config["std"][c] for c in picks], dtype=torch.float32)
    return mean[:, None, None], std[:, None, None]


def build_loss(
    task: Task, pos_weight: list[float] | None, class_weights: list[float] | None, rsna_weights: bool
) -> nn.Module:
    """The task's loss; its weights are buffers, so they move with the module to the GPU and into checkpoints."""
    if task.loss == "ce":
        if pos_weight is not None or rsna_weights:
            raise ValueError(
                f"pos_weight and rsna_weights apply to sigmoid tasks, not task={task.name}: use class_weights."
            )
        return nn.CrossEntropyLoss(weight=_per_output(class_weights, task, "class_weights"))
    if class_weights is not None:
        raise ValueError(f"class_weights apply to task=subtype, not task={task.name}: use pos_weight.")
    weight = None
    if rsna_weights:
        if task.outputs != LABELS:
            raise ValueError(
                f"rsna_weights=true needs the six RSNA labels, not task={task.name}: set task=multilabel."
            )
        # scaled to mean 1 so the mean over outputs equals the challenge's normalisation by the sum of weights
        weight = torch.tensor(RSNA_LABEL_WEIGHTS) * len(RSNA_LABEL_WEIGHTS) / sum(RSNA_LABEL_WEIGHTS)
    return nn.BCEWithLogitsLoss(weight=weight, pos_weight=_per_output(pos_weight, task, "pos_weight"))


def _per_output(values: list[float] | None, task: Task, option: str) -> torch.Tensor | None:
    if values is None:
        return None
    if len(values) != task.num_outputs:
        raise ValueError(
            f"{option} has {len(values)} values but task={task.name} has {task.num_outputs} outputs "
            f"({', '.join(task.outputs)}): give one per output."
        )
    return torch.tensor(values, dtype=torch.float32)


def configure_optimization(module: pl.LightningModule, optimizer: dict | None, scheduler: dict | None) -> Any:
    """What `configure_optimizers` returns for Hydra `_target_` dicts of an optimizer (over all of `module`'s
    parameters) and an optional scheduler, whose schedule length left null spans the whole run."""
    built = _partial(optimizer or DEFAULT_OPTIMIZER)(params=module.parameters())
    if not scheduler:
        return built
    config = dict(scheduler)
    stepping = {key: config.pop(key) for key in SCHEDULER_STEPPING_KEYS if key in config}
    stepping.setdefault("interval", "epoch")
    factory = _partial(config)
    defaults = _schedule_defaults(factory, _run_length(module.trainer, stepping["interval"]), built)
    return {"optimizer": built, "lr_scheduler": {"scheduler": factory(built, **defaults), **stepping}}


def _schedule_defaults(factory: partial, length: Callable[[], int], optimizer: torch.optim.Optimizer) -> dict:
    """Fill what the scheduler config leaves null: the schedule spans the whole run, in its interval's units
    (OneCycleLR total_steps, CosineAnnealingLR T_max; `length` gives it), and OneCycleLR peaks at the optimizer's lr."""
    accepted = inspect.signature(factory.func).parameters
    given = {key: value for key, value in factory.keywords.items() if value is not None}
    defaults: dict[str, Any] = {}
    if "total_steps" in accepted and "total_steps" not in given and "epochs" not in given:
        defaults["total_steps"] = length()
    if "T_max" in accepted and "T_max" not in given:
        defaults["T_max"] = length()
    if "max_lr" in accepted and "max_lr" not in given:
        defaults["max_lr"] = [group["lr"] for group in optimizer.param_groups]
    if "pct_start" in accepted:
        total = defaults.get("total_steps", given.get("total_steps"))
        warmup = given.get("pct_start", accepted["pct_start"].default)
        if total and float(warmup * total) == 1.0:
            # OneCycleLR divides by zero when its warm-up is exactly one step (4 steps at 0.25): a
            # millionth more keeps the schedule and the division.
            defaults["pct_start"] = warmup * (1 + 1e-6)
    return defaults


def _run_length(trainer: pl.Trainer, interval: str) -> Callable[[], int]:
    """The run's length in the scheduler's interval, asked for only when the scheduler takes one."""

    def length() -> int:
        if interval == "step":
            return int(trainer.estimated_stepping_batches)
        epochs = trainer.max_epochs
        if epochs is None or epochs < 1:
            raise ValueError(
                "An epoch-wise scheduler needs trainer.max_epochs to know its length: set it, "
                "or set the schedule length in the scheduler config (T_max or total_steps)."
            )
        return epochs

    return length


def _partial(config: dict) -> partial:
    """A Hydra `_target_` dict as a factory; plain containers, so the optimizer state pickles as plain data."""
    return instantiate(config, _partial_=True, _convert_="all")


def _strip_prefix(state_dict: dict[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    return {key.removeprefix(prefix): value for key, value in state_dict.items() if key.startswith(prefix)}


def predict_logits(
    trainer: pl.Trainer, model: ICHLitModule, loader: DataLoader
) -> tuple[list[str], torch.Tensor, torch.Tensor]:
    """Image ids, logits [N, K] and targets of every slice the loader could read, through one device's trainer."""
    batches = trainer.predict(model, dataloaders=loader)
    ids = [image_id for batch in batches for image_id in batch["image_id"]]
    logits = torch.cat([batch["logits"] for batch in batches]).float().cpu()
    targets = torch.cat([batch["target"] for batch in batches]).cpu()
    return ids, logits, targets
