"""A study's answer: the series a hospital export's study is read on, predicted as the model was trained.

The one function that answers a study (`predict_study`), what predict.py and the DICOM node both call. Each eligible
series is predicted slice by slice as the model was trained (the checkpoint's windows, context and size, through
ich.inference.deploy), its exam probability is its highest slice probability (ich.evaluation.exam), and the study
is answered by the series a fixed rule reads it on (ich.inference.study.read_on: one, or the ranges of a split
protocol), the others listed.
"""

import re
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from ich.data.datamodule import neighbour_rows
from ich.data.dicom import DicomReadError, read_hu, square_hu
from ich.data.index import brain_fraction, head_figures
from ich.data.seen import series_figures
from ich.evaluation.exam import combine_series, series_exam_probabilities
from ich.evaluation.operating import HEADLINE_LABEL, called
from ich.inference.deploy import (EXPORT_FORMATS, HUModel, load_deployed, model_checkpoint, operating_point_chosen,
                                  require_windows)
from ich.inference.study import TOO_FEW_SLICES, Series, Study, read_on
from ich.training.sequence import SequenceLitModule, is_stage_two, predict_series


@dataclass
class SeriesResult:
    """One predicted series: its slices as read (in position order), their probabilities and its exam score."""

    series: Series
    positions: np.ndarray  # mm along the slice normal, per slice read
    probs: np.ndarray  # float32 [N, K]
    hu: np.ndarray  # int16 [N, S, S] as the model read them (kept for the figures of the series read)
    stacks: np.ndarray  # int [N, 2k+1]: each slice's context rows
    exam: np.ndarray  # float [K]: the series' exam probability per output (Predictor.exam_rule)
    figures: dict[str, float]  # what training's series are compared on (ich.data.seen.series_figures)


@dataclass
class StudyResult:
    study: Study
    results: list[SeriesResult]  # every eligible series predicted
    read: list[SeriesResult]  # the series the study is read on (ich.inference.study.read_on), in position order

    @property
    def exam(self) -> np.ndarray:
        """The study's exam probability per output: the highest of the series it is read on (ich.evaluation.exam)."""
        return combine_series([result.exam for result in self.read])

    def is_read(self, result: SeriesResult) -> bool:
        """Whether the study is read on this series (by identity: results holding arrays do not compare by value)."""
        return any(result is one for one in self.read)


# --- the model, whichever file it comes in ------------------------------------------------------------


@dataclass(frozen=True)
class Predictor:
    """What prediction needs of a model: its outputs and thresholds, how its inputs are made, and one call per
    series. A stage-1 model (a checkpoint or an exported file, through ich.inference.deploy) scores each slice alone and its
    exam is its highest slice; a stage-2 sequence model (ich.training.sequence) reads the whole ordered series."""

    labels: tuple[str, ...]
    thresholds: np.ndarray  # [K], a slice probability at or above its threshold is called
    exam_thresholds: np.ndarray  # [K], the same for a study's exam probability (ich.evaluation.exam)
    thresholds_chosen: bool  # chosen on the validation patients; False: the fixed threshold, no operating point
    task: str
    inputs: dict  # windows, context, image_size (the checkpoint's, or its encoder's)
    source: Path
    exam_rule: str  # how a series' exam probability is made, in words for the report
    # int16 HU [N, S, S] in position order, each slice's context rows [N, 2k+1], positions [N], whether each slice
    # counts in the exam [N] (ich.evaluation.exam: the slices training would have tested) -> slice probabilities [N, K] and
    # exam probabilities [K]
    series: Callable[[np.ndarray, np.ndarray, np.ndarray, np.ndarray], tuple[np.ndarray, np.ndarray]]
    module: HUModel | None = None  # the stage-1 torch model that heat maps take gradients of; None: no heat maps


def load_predictor(ckpt_path: str, batch_size: int) -> Predictor:
    """A run folder, a .ckpt (stage 1 or a stage-2 sequence model), or an exported .onnx / .pt file."""
    path = Path(ckpt_path).expanduser()
    if path.suffix not in EXPORT_FORMATS:
        checkpoint = model_checkpoint(path)
        if is_stage_two(checkpoint):
            return sequence_predictor(checkpoint, batch_size)
    deployed = load_deployed(path)

    def series(hu: np.ndarray, stacks: np.ndarray, positions: np.ndarray,
               scored: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        probs = np.concatenate([deployed(hu[stacks[start:start + batch_size]])
                                for start in range(0, len(stacks), batch_size)])
        return probs, series_exam_probabilities(probs[scored])

    return Predictor(labels=tuple(deployed.labels), thresholds=deployed.thresholds, exam_thresholds=deployed.thresholds,
                     thresholds_chosen=deployed.thresholds_chosen, task=deployed.task, inputs=deployed.inputs,
                     source=deployed.source, exam_rule="its highest slice probability", series=series,
                     module=deployed.module)


def sequence_predictor(checkpoint: Path, batch_size: int) -> Predictor:
    """A stage-2 checkpoint: the encoder it carries makes each slice's features, the sequence model reads the series;
    slices are called at its slice thresholds, exams at its exam output's own."""
    model = SequenceLitModule.load_from_checkpoint(checkpoint, map_location="cpu", weights_only=True).eval()
    require_windows(model.hparams.inputs, f"{checkpoint} was trained over an encoder of", "its encoder")
    if model.task.loss != "bce":
        raise ValueError(f"{checkpoint} is a stage-2 subtype model, whose exam output is not trained: predict with the "
                         "stage-1 subtype run it was trained on (model.encoder) instead.")
    encoder = HUModel(model.slice_encoder).eval()  # the encoder's inputs made from HU, as ich.inference.deploy makes them
    thresholds = model.op_thresholds.cpu().numpy().astype(np.float32)
    temperature = float(model.temperature)

    def series(hu: np.ndarray, stacks: np.ndarray, positions: np.ndarray,
               scored: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        # the exam output reads the whole series, blank slices included, as in training (ich.training.sequence)
        with torch.inference_mode():
            planes = torch.cat([encoder.planes(torch.from_numpy(hu[stacks[start:start + batch_size]]))
                                for start in range(0, len(stacks), batch_size)])
        return predict_series(model, planes, positions=positions, batch_size=batch_size)

    return Predictor(labels=tuple(model.task.outputs), thresholds=thresholds, exam_thresholds=model.exam_thresholds(),
                     thresholds_chosen=operating_point_chosen(thresholds, float(model.hparams.threshold), temperature),
                     task=model.task.name, inputs=dict(model.hparams.inputs), source=checkpoint,
                     exam_rule="the sequence model's exam output over the ordered series", series=series,
                     module=encoder)


def require_study_inputs(model: Predictor) -> None:
    """Studies are read as the model's training read its data: which modalities, and which slices count."""
    if not {"modalities", "min_brain_fraction"} <= set(model.inputs):
        raise ValueError(f"{model.source} does not say which DICOM modalities and slices its training read (it "
                         "predates ich 2026-12): train it again with this version of ich.")


def figures_of(key: str, positions: np.ndarray, measured: list[dict[str, float]]) -> dict[str, float]:
    """A series' figures from its slices as read (in position order), by the rule that made training's."""
    slices = pd.DataFrame(measured).assign(series=key, position=positions, slice_index=np.arange(len(positions)))
    return series_figures(slices).iloc[0].to_dict()


def failure_reason(err: Exception) -> str:
    """Why a study failed, in one line without identifiers: paths and UIDs in the message are replaced."""
    text = re.sub(r"\S*[/\\]\S*", "<path>", " ".join(str(err).split()))
    text = re.sub(r"\b\d+(\.\d+){3,}\b", "<uid>", text)
    return f"{type(err).__name__}: {text}"[:200] if text else type(err).__name__


def predict_study(study: Study, model: Predictor, min_slices: int) -> StudyResult:
    """Predict each eligible series of one study and the series it is read on (ich.inference.study.read_on).

    A slice whose pixels do not read is left out and listed; a series left with fewer than `min_slices` slices
    is skipped as too_few_slices. Slices with less brain than the checkpoint's data.min_brain_fraction are
    predicted and drawn but count in no exam, as they were no test slices in training; a series without one other
    slice is skipped as blank.
    """
    results = []
    size, context = int(model.inputs["image_size"]), int(model.inputs["context"])
    min_brain = float(model.inputs["min_brain_fraction"])
    for series in study.eligible:
        planes, kept, brain, measured = [], [], [], []
        for image in series.slices:
            try:
                hu = read_hu(image.path)
                brain.append(brain_fraction(hu))  # at full resolution, as the index measures it for training
                measured.append({"field_of_view_mm": image.field_of_view, **head_figures(hu)})
                planes.append(square_hu(hu, size))
                kept.append(image)
            except DicomReadError as err:
                detail = str(err).replace(str(image.path), "the file")  # a path may name the patient
                series.left_out.append(replace(image, reason=err.reason, detail=detail))
        series.slices = kept
        if len(kept) < min_slices:
            series.reason, series.detail = "too_few_slices", TOO_FEW_SLICES
            continue
        scored = np.array(brain) >= min_brain
        if not scored.any():
            series.reason = "blank"
            series.detail = (f"no slice with at least {min_brain:g} of its pixels in the brain's HU range (the "
                             "checkpoint's data.min_brain_fraction)")
            continue
        hu = np.stack(planes)
        order = pd.DataFrame({"series": series.key, "slice_index": np.arange(len(kept)), "series_length": len(kept)})
        stacks = neighbour_rows(order, context)  # training's rule: true neighbours, the edge slice repeated
        positions = np.array([image.position for image in kept])
        probs, exam = model.series(hu, stacks, positions, scored)
        figures = figures_of(series.key, positions, measured)
        results.append(SeriesResult(series, positions, probs, hu, stacks, exam, figures))
    predicted = {id(result.series): result for result in results}  # Series are mutable: keyed by identity
    answer = StudyResult(study, results, [predicted[id(series)] for series in read_on([r.series for r in results])])
    for result in results:  # only the pixels of the series read are drawn; the others' are freed now
        if not answer.is_read(result):
            result.hu = result.hu[:0]
    return answer


# --- what a study's numbers say ---------------------------------------------------------------------


def headline_output(labels: tuple[str, ...], task: str, exam: np.ndarray) -> int:
    """The output a study's verdict and heat maps follow: `any`, a binary model's one label, or (subtype) the
    most probable subtype."""
    if task == "subtype":
        return int(np.argmax(exam))
    return labels.index(HEADLINE_LABEL) if HEADLINE_LABEL in labels else 0


def verdict(labels: tuple[str, ...], task: str, exam: np.ndarray, thresholds: np.ndarray) -> tuple[str, bool]:
    """The study's answer in words, and whether it is positive (at the thresholds, as every decision here)."""
    decided = called(exam, thresholds)
    headline = headline_output(labels, task, exam)
    if task == "subtype":  # a softmax over the five subtypes says which kind, assuming there is a hemorrhage
        return f"most likely {labels[headline]} (a subtype model assumes a hemorrhage)", True
    name = "hemorrhage" if labels[headline] == HEADLINE_LABEL else labels[headline]
    others = [label for label, on in zip(labels, decided) if on and label != labels[headline]]
    if decided[headline]:
        return name + (f": {', '.join(others)}" if others else ""), True
    if others:
        return f"no {name} by `{labels[headline]}`; {', '.join(others)} above threshold", False
    return f"no {name}", False
