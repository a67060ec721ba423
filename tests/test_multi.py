"""Several sources in one run (data=multi): one index, splits by patient within each source, a source held out
whole, per-source metrics and the report's per-source table. Two phantoms of other seeds stand in for two sites."""

import json

import numpy as np
import pandas as pd
import pytest

from conftest import FAST_RUN, PHANTOM, SMALL_PHANTOM, compose_config, make_datamodule
from ich.evaluation.html_report import write_report
from ich.evaluation.operating import below_pooled, metric_sources

SITES = {"a": {"source": "phantom", "phantom": {**PHANTOM, "seed": 0}},
         "b": {"source": "phantom", "phantom": {**PHANTOM, "patients": 6, "seed": 1}}}
# the same sources on the command line, at the small phantom's size, with FAST_RUN's other settings
SITE_OVERRIDES = [*(override for override in FAST_RUN if override not in SMALL_PHANTOM), "data=multi",
                  "data.sources.a.phantom.patients=10", "data.sources.b.phantom.patients=6",
                  *(f"data.sources.{name}.phantom.{key}={value}" for name in "ab"
                    for key, value in (("slices", 6), ("size", 128)))]


def multi(cache_dir, tmp_path, sources=SITES, **kwargs):
    return make_datamodule(cache_dir, tmp_path, source="multi", sources=sources, **kwargs)


def test_ids_of_two_sources_never_collide(cache_dir, tmp_path):
    """The same phantom twice: every image id, patient and series repeats across the sources, and the prefix parts them."""
    same = {"a": {"source": "phantom", "phantom": PHANTOM}, "b": {"source": "phantom", "phantom": PHANTOM}}
    dm = multi(cache_dir, tmp_path, sources=same)
    index = dm.index
    alone = make_datamodule(cache_dir, tmp_path / "alone").index
    assert len(index) == 2 * len(alone)
    assert index["image_id"].is_unique
    for column in ("image_id", "patient", "study", "series"):
        raw = {name: set(part[column].str[2:]) for name, part in index.groupby("source")}
        assert raw["a"] == raw["b"] == set(alone[column])  # the raw ids of the two sources are the same ...
        assert index.groupby(column)["source"].nunique().max() == 1  # ... and no prefixed id is shared
    assert set(index.loc[index["source"] == "b", "image_id"]) == {f"b/{i}" for i in alone["image_id"]}
    split = pd.read_csv(tmp_path / "split.csv")
    assert split["image_id"].is_unique and set(split["source"]) == {"a", "b"}


def test_each_source_is_split_by_its_own_patients(cache_dir, tmp_path):
    dm = multi(cache_dir, tmp_path)
    split = pd.read_csv(tmp_path / "split.csv")
    assert split.groupby("patient")["split"].nunique().max() == 1  # by patient
    assert split.groupby("source")["split"].nunique().to_dict() == {"a": 3, "b": 3}  # every source in every stage
    # a source is split as it would be alone
    make_datamodule(cache_dir, tmp_path / "alone")
    alone = pd.read_csv(tmp_path / "alone" / "split.csv")
    mine = split[split["source"] == "a"]
    assert mine["split"].tolist() == alone.set_index("image_id").loc[mine["image_id"].str[2:], "split"].tolist()
    assert dm.summary["sources"]["test"].keys() == {"a", "b"}


def test_a_held_out_source_is_the_whole_test_split(cache_dir, tmp_path):
    dm = multi(cache_dir, tmp_path, test_sources=["b"])
    split = pd.read_csv(tmp_path / "split.csv")
    b = split[split["source"] == "b"]
    assert len(b) and (b["split"] == "test").all()  # every slice, so every patient of b
    assert set(split.loc[split["split"] != "test", "source"]) == {"a"}
    assert set(split.loc[split["split"] == "test", "source"]) == {"b"}
    assert set(dm.tables["train"]["source"]) == set(dm.tables["val"]["source"]) == {"a"}
    with pytest.raises(ValueError, match="data.test_sources names c, which is not a source"):
        multi(cache_dir, tmp_path / "unknown", test_sources=["c"])
    with pytest.raises(ValueError, match="holds out every source"):
        multi(cache_dir, tmp_path / "every", test_sources=["a", "b"])


def test_balanced_sources_are_sampled_equally_in_training(cache_dir, tmp_path):
    plain = multi(cache_dir, tmp_path / "plain")
    counts = plain.tables["train"]["source"].value_counts()
    assert counts["a"] > counts["b"]  # 10 patients against 6
    balanced = multi(cache_dir, tmp_path / "balanced", balance_sources=True)
    train = balanced.tables["train"]
    assert train["source"].value_counts().to_dict() == {"a": counts["a"], "b": counts["a"]}
    assert set(train.loc[train["source"] == "b", "image_id"]) == set(plain.tables["train"].query("source == 'b'")["image_id"])
    assert len(balanced.datasets["train"]) == 2 * counts["a"]
    assert balanced.tables["val"].equals(plain.tables["val"])  # validation and test are left as they are


def test_sources_that_make_other_inputs_are_refused_naming_the_key(cache_dir, tmp_path):
    from ich.data.datamodule import ICHDataModule

    def sources(**b):
        return {"a": SITES["a"], "b": {**SITES["b"], **b}}

    with pytest.raises(ValueError, match=r"data.sources.b makes image size 32 .* set data.sources.b.image_size to match"):
        ICHDataModule(source="multi", sources=sources(image_size=32), image_size=64)
    with pytest.raises(ValueError, match=r"set data.sources.b.context to match"):
        ICHDataModule(source="multi", sources=sources(context=1))
    with pytest.raises(ValueError, match=r"set data.sources.b.windows to match"):
        ICHDataModule(source="multi", sources=sources(windows=["brain"]))
    pngs = {"source": "images", "root": str(tmp_path), "labels": str(tmp_path / "labels.csv")}
    with pytest.raises(ValueError, match=r"makes windows None .* set data.sources.b.encoding_window to match"):
        ICHDataModule(source="multi", sources={"a": SITES["a"], "b": pngs})
    with pytest.raises(ValueError, match=r"data.sources.b.batch_size is a key of the whole run.*data.batch_size"):
        ICHDataModule(source="multi", sources=sources(batch_size=4))
    with pytest.raises(ValueError, match=r"data.sources.b.source=None"):
        ICHDataModule(source="multi", sources={"a": SITES["a"], "b": {"root": "x"}})
    with pytest.raises(ValueError, match="use letters, digits"):
        ICHDataModule(source="multi", sources={"a": SITES["a"], "site/b": SITES["b"]})
    with pytest.raises(ValueError, match="about the sources of data=multi"):
        ICHDataModule(source="phantom", test_sources=["b"])
    # an HU image folder windowed as the DICOMs are makes the same inputs
    hu = {**pngs, "encoding": "hu", "windows": ["brain"]}
    same = ICHDataModule(source="multi", sources={"a": {**SITES["a"], "windows": ["brain"]}, "b": hu})
    assert same.model_windows == same.parts["a"].model_windows


def hand_metrics(low_b: float, high_b: float) -> dict:
    """Pooled AUROC 0.90 [0.85, 0.94]; source a 0.93 [0.88, 0.97]; source b at the interval given."""
    metrics = {"test/auroc": 0.90, "test/auroc_ci_low": 0.85, "test/auroc_ci_high": 0.94, "data/patients_test": 20}
    for name, (value, low, high) in {"a": (0.93, 0.88, 0.97), "b": ((low_b + high_b) / 2, low_b, high_b)}.items():
        metrics.update({f"test/{name}/auroc": value, f"test/{name}/auroc_ci_low": low,
                        f"test/{name}/auroc_ci_high": high, f"test/{name}/op_sensitivity": 0.8,
                        f"data/{name}/patients_test": 10})
    return metrics


def test_a_source_whose_auroc_interval_lies_below_the_pooled_one_is_flagged(tmp_path):
    below = hand_metrics(0.70, 0.84)  # b's highest 0.84 < the pooled lowest 0.85
    assert metric_sources(below) == ["a", "b"]
    assert not below_pooled(below, "a") and below_pooled(below, "b")
    assert not below_pooled(hand_metrics(0.70, 0.86), "b")  # the intervals overlap: no flag
    assert not below_pooled({"test/b/auroc": 0.7}, "b")  # no interval, no flag

    predictions = pd.DataFrame({"image_id": ["1", "2", "3", "4"], "patient": ["p", "p", "q", "q"],
                                "prob_any": [0.9, 0.2, 0.7, 0.1], "target_any": [1, 0, 1, 0]})
    page = write_report(tmp_path / "report.html", title="t", about={}, metrics=below, predictions=predictions,
                        outputs=("any",), thresholds={"any": 0.5}).read_text()
    table = page[page.index('<section id="sources">'):]
    table = table[:table.index("</section>")]
    rows = table.split("<tr")[2:]
    assert [row.split("<td>")[1].split("<")[0] for row in rows] == ["a", "b", "pooled"]
    assert "below the pooled" not in rows[0] and "AUROC interval below the pooled one" in rows[1]
    assert "0.770" in rows[1] and "[0.700, 0.840]" in rows[1] and "[0.850, 0.940]" in rows[2]
    overlapping = write_report(tmp_path / "overlap.html", title="t", about={}, metrics=hand_metrics(0.70, 0.86),
                               predictions=predictions, outputs=("any",)).read_text()
    assert "AUROC interval below the pooled one" not in overlapping
    single = write_report(tmp_path / "single.html", title="t", about={}, metrics={"test/auroc": 0.9},
                          predictions=predictions, outputs=("any",)).read_text()
    assert 'id="sources"' not in single  # one source: no per-source table


@pytest.mark.slow
def test_a_run_of_two_sources_reports_each_source(cache_dir, tmp_path):
    """train.py data=multi on two phantom sites, then evaluate.py on its checkpoint: per-source metrics in both
    metrics.json files and the per-source table in both reports."""
    from ich import evaluate, train

    cfg = compose_config("train", [*SITE_OVERRIDES, f"output_dir={tmp_path / 'run'}", "bootstrap=50"])
    metrics = train.run(cfg)
    written = json.loads((tmp_path / "run" / "metrics.json").read_text())
    for name in ("a", "b"):
        for key in ("auroc", "op_sensitivity", "op_specificity"):
            assert {f"test/{name}/{key}", f"test/{name}/{key}_ci_low", f"test/{name}/{key}_ci_high"} <= set(written)
        assert written[f"data/{name}/patients_test"] >= 1
    assert written.keys() == metrics.keys() and "test/auroc" in written
    page = (tmp_path / "run" / "report.html").read_text()
    assert '<section id="sources">' in page and "<td>a</td>" in page and "<td>b</td>" in page

    cfg = compose_config("evaluate", [f"ckpt_path={tmp_path / 'run'}", f"output_dir={tmp_path / 'eval'}",
                                      "bootstrap=50", "accelerator=cpu"])
    evaluated = evaluate.run(cfg)
    assert evaluated["data/a/patients_test"] == written["data/a/patients_test"]
    assert np.isclose(evaluated["test/b/op_sensitivity"], written["test/b/op_sensitivity"], equal_nan=True)
    assert '<section id="sources">' in (tmp_path / "eval" / "report.html").read_text()
    said = json.loads((tmp_path / "eval" / "metrics.json").read_text())["training_source"]
    assert said.startswith("Trained on several sources") and "a: Trained on the synthetic phantom" in said


@pytest.mark.slow
def test_a_run_that_holds_a_source_out_tests_on_it_alone(cache_dir, tmp_path):
    from ich import train

    # site B of the phantom held out, training at A with the site augmentation (which reads each source's HU)
    cfg = compose_config("train", [*SITE_OVERRIDES, "+data.sources.b.phantom.site=B", "data.augment.site=true",
                                   "data.test_sources=[b]", "data.balance_sources=true", f"output_dir={tmp_path}",
                                   "bootstrap=50"])
    metrics = train.run(cfg)
    split = pd.read_csv(tmp_path / "split.csv")
    assert set(split.loc[split["split"] == "test", "source"]) == {"b"}
    assert metric_sources(metrics) == ["b"]
    assert metrics["data/b/patients_test"] == metrics["data/patients_test"] == 6


def test_prepare_indexes_every_source(cache_dir, capsys):
    from ich.prepare import main

    main(compose_config("prepare", [override for override in SITE_OVERRIDES if override.startswith("data")]))
    printed = capsys.readouterr().out
    assert printed.count("Index: ") == 2 and "files found: 60" in printed and "files found: 36" in printed
