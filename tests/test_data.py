"""The data layer on real DICOM files written by the phantom: labels, index, splits, tasks, context."""

import numpy as np
import pandas as pd
import pytest
import torch

from ich.data.datamodule import ICHDataModule
from ich.data.sources import read_image_table, read_rsna_labels
from ich.data.splits import split_by_patient, undersample
from conftest import PHANTOM, make_datamodule
from ich.tasks import LABELS, SUBTYPES



def write_rsna_csv(path, rows):
    pd.DataFrame(rows, columns=["ID", "Label"]).to_csv(path, index=False)


def six_rows(image_id, positives=()):
    return [(f"{image_id}_{name}", int(name in positives)) for name in LABELS]


# -- label files --------------------------------------------------------------------------------
def test_rsna_labels_drop_duplicate_rows_and_pivot(tmp_path):
    rows = six_rows("ID_a", {"any", "subdural"}) + six_rows("ID_b") + six_rows("ID_a", {"any", "subdural"})[:2]
    write_rsna_csv(tmp_path / "labels.csv", rows)
    table = read_rsna_labels(tmp_path / "labels.csv").set_index("image_id")
    assert list(table.index) == ["ID_a", "ID_b"]
    assert list(table.columns) == list(LABELS)
    assert table.loc["ID_a", "subdural"] == 1 and table.loc["ID_a", "epidural"] == 0
    assert table.loc["ID_b"].sum() == 0


@pytest.mark.parametrize(
    "rows, message",
    [
        (six_rows("ID_a") + [("ID_a_any", 1)], "contradicting"),
        (six_rows("ID_a") + [("ID_a_tumour", 0)], "unknown label names"),
        ([(i, 2 if i.endswith("any") else v) for i, v in six_rows("ID_a")], "must be 0 or 1"),
        (six_rows("ID_a")[:5], "all six labels"),
    ],
)
def test_rsna_labels_reject_bad_files_with_one_sentence(tmp_path, rows, message):
    write_rsna_csv(tmp_path / "labels.csv", rows)
    with pytest.raises(ValueError, match=message):
        read_rsna_labels(tmp_path / "labels.csv")


def test_image_table_needs_the_task_labels(tmp_path):
    pd.DataFrame({"filename": ["a.png"], "any": [1]}).to_csv(tmp_path / "labels.csv", index=False)
    with pytest.raises(ValueError, match=r"needs label column\(s\) \['epidural'"):
        read_image_table(tmp_path, tmp_path / "labels.csv", LABELS)


# -- splits and balance ---------------------------------------------------------------------------
def toy_index(patients=40, slices=5, positive_every=3):
    rows = [
        {"image_id": f"ID_{p}_{s}", "patient": f"P{p}", "any": int(p % positive_every == 0)}
        for p in range(patients)
        for s in range(slices)
    ]
    return pd.DataFrame(rows)


def test_split_keeps_each_patient_in_one_stage_and_stratifies():
    index = toy_index()
    stages = split_by_patient(index, (0.7, 0.15, 0.15), seed=3)
    per_patient = index.assign(stage=stages).groupby("patient")["stage"].nunique()
    assert (per_patient == 1).all()
    positives = index.assign(stage=stages).groupby("stage")["any"].sum()
    assert (positives > 0).all(), "every stage should hold hemorrhage patients"
    assert stages.equals(split_by_patient(index, (0.7, 0.15, 0.15), seed=3))
    assert not stages.equals(split_by_patient(index, (0.7, 0.15, 0.15), seed=4))


def test_split_that_leaves_a_stage_empty_is_refused():
    with pytest.raises(ValueError, match="leaves the val split empty"):
        split_by_patient(toy_index(patients=3), (0.9, 0.05, 0.05), seed=0)
    with pytest.raises(ValueError, match="summing to 1"):
        split_by_patient(toy_index(), (0.7, 0.2, 0.2), seed=0)


def test_undersample_to_one_to_one():
    table = toy_index()
    balanced = undersample(table, table["any"].to_numpy(), ratio=1.0, seed=0)
    counts = balanced["any"].value_counts()
    assert counts[0] == counts[1] == table["any"].sum()


# -- the data module on phantom DICOMs ------------------------------------------------------------
def test_index_counts_the_corrupt_file_and_orders_series(cache_dir, tmp_path):
    dm = make_datamodule(cache_dir, tmp_path)
    index, summary, folder = dm.build_index()
    assert summary.skipped.get("unreadable", 0) + summary.skipped.get("bad_pixel_data", 0) == 1
    assert summary.read + 1 == summary.files_found == PHANTOM["patients"] * PHANTOM["slices"]
    skipped = pd.read_csv(folder / "skipped.csv")
    assert len(skipped) == 1 and skipped["image_id"].str.startswith("ID_").all()
    for _, series in index.groupby("series"):
        positions = series.sort_values("slice_index")["position"].to_numpy()
        assert np.all(np.diff(positions) > 0), "slices must be ordered along the slice normal"
    # no raw identifiers: patient ids are pseudonyms
    assert index["patient"].str.startswith("P").all()


def test_index_is_reused_when_nothing_changed(cache_dir, tmp_path):
    dm = make_datamodule(cache_dir, tmp_path)
    _, _, folder = dm.build_index()
    stamp = (folder / "index.parquet").stat().st_mtime_ns
    dm.build_index()
    assert (folder / "index.parquet").stat().st_mtime_ns == stamp
    dm.build_index(force=True)
    assert (folder / "index.parquet").stat().st_mtime_ns != stamp


@pytest.mark.parametrize("task, shape, dtype", [("binary", (1,), torch.float32), ("multilabel", (6,), torch.float32), ("subtype", (), torch.int64)])
def test_each_task_gets_its_targets(cache_dir, tmp_path, task, shape, dtype):
    dm = make_datamodule(cache_dir, tmp_path, task=task)
    batch = next(iter(dm.val_dataloader()))
    # windowed uint8, laid out channels-last: a quarter of float32's bytes to the GPU, in the layout it convolves fastest
    assert batch["image"].shape[1:] == (3, 64, 64) and batch["image"].dtype == torch.uint8
    assert batch["image"].is_contiguous(memory_format=torch.channels_last)
    assert batch["target"].shape[1:] == shape and batch["target"].dtype == dtype
    train = dm.tables["train"]
    if task == "subtype":
        assert (train[list(SUBTYPES)].sum(axis=1) == 1).all(), "subtype keeps single-subtype positives only"
        assert batch["target"].max() < len(SUBTYPES)
    else:
        assert train["any"].nunique() == 2, "binary and multilabel keep negative slices"


def test_split_file_is_written_disjoint_by_patient_and_reused(cache_dir, tmp_path):
    dm = make_datamodule(cache_dir, tmp_path)
    split = pd.read_csv(tmp_path / "split.csv")
    assert (split.groupby("patient")["split"].nunique() == 1).all()
    assert set(split["split"]) == {"train", "val", "test"}
    again = make_datamodule(cache_dir, tmp_path / "again", split_file=str(tmp_path / "split.csv"), seed=99)
    assert set(again.tables["test"]["image_id"]) == set(dm.tables["test"]["image_id"])


def test_context_stacks_neighbouring_slices_as_channels(cache_dir, tmp_path):
    dm = make_datamodule(cache_dir, tmp_path, context=1, windows=["brain", "subdural", "bone"])
    assert dm.num_channels == 9
    dataset = dm.datasets["val"]
    table = dm.tables["val"]
    row = int(np.flatnonzero((table["slice_index"] > 0) & (table["slice_index"] < table["series_length"] - 1))[0])
    series = table.iloc[row]["series"]
    stack = dataset.stacks[row]
    # the middle of the stack is the slice itself, the others its neighbours along the normal
    assert stack[1] == table.iloc[row]["path"]
    index, _, _ = dm.build_index()
    order = index[index["series"] == series].set_index("path")["slice_index"]
    assert [order[p] for p in stack] == [order[stack[1]] - 1, order[stack[1]], order[stack[1]] + 1]
    image = dataset[row]["image"]
    assert image.shape == (9, 64, 64)
    assert torch.equal(image[3:6], make_datamodule(cache_dir, tmp_path, windows=["brain", "subdural", "bone"]).datasets["val"][row]["image"])


def test_one_window_is_repeated_to_three_channels(cache_dir, tmp_path):
    dm = make_datamodule(cache_dir, tmp_path, windows=["brain"])
    image = dm.datasets["val"][0]["image"]
    assert image.shape[0] == 3 and torch.equal(image[0], image[2])


def test_blank_slices_are_dropped_and_counted(cache_dir, tmp_path):
    everything = make_datamodule(cache_dir, tmp_path)
    filtered = make_datamodule(cache_dir, tmp_path, min_brain_fraction=0.2)
    dropped = filtered.summary["skipped"]["little_brain"]
    assert dropped > 0
    assert sum(filtered.summary["slices"].values()) == sum(everything.summary["slices"].values()) - dropped


def test_augmentation_touches_training_slices_only(cache_dir, tmp_path):
    dm = make_datamodule(cache_dir, tmp_path, augment={"hflip": 1.0, "affine_p": 0.0, "blur_p": 0.0, "brightness_contrast_p": 0.0})
    assert torch.equal(dm.datasets["val"][0]["image"], dm.datasets["val"][0]["image"])
    train = dm.datasets["train"]
    plain = np.stack(train.loader(train.stacks[0][0]))
    assert np.array_equal(train[0]["image"].numpy(), plain[:, :, ::-1])


def test_class_weights_follow_the_training_split(cache_dir, tmp_path):
    dm = make_datamodule(cache_dir, tmp_path, task="multilabel")
    targets = dm.datasets["train"].targets
    weights = np.array(dm.pos_weight())
    positives = targets.sum(axis=0)
    assert weights.shape == (6,)
    seen = positives > 0
    assert np.allclose(weights[seen], (len(targets) - positives[seen]) / positives[seen])


def test_images_source_reads_windowed_pngs_and_counts_missing_files(cache_dir, tmp_path):
    import cv2

    dm = make_datamodule(cache_dir, tmp_path, windows=["brain"])
    rows = []
    for i, row in dm.tables["train"].head(12).iterrows():
        image = dm.datasets["train"].loader(row["path"])[0]
        cv2.imwrite(str(tmp_path / f"{row['image_id']}.png"), image)
        rows.append({"filename": f"{row['image_id']}.png", "patient": f"p{i % 6}", "any": row["any"]})
    rows.append({"filename": "ghost.png", "patient": "p0", "any": 0})
    pd.DataFrame(rows).to_csv(tmp_path / "labels.csv", index=False)
    images = ICHDataModule(source="images", root=str(tmp_path), labels=str(tmp_path / "labels.csv"),
                           cache_dir=str(cache_dir), image_size=32, num_workers=0, split=(0.5, 0.25, 0.25), seed=0)
    images.setup()
    assert images.summary["skipped"]["missing_file"] == 1
    assert sum(images.summary["slices"].values()) == 12
    assert images.datasets["train"][0]["image"].shape == (3, 32, 32)


def test_unknown_source_and_missing_root_are_one_sentence(tmp_path):
    with pytest.raises(ValueError, match="data=phantom, data=rsna or data=images"):
        ICHDataModule(source="kaggle")
    with pytest.raises(ValueError, match="needs data.root"):
        ICHDataModule(source="rsna")
    with pytest.raises(FileNotFoundError, match="does not exist"):
        ICHDataModule(source="rsna", root=str(tmp_path / "nowhere"), cache_dir=str(tmp_path)).prepare_data()


def _params(rows: int, **changed) -> torch.Tensor:
    """Identity augmentation parameters for `rows` slices, with {name: (row, value)} changes."""
    from ich.data.augment import _IDENTITY, PARAMS

    params = torch.from_numpy(np.tile(_IDENTITY, (rows, 1)))
    for name, (row, value) in changed.items():
        params[row, PARAMS.index(name)] = value
    return params


def test_device_augmentation_flips_turns_and_leaves_untouched_slices_alone():
    from ich.data.augment import DeviceAugmentation

    images = torch.rand(3, 3, 16, 16)
    out = DeviceAugmentation.apply(images, _params(3, flip=(0, 1.0), angle=(1, 90.0)))
    assert torch.equal(out[0], images[0].flip(-1))
    torch.testing.assert_close(out[1], torch.rot90(images[1], k=-1, dims=(1, 2)))  # a quarter turn moves pixel centres onto pixel centres
    assert torch.equal(out[2], images[2])


def test_device_augmentation_blurs_and_shifts_brightness_within_0_1():
    from ich.data.augment import DeviceAugmentation

    images = torch.rand(2, 3, 32, 32)
    out = DeviceAugmentation.apply(images, _params(2, blur_sigma=(0, 1.0), contrast=(1, 1.5), brightness=(1, 0.2)))
    assert out[0].std() < 0.6 * images[0].std()  # noise averaged away
    assert abs(float(out[0].mean() - images[0].mean())) < 0.01  # a blur moves no brightness
    torch.testing.assert_close(out[1], (images[1] * 1.5 + 0.2).clamp(0, 1))


def test_augment_on_gpu_draws_in_the_loader_and_augments_training_batches_after_the_copy(cache_dir, tmp_path):
    """data.augment_on=gpu: workers only read and window; the batch is augmented after the copy, seeded as on the CPU."""
    from ich.data.ondevice import finish_batch

    dm = make_datamodule(cache_dir, tmp_path, augment_on="gpu", augment={"hflip": 1.0, "affine_p": 0.0, "blur_p": 0.0,
                                                                          "brightness_contrast_p": 0.0})
    loader = dm.train_dataloader()
    batch = next(iter(loader))
    assert batch["augment"].shape == (len(batch["image"]), 7) and torch.equal(batch["augment"], next(iter(loader))["augment"])
    plain = batch["image"].clone()
    augmented = finish_batch(batch)
    assert "augment" not in augmented and augmented["image"].dtype == torch.float32
    torch.testing.assert_close(augmented["image"], plain.flip(-1).float() / 255)
    assert "augment" not in next(iter(dm.val_dataloader()))


@pytest.mark.parametrize("cache", [False, True])
def test_window_on_gpu_sends_hu_and_the_device_gives_the_cpu_paths_images(cache_dir, tmp_path, cache):
    """data.window_on=gpu: one int16 HU channel per slice crosses to the GPU; windowed there, the channels
    match the CPU path's, in order, within its 256 levels."""
    from ich.data.ondevice import finish_batch

    settings = dict(context=1, windows=["brain", "subdural", [600, 2800]], augment_on="gpu", cache=cache)
    cpu = next(iter(make_datamodule(cache_dir, tmp_path, **settings).val_dataloader()))
    gpu_dm = make_datamodule(cache_dir, tmp_path, window_on="gpu", **settings)
    batch = next(iter(gpu_dm.val_dataloader()))
    assert batch["image"].dtype == torch.int16 and batch["image"].shape[1:] == (3, 64, 64)  # three slices of HU
    assert gpu_dm.num_channels == 9
    images = finish_batch(batch)["image"]
    assert images.shape[1:] == (9, 64, 64) and "windows" not in batch
    assert (images - cpu["image"].float() / 255).abs().max() <= 0.5 / 255 + 1e-6


@pytest.mark.parametrize("window_on", ["cpu", "gpu"])
def test_lightning_finishes_every_batch_on_the_device_before_the_model_sees_it(cache_dir, tmp_path, window_on):
    import pytorch_lightning as pl

    from ich.module import ICHLitModule

    dm = make_datamodule(cache_dir, tmp_path, augment_on="gpu", window_on=window_on)
    seen = []

    class Capture(pl.Callback):
        def on_train_batch_start(self, trainer, module, batch, batch_idx):
            seen.append((batch["image"].dtype, sorted(batch)))

    trainer = pl.Trainer(fast_dev_run=1, accelerator="cpu", logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False, callbacks=[Capture()])
    trainer.fit(ICHLitModule(backbone="test_resnet", pretrained=False), datamodule=dm)
    assert seen == [(torch.float32, ["image", "image_id", "target"])]


def test_hu_batches_given_to_the_model_directly_say_what_to_do():
    from ich.module import ICHLitModule

    with pytest.raises(ValueError, match="finish_batch"):
        ICHLitModule(backbone="test_resnet", pretrained=False)(torch.zeros(1, 3, 32, 32, dtype=torch.int16))


def test_unknown_or_conflicting_device_options_are_one_sentence():
    with pytest.raises(ValueError, match="use cpu .* or gpu"):
        ICHDataModule(augment_on="tpu")
    with pytest.raises(ValueError, match="set data.augment_on=gpu as well"):
        ICHDataModule(window_on="gpu")
    with pytest.raises(ValueError, match="windowed already"):
        ICHDataModule(window_on="gpu", augment_on="gpu", cache=True, cache_format="window8")
