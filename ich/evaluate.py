"""Evaluate one trained checkpoint: `run(cfg)` is what `python evaluate.py ckpt_path=PATH` calls.

The checkpoint says how its inputs were made (windows, context, image size, normalisation), which
data it was trained on, and its operating thresholds and temperature, so the .ckpt file alone is
enough: by default it is tested on its training data's test patients (the run's split.csv when the run
folder is still beside it, else the same split drawn again from the saved seed). Other data can be
chosen (`data=rsna data.root=DIR`): the input is still shaped as in training, and a dataset other than
training's is used whole as an external test set. Data options that contradict the checkpoint are
refused. Everything goes to the evaluation's own folder; a training run is only read.
"""

import logging
import math
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pandas as pd
import pytorch_lightning as pl
import torch
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, OmegaConf

from ich.core.hardware import resolve_trainer
from ich.core.privacy import pseudonym
from ich.core.results import predictions_table, print_metrics, write_json
from ich.core.runs import checkpoint_file, data_config, saved_inputs, training_run_dir
from ich.core.tasks import LABELS, Task
from ich.data.datamodule import ICHDataModule
from ich.data.index import add_slice_order
from ich.data.multi import data_parts
from ich.data.encoding import parse_encoding_windows
from ich.data.seen import TrainingSource, announce, ood_table
from ich.data.windows import parse_windows, window_pairs
from ich.evaluation.exam import exam_metrics, exam_table, exams_of, report_exams, stage_exams
from ich.evaluation.html_report import CHOSEN_ON_VALIDATION, write_evaluation_report
from ich.evaluation.metrics import metrics_at_once
from ich.evaluation.operating import headline_output, honest_metrics, one_vs_rest, slice_groups, source_metrics
from ich.evaluation.plots import save_figures, save_reliability_diagram
from ich.inference.study import files_read
from ich.training.module import ICHLitModule, SliceClassifier, predict_logits
from ich.training.sequence import SequenceLitModule, exam_score_metrics, is_stage_two, stage_two_data

log = logging.getLogger(__name__)

# Kaggle scores log loss: a probability of exactly 0 or 1 on a wrong answer would cost infinity.
SUBMISSION_CLIP = 1e-6


def run(cfg: DictConfig, overrides: Sequence[str] | None = None) -> dict[str, float]:
    """Test the checkpoint `cfg.ckpt_path`; returns the flat metrics also written to metrics.json.

    `overrides` are the command-line overrides (`data.image_size=128`, ...); by default Hydra's own,
    and none when the config was composed outside a Hydra app (tests, notebooks).
    """
    if overrides is None:
        overrides = HydraConfig.get().overrides.task if HydraConfig.initialized() else ()
    checkpoint = checkpoint_path(cfg)
    pl.seed_everything(cfg.seed, workers=True)
    output_dir = Path(cfg.output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)

    stage_two = is_stage_two(checkpoint)  # a sequence model over a stage-1 checkpoint's series (ich.training.sequence)
    model = (SequenceLitModule if stage_two else ICHLitModule).load_from_checkpoint(checkpoint, map_location="cpu",
                                                                                     weights_only=True)
    task = model.task
    test_dir = submission_folder(cfg, task)
    if stage_two and (test_dir is not None or cfg.get("study_labels")):
        raise ValueError("test_dir and study_labels take stage-1 checkpoints for now: pass the stage-2 model's encoder "
                         "run as ckpt_path.")
    local = float(cfg.get("local_operating_point") or 0)
    if local and (stage_two or cfg.get("study_labels") or not 0 < local < 1):
        raise ValueError(f"local_operating_point={local:g} takes a share between 0 and 1 of the test patients, for a "
                         "stage-1 checkpoint tested on slice labels (not study_labels, not stage 2).")
    run_dir = training_run_dir(checkpoint)
    inputs, trained = saved_inputs(model, checkpoint)
    source = announce(inputs)
    data = data_config(cfg, trained, command_line_keys(overrides), run_dir, inputs)
    for part in data_parts(data):  # each source of data=multi
        check_inputs(inputs, part)
    label = task.outputs[0] if task.name == "binary" else None
    datamodule = ICHDataModule(task=task.name, label=label, output_dir=str(output_dir), **data)
    if cfg.get("study_labels"):
        return evaluate_studies(cfg, model, datamodule, output_dir, source)
    slices = datamodule  # what the report's tiles are read from
    if stage_two:
        datamodule = stage_two_data(model, slices, data)
    datamodule.prepare_data()
    datamodule.setup()
    if not len(datamodule.datasets["test"]):
        raise ValueError(f"The test split holds no slices for task={task.name}: evaluate on more data (data.root=DIR).")
    if data["split_file"] is None:
        warn_if_seen_in_training(datamodule.tables["test"]["image_id"], run_dir / "split.csv")

    trainer = prediction_trainer(cfg, output_dir, model)
    loader, table = datamodule.predict_dataloader(), datamodule.tables["test"]
    ids, logits, targets = predict_logits(trainer, model, loader)
    chosen_on = CHOSEN_ON_VALIDATION
    if local:
        ids, logits, targets, chosen_on = choose_locally(cfg, model, table, ids, logits, targets, local)
    probs = model.probabilities(logits)  # at the checkpoint's temperature

    metrics = compute_metrics(task, float(model.hparams.threshold), probs, targets)
    patients, _ = slice_groups(table, ids)
    temperature = float(model.temperature)
    metrics.update(honest_metrics(task, logits, targets, model.op_thresholds.cpu().numpy(), temperature, patients,
                                  resamples=int(cfg.bootstrap), seed=int(cfg.seed)))
    metrics.update(source_metrics(task, logits, targets, model.op_thresholds.cpu().numpy(), temperature, table, ids,
                                  resamples=int(cfg.bootstrap), seed=int(cfg.seed)))
    exams = stage_exams(model, trainer, loader, table, ids, logits, targets)
    metrics.update(report_exams(task, exams, model.exam_thresholds(), output_dir, int(cfg.bootstrap), int(cfg.seed)))
    if stage_two:
        metrics.update(exam_score_metrics(trainer, model, loader))
    metrics["data/slices_test"] = float(len(ids))
    if local:
        metrics["data/local_op_slices"] = float(len(table) - len(ids))
    flags = test_series_flags(slices, inputs, output_dir)
    metrics.update(flag_counts(flags))
    write_json(output_dir / "metrics.json", metrics, first={"training_source": source.text})
    table = predictions_table(task, ids, datamodule.tables["test"].set_index("image_id")["patient"], probs, targets)
    table.to_csv(output_dir / "predictions.csv", index=False)
    save_figures(output_dir, task, float(model.hparams.threshold), probs, targets)
    save_reliability_diagram(output_dir / "reliability.png", task, logits, targets, temperature)
    name = model.hparams.get("backbone", "sequence")
    write_evaluation_report(output_dir / "report.html", title=f"{task.name} / {name}: evaluation",
                            checkpoint=checkpoint, data=f"{data['source']} {data.get('root') or ''}".strip(),
                            model=model, datamodule=slices, metrics=metrics, predictions=table, ood=flags,
                            chosen_on=chosen_on)

    if test_dir is not None:
        write_submission(output_dir / "submission.csv", trainer, model, datamodule, test_dir)
    print_metrics(metrics, title=f"{task.name} / {name} on {len(ids)} test slices -> {output_dir}")
    return metrics


def choose_locally(cfg: DictConfig, model: ICHLitModule, table: pd.DataFrame, ids: list[str], logits: torch.Tensor,
                   targets: torch.Tensor, share: float) -> tuple[list[str], torch.Tensor, torch.Tensor, str]:
    """local_operating_point: the model's thresholds chosen again, by its own rule (task.operating_point), on a
    seeded `share` of these test patients, as on validation in training; returns the other patients' slices to
    test, and where the thresholds were chosen, in words. A model moving to another hospital keeps its weights and
    takes that hospital's operating point."""
    patients, _ = slice_groups(table, ids)
    names = np.unique(patients)
    if len(names) < 2:
        raise ValueError(f"local_operating_point={share:g} needs two patients or more, to choose on some and test on "
                         f"the others; this data has {len(names)}: evaluate on more patients.")
    count = min(len(names) - 1, max(1, round(share * len(names))))
    here = np.isin(patients, np.random.default_rng(int(cfg.seed)).permutation(names)[:count])
    truth = one_vs_rest(model.task, targets.numpy())
    headline = headline_output(model.task) or 0
    if truth[here, headline].min() == truth[here, headline].max():
        raise ValueError(f"local_operating_point={share:g} chose {count} of {len(names)} patients, whose slices lack "
                         f"{'a positive' if truth[here, headline].max() == 0 else 'a negative'} "
                         f"{model.task.outputs[headline]} slice: give a larger share, or evaluate on more patients.")
    before = model.op_thresholds.clone()
    thresholds = model.choose_thresholds(logits[here], targets[here])
    log.info("Local operating point (%s) on %d of %d patients (%d slices): thresholds %s (the checkpoint's: %s); "
             "tested on the other %d", model.hparams.operating_point, count, len(names), int(here.sum()),
             ", ".join(f"{t:.4f}" for t in thresholds), ", ".join(f"{t:.4f}" for t in before.tolist()),
             len(names) - count)
    rest = np.flatnonzero(~here)
    where = f"{count} of these {len(names)} patients (local_operating_point={share:g}), the others tested"
    return [ids[i] for i in rest], logits[rest], targets[rest], where


# --- which checkpoint, which data ---------------------------------------------------------------------


def prediction_trainer(cfg: DictConfig, output_dir: Path, model: SliceClassifier) -> pl.Trainer:
    """The Trainer that predicts: on `cfg.accelerator`'s devices at `cfg.precision`, by default the checkpoint's own
    (its test stage's; a stage-2 network runs in float32 whatever it is), saving nothing."""
    chosen = cfg.precision if cfg.precision is not None else model.hparams.get("precision", "32-true")
    precision = resolve_trainer({"accelerator": cfg.accelerator, "precision": chosen})["precision"]
    return pl.Trainer(accelerator=cfg.accelerator, devices=cfg.devices, precision=precision, logger=False,
                      enable_checkpointing=False, default_root_dir=str(output_dir))


def checkpoint_path(cfg: DictConfig) -> Path:
    example = "e.g. ckpt_path=outputs/<date>/<time> (its best checkpoint) or a .ckpt in its checkpoints/"
    if OmegaConf.is_missing(cfg, "ckpt_path") or not cfg.ckpt_path:
        raise ValueError(f"Evaluation needs a checkpoint: pass ckpt_path=PATH to a run folder or .ckpt of train.py, {example}.")
    return checkpoint_file(cfg.ckpt_path, "ckpt_path", f"a .ckpt written by train.py, {example}")


def submission_folder(cfg: DictConfig, task: Task) -> Path | None:
    """Check `test_dir` before any work is done: only a six-label checkpoint can fill a Kaggle submission."""
    if not cfg.get("test_dir"):
        return None
    if task.outputs != LABELS:
        raise ValueError(
            f"test_dir writes an RSNA submission, which needs all six labels: train with task=multilabel "
            f"(this checkpoint is task={task.name})."
        )
    test_dir = Path(cfg.test_dir).expanduser()
    if not test_dir.is_dir():
        raise FileNotFoundError(
            f"test_dir={cfg.test_dir} does not exist: point it at a folder of DICOMs (Kaggle stage_2_test/)."
        )
    return test_dir


def command_line_keys(overrides: Sequence[str]) -> set[str]:
    """The config keys set on the command line: `+data.context=1` -> `data.context`."""
    return {override.lstrip("+~").split("=", 1)[0] for override in overrides}


def check_inputs(inputs: dict, data: dict) -> None:
    """Refuse data whose slices cannot be made into the checkpoint's inputs, naming the option that would fix it.

    The checkpoint's windows decide (ich.data.encoding): HU data (DICOM, NIfTI, data.encoding=hu images) is windowed
    with them; windowed images must have been made with them; a model of images of an unknown window (no windows)
    reads only windowed images.
    """
    needed = inputs["windows"]
    encoding = data.get("encoding", "none") if data["source"] == "images" else "hu"
    if encoding == "hu" and needed is None:
        raise ValueError("The checkpoint was trained on PNG/JPG slices of an unknown window (data.encoding=none), so "
                         "it has no window to apply to HU data: train it again with data.encoding=window "
                         "data.encoding_window=[CENTRE,WIDTH], the window its images were made with.")
    if encoding == "none" and needed is not None:
        raise ValueError(f"The checkpoint takes planes of the windows {needed} (centre, width) and these images' "
                         f"window is unknown: set data.encoding=window data.encoding_window={_as_option(needed)} if "
                         "they were made with it, or data.encoding=hu if their pixels are HU.")
    if encoding == "window" and needed is not None:
        made = window_pairs(parse_encoding_windows(data["encoding_window"]))
        if made != needed:
            raise ValueError(f"These images were windowed with {made} (data.encoding_window) and cannot be windowed "
                             f"again into the checkpoint's {needed}: evaluate it on HU data (DICOMs, or images with "
                             "data.encoding=hu) or on images made with its windows.")
    given = {"context": int(data["context"]), "image_size": int(data["image_size"])}
    if encoding == "hu":
        given["windows"] = window_pairs(parse_windows(data["windows"]))
    for key, value in given.items():
        if value != inputs[key]:
            raise ValueError(f"data.{key}={value} differs from the checkpoint's {inputs[key]}: the model only knows "
                             f"inputs made as in training, so leave data.{key} out or set it to {inputs[key]}.")


def _as_option(pairs: list[list[float]]) -> str:
    """[centre, width] pairs as a command line takes them: [40,80] for one window, [[40,80],[80,200]] for several."""
    written = [f"[{center:g},{width:g}]" for center, width in pairs]
    return written[0] if len(written) == 1 else f"[{','.join(written)}]"


def warn_if_seen_in_training(image_ids: pd.Series, split_csv: Path) -> None:
    """External data that shares slices with training's train/val patients flatters the model: say so."""
    if not split_csv.is_file():
        return
    split = pd.read_csv(split_csv, dtype=str)
    seen = image_ids.isin(split.loc[split["split"] != "test", "image_id"])
    if seen.any():
        log.warning(
            "%d of the %d test slices were train/val slices of the training run, so these metrics are optimistic; "
            "if this is the training data at another path, pass data.split_file=%s to test its test patients only.",
            int(seen.sum()), len(image_ids), split_csv,
        )


def test_series_flags(datamodule: ICHDataModule, inputs: dict, output_dir: Path) -> pd.DataFrame:
    """Each test series' figures and whether it lies outside what the checkpoint saw in training (ich.data.seen),
    written to series_ood.csv (series by pseudonym): on external data, how often and why the flag fires there. Image
    folders have no figures (ICHDataModule.seen): none of their series is checked."""
    index = datamodule.index
    checked = datamodule.source != "images"
    test = index[index["series"].isin(datamodule.tables["test"]["series"])] if checked else index.iloc[:0]
    flags = ood_table(test, inputs)
    flags.to_csv(output_dir / "series_ood.csv", float_format="%.6g")
    return flags


def flag_counts(flags: pd.DataFrame) -> dict[str, float]:
    """metrics.json's counts of an ood_table: series checked, flagged, and their share (null when unknown)."""
    checked = flags["ood"].dropna()
    return {"data/series_test": float(len(flags)), "data/ood_series": float(checked.sum()) if len(checked) else math.nan,
            "data/ood_series_share": float(checked.mean()) if len(checked) else math.nan}


# --- predictions and what is made of them ---------------------------------------------------------


def compute_metrics(task: Task, threshold: float, probs: torch.Tensor, targets: torch.Tensor) -> dict[str, float]:
    """The training test stage's collection on all predictions at once, so the names match (`test/auroc`, ...)."""
    metrics = metrics_at_once(task, threshold, probs, targets, prefix="test/")
    undefined = [name for name, value in metrics.items() if math.isnan(value)]
    if undefined:
        log.warning("Undefined on these slices (a class absent), written as null: %s", ", ".join(undefined))
    return metrics


def write_submission(
    path: Path, trainer: pl.Trainer, model: ICHLitModule, datamodule: ICHDataModule, test_dir: Path
) -> None:
    """Kaggle's `ID,Label` rows, six per image (`ID_<hex>_<label>`), for the unlabelled DICOMs of `test_dir`."""
    ids, logits, _ = predict_logits(trainer, model, datamodule.folder_dataloader(test_dir))
    rows = submission_rows(ids, model.probabilities(logits))
    rows.to_csv(path, index=False, float_format="%.6g")
    missing = sorted({file.stem for file in test_dir.rglob("*.dcm")} - set(ids))
    if missing:
        log.warning(
            "%d DICOMs of %s could not be read and have no rows in %s (Kaggle rejects a submission without them): %s",
            len(missing), test_dir, path.name, ", ".join(missing[:10]),
        )
    log.info("Wrote %d rows for %d images to %s", len(rows), len(ids), path)


def submission_rows(ids: list[str], probs: torch.Tensor) -> pd.DataFrame:
    """Six `ID,Label` rows per image in LABELS order, probabilities clipped away from 0 and 1."""
    clipped = probs.double().clamp(SUBMISSION_CLIP, 1 - SUBMISSION_CLIP).numpy()
    names = [f"{image_id}_{label}" for image_id in ids for label in LABELS]
    return pd.DataFrame({"ID": names, "Label": clipped.reshape(-1)})


# --- study-level truth (CQ500) ---------------------------------------------------------------------


def evaluate_studies(cfg: DictConfig, model: ICHLitModule, datamodule: ICHDataModule, output_dir: Path,
                     source: TrainingSource) -> dict[str, float]:
    """Test a checkpoint against study-level truth instead of slice labels (CQ500: three radiologists' reads).

    Each study under `study_images` is read on the series predict.py reads it on (ich.inference.study.read_on); a study is
    an exam (ich.evaluation.exam) scored on `any` and called at the checkpoint's exam threshold. Writes metrics.json (exam
    AUROC, sensitivity and specificity with intervals over resampled patients, as every interval; first, what the model
    was trained on) and exams.csv, with each study's out-of-distribution flag as predict.py gives it.
    """
    if not isinstance(model, ICHLitModule):
        raise ValueError("study_labels tests the exam score of a slice model: pass a stage-1 checkpoint as ckpt_path.")
    task = model.task
    if "any" not in task.outputs:
        raise ValueError(f"Study-level truth is about any hemorrhage, which this checkpoint ({task.name}: "
                         f"{', '.join(task.outputs)}) does not predict: evaluate one trained on `any`.")
    if not cfg.get("study_images"):
        raise ValueError("study_labels needs study_images=DIR, the folder of those studies' DICOMs.")
    images = Path(cfg.study_images).expanduser()
    truth = read_study_labels(Path(cfg.study_labels).expanduser(), str(cfg.study_id), list(cfg.study_reads))
    index = datamodule.folder_index(images)
    # each study scored on the series predict.py reads it on (ich.inference.study.read_on), not on scouts, bone or perfusion;
    # min_slices=1: a labelled study is scored on whatever series it has, however short
    read = files_read(index["path"].tolist(), min_slices=1, modalities=datamodule.modalities)
    index = add_slice_order(index[index["path"].isin({str(path) for path in read})])
    study = study_of_slices(index, truth, images, str(cfg.study_id))

    dataset = datamodule.folder_dataset(index, ids=np.arange(len(index)))  # file names repeat across series
    ids, logits, _ = predict_logits(prediction_trainer(cfg, output_dir, model), model, datamodule.loader(dataset))
    rows = np.array([int(i) for i in ids])
    labelled = pd.notna(study.to_numpy(dtype=object)[rows])
    rows, names = rows[labelled], study.to_numpy(dtype=object)[rows[labelled]].astype(str)
    output = task.outputs.index("any")
    probs = model.probabilities(logits[labelled])[:, [output]].double().numpy()
    exams = exams_of(probs, truth.loc[names].to_numpy()[:, None], names, index["patient"].to_numpy()[rows])
    threshold = model.exam_thresholds()[[output]]
    metrics = exam_metrics(exams, 0, float(threshold[0]), int(cfg.bootstrap), int(cfg.seed))
    metrics.update({"data/slices_test": float(len(ids)), "data/exams_positive": float(exams.truth.sum()),
                    "data/exams_unmatched": float(len(set(truth.index) - set(names))),
                    "data/exams_unlabelled": float(index.loc[study.isna(), "study"].nunique())})
    flags = study_flags(index, study, model.hparams.inputs)
    metrics.update({"data/exams_ood": float(flags.loc[exams.study, "ood"].sum(min_count=1))})
    write_json(output_dir / "metrics.json", metrics, first={"training_source": source.text})
    table = exam_table(exams, ("any",), threshold, keyed=False)
    table[["ood", "ood_reason"]] = flags.loc[exams.study, ["ood", "ood_reason"]].to_numpy()
    table.to_csv(output_dir / "exams.csv", index=False, float_format="%.9g")
    print_metrics(metrics, title=f"{task.name} on {len(exams.study)} studies of {images} -> {output_dir}")
    return metrics


def study_flags(index: pd.DataFrame, study: pd.Series, inputs: dict) -> pd.DataFrame:
    """Per study of the truth CSV (by its id), `ood` and `ood_reason` over the series it is read on, as predict.py
    flags a study: 1 when any of them lies outside the training ranges (ich.data.seen), nan when unknown."""
    flags = ood_table(index, inputs)
    named = pd.DataFrame({"series": index["series"].to_numpy(), "study": study.to_numpy()}).dropna()
    flags = flags.join(named.drop_duplicates("series").set_index("series"), how="inner")
    return flags.groupby("study").agg(ood=("ood", "max"),  # nan only where every series is unknown
                                      ood_reason=("ood_reason", lambda said: "; ".join(sorted(set(filter(None, said))))))


def read_study_labels(path: Path, id_column: str, reads: list[str]) -> pd.Series:
    """Study id -> 0/1 truth: positive when more than half of the `reads` columns say 1 (CQ500: two of three)."""
    if not path.is_file():
        raise FileNotFoundError(f"study_labels={path} does not exist: pass the CSV of study-level truth (CQ500: reads.csv).")
    table = pd.read_csv(path, dtype={id_column: str})
    missing = [column for column in (id_column, *reads) if column not in table.columns]
    if missing:
        raise ValueError(f"{path} has no column {', '.join(missing)}: set study_id to its study column and study_reads "
                         f"to its 0/1 read columns (present: {', '.join(table.columns[:12])}).")
    values = table[reads].apply(pd.to_numeric, errors="coerce")
    if not values.isin([0, 1]).all().all():
        raise ValueError(f"{path}: the study_reads columns {reads} must hold 0 or 1 in every row.")
    ids = table[id_column].astype(str).str.strip()
    if ids.duplicated().any():
        raise ValueError(f"{path}: study {ids[ids.duplicated()].iloc[0]} has several rows; keep one per study.")
    return pd.Series((values.sum(axis=1) * 2 > len(reads)).astype(int).to_numpy(), index=ids.to_numpy())


def study_of_slices(index: pd.DataFrame, truth: pd.Series, images: Path, id_column: str) -> pd.Series:
    """Per slice of a folder index, the id of its study in the truth CSV (NaN where the CSV has none). The ids
    are PatientIDs or StudyInstanceUIDs, matched through their pseudonyms, whichever matches more slices."""
    ids = {pseudonym(name): name for name in truth.index}
    column = max(("study", "patient"), key=lambda name: int(index[name].isin(list(ids)).sum()))
    study = index[column].map(ids)
    if study.isna().all():
        raise ValueError(f"None of the {len(truth)} studies of study_labels is the PatientID or StudyInstanceUID of a "
                         f"DICOM under {images}: set study_id (now {id_column}) to the column that holds them.")
    return study
