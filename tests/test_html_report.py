"""report.html and summary.html (ich.evaluation.html_report): self-contained, no identifiers, every section; and in Chromium."""

import base64
import re

import matplotlib.image
import numpy as np
import pandas as pd
import pytest

from conftest import open_in_chromium
from ich.core.privacy import pseudonym
from ich.core.tasks import SUBTYPES
from ich.evaluation.html_report import worst_cases, write_report, write_summary

SECTIONS = {"about": "What was evaluated", "metrics": "Metrics", "curves": "ROC and precision-recall curves",
            "calibration": "Calibration", "confusion": "Confusion matrices at the operating point",
            "cases": "Worst mistakes", "every-metric": "Every value in metrics.json"}


def synthetic_predictions(categorical: bool) -> tuple[pd.DataFrame, tuple[str, ...]]:
    """predictions.csv of 8 patients x 6 slices, as ich.core.results.predictions_table writes it: for two sigmoid
    outputs (any, subdural), or for the five subtypes (one `target` column of names)."""
    rng = np.random.default_rng(0)
    table = pd.DataFrame({"image_id": [f"ID_{k:09x}" for k in range(48)],
                          "patient": [pseudonym(f"patient-{k // 6}") for k in range(48)]})
    if categorical:
        outputs = SUBTYPES
        truth = rng.integers(0, len(outputs), 48)
        logits = rng.normal(size=(48, len(outputs))) + 2.0 * np.eye(len(outputs))[truth]
        probs = np.exp(logits) / np.exp(logits).sum(axis=1, keepdims=True)
        table["target"] = [outputs[k] for k in truth]
    else:
        outputs = ("any", "subdural")
        subdural = rng.random(48) < 0.3
        truth = np.stack([subdural | (rng.random(48) < 0.2), subdural], axis=1).astype(np.int64)
        probs = 1 / (1 + np.exp(-(2.5 * (2 * truth - 1) + rng.normal(scale=1.5, size=truth.shape))))
        for k, name in enumerate(outputs):
            table[f"target_{name}"] = truth[:, k]
    for k, name in enumerate(outputs):
        table[f"prob_{name}"] = probs[:, k]
    return table, outputs


def synthetic_metrics(outputs: tuple[str, ...]) -> dict[str, float | None]:
    """metrics.json as evaluate.py writes it, with intervals for the first output only and one undefined value."""
    metrics = {"test/auroc": 0.91, "test/auroc_ci_low": 0.85, "test/auroc_ci_high": 0.96, "test/sensitivity": 0.7,
               "test/specificity": 0.9, "test/acc": 0.86, "test/logloss_weighted": None, "data/slices_test": 48.0,
               "data/patients_test": 8.0, "data/exams_test": 8.0, "test/exam_auroc": 0.93,
               "test/exam_op_sensitivity": 1.0, "test/exam_op_specificity": 0.5, "test/op_threshold": 0.3}
    for name in outputs:
        metrics.update({f"test/auroc_{name}": 0.9, f"test/sensitivity_{name}": 0.7, f"test/specificity_{name}": 0.9,
                        f"test/op_threshold_{name}": 0.3, f"test/op_sensitivity_{name}": 0.875,
                        f"test/op_specificity_{name}": 0.8, f"test/ece_{name}": 0.05})
    first = outputs[0]
    metrics.update({f"test/op_sensitivity_ci_low_{first}": 0.812, f"test/op_sensitivity_ci_high_{first}": 0.95})
    return metrics


def tile(seed: int, rgb: bool = False) -> np.ndarray:
    """A windowed 'slice': a bright disc with a darker blob, 64x64 uint8 (three planes as RGB when asked)."""
    y, x = np.mgrid[:64, :64]
    head = (y - 32) ** 2 + (x - 32) ** 2 < 26**2
    blob = (y - 20 - seed) ** 2 + (x - 40) ** 2 < 36
    image = (90 * head + 80 * blob).astype(np.uint8)
    return np.stack([image, image // 2, image], axis=2) if rgb else image


def write_example(folder, categorical: bool = False):
    predictions, outputs = synthetic_predictions(categorical)
    thresholds = {name: 0.3 for name in outputs}
    cases = worst_cases(predictions, outputs[0], thresholds[outputs[0]], k=4)
    tiles = {heading: [(tile(k, rgb=k == 1), caption) for k, (_, caption) in enumerate(rows)]
             for heading, rows in cases.items()}
    path = write_report(folder / "report.html", title="resnet18 on the phantom: test split",
                        about={"checkpoint": "outputs/2026-01-01/10-00-00/checkpoints/best.ckpt",
                               "data": "phantom, 10 patients", "skipped": "little_brain: 3"},
                        metrics=synthetic_metrics(outputs), predictions=predictions, outputs=outputs,
                        thresholds=thresholds, tiles=tiles)
    return path, predictions, outputs


def images_of(page: str) -> list[bytes]:
    return [base64.b64decode(data) for data in re.findall(r'<img src="data:image/png;base64,([^"]+)"', page)]


@pytest.mark.parametrize("categorical", [False, True], ids=["sigmoid", "subtype"])
def test_the_report_is_one_self_contained_page_with_every_section_and_no_identifier(tmp_path, categorical):
    path, predictions, outputs = write_example(tmp_path, categorical)
    page = path.read_text(encoding="utf-8")

    for outside in ("http://", "https://", 'src="/', "url(", "<script", "@import"):
        assert outside not in page
    leaked = [value for value in {*predictions["patient"], *predictions["image_id"]} if value in page]
    assert not leaked, f"identifiers on the page: {leaked[:3]}"
    for anchor, heading in SECTIONS.items():
        assert f'<section id="{anchor}"><h2>{heading}</h2>' in page
    assert "at the operating point" in page and "[0.812, 0.950]" in page  # an interval beside its value
    assert "at highest probability" in page if categorical else "at threshold 0.5" in page
    assert f"Worst false negatives: {outputs[0]}" in page and "p(" in page

    # a figure of curves per output, the reliability diagram, the matrices (subtype: and its KxK), 4 + 4 tiles
    images = images_of(page)
    worst = worst_cases(predictions, outputs[0], 0.3, k=4)
    expected = len(outputs) + 1 + (2 if categorical else 1) + sum(len(rows) for rows in worst.values())
    assert len(images) == expected
    assert all(image.startswith(b"\x89PNG\r\n\x1a\n") for image in images)


def test_worst_cases_are_the_most_confident_mistakes_first_and_captioned_without_ids():
    predictions = pd.DataFrame({"image_id": list("abcdef"), "patient": "P0",
                                "target_any": [1, 1, 0, 0, 1, 0], "prob_any": [0.1, 0.2, 0.9, 0.6, 0.3, 0.8]})
    cases = worst_cases(predictions, "any", threshold=0.5, k=2)
    assert [image_id for image_id, _ in cases["Worst false negatives: any"]] == ["a", "b"]
    assert [image_id for image_id, _ in cases["Worst false positives: any"]] == ["c", "f"]
    assert cases["Worst false negatives: any"][0][1] == "p(any) = 0.100\ntruth: any"
    assert cases["Worst false positives: any"][0][1] == "p(any) = 0.900\ntruth: negative"


def test_without_operating_thresholds_the_report_marks_the_fixed_one_and_says_so(tmp_path):
    predictions, outputs = synthetic_predictions(categorical=False)
    page = write_report(tmp_path / "report.html", title="an old checkpoint", about={}, metrics={},
                        predictions=predictions, outputs=outputs).read_text(encoding="utf-8")
    assert "No operating thresholds were given: the dot marks threshold 0.5." in page
    assert "No operating thresholds were given: each output at the fixed threshold." in page
    assert "No slices were given for this report." in page
    assert '<td class="num">\u2013</td>' in page  # a metric metrics.json lacks shows as a dash, not as 0


def test_a_tile_that_is_no_windowed_slice_is_refused_naming_the_shape(tmp_path):
    predictions, outputs = synthetic_predictions(categorical=False)
    with pytest.raises(ValueError, match=r"HxW or HxWx3 uint8, not float64 \(4, 4\)"):
        write_report(tmp_path / "report.html", title="t", about={}, metrics={}, predictions=predictions,
                     outputs=outputs, tiles={"cases": [(np.zeros((4, 4)), "p = 0.5")]})


def test_the_sweep_summary_shows_every_job_and_a_chart(tmp_path):
    table = pd.DataFrame({"run": ["model=resnet18", "model=densenet121", "model=tiny"],
                          "val/auroc_best": [0.97, 0.91, np.nan], "status": ["done", "done", "no metrics.json"],
                          "job": ["0", "1", "2"]})
    page = write_summary(tmp_path / "summary.html", table, "val/auroc_best",
                         title="Sweep summary: 3 jobs, sorted by val/auroc_best").read_text(encoding="utf-8")
    assert "http" not in page and "<script" not in page
    assert all(f"<td>{name}</td>" in page for name in table["run"])
    assert '<td class="num">0.9700</td>' in page and "no metrics.json" in page
    assert len(images_of(page)) == 1


@pytest.mark.slow
def test_the_report_opens_in_chromium_without_console_errors_every_image_decodes_and_it_is_not_blank(tmp_path):
    path, _, _ = write_example(tmp_path)
    screenshot, widths = open_in_chromium(path, tmp_path)
    assert matplotlib.image.imread(screenshot).std() > 0.05  # not a blank page
    assert len(widths) == len(images_of(path.read_text(encoding="utf-8")))
    assert all(width > 0 for width in widths)
