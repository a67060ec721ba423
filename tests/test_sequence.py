"""Stage 2: the sequence model over each series' ordered slices, its embedding cache, and the two-stage path
(stage 1 -> stage 2 -> evaluate.py) on phantom DICOMs and on a PNG folder with series/slice columns."""

import inspect
import json
import shutil

import cv2
import numpy as np
import pandas as pd
import pytest
import pytorch_lightning as pl
import torch

from conftest import FAST_RUN, compose_config, make_datamodule
from ich.evaluate import run as evaluate
from ich.evaluation.operating import auroc
from ich.train import run as train
from ich.training.module import ICHLitModule
from ich.training.sequence import (SequenceLitModule, SequenceNet, SeriesDataset, collate_series, predict_series,
                                   series_order)

# --- the network on pure tensors ------------------------------------------------------------------------


def neighbour_task(series: int, seed: int) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """Series of 3-12 slices whose 4-number embeddings are noise; a slice is positive when the first number of
    its two neighbours sums above 0 (a missing neighbour counts 0): nothing in the slice itself tells."""
    rng = np.random.default_rng(seed)
    features, labels = [], []
    for _ in range(series):
        x = rng.normal(size=(int(rng.integers(3, 13)), 4)).astype(np.float32)
        padded = np.pad(x[:, 0], 1)
        labels.append(torch.from_numpy((padded[:-2] + padded[2:] > 0).astype(np.float32))[:, None])
        features.append(torch.from_numpy(x))
    return features, labels


def as_batch(features: list[torch.Tensor]) -> dict:
    items = [{"features": f, "logits": torch.zeros(len(f), 1), "target": torch.zeros(len(f), 1),
              "labelled": torch.ones(len(f), dtype=torch.bool), "exam_target": torch.zeros(1),
              "image_id": [f"s{i}-{k}" for k in range(len(f))]} for i, f in enumerate(features)]
    return collate_series(items)


def fit_and_score(net: SequenceNet, steps: int = 300) -> float:
    """Train on 200 series, return the slice AUROC on 200 others."""
    torch.manual_seed(0)
    features, labels = neighbour_task(200, seed=1)
    batch, target = as_batch(features), torch.cat(labels)
    optimizer = torch.optim.Adam(net.parameters(), lr=3e-3)
    for _ in range(steps):
        logits, _ = net(batch["features"], batch["logits"], batch["valid"])
        loss = torch.nn.functional.binary_cross_entropy_with_logits(logits[batch["valid"]], target)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    features, labels = neighbour_task(200, seed=2)
    batch = as_batch(features)
    net.eval()
    with torch.no_grad():
        logits, _ = net(batch["features"], batch["logits"], batch["valid"])
    return auroc(logits[batch["valid"]][:, 0].numpy(), torch.cat(labels)[:, 0].numpy())


def test_the_sequence_model_learns_labels_set_by_neighbours_that_a_per_slice_model_cannot():
    torch.manual_seed(0)
    gru = fit_and_score(SequenceNet(4, 1, "gru", hidden=32, dropout=0.0))
    torch.manual_seed(0)
    conv = fit_and_score(SequenceNet(4, 1, "conv1d", hidden=32, kernel=3, dropout=0.0))
    torch.manual_seed(0)
    per_slice = fit_and_score(SequenceNet(4, 1, "conv1d", hidden=32, kernel=1, dropout=0.0))  # sees one slice
    assert gru > 0.9 and conv > 0.9
    assert 0.4 < per_slice < 0.6


@pytest.mark.parametrize("kind", ["gru", "conv1d", "transformer"])
def test_a_series_scores_the_same_alone_and_padded_beside_a_longer_one(kind):
    torch.manual_seed(0)
    net = SequenceNet(4, 2, kind, hidden=16, layers=2, heads=2).eval()
    short, single, longer = torch.randn(3, 4), torch.randn(1, 4), torch.randn(9, 4)

    def scores(series):
        batch = as_batch(series)
        logits = torch.randn(len(batch["valid"]), batch["valid"].shape[1], 2)
        batch["logits"] = torch.where(batch["valid"][..., None], 0.5, logits)  # garbage where padded
        with torch.no_grad():
            return net(batch["features"], batch["logits"], batch["valid"])

    alone_short, exam_short = scores([short])
    alone_single, exam_single = scores([single])
    padded, exams = scores([short, longer, single])
    assert torch.allclose(padded[0, :3], alone_short[0], atol=1e-5) and torch.allclose(exams[0], exam_short[0], atol=1e-5)
    assert torch.allclose(padded[2, :1], alone_single[0], atol=1e-5) and torch.allclose(exams[2], exam_single[0], atol=1e-5)


def test_shuffled_rows_reach_the_model_in_position_order_and_predictions_come_back_per_row():
    index = pd.DataFrame({"series": ["b"] * 4 + ["a"] * 3, "slice_index": [2, 0, 3, 1, 1, 2, 0]})
    index["image_id"] = [f"{s}{k}" for s, k in zip(index["series"], index["slice_index"])]
    shuffled = index.sample(frac=1.0, random_state=3).reset_index(drop=True)
    order, starts = series_order(shuffled["series"].to_numpy(), shuffled["slice_index"].to_numpy())
    positions = shuffled["slice_index"].to_numpy()

    class Embedded:  # the embedding of a slice is its position, so the order can be read back
        features = np.repeat(positions[:, None], 3, axis=1).astype(np.float16)
        logits = np.zeros((len(shuffled), 1), np.float32)

    labelled = np.ones(len(shuffled), bool)
    dataset = SeriesDataset(Embedded, np.zeros((len(shuffled), 1), np.float32),
                            shuffled["image_id"].to_numpy().astype(bytes), labelled, order, starts, "bce")
    items = [dataset[i] for i in range(len(dataset))]
    assert sorted(item["image_id"] for item in items) == [["a0", "a1", "a2"], ["b0", "b1", "b2", "b3"]]
    for item in items:
        assert item["features"][:, 0].tolist() == list(range(len(item["features"])))

    torch.manual_seed(0)
    model = SequenceLitModule(task="binary", features=3, hidden=8).eval()
    with torch.no_grad():
        model.net.slice_head.weight.normal_()  # not the zero start, so the order matters
    rows = np.array([3, 0, 2, 1])
    embeddings = torch.randn(4, 3)
    in_order, exam = predict_series(model, embeddings=embeddings, logits=torch.zeros(4, 1))
    mixed, exam_mixed = predict_series(model, embeddings=embeddings[rows], logits=torch.zeros(4, 1),
                                       positions=rows)
    assert np.allclose(mixed, in_order[rows], atol=1e-6) and np.allclose(exam_mixed, exam, atol=1e-6)
    reversed_order, _ = predict_series(model, embeddings=embeddings.flip(0), logits=torch.zeros(4, 1))
    assert not np.allclose(reversed_order[::-1], in_order, atol=1e-4)  # the model does read the order


def test_the_model_config_names_sequence_module_arguments():
    cfg = compose_config("train", ["model=sequence", "model.encoder=somewhere", "output_dir=unused"]).model
    assert set(cfg) == {"encoder", "flip", "sequence"}
    assert set(cfg.sequence) - {"batch_size"} <= set(inspect.signature(SequenceLitModule).parameters)
    assert cfg.sequence.kind == "gru"


# --- the embedding cache ----------------------------------------------------------------------------------


def save_encoder(dm, path, seed: int):
    """A stage-1 checkpoint as train.py writes one (weights + hyperparameters), with seeded random weights."""
    torch.manual_seed(seed)
    model = ICHLitModule(task="binary", backbone="test_resnet", in_chans=dm.num_channels, inputs=dm.inputs,
                         data={"source": "phantom"})
    torch.save({"state_dict": model.state_dict(), "hyper_parameters": dict(model.hparams),
                "pytorch-lightning_version": pl.__version__}, path)
    return ICHLitModule.load_from_checkpoint(path, map_location="cpu", weights_only=True)


def test_embeddings_are_extracted_once_per_encoder_and_rebuilt_when_it_changes(cache_dir, tmp_path, monkeypatch):
    from ich.core.results import file_digest
    from ich.training.embeddings import load_or_extract

    dm = make_datamodule(cache_dir, tmp_path)
    data = {"source": "phantom", "phantom": {"seed": 0}, "image_size": 64}
    calls = []
    features = ICHLitModule.features
    monkeypatch.setattr(ICHLitModule, "features", lambda self, image: calls.append(len(image)) or features(self, image))
    first_path = tmp_path / "first.ckpt"
    encoder = save_encoder(dm, first_path, seed=0)
    first = load_or_extract(lambda: encoder, file_digest(str(first_path)), dm, data, flip=False)
    assert sum(calls) == len(dm.index)  # every slice of the index, once
    assert first.features.shape[0] == first.logits.shape[0] == len(dm.index) and first.readable.all()

    # the cached rows follow the index: row 7 is the 7th slice's embedding
    image = dm.every_slice()[7]["image"][None]
    with torch.no_grad():
        expected = features(encoder.eval(), image)
    assert np.allclose(first.features[7], expected[0].numpy(), atol=2e-3, rtol=2e-3)

    calls.clear()
    again = load_or_extract(lambda: pytest.fail("the encoder was loaded again"), file_digest(str(first_path)), dm,
                            data, flip=False)
    assert calls == [] and again.folder == first.folder
    assert np.array_equal(np.asarray(again.features), np.asarray(first.features))

    second_path = tmp_path / "second.ckpt"  # retrained: other weights, other bytes
    encoder = save_encoder(dm, second_path, seed=1)
    rebuilt = load_or_extract(lambda: encoder, file_digest(str(second_path)), dm, data, flip=False)
    assert sum(calls) == len(dm.index) and rebuilt.folder != first.folder
    assert not np.allclose(np.asarray(rebuilt.features), np.asarray(first.features))


# --- two stages end to end --------------------------------------------------------------------------------


def run_stage(tmp_path, name, *overrides, phantom: bool = True):
    """A fast train.py run into tmp_path/name; stage 2 brings its own model, an image folder its own data."""
    base = [o for o in FAST_RUN if not o.startswith("model=") and (phantom or not o.startswith("data.phantom."))]
    if not any(o.startswith("model=") for o in overrides):
        base.append("model=tiny")
    cfg = compose_config("train", [*base, f"output_dir={tmp_path / name}", *overrides])
    return train(cfg)


@pytest.mark.slow
def test_stage_two_trains_on_stage_one_and_evaluates_with_the_same_metric_names(cache_dir, tmp_path):
    stage_one = run_stage(tmp_path, "one", "task=multilabel", "trainer.max_epochs=2")
    stage_two = run_stage(tmp_path, "two", "model=sequence", f"model.encoder={tmp_path / 'one'}",
                          "trainer.max_epochs=3", "logger=wandb")
    one_tested = {k for k, v in stage_one.items() if k.startswith("test/")}
    assert one_tested <= set(stage_two)  # the same names, slice and exam level, incl. the RSNA metric
    assert {"test/logloss_weighted", "test/exam_auroc", "test/exam_score_auroc"} <= set(stage_two)
    assert stage_two["data/slices_test"] == stage_one["data/slices_test"]  # the same test patients
    assert (tmp_path / "two" / "split.csv").read_text() == (tmp_path / "one" / "split.csv").read_text()
    assert "at the operating point" in (tmp_path / "two" / "report.html").read_text()
    # W&B dashboards work for stage 2 too: its matrices and curves (its batches hold no slices to show)
    assert (tmp_path / "two" / "figures" / "val" / "roc.png").is_file()
    assert not (tmp_path / "two" / "figures" / "val" / "slices.png").exists()

    cfg = compose_config("evaluate", [f"ckpt_path={tmp_path / 'two'}", f"output_dir={tmp_path / 'eval'}"])
    evaluated = evaluate(cfg)
    tested = {k: v for k, v in stage_two.items() if k.startswith("test/") and k != "test/loss"}
    assert {name for name in evaluated if name.startswith("test/")} == set(tested)
    assert {name: evaluated[name] for name in tested} == pytest.approx(tested, abs=1e-5, nan_ok=True)
    predictions = pd.read_csv(tmp_path / "eval" / "predictions.csv")

    # predict_series on one series' stacks, as a prediction script would call it, agrees with evaluate.py
    model = SequenceLitModule.load_from_checkpoint(sorted((tmp_path / "two" / "checkpoints").glob("epoch*.ckpt"))[0],
                                                   map_location="cpu", weights_only=True)
    dm = make_datamodule(cache_dir, tmp_path / "dm")
    index = dm.index
    first = predictions["image_id"].iloc[0]
    series = index.loc[index["image_id"] == first, "series"].iloc[0]
    rows = np.flatnonzero(index["series"].to_numpy() == series)
    slices = dm.every_slice()
    stacks = torch.stack([slices[int(row)]["image"] for row in rows])
    probs, exam = predict_series(model, stacks)
    ids = index["image_id"].to_numpy()[rows]
    expected = predictions.set_index("image_id").loc[[i for i in ids if i in set(predictions["image_id"])]]
    got = pd.DataFrame(probs, index=ids, columns=[f"prob_{n}" for n in model.task.outputs]).loc[expected.index]
    assert np.allclose(got.to_numpy(), expected[got.columns].to_numpy(), atol=1e-2)
    assert exam.shape == (6,) and ((0 <= exam) & (exam <= 1)).all()

    # a stage-2 checkpoint carries its encoder: with the encoder's run and the cached embeddings gone, evaluation
    # embeds the slices again and gives the same figures
    shutil.rmtree(tmp_path / "one")
    shutil.rmtree(cache_dir / "embeddings")
    cfg = compose_config("evaluate", [f"ckpt_path={tmp_path / 'two'}", f"output_dir={tmp_path / 'eval2'}"])
    again = evaluate(cfg)
    assert {name: again[name] for name in tested} == pytest.approx(tested, abs=1e-5, nan_ok=True)


@pytest.fixture()
def png_folder(tmp_path):
    """The phantom as PNGs; labels.csv rows shuffled, so only its series/slice columns give the order."""
    from ich.data.phantom import generate_images

    folder = tmp_path / "pngs"
    generate_images(folder, patients=10, slices=5, size=64, seed=2)
    labels = pd.read_csv(folder / "labels.csv")
    labels.sample(frac=1.0, random_state=0).to_csv(folder / "labels.csv", index=False)
    return folder, labels


def test_image_folders_with_series_and_slice_columns_get_true_neighbours(cache_dir, png_folder, tmp_path):
    from ich.data.datamodule import ICHDataModule

    folder, labels = png_folder
    assert {"series", "slice"} <= set(labels.columns)
    dm = ICHDataModule(source="images", root=str(folder), labels=str(folder / "labels.csv"), cache_dir=str(cache_dir),
                       image_size=64, context=1, num_workers=0, seed=0, output_dir=str(tmp_path))
    dm.setup()
    middle = labels[labels["slice"] == 2].iloc[0]
    dataset = dm.every_slice()
    row = int(np.flatnonzero(dataset.image_ids == middle["filename"].split("/")[-1][:-4].encode())[0])
    image = dataset[row]["image"].numpy()  # context 1, one grey plane per slice: slices 1, 2, 3 of its series
    for channel, k in enumerate((1, 2, 3)):
        name = labels[(labels["series"] == middle["series"]) & (labels["slice"] == k)]["filename"].iloc[0]
        assert np.array_equal(image[channel], cv2.imread(str(folder / name), cv2.IMREAD_GRAYSCALE)), k

    labels.drop(columns=["slice"]).to_csv(folder / "no_order.csv", index=False)
    plain = ICHDataModule(source="images", root=str(folder), labels=str(folder / "no_order.csv"),
                          cache_dir=str(cache_dir), image_size=64, context=1, num_workers=0)
    with pytest.raises(ValueError, match=r"data.context=1 needs each slice's place in its series: add a `slice` column"):
        plain.setup()


@pytest.mark.slow
def test_stage_two_runs_on_an_image_folder_with_context(cache_dir, png_folder, tmp_path):
    folder, _ = png_folder
    images = ["data=images", f"data.root={folder}", f"data.labels={folder / 'labels.csv'}", "data.context=1"]
    stage_one = run_stage(tmp_path, "one", *images, phantom=False)
    stage_two = run_stage(tmp_path, "two", "model=sequence", f"model.encoder={tmp_path / 'one'}", "trainer.max_epochs=2")
    assert {k for k in stage_one if k.startswith("test/")} <= set(stage_two)
    assert "test/exam_auroc" in stage_two  # a series column makes exams of PNG slices too
    written = [json.loads(path.read_text())["key"]["data"] for path in (cache_dir / "embeddings").glob("*/embeddings.json")]
    assert any(data["source"] == "images" and data["context"] == 1 for data in written)
