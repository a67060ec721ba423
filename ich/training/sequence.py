"""Stage 2: a sequence model over the ordered slices of each series, on a frozen stage-1 checkpoint's embeddings.

Every strong RSNA 2019 solution got its largest gain here: a bleed spans neighbouring slices, and a lone
bright slice is often an artefact. The stage-1 checkpoint (`model.encoder`) gives every slice of its data its
pooled features and logits once (ich.training.embeddings, cached); this module reads them per series, always sorted by
the slice's place along the head, and predicts each slice's labels as a correction of the stage-1 logits, plus
one exam score per series. Task, inputs, data and split are the encoder's, so both stages test the same
patients and report the same metric names (ich.evaluation.metrics), slice level and exam level.

    python train.py model=sequence model.encoder=outputs/<date>/<time>
    python evaluate.py ckpt_path=<that stage-2 run>

For prediction on new series: `SequenceLitModule.load_from_checkpoint(path)` and `predict_series`. The checkpoint
carries its encoder (weights and arguments), so it predicts on any machine without the stage-1 run folder.
"""

import logging
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pytorch_lightning as pl
import torch
from omegaconf import DictConfig, OmegaConf, open_dict
from torch import nn
from torch.nn.utils.rnn import pack_padded_sequence, pad_packed_sequence
from torch.utils.data import DataLoader, Dataset

from ich import CONFIG_DIR
from ich.core.results import file_digest
from ich.core.runs import checkpoint_file, data_config, saved_inputs, training_run_dir
from ich.core.tasks import Task, get_task
from ich.data.datamodule import ICHDataModule, check_slice_order, task_targets
from ich.data.dataset import as_bytes
from ich.data.splits import STAGES
from ich.evaluation.exam import exams_of
from ich.evaluation.metrics import OneVsRestAUROC
from ich.evaluation.operating import HEADLINE_LABEL, choose_thresholds, fit_temperature, probabilities, slice_groups
from ich.training.embeddings import Embeddings, embed, load_or_extract
from ich.training.module import ICHLitModule, SliceClassifier, build_loss, portable_hparams

log = logging.getLogger(__name__)

KINDS = ("gru", "conv1d", "transformer")
# The key of the exam output's AUROC per series on the headline output, logged every epoch (`val/exam_score_auroc`);
# `exam_auroc` is the AUROC of the exams (ich.evaluation.exam), studies scored by their series' exam output.
EXAM_SCORE_KEY = "exam_score_auroc"


# --- the network ----------------------------------------------------------------------------------------


class SequenceNet(nn.Module):
    """Per series [B, L] of slices: embeddings [B, L, D] and stage-1 logits [B, L, K] -> slice logits [B, L, K]
    (the stage-1 logits plus a correction from the series) and exam logits [B, K]. Padding is masked everywhere.

    Args:
        kind: gru (bidirectional), conv1d (`layers` residual convolutions of `kernel` slices; kernel 1 sees one
            slice only) or transformer (a small encoder; the relative slice position is an input feature).
    """

    def __init__(self, features: int, outputs: int, kind: str = "gru", hidden: int = 128, layers: int = 1,
                 dropout: float = 0.3, kernel: int = 5, heads: int = 4) -> None:
        super().__init__()
        if kind not in KINDS:
            raise ValueError(f"Unknown model.sequence.kind={kind}: choose one of {', '.join(KINDS)}.")
        if kind == "conv1d" and kernel % 2 == 0:
            raise ValueError(f"model.sequence.kernel={kernel}: give an odd width, so each slice is its window's centre.")
        if kind == "transformer" and hidden % heads:
            raise ValueError(f"model.sequence.hidden={hidden} is not a multiple of model.sequence.heads={heads}: change one.")
        self.kind = kind
        # inputs: the embedding, the stage-1 logits and the slice's relative place in its series (0 top, 1 bottom)
        self.project = nn.Sequential(nn.Dropout(dropout), nn.Linear(features + outputs + 1, hidden), nn.GELU())
        if kind == "gru":
            self.body = nn.GRU(hidden, hidden, num_layers=layers, batch_first=True, bidirectional=True,
                               dropout=dropout if layers > 1 else 0.0)
            width = 2 * hidden
        elif kind == "conv1d":
            self.body = nn.ModuleList(nn.Conv1d(hidden, hidden, kernel, padding=kernel // 2) for _ in range(layers))
            width = hidden
        else:
            layer = nn.TransformerEncoderLayer(hidden, heads, 2 * hidden, dropout, batch_first=True)
            self.body = nn.TransformerEncoder(layer, layers, enable_nested_tensor=False)
            width = hidden
        self.dropout = nn.Dropout(dropout)
        self.slice_head = nn.Linear(width, outputs)
        nn.init.zeros_(self.slice_head.weight)  # starts as stage 1 exactly: the series adds what it can
        nn.init.zeros_(self.slice_head.bias)
        self.exam_head = nn.Linear(2 * width, outputs)

    def forward(self, features: torch.Tensor, logits: torch.Tensor, valid: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        lengths = valid.sum(dim=1)
        steps = torch.arange(valid.shape[1], device=valid.device)
        position = steps[None, :] / (lengths[:, None] - 1).clamp(min=1)
        x = self.project(torch.cat([features, logits, position[..., None]], dim=-1))
        x = x.masked_fill(~valid[..., None], 0.0)
        if self.kind == "gru":
            packed = pack_padded_sequence(x, lengths.cpu(), batch_first=True, enforce_sorted=False)
            out, _ = pad_packed_sequence(self.body(packed)[0], batch_first=True, total_length=x.shape[1])
        elif self.kind == "conv1d":
            h = x.transpose(1, 2)
            for conv in self.body:  # zeros beyond the series' ends, not the next series' slices
                h = (h + nn.functional.gelu(conv(h))).masked_fill(~valid[:, None, :], 0.0)
            out = h.transpose(1, 2)
        else:
            out = self.body(x, src_key_padding_mask=~valid)
        out = self.dropout(out).masked_fill(~valid[..., None], 0.0)
        slice_logits = logits + self.slice_head(out)
        highest = out.masked_fill(~valid[..., None], float("-inf")).amax(dim=1)
        mean = out.sum(dim=1) / lengths[:, None]
        return slice_logits, self.exam_head(torch.cat([highest, mean], dim=-1))


# --- series as items ------------------------------------------------------------------------------------


def series_order(series: np.ndarray, slice_index: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Rows grouped by series and put in the index's slice order within each (`slice_index`, which
    ich.data.order.slice_order decided), whatever order they come in: (order [N], starts [S + 1]); series s is
    rows order[starts[s]:starts[s + 1]], in the order stage 1's context saw them."""
    codes = pd.factorize(series)[0]
    order = np.lexsort((slice_index, codes))  # the last key sorts first
    starts = np.concatenate([[0], np.flatnonzero(np.diff(codes[order])) + 1, [len(order)]])
    return order, starts


class SeriesDataset(Dataset):
    """One item per series that has a slice labelled in this stage: every slice of the series in anatomical order
    (its embedding and stage-1 logits), the targets, and which slices this stage scores (the rest is context:
    slices of other tasks, dropped as blank, or unreadable). Per-row data stay numpy arrays (see STYLE.md, 14).
    """

    def __init__(self, embeddings: Embeddings, targets: np.ndarray, image_ids: np.ndarray, labelled: np.ndarray,
                 order: np.ndarray, starts: np.ndarray, loss: str) -> None:
        lengths = np.diff(starts)
        scored = np.add.reduceat(labelled[order], starts[:-1]) > 0 if len(order) else np.zeros(0, bool)
        keep = np.flatnonzero(scored)
        self.order = np.concatenate([order[starts[s]:starts[s + 1]] for s in keep]) if len(keep) else order[:0]
        self.starts = np.concatenate([[0], np.cumsum(lengths[keep])])
        self.embeddings, self.targets, self.image_ids, self.labelled = embeddings, targets, image_ids, labelled
        self.loss = loss

    def __len__(self) -> int:
        return len(self.starts) - 1

    def rows(self, i: int) -> np.ndarray:
        """Index rows of series i, top to bottom."""
        return self.order[self.starts[i]:self.starts[i + 1]]

    def __getitem__(self, i: int) -> dict:
        rows = self.rows(i)
        labelled = torch.from_numpy(self.labelled[rows])
        target = torch.as_tensor(self.targets[rows])
        if self.loss == "bce":  # a series is positive for a label when any of its scored slices is
            exam = target[labelled].amax(dim=0)
        else:
            exam = torch.zeros(target.shape[1:] or 1)
        return {"features": torch.from_numpy(np.asarray(self.embeddings.features[rows], np.float32)),
                "logits": torch.from_numpy(self.embeddings.logits[rows]), "target": target, "labelled": labelled,
                "exam_target": exam, "image_id": [name.decode() for name in self.image_ids[rows]]}


def collate_series(items: list[dict]) -> dict:
    """Pad series to the longest of the batch; `valid` marks real slices, `labelled` the scored ones, and
    `image_id` lists the scored slices in the order `tensor[labelled]` gives them (series, then top to bottom)."""
    lengths = torch.tensor([len(item["labelled"]) for item in items])
    longest = int(lengths.max())

    def pad(key: str) -> torch.Tensor:
        first = items[0][key]
        out = first.new_zeros((len(items), longest, *first.shape[1:]))
        for b, item in enumerate(items):
            out[b, : len(item[key])] = item[key]
        return out

    batch = {key: pad(key) for key in ("features", "logits", "target", "labelled")}
    batch["valid"] = torch.arange(longest)[None, :] < lengths[:, None]
    batch["exam_target"] = torch.stack([item["exam_target"] for item in items])
    batch["image_id"] = [i for item in items for i, scored in zip(item["image_id"], item["labelled"]) if scored]
    # one scored slice per series: what its study and patient are looked up by (ich.evaluation.exam.stage_exams)
    batch["exam_image_id"] = [next(i for i, scored in zip(item["image_id"], item["labelled"]) if scored)
                              for item in items]
    return batch


class SequenceDataModule(pl.LightningDataModule):
    """Series of embedded slices per stage, over a set-up-able stage-1 data module (`slices`): its splits, its
    tables (what the reports read) and its counts.

    Args:
        slices: the ICHDataModule of the encoder's data; data: the config it was built from (the cache key).
        encoder: the encoder reference {path, sha256, backbone}; load_encoder: returns the encoder module, called
            only when the embeddings are not cached yet.
        flip: average each slice's embedding with its mirror's; batch_size: series per batch.
    """

    def __init__(self, slices: ICHDataModule, data: dict, encoder: dict, load_encoder: Callable[[], ICHLitModule],
                 flip: bool = False, batch_size: int = 8, seed: int = 0) -> None:
        super().__init__()
        self.slices, self.data, self.encoder, self.load_encoder = slices, data, encoder, load_encoder
        self.flip, self.batch_size, self.seed = bool(flip), int(batch_size), int(seed)
        self.task: Task = slices.task
        self.datasets: dict[str, SeriesDataset] = {}
        self.tables: dict[str, pd.DataFrame] = {}
        self.summary: dict = {}
        self.embeddings: Embeddings | None = None

    def prepare_data(self) -> None:
        self.slices.prepare_data()

    def setup(self, stage: str | None = None) -> None:
        if self.datasets:
            return
        self.slices.setup()
        index = self.slices.index
        check_slice_order(index, "model=sequence")
        self.embeddings = load_or_extract(self.load_encoder, self.encoder["sha256"], self.slices, self.data, self.flip)
        targets = task_targets(index, self.task)
        order, starts = series_order(index["series"].to_numpy(), index["slice_index"].to_numpy())
        image_ids = as_bytes(index["image_id"])
        for name in STAGES:
            labelled = np.zeros(len(index), bool)
            labelled[self.slices.tables[name]["row"].to_numpy()] = True
            self.datasets[name] = SeriesDataset(self.embeddings, targets, image_ids, labelled & self.embeddings.readable,
                                                order, starts, self.task.loss)
        self.tables = self.slices.tables
        self.summary = {**self.slices.summary, "series": {name: len(ds) for name, ds in self.datasets.items()}}
        log.info("Stage 2 on %s series (train/val/test) of embeddings from %s",
                 "/".join(str(len(self.datasets[name])) for name in STAGES), self.embeddings.folder)

    @property
    def embedding_dim(self) -> int:
        return int(self.embeddings.features.shape[1])

    def loader(self, dataset: SeriesDataset, shuffle: bool = False) -> DataLoader:
        """Series in memory: no worker processes; shuffled by the seed alone."""
        generator = torch.Generator().manual_seed(self.seed) if shuffle else None
        return DataLoader(dataset, batch_size=self.batch_size, shuffle=shuffle, generator=generator,
                          collate_fn=collate_series)

    def train_dataloader(self) -> DataLoader:
        return self.loader(self.datasets["train"], shuffle=True)

    def val_dataloader(self) -> DataLoader:
        return self.loader(self.datasets["val"])

    def test_dataloader(self) -> DataLoader:
        return self.loader(self.datasets["test"])

    def predict_dataloader(self) -> DataLoader:
        return self.loader(self.datasets["test"])


# --- the LightningModule --------------------------------------------------------------------------------


class SequenceLitModule(SliceClassifier):
    """Stage 2 for the encoder's task: slice logits and an exam score per series; metrics named as stage 1's.

    Args:
        task, label: the encoder's task. features: the encoder's embedding width.
        kind, hidden, layers, dropout, kernel, heads: the SequenceNet (conf/model/sequence.yaml).
        threshold, operating_point, target_sensitivity, calibrate, rsna_weights: as ICHLitModule's.
        optimizer, scheduler: Hydra `_target_` dicts (conf/optimizer, conf/scheduler).
        encoder: {path, sha256, backbone, hparams} of the stage-1 checkpoint: its content hash keys the cached
            embeddings, and its arguments (ich.training.module.portable_hparams) rebuild it here as `slice_encoder`, whose
            weights travel in this checkpoint's state dict. flip: how its embeddings were made. inputs, data: the
            encoder's inputs and the data stage 2 was trained on, so evaluate.py shapes and splits data as both
            stages did.

    Its exam output has its own operating point, chosen on the validation exams after training (with
    `calibrate`, a temperature first): buffers `exam_op_thresholds` and `exam_temperature`.
    """

    OPERATING_BUFFERS = (*SliceClassifier.OPERATING_BUFFERS, "exam_op_thresholds", "exam_temperature")

    def __init__(self, task: str = "binary", label: str | None = None, features: int = 512, kind: str = "gru",
                 hidden: int = 128, layers: int = 1, dropout: float = 0.3, kernel: int = 5, heads: int = 4,
                 threshold: float = 0.5, operating_point: str = "sensitivity", target_sensitivity: float = 0.95,
                 calibrate: bool = False, rsna_weights: bool = False, optimizer: dict | None = None,
                 scheduler: dict | None = None, encoder: dict | None = None, flip: bool = False,
                 inputs: dict | None = None, data: dict | None = None) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.task = get_task(task, label)
        self.net = SequenceNet(features, self.task.num_outputs, kind, hidden, layers, dropout, kernel, heads)
        self.track_outputs(threshold)
        self.criterion = build_loss(self.task, None, None, rsna_weights)
        self.headline = self.task.outputs.index(HEADLINE_LABEL) if HEADLINE_LABEL in self.task.outputs else 0
        for stage in STAGES:
            setattr(self, f"{stage}_exam_auroc", OneVsRestAUROC(self.task.num_outputs, average=None))
        self.register_buffer("exam_op_thresholds", torch.full((self.task.num_outputs,), float(threshold)))
        self.register_buffer("exam_temperature", torch.ones(()))
        if encoder and "hparams" not in encoder:
            raise ValueError("This stage-2 checkpoint predates checkpoints that carry their encoder: train it again "
                             "(python train.py model=sequence model.encoder=<its stage-1 run>).")
        # frozen: it made the embeddings; kept to embed new series in prediction
        self.slice_encoder = ICHLitModule(**encoder["hparams"]).requires_grad_(False) if encoder else None

    def forward(self, batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
        """float32 slice logits [B, L, K] and exam logits [B, K] of a collated batch of series. The network is
        small: it runs in float32 whatever the trainer's precision (bf16 would blur nearby slices' logits)."""
        with torch.autocast(device_type=batch["features"].device.type, enabled=False):
            return self.net(batch["features"].float(), batch["logits"].float(), batch["valid"])

    def predict_step(self, batch: dict, batch_idx: int) -> dict[str, Any]:
        """The scored slices' ids, logits, probabilities and targets (as ICHLitModule's), and per series the exam
        logits and truth."""
        slice_logits, exam_logits = self(batch)
        logits = slice_logits[batch["labelled"]]
        return {"image_id": batch["image_id"], "logits": logits, "probs": self.probabilities(logits),
                "target": batch["target"][batch["labelled"]], "exam_logits": exam_logits,
                "exam_target": batch["exam_target"], "exam_image_id": batch["exam_image_id"]}

    def _step(self, batch: dict, stage: str) -> torch.Tensor:
        slice_logits, exam_logits = self(batch)
        logits, target = slice_logits[batch["labelled"]], batch["target"][batch["labelled"]]
        loss = self.criterion(logits, target)
        if self.task.loss == "bce":  # subtype's slices are all positive: it has no exam level
            loss = loss + self.criterion(exam_logits, batch["exam_target"])
            getattr(self, f"{stage}_exam_auroc").update(exam_logits.detach().sigmoid(), batch["exam_target"].long())
        getattr(self, f"{stage}_metrics").update(self.probabilities(logits.detach()), target.long())
        self.log(f"{stage}/loss", loss, prog_bar=True, batch_size=len(logits), sync_dist=stage != "train")
        return loss

    def epoch_metrics(self, stage: str) -> dict[str, torch.Tensor]:
        """The sequence model's own exam score: its AUROC on the headline output (subtype has no exam level)."""
        if self.task.loss != "bce":
            return {}
        exam = getattr(self, f"{stage}_exam_auroc")
        value = exam.compute().reshape(-1)[self.headline]  # one output: a scalar
        exam.reset()
        return {f"{stage}/{EXAM_SCORE_KEY}": value}

    # --- the exam output's operating point -----------------------------------------------------------

    def exam_probabilities(self, exam_logits: torch.Tensor) -> torch.Tensor:
        """The exam output's probabilities at its own temperature (1 unless calibrated)."""
        return probabilities(self.task, exam_logits, self.exam_temperature.to(exam_logits.device))

    def exam_thresholds(self) -> np.ndarray:
        return self.exam_op_thresholds.cpu().numpy()

    def on_fit_start(self) -> None:
        super().on_fit_start()
        self.exam_temperature.fill_(1.0)
        self.exam_op_thresholds.fill_(self.hparams.threshold)

    def exam_rows(self, trainer: pl.Trainer, loader: DataLoader, ids: list[str], logits: torch.Tensor,
                  targets: torch.Tensor) -> tuple[list[str], np.ndarray, np.ndarray] | None:
        """Each series of `loader` (named by one of its scored slices) with its exam output's probabilities and truth;
        None for subtype, whose exam output is not trained (its slices are all positive)."""
        if self.task.loss != "bce":
            return None
        series, exam_logits, exam_targets = series_exam_logits(trainer.predict(self, dataloaders=loader))
        return series, self.exam_probabilities(exam_logits).numpy(), exam_targets.long().numpy()

    def choose_operating_points(self, trainer: pl.Trainer, loader: DataLoader, table: pd.DataFrame) -> None:
        """The slice operating point as stage 1's; then, for sigmoid tasks, the exam output's temperature (with
        `calibrate`, fitted on the validation series) and its thresholds, chosen on the validation exams."""
        batches = trainer.predict(self, dataloaders=loader)
        self.choose_operating_point(torch.cat([b["logits"] for b in batches]).float().cpu(),
                                    torch.cat([b["target"] for b in batches]).cpu())
        if self.task.loss != "bce":
            return
        series, exam_logits, exam_targets = series_exam_logits(batches)
        calibrated = fit_temperature(exam_logits, exam_targets, "bce") if self.hparams.calibrate else 1.0
        self.exam_temperature.fill_(calibrated)
        patients, studies = slice_groups(table, series)
        exams = exams_of(self.exam_probabilities(exam_logits).numpy(), exam_targets.long().numpy(),
                         np.asarray(series) if studies is None else studies, patients)
        thresholds = choose_thresholds(exams.probs, exams.truth, self.hparams.operating_point,
                                       self.hparams.target_sensitivity, fallback=self.hparams.threshold)
        self.exam_op_thresholds.copy_(torch.as_tensor(thresholds))
        log.info("Exam operating point (%s) on %d validation exams: thresholds %s, temperature %.3f",
                 self.hparams.operating_point, len(exams.study),
                 ", ".join(f"{name} {t:.4f}" for name, t in zip(self.task.outputs, thresholds)), calibrated)


def series_exam_logits(batches: list[dict]) -> tuple[list[str], torch.Tensor, torch.Tensor]:
    """From SequenceLitModule.predict_step's batches: one scored slice id per series, the exam logits [S, K] and
    the exam targets [S, K], on the CPU."""
    series = [image_id for batch in batches for image_id in batch["exam_image_id"]]
    return (series, torch.cat([b["exam_logits"] for b in batches]).float().cpu(),
            torch.cat([b["exam_target"] for b in batches]).float().cpu())


@torch.inference_mode()
def predict_series(model: SequenceLitModule, stacks: torch.Tensor | np.ndarray | None = None, *,
                   embeddings: torch.Tensor | np.ndarray | None = None, logits: torch.Tensor | np.ndarray | None = None,
                   positions: np.ndarray | None = None, batch_size: int = 32) -> tuple[np.ndarray, np.ndarray]:
    """Per-slice probabilities [L, K] (at the model's temperature) and the exam probabilities [K] of one series.

    Args:
        model: `SequenceLitModule.load_from_checkpoint(path)`.
        stacks: the series' slices as the stage-1 model takes them, uint8 [L, C, H, W] (windows x context
            channels, shaped as the checkpoint's `inputs` say); embedded by the encoder the checkpoint carries.
            Or, instead, `embeddings` [L, D] and `logits` [L, K] of the encoder.
        positions: [L] the slices' places along the head; without them the rows must come top to bottom. With
            them the model sees the sorted series and the probabilities come back in the rows' own order.
    """
    if stacks is not None:
        encoder = model.slice_encoder.eval()
        images = torch.as_tensor(stacks)
        parts = [embed(encoder, images[i:i + batch_size].to(model.device), model.hparams.flip)
                 for i in range(0, len(images), batch_size)]
        embeddings, logits = torch.cat([p[0] for p in parts]), torch.cat([p[1] for p in parts])
    if embeddings is None or logits is None:
        raise ValueError("predict_series needs the series' stacks, or its embeddings and logits.")
    embeddings, logits = torch.as_tensor(embeddings).float(), torch.as_tensor(logits).float()
    order = np.argsort(np.asarray(positions), kind="stable") if positions is not None else np.arange(len(embeddings))
    batch = {"features": embeddings[order][None].to(model.device), "logits": logits[order][None].to(model.device),
             "valid": torch.ones(1, len(order), dtype=torch.bool, device=model.device)}
    model.eval()
    slice_logits, exam_logits = model(batch)
    probs = np.empty((len(order), model.task.num_outputs), np.float32)
    probs[order] = model.probabilities(slice_logits[0]).cpu().numpy()
    return probs, model.exam_probabilities(exam_logits[0]).cpu().numpy()


# --- from a config or a checkpoint ----------------------------------------------------------------------


def adopt_task(cfg: DictConfig, task: Task) -> None:
    """Stage 2 predicts what its encoder predicts. The command line's task settings stay when it names that task;
    otherwise those of conf/task/<task>.yaml apply (its monitor selects checkpoints and ends sweeps)."""
    label = task.outputs[0] if task.name == "binary" else None
    if cfg.task.name == task.name:
        node = cfg.task.copy()
    else:
        files = [CONFIG_DIR / "task" / "_common.yaml", CONFIG_DIR / "task" / f"{task.name}.yaml"]
        node = OmegaConf.merge(*(OmegaConf.load(file) for file in files))
        node.pop("defaults", None)
        log.info("Stage 2 takes its encoder's task: task=%s (settings of conf/task/%s.yaml)", task.name, task.name)
    with open_dict(node):
        if label is not None:
            node.label = label
    with open_dict(cfg):
        cfg.task = node


def build_stage_two(cfg: DictConfig) -> tuple[SequenceDataModule, SequenceLitModule]:
    """The data module and module `python train.py model=sequence model.encoder=RUN` trains: task, inputs, data
    and split of the encoder (its run's split.csv when it is beside the checkpoint, else its saved seed)."""
    if OmegaConf.is_missing(cfg.model, "encoder") or not cfg.model.encoder:
        raise ValueError("model=sequence needs its stage-1 model: add model.encoder=outputs/<date>/<time> "
                         "(a run folder of train.py) or a .ckpt.")
    path = checkpoint_file(cfg.model.encoder, "model.encoder",  # a run folder: the checkpoint that run tested
                           "a stage-1 run folder of train.py (outputs/<date>/<time>) or one of its .ckpt files")
    encoder = ICHLitModule.load_from_checkpoint(path, map_location="cpu", weights_only=True)
    inputs, trained = saved_inputs(encoder, path)
    adopt_task(cfg, encoder.task)
    data = data_config(OmegaConf.create({"num_workers": cfg.data.num_workers}), trained, set(), training_run_dir(path),
                       inputs)
    with open_dict(cfg):
        cfg.data = OmegaConf.create(data)  # logged as used: the encoder's data, not the command line's default
    output_dir = Path(cfg.output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    if data.get("split_file"):  # beside the stage-2 checkpoint too, for evaluate.py
        shutil.copyfile(data["split_file"], output_dir / "split.csv")
    reference = {"path": str(path.resolve()), "sha256": file_digest(str(path)), "backbone": encoder.hparams.backbone,
                 "hparams": portable_hparams(dict(encoder.hparams))}
    label = encoder.task.outputs[0] if encoder.task.name == "binary" else None
    slices = ICHDataModule(task=encoder.task.name, label=label, output_dir=str(output_dir), **data)
    settings = OmegaConf.to_container(cfg.model.sequence, resolve=True)
    datamodule = SequenceDataModule(slices, data, reference, lambda: encoder, flip=bool(cfg.model.flip),
                                    batch_size=settings.pop("batch_size"), seed=int(cfg.seed))
    datamodule.prepare_data()
    datamodule.setup()
    model = SequenceLitModule(
        task=encoder.task.name, label=label, features=datamodule.embedding_dim, **settings,
        threshold=float(cfg.task.threshold), operating_point=str(cfg.task.operating_point),
        target_sensitivity=float(cfg.task.target_sensitivity), calibrate=bool(cfg.task.calibrate),
        rsna_weights=bool(cfg.task.get("rsna_weights", False)),
        optimizer=OmegaConf.to_container(cfg.optimizer, resolve=True),
        scheduler=OmegaConf.to_container(cfg.scheduler, resolve=True) if cfg.get("scheduler") else None,
        encoder=reference, flip=bool(cfg.model.flip), inputs=inputs, data=data,
    )
    model.slice_encoder.load_state_dict(encoder.state_dict())
    return datamodule, model


def is_stage_two(checkpoint: Path) -> bool:
    """Whether a .ckpt holds a SequenceLitModule (it references an encoder)."""
    saved = torch.load(checkpoint, map_location="cpu", weights_only=True, mmap=True)
    return "encoder" in saved.get("hyper_parameters", {})


def stage_two_data(model: SequenceLitModule, slices: ICHDataModule, data: dict) -> SequenceDataModule:
    """The series of a stage-2 checkpoint's data for evaluation: cached embeddings, or extracted by the encoder it
    carries."""
    return SequenceDataModule(slices, data, model.hparams.encoder, lambda: model.slice_encoder,
                              flip=model.hparams.flip)


def exam_score_metrics(trainer: pl.Trainer, model: SequenceLitModule, loader: DataLoader) -> dict[str, float]:
    """`test/exam_score_auroc` as the test stage logs it, for evaluate.py (sigmoid tasks; none for subtype)."""
    if model.task.loss != "bce":
        return {}
    auroc = OneVsRestAUROC(model.task.num_outputs, average=None)
    for batch in trainer.predict(model, dataloaders=loader):
        auroc.update(batch["exam_logits"].float().sigmoid(), batch["exam_target"].long())
    return {f"test/{EXAM_SCORE_KEY}": float(auroc.compute().reshape(-1)[model.headline])}
