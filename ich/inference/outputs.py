"""predict.py's files for a folder of studies: studies.csv, slices.csv, series.csv, skipped_files.csv, heatmaps/
and report.html, added study by study.

They carry pseudonyms (ich.core.privacy), never names, birth dates, PatientID, UIDs or file paths, unless
keep_ids=true asks for StudyInstanceUID, AccessionNumber and paths.
"""

import html
from collections import Counter
from dataclasses import replace
from pathlib import Path

import cv2
import matplotlib.image
import numpy as np
import pandas as pd
from matplotlib.figure import Figure
from rich.console import Console
from rich.table import Table

from ich.core.privacy import pseudonym
from ich.core.results import write_atomic
from ich.data.seen import FIGURES, TrainingSource, flag, not_checked, training_source
from ich.evaluation.html_report import figure_tag, page, section, source_banner, tile_tag
from ich.evaluation.operating import called
from ich.inference.answer import Predictor, SeriesResult, StudyResult, headline_output, verdict
from ich.inference.heatmap import BRAIN, grad_cam, last_stage, side_by_side
from ich.inference.study import ImageFile, Scan, Series, Study, covered_mm

CONTRAST_NOTE = "read on a contrast series: contrast in vessels and plexus looks like blood in the brain window"
STRIP_THUMBNAILS = 20  # slices shown above the probability curve of a series (evenly spread)
THUMBNAIL_PX = 64
FOOTER = ("Written by ich predict.py: one self-contained page (no scripts, fonts or links). Studies are named by "
          "pseudonyms unless keep_ids=true. A research tool, not a medical device: every finding needs a radiologist.")


class Outputs:
    """Rows of the CSV files and sections of the report, added study by study, written at the end."""

    def __init__(self, model: Predictor, output_dir: Path, keep_ids: bool, heatmaps: int):
        self.model, self.output_dir, self.keep_ids, self.heatmaps = model, output_dir, keep_ids, heatmaps
        self.labels = tuple(model.labels)
        self.thresholds = np.asarray(model.thresholds, dtype=np.float64)  # of slices
        self.exam_thresholds = np.asarray(model.exam_thresholds, dtype=np.float64)  # of studies
        self.studies: list[dict] = []
        self.slices: list[pd.DataFrame] = []
        self.series: list[dict] = []
        self.skipped: list[dict] = []
        self.sections: list[str] = []
        self.stage = last_stage(model.module) if model.module is not None and heatmaps > 0 else None
        self.source = training_source(model.inputs)  # what every output says first
        (output_dir / "heatmaps").mkdir(exist_ok=True)

    def ids(self, study: Study) -> dict:
        return {"study_uid": study.uid, "accession": study.accession} if self.keep_ids else {}

    def file_name(self, image: ImageFile, root: Path) -> str:
        """The file as the user finds it (keep_ids=true), else a pseudonym: folder names often hold patient names."""
        relative = str(image.path.relative_to(root))
        return relative if self.keep_ids else pseudonym(relative)

    def add(self, result: StudyResult, root: Path, tiles: list[tuple[np.ndarray, str]] | None = None) -> None:
        """One study's rows in every file, its heat maps (when positive) and its section of the report, kept only
        once all are made: a study that fails on the way leaves nothing half written. `tiles`: its heat maps when
        the caller drew them already (the DICOM node, for its Secondary Captures), so they are not drawn twice."""
        row = self.study_row(result)
        skipped = self.skipped_rows(result.study, root)
        slices = [self.slice_rows(result.study, r, result.is_read(r)) for r in result.results]
        series = self.series_rows(result)
        if row["positive"] != 1:
            tiles = []
        elif tiles is None:
            tiles = self.draw_heatmaps(result)
        section = self.study_section(row, result, tiles)
        self.studies.append(row)
        self.skipped += skipped
        self.slices += slices
        self.series += series
        self.sections.append(section)

    def add_failed(self, study: Study, reason: str, root: Path) -> None:
        """A study that could not be predicted: listed with its reason, in studies.csv and the report."""
        unread = StudyResult(study, [], [])
        row = self.study_row(unread, failed=reason)
        self.studies.append(row)
        self.skipped += self.skipped_rows(study, root)
        self.series += self.series_rows(unread)
        self.sections.append(self.study_section(row, unread, []))

    def study_row(self, result: StudyResult, failed: str = "") -> dict:
        study, read = result.study, result.read
        row = {"training_source": self.source.text, "study": study.key, "patient": study.patient, **self.ids(study)}
        if not read:
            text = f"failed: {failed}" if failed else "not read: no usable axial CT series"
            row.update(verdict=text, positive=np.nan, slices=0, series="", series_key="", covered_mm=np.nan,
                       contrast=np.nan, ood=np.nan, ood_reason="")
            row.update({f"prob_{label}": np.nan for label in self.labels})
        else:
            exam = result.exam
            text, positive = verdict(self.labels, self.model.task, exam, self.exam_thresholds)
            contrast = all(r.series.contrast for r in read)
            row.update(verdict=f"{text} ({CONTRAST_NOTE})" if contrast else text, positive=int(positive),
                       slices=sum(len(r.probs) for r in read), series="; ".join(r.series.describe() for r in read),
                       series_key=";".join(r.series.key for r in read),
                       covered_mm=round(covered_mm([r.series for r in read]), 1), contrast=int(contrast))
            row.update({f"prob_{label}": float(p) for label, p in zip(self.labels, exam)})
            row["ood"], row["ood_reason"] = flag([(r.series.name, r.figures) for r in read], self.model.inputs)
            decided = called(exam, self.exam_thresholds)
            row.update({f"called_{label}": int(on) for label, on in zip(self.labels, decided)})
        row.update({f"threshold_{label}": float(t) for label, t in zip(self.labels, self.exam_thresholds)})
        row["operating_point"] = self.operating_point()
        row["other_series"] = "; ".join(
            f"{r.series.describe()}: " + ", ".join(f"p({label}) {p:.3f}" for label, p in zip(self.labels, r.exam))
            for r in result.results if not result.is_read(r))
        row["skipped"] = "; ".join(skipped_lines(study))
        row["failed"] = failed
        return row

    def skipped_rows(self, study: Study, root: Path) -> list[dict]:
        """Every file of the study that was not predicted: left out of its series, or in a series skipped whole."""
        rows = []
        for series in study.series:
            whole = [replace(image, reason=series.reason, detail=series.detail)
                     for image in series.slices] if series.reason else []
            rows += [{"study": study.key, "series": series.key, "file": self.file_name(image, root),
                      "reason": image.reason, "detail": image.detail} for image in series.left_out + whole]
        return rows

    def slice_rows(self, study: Study, result: SeriesResult, used: bool) -> pd.DataFrame:
        table = pd.DataFrame({"study": study.key, "series": result.series.key, "used": int(used),
                              "rank": np.arange(1, len(result.probs) + 1), "position_mm": np.round(result.positions, 2)})
        for k, label in enumerate(self.labels):
            table[f"prob_{label}"] = result.probs[:, k]
        for key, value in self.ids(study).items():
            table[key] = value
        return table

    def series_rows(self, result: StudyResult) -> list[dict]:
        predicted = {id(r.series): r for r in result.results}  # Series objects are mutable, so keyed by identity
        rows = []
        for series in result.study.series:
            r = predicted.get(id(series))
            ood, reason = (np.nan, "") if r is None else flag([("", r.figures)], self.model.inputs)
            rows.append({
                "study": result.study.key, "series": series.key, "number": series.number,
                "role": role(series, r, result),
                "reason": series.reason, "slices": len(series.slices), "files_left_out": len(series.left_out),
                "left_out": ", ".join(f"{reason}: {count}" for reason, count in sorted(series.skipped.items())),
                "detail": series.detail, "thickness_mm": round(series.thickness, 3) if series.slices else np.nan,
                "kernel": series.kernel, "contrast": int(series.contrast), "from_mm": round(series.span[0], 2),
                "to_mm": round(series.span[1], 2),
                **{f"prob_{label}": np.nan if r is None else float(r.exam[k]) for k, label in enumerate(self.labels)},
                **{name: np.nan if r is None else r.figures.get(name, np.nan) for name in FIGURES},
                "ood": ood, "ood_reason": reason,
            })
        return rows

    def operating_point(self) -> str:
        if self.model.thresholds_chosen:
            return "chosen on the validation patients"
        return "none chosen: the fixed threshold " + ", ".join(f"{t:g}" for t in sorted(set(self.thresholds)))

    # --- heat maps --------------------------------------------------------------------------------

    def heatmap_note(self) -> str:
        if self.heatmaps <= 0:
            return "Heat maps were not asked for (heatmaps=0)."
        if self.model.module is None:
            return (f"No heat maps: {self.model.source.name} is an exported model, and Grad-CAM needs the torch "
                    "checkpoint (pass its .ckpt or run folder as ckpt_path).")
        if self.stage is None:
            return f"No heat maps: backbone {self.model.module.model.hparams.backbone} has no feature maps."
        return (f"Heat maps: Grad-CAM on the backbone at {self.stage.describe()} for the {self.heatmaps} most "
                "suspicious slices of each positive study: the slice in the brain window, and under its map (red: "
                "the regions that raised the score most; each map scaled to its own maximum).")

    def draw_heatmaps(self, result: StudyResult) -> list[tuple[np.ndarray, str]]:
        """The most suspicious slices of the series read beside their Grad-CAM, written to heatmaps/ and returned
        as report tiles."""
        if self.stage is None:
            return []
        output = headline_output(self.labels, self.model.task, result.exam)
        suspicious = sorted(((-float(r.probs[rank, output]), n, rank) for n, r in enumerate(result.read)
                             for rank in range(len(r.probs))))[: self.heatmaps]
        tiles = []
        for _, n, rank in suspicious:
            read = result.read[n]
            cam = grad_cam(self.model.module, read.hu[read.stacks[[rank]]], output)[0]
            image = side_by_side(read.hu[rank], cam)
            name = f"{result.study.key}_{read.series.key}_slice{rank + 1:03d}.png"
            matplotlib.image.imsave(self.output_dir / "heatmaps" / name, image)
            where = f"series {read.series.number}, " if len(result.read) > 1 else ""
            caption = (f"{where}slice {rank + 1} of {len(read.probs)} ({read.positions[rank]:.1f} mm)\n"
                       f"p({self.labels[output]}) = {read.probs[rank, output]:.3f}")
            tiles.append((image, caption))
        return tiles

    # --- the report -------------------------------------------------------------------------------

    def study_section(self, row: dict, result: StudyResult, tiles: list[tuple[np.ndarray, str]]) -> str:
        study, read = result.study, result.read
        name = study_name(row, self.keep_ids)
        if not read:
            body = f'<p class="verdict none">{html.escape(row["verdict"])}</p>' + self.skipped_html(study)
            return section(f"study-{study.key}", name, body)
        kind = "positive" if row["positive"] else "negative"
        parts = [f'<p class="verdict {kind}">{html.escape(row["verdict"])}</p>', self.ood_note(row),
                 self.outputs_table(row)]
        names = " and ".join(f"<b>{html.escape(r.series.describe())}</b>" for r in read)
        parts.append(f"<p>Read on {names}, covering {row['covered_mm']:g} mm of the head along the slice normal: "
                     "the series the rule picks (plain before contrast, a soft-tissue kernel, the thickness closest "
                     "to 5 mm, the most slices), and each series of its kind that covers another range of the head "
                     "(a split protocol). The study's exam probability is the highest of theirs.</p>")
        if row["contrast"] == 1:
            parts.append(f'<p class="note">This study has no plain series: it was {CONTRAST_NOTE}.</p>')
        if row["other_series"]:
            parts.append(f'<p class="note">Also predicted: {html.escape(row["other_series"])}.</p>')
        parts += [figure_tag(self.strip_figure(r, result.exam), f"{r.series.describe()}: its slices and the "
                                                                "probability per slice") for r in read]
        if tiles:
            grid = "".join(tile_tag(image, caption) for image, caption in tiles)
            parts.append(f'<h3>Most suspicious slices</h3><div class="tiles heatmaps">{grid}</div>')
        parts.append(self.skipped_html(study))
        return section(f"study-{study.key}", name, "".join(parts))

    def ood_note(self, row: dict) -> str:
        """Whether the study lies outside what the model saw in training, said above its numbers."""
        if row["ood"] == 1:
            return (f'<p class="ood">Out of distribution: {html.escape(row["ood_reason"])}. The model saw no series '
                    "like it in training: what its test measured does not hold here.</p>")
        if row["ood"] == 0:
            return ""
        return f'<p class="note">Out of distribution: {html.escape(row["ood_reason"])}.</p>'

    def outputs_table(self, row: dict) -> str:
        head = ('<thead><tr><th>output</th><th class="num">exam probability</th><th class="num">threshold</th>'
                "<th>decision</th></tr></thead>")
        cells = []
        for label in self.labels:
            probability, threshold = row[f"prob_{label}"], row[f"threshold_{label}"]
            decision = "above: called" if called(probability, threshold) else "below"
            cells.append(f'<tr><td>{html.escape(label)}</td><td class="num">{probability:.3f}</td>'
                         f'<td class="num">{threshold:.3g}</td><td>{decision}</td></tr>')
        return f'<table class="outputs">{head}<tbody>{"".join(cells)}</tbody></table>'

    def skipped_html(self, study: Study) -> str:
        lines = skipped_lines(study)
        if not lines:
            return '<p class="note">Nothing of this study was skipped.</p>'
        items = "".join(f"<li>{html.escape(line)}</li>" for line in lines)
        return f"<h3>Skipped</h3><ul>{items}</ul>"

    def strip_figure(self, read: SeriesResult, exam: np.ndarray) -> Figure:
        """Thumbnails of the series in the brain window above the probability of each output per slice, with the
        headline output's threshold."""
        count = len(read.probs)
        ranks = np.arange(1, count + 1)
        shown = np.unique(np.linspace(0, count - 1, min(count, STRIP_THUMBNAILS)).round().astype(int))
        # thumbnails about square: each as tall as the plot width (~7.4 of the 10 inches) shares out among them
        strip = min(1.4, 7.4 / len(shown))
        figure = Figure(figsize=(10, strip + 3.0), layout="constrained")
        top, bottom = figure.subplots(2, 1, sharex=True, gridspec_kw={"height_ratios": [strip, 2.2]})
        width = count / len(shown)
        for row in shown:
            thumbnail = cv2.resize(BRAIN(read.hu[row]), (THUMBNAIL_PX, THUMBNAIL_PX), interpolation=cv2.INTER_AREA)
            top.imshow(thumbnail, cmap="gray", vmin=0, vmax=255, aspect="auto",
                       extent=(row + 1 - width / 2, row + 1 + width / 2, 0, 1))
        top.set_yticks([])
        top.set_facecolor("black")  # where rounding leaves a gap between thumbnails: air, not a white slice
        top.set_title("brain window, slices in position order", fontsize=9)
        output = headline_output(self.labels, self.model.task, exam)
        for k, label in enumerate(self.labels):
            bottom.plot(ranks, read.probs[:, k], marker="o", markersize=3, linewidth=2.2 if k == output else 1.0,
                        label=label, color=f"C{k}")
        bottom.axhline(self.thresholds[output], color=f"C{output}", linestyle="--", linewidth=1,
                       label=f"threshold {self.thresholds[output]:.3g}")
        bottom.set_xlim(0.5, count + 0.5)
        bottom.set_ylim(-0.02, 1.02)
        bottom.set_ylabel("probability")
        ticks = np.unique(np.linspace(0, count - 1, min(count, 12)).round().astype(int))
        bottom.set_xticks(ticks + 1, [f"{t + 1}\n{read.positions[t]:.0f} mm" for t in ticks], fontsize=8)
        bottom.set_xlabel("slice (and its position along the slice normal)", fontsize=9)
        bottom.grid(alpha=0.3)
        bottom.legend(loc="center left", bbox_to_anchor=(1.0, 0.5), fontsize=8, frameon=False)
        return figure

    def about_section(self, scan: Scan, input_path: str | None) -> str:
        inputs = self.model.inputs
        windows = ", ".join(f"{center:g}/{width:g}" for center, width in inputs["windows"])
        rows = [
            ("model", f"{self.model.source} ({self.model.task}: {', '.join(self.labels)})"),
            ("inputs", f"windows (centre/width HU) {windows}; context {inputs['context']} slice(s) each side; "
                       f"{inputs['image_size']} px"),
            ("operating point", self.operating_point() + (
                "" if self.model.thresholds_chosen else
                ": this checkpoint carries no thresholds chosen on validation, so decisions are at a threshold that "
                "is no operating point")),
            ("input", input_path if input_path is not None else "not written (keep_ids=false)"),
            ("files", f"{scan.files:,} read; {len(scan.loose):,} in no study" + _reasons(Counter(f.reason for f in scan.loose))),
            ("studies", f"{len(scan.studies):,}; {sum(1 for row in self.studies if row['positive'] == 1):,} positive, "
                        f"{sum(1 for row in self.studies if row['slices'] == 0 and not row['failed']):,} not read, "
                        f"{sum(1 for row in self.studies if row['failed']):,} failed"),
            ("series", f"{sum(row['role'] == 'used' for row in self.series):,} used, "
                       f"{sum(row['role'] == 'predicted' for row in self.series):,} also predicted, "
                       f"{sum(row['role'] == 'skipped' for row in self.series):,} skipped"
                       + _reasons(Counter(row["reason"] for row in self.series if row["reason"]))),
            ("heat maps", self.heatmap_note()),
            ("out of distribution", self.ood_line()),
        ]
        cells = "".join(f"<tr><th>{html.escape(key)}</th><td>{html.escape(value)}</td></tr>" for key, value in rows)
        return section("about", "What was read", f'<table class="about">{cells}</table>')

    def ood_line(self) -> str:
        """How many studies lie outside the training ranges, and what is compared."""
        unknown = not_checked(self.model.inputs)
        if unknown:
            return unknown
        flagged = sum(1 for row in self.studies if row["ood"] == 1)
        seen = self.model.inputs["seen"]
        return (f"{flagged:,} of {sum(1 for row in self.studies if row['slices']):,} studies read lie outside the "
                f"ranges of the {seen['series']:,} training series: {', '.join(seen['figures'])} (ood in studies.csv, "
                "each series' figures in series.csv). Inside every range is no promise: anatomy and findings unlike "
                "training's are not compared.")

    def overview_section(self) -> str:
        head = "".join(f'<th class="num">p({html.escape(label)})</th>' for label in self.labels)
        rows = []
        for row in self.studies:
            probabilities = "".join(f'<td class="num">{row[f"prob_{label}"]:.3f}</td>' if row["slices"] else
                                    '<td class="num">\u2013</td>' for label in self.labels)
            kind = "positive" if row["positive"] == 1 else "negative" if row["positive"] == 0 else "none"
            rows.append(f'<tr><td><a href="#study-{row["study"]}">{html.escape(study_name(row, self.keep_ids))}</a></td>'
                        f'<td class="verdict {kind}">{html.escape(row["verdict"])}</td>{probabilities}'
                        f'<td>{html.escape(row["series"])}</td>{ood_cell(row)}</tr>')
        table = (f"<table><thead><tr><th>study</th><th>verdict</th>{head}<th>read on</th>"
                 "<th>out of distribution</th></tr></thead>"
                 f"<tbody>{''.join(rows)}</tbody></table>")
        note = (f"p(...): the study's exam probability, {self.model.exam_rule}, on the series it is read on. "
                f"Decisions at the thresholds of the about table ({self.operating_point()}).")
        return section("studies", "Studies", table, note)

    def loose_section(self, scan: Scan, root: Path) -> str:
        if not scan.loose:
            return ""
        lines = [f"{reason}: {files(count)}" for reason, count in Counter(f.reason for f in scan.loose).most_common()]
        if self.keep_ids:
            lines += [f"{self.file_name(image, root)}: {image.reason}" for image in scan.loose]
        items = "".join(f"<li>{html.escape(line)}</li>" for line in lines)
        note = "Listed one by one in skipped_files.csv" + ("." if self.keep_ids else " (by pseudonym; keep_ids=true names them).")
        return section("no-study", "Files in no study", f"<ul>{items}</ul>", note)

    # --- writing ----------------------------------------------------------------------------------

    def studies_table(self) -> pd.DataFrame:
        return pd.DataFrame(self.studies)

    def finish(self, scan: Scan, input_path: str | None) -> None:
        for image in scan.loose:
            self.skipped.append({"study": "", "series": "", "file": self.file_name(image, scan.root),
                                 "reason": image.reason, "detail": image.detail})
        studies = self.studies_table()
        _write_csv(self.output_dir / "studies.csv", studies)
        slices = pd.concat(self.slices, ignore_index=True) if self.slices else pd.DataFrame(
            columns=["study", "series", "used", "rank", "position_mm", *(f"prob_{label}" for label in self.labels)])
        _write_csv(self.output_dir / "slices.csv", slices)
        _write_csv(self.output_dir / "series.csv", pd.DataFrame(self.series))
        _write_csv(self.output_dir / "skipped_files.csv",
                   pd.DataFrame(self.skipped, columns=["study", "series", "file", "reason", "detail"]))
        body = "\n".join([source_banner(self.source), self.about_section(scan, input_path), self.overview_section(),
                          *self.sections,
                          self.loose_section(scan, scan.root)])
        document = page(f"Prediction: {len(scan.studies)} studies", body, footer=FOOTER)
        report = self.output_dir / "report.html"
        write_atomic(report, lambda tmp: tmp.write_text(document, encoding="utf-8"))
        print_studies(studies, self.labels, self.keep_ids, self.output_dir, self.source)


def ood_cell(row: dict) -> str:
    """A study's flag in the overview: its reason when outside, no when inside, a dash when unknown or not read."""
    if row["ood"] == 1:
        return f'<td class="ood">yes: {html.escape(row["ood_reason"])}</td>'
    return "<td>no</td>" if row["ood"] == 0 else "<td>\u2013</td>"


def role(series: Series, result: SeriesResult | None, study: StudyResult) -> str:
    """A series' part in its study: `used` (read on), `predicted` (an alternative), `skipped`, or `failed` (its
    study failed before it was read)."""
    if result is None:
        return "skipped" if series.reason else "failed"
    return "used" if study.is_read(result) else "predicted"


def skipped_lines(study: Study) -> list[str]:
    """What of a study was not predicted: skipped series with their reason, files left out of the others."""
    lines = [f"{series.describe()}: skipped, {series.reason}" + (f": {series.detail}" if series.detail else "")
             + f" ({files(len(series.slices) + len(series.left_out))})" for series in study.series if series.reason]
    lines += [f"{series.describe()}: {files(count)} left out, {reason}" for series in study.series if not series.reason
              for reason, count in sorted(series.skipped.items())]
    return lines


def files(count: int) -> str:
    return f"{count} file" if count == 1 else f"{count} files"


def study_name(row: dict, keep_ids: bool) -> str:
    name = f"Study {row['study']}"
    if keep_ids and row.get("accession"):
        name += f" (accession {row['accession']})"
    return name


def print_studies(studies: pd.DataFrame, labels: tuple[str, ...], keep_ids: bool, output_dir: Path,
                  source: TrainingSource) -> None:
    """The studies on the console, under the training source (in red when it is synthetic or unknown)."""
    table = Table(title=f"{len(studies)} studies -> {output_dir}", caption=source.text,
                  caption_style="bold red" if source.loud else "")
    for column in ("study", "verdict", *(f"p({label})" for label in labels), "read on", "ood"):
        table.add_column(column, justify="right" if column.startswith("p(") else "left")
    for row in studies.to_dict("records"):
        probabilities = [f"{row[f'prob_{label}']:.3f}" if row["slices"] else "-" for label in labels]
        ood = "yes" if row["ood"] == 1 else "no" if row["ood"] == 0 else "-"
        table.add_row(study_name(row, keep_ids), row["verdict"], *probabilities, row["series"], ood)
    Console().print(table)


def _reasons(counts: Counter) -> str:
    return (" (" + ", ".join(f"{reason}: {count}" for reason, count in counts.most_common()) + ")") if counts else ""


def _write_csv(path: Path, table: pd.DataFrame) -> None:
    write_atomic(path, lambda tmp: table.to_csv(tmp, index=False, float_format="%.9g"))
