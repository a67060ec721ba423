"""Predict every study of a new DICOM folder: `run(cfg)` is what `python predict.py ckpt_path=... input=...` calls.

The folder is read as a hospital exports it (ich.inference.study): files are grouped by study and series from their
headers alone, and each study is read on its axial CT series, the others skipped with their reason. Each study is
answered by ich.inference.answer.predict_study, as the DICOM node answers it. A study that fails is listed as failed,
and the others go on. It streams: one study's pixels at a time, no index and no slice cache of the folder.

Outputs, in the run's own folder (ich.inference.outputs): studies.csv, slices.csv, series.csv, skipped_files.csv,
heatmaps/ and report.html, with pseudonyms unless keep_ids=true. Each says first what the model was trained on, and
flags a study outside what it saw in training (ich.data.seen).
"""

import logging
from pathlib import Path

import pandas as pd
from omegaconf import DictConfig, OmegaConf
from tqdm.auto import tqdm

from ich.data.seen import announce
from ich.inference.answer import failure_reason, load_predictor, predict_study, require_study_inputs
from ich.inference.outputs import Outputs
from ich.inference.study import input_folder, scan_folder

log = logging.getLogger(__name__)


def run(cfg: DictConfig) -> pd.DataFrame:
    """Predict every study under `cfg.input` with `cfg.ckpt_path`; returns studies.csv as a table."""
    for key in ("ckpt_path", "input"):
        if OmegaConf.is_missing(cfg, key) or not cfg[key]:
            raise ValueError(f"predict.py needs {key}=PATH: e.g. python predict.py ckpt_path=outputs/<date>/<time> "
                             "input=/data/exports/2026-12-01")
    if int(cfg.min_slices) < 1 or int(cfg.batch_size) < 1:
        raise ValueError(f"min_slices={cfg.min_slices} and batch_size={cfg.batch_size} count slices: give each at least 1.")
    model = load_predictor(str(cfg.ckpt_path), int(cfg.batch_size))
    announce(model.inputs)
    output_dir = Path(cfg.output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    keep_ids = bool(cfg.keep_ids)
    if keep_ids:
        log.warning("keep_ids=true: studies.csv, slices.csv, skipped_files.csv and report.html carry StudyInstanceUID, "
                    "AccessionNumber and file paths; keep them inside the hospital.")
    outputs = Outputs(model, output_dir, keep_ids, int(cfg.heatmaps))
    with input_folder(cfg.input) as folder:
        require_study_inputs(model)
        scan = scan_folder(folder, int(cfg.min_slices), model.inputs["modalities"])
        if not scan.files:
            raise FileNotFoundError(f"input={cfg.input} holds no files: pass the folder (or .zip) the DICOMs were exported to.")
        log.info("%d files: %d studies, %d files in no study", scan.files, len(scan.studies), len(scan.loose))
        for study in tqdm(scan.studies, desc="Predicting studies", unit="study", disable=None):
            try:
                outputs.add(predict_study(study, model, int(cfg.min_slices)), folder)
            except Exception as err:  # the study's boundary: whatever breaks one study must not cost the others
                reason = failure_reason(err)
                log.error("Study %s failed and is listed as failed: %s", study.key, reason)
                outputs.add_failed(study, reason, folder)
        outputs.finish(scan, str(cfg.input) if keep_ids else None)
    return outputs.studies_table()
