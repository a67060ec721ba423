"""The data layer on real DICOM files written by the phantom: labels, index, splits, tasks, context."""

import hashlib
import json

import numpy as np
import pandas as pd
import pytest
import torch

from ich.data.datamodule import ICHDataModule
from ich.data.sources import read_image_table, read_rsna_labels
from ich.data.splits import split_by_patient, undersample
from conftest import PHANTOM, make_datamodule
from ich.core.tasks import LABELS, SUBTYPES



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


def test_the_same_seed_splits_the_same_images_alike_under_another_installations_salt():
    index = toy_index()
    # another installation's secret salt gives every patient another pseudonym, in another sorted order
    renamed = index.assign(patient=index["patient"].map(lambda name: hashlib.sha256(b"other salt" + name.encode()).hexdigest()))
    assert list(renamed.groupby("patient").size().index.map(lambda p: renamed.loc[renamed.patient == p, "image_id"].iloc[0])) != \
        list(index.groupby("patient").size().index.map(lambda p: index.loc[index.patient == p, "image_id"].iloc[0]))
    stages = split_by_patient(index, (0.7, 0.15, 0.15), seed=3)
    assert stages.equals(split_by_patient(renamed, (0.7, 0.15, 0.15), seed=3))


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
    index, _, _ = dm.build_index()
    stack = [index.iloc[r] for r in dataset.stacks[row]]
    # the middle of the stack is the slice itself, the others its neighbours along the normal
    assert stack[1]["image_id"] == table.iloc[row]["image_id"]
    assert [s["series"] for s in stack] == [series] * 3
    assert [s["slice_index"] for s in stack] == [stack[1]["slice_index"] + d for d in (-1, 0, 1)]
    image = dataset[row]["image"]
    assert image.shape == (9, 64, 64)
    assert torch.equal(image[3:6], make_datamodule(cache_dir, tmp_path, windows=["brain", "subdural", "bone"]).datasets["val"][row]["image"])


def test_context_neighbours_are_the_true_ones_after_blank_slices_are_dropped(cache_dir, tmp_path):
    """With data.min_brain_fraction dropping slices, each stack is still (s-1, s, s+1) of the full series:
    the centre is the labelled slice, and a dropped blank slice can be a neighbour."""
    filtered = make_datamodule(cache_dir, tmp_path, context=1, min_brain_fraction=0.2, windows=["brain"], split=(0.0, 0.0, 1.0))
    assert filtered.summary["skipped"]["little_brain"] > 0
    plain = make_datamodule(cache_dir, tmp_path / "plain", windows=["brain"], split=(0.0, 0.0, 1.0))
    index = plain.tables["test"].set_index(["series", "slice_index"])
    by_id = {image_id: i for i, image_id in enumerate(plain.tables["test"]["image_id"])}
    checked = 0
    for i, slice_ in filtered.tables["test"].iterrows():
        image = filtered.datasets["test"][i]["image"]
        for k, step in enumerate((-1, 0, 1)):
            neighbour = min(max(slice_["slice_index"] + step, 0), slice_["series_length"] - 1)
            expected = plain.datasets["test"][by_id[index.loc[(slice_["series"], neighbour), "image_id"]]]["image"]
            # one window: one channel per slice of the stack (a lone slice repeats its one to three)
            assert torch.equal(image[k], expected[0]), f"{slice_['image_id']}: channel {k}"
            checked += 1
    assert checked == 3 * len(filtered.tables["test"]) > 0


def test_one_window_is_repeated_to_three_channels(cache_dir, tmp_path):
    dm = make_datamodule(cache_dir, tmp_path, windows=["brain"])
    image = dm.datasets["val"][0]["image"]
    assert image.shape[0] == 3 and torch.equal(image[0], image[2])


def test_two_windows_make_two_channels(cache_dir, tmp_path):
    dm = make_datamodule(cache_dir, tmp_path, windows=["brain", "bone"])
    assert dm.num_channels == 2 == dm.datasets["val"][0]["image"].shape[0]


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
    plain = np.stack(train.loader(train.stacks[0][0]))  # the slice's row, read and windowed without augmentation
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
        image = dm.datasets["train"].loader(row["row"])[0]
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
    with pytest.raises(ValueError, match="data=phantom, data=rsna, data=images, data=nifti or data=multi"):
        ICHDataModule(source="kaggle")
    with pytest.raises(ValueError, match="needs data.root"):
        ICHDataModule(source="rsna")
    with pytest.raises(FileNotFoundError, match="does not exist"):
        ICHDataModule(source="rsna", root=str(tmp_path / "nowhere"), cache_dir=str(tmp_path)).prepare_data()


def test_a_small_image_folder_is_decoded_once_not_every_epoch(cache_dir, tmp_path, monkeypatch):
    import cv2

    from ich.data.phantom import generate_images

    written = generate_images(tmp_path / "pngs", patients=6, slices=3, size=64, seed=3)
    labels = pd.read_csv(tmp_path / "pngs" / "labels.csv")
    assert written["files"] == len(labels) == 18 and labels["patient"].nunique() == 6
    reads = []
    imread = cv2.imread
    monkeypatch.setattr(cv2, "imread", lambda *args: reads.append(args[0]) or imread(*args))
    dm = ICHDataModule(source="images", root=str(tmp_path / "pngs"), labels=str(tmp_path / "pngs" / "labels.csv"),
                       cache_dir=str(cache_dir), image_size=32, num_workers=0, batch_size=4, split=(0.5, 0.25, 0.25))
    dm.setup()
    after_setup = len(reads)
    for _ in range(2):  # two epochs, augmented differently, from the planes decoded at setup
        batches = list(dm.train_dataloader())
    assert len(reads) == after_setup <= 18 + 1
    assert sum(len(batch["image"]) for batch in batches) > 0


# -- image ids: one per slice, whatever the layout ------------------------------------------------------------


def ct_ich_layout(root, patients: int, slices: int) -> pd.DataFrame:
    """The phantom's PNGs laid out as CT-ICH's JPG release is: one folder per patient, slices named 1.png, 2.png..."""
    import shutil

    from ich.data.phantom import generate_images

    generate_images(root / "flat", patients=patients, slices=slices, size=64, seed=5)
    labels = pd.read_csv(root / "flat" / "labels.csv")
    patients_in_order = {patient: k + 1 for k, patient in enumerate(dict.fromkeys(labels["patient"]))}
    names = [f"p{patients_in_order[row.patient]}/{row.slice + 1}.png" for row in labels.itertuples()]
    for source, name in zip(labels["filename"], names):
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(root / "flat" / source, root / name)
    labels["filename"] = names
    labels.to_csv(root / "labels.csv", index=False)
    return labels


def test_images_of_the_same_name_in_two_folders_get_two_ids_and_a_flat_folder_keeps_its_names(tmp_path):
    ct_ich_layout(tmp_path, patients=2, slices=2)
    table = read_image_table(tmp_path, tmp_path / "labels.csv", ("any",))
    assert sorted(table["image_id"]) == ["p1/1", "p1/2", "p2/1", "p2/2"]

    pd.DataFrame({"filename": ["1.png", "2.png"], "any": [0, 1]}).to_csv(tmp_path / "flat.csv", index=False)
    assert read_image_table(tmp_path, tmp_path / "flat.csv", ("any",))["image_id"].tolist() == ["1", "2"]


def test_two_images_with_one_id_are_refused_naming_both(tmp_path):
    pd.DataFrame({"filename": ["p1/1.png", "p1/1.jpg"], "any": [0, 1]}).to_csv(tmp_path / "labels.csv", index=False)
    with pytest.raises(ValueError, match=r"^p1/1\.png and p1/1\.jpg both get the image id 1: give each image one"):
        read_image_table(tmp_path, tmp_path / "labels.csv", ("any",))


def test_two_labelled_dicoms_with_one_file_name_are_refused_and_unlabelled_ones_get_their_paths(cache_dir, tmp_path):
    import shutil

    from ich.data.datamodule import phantom_root
    from ich.data.index import build_index

    make_datamodule(cache_dir, tmp_path)  # writes the phantom
    source = next((phantom_root(cache_dir, PHANTOM) / "stage_2_train").glob("*.dcm"))
    for folder in ("a", "b"):
        (tmp_path / "dicoms" / folder).mkdir(parents=True)
        shutil.copy(source, tmp_path / "dicoms" / folder / source.name)
    labels = pd.DataFrame({"image_id": [source.stem], **{label: [0] for label in LABELS}})  # labels name files
    with pytest.raises(ValueError, match=rf"^a/{source.stem}\.dcm and b/{source.stem}\.dcm both get the image id"):
        build_index(tmp_path / "dicoms", labels, workers=1)
    # a hospital export without labels repeats file names in every series folder: each slice is its path
    index, _, _ = build_index(tmp_path / "dicoms", None, workers=1)
    assert sorted(index["image_id"]) == [f"a/{source.stem}", f"b/{source.stem}"]


@pytest.mark.slow
def test_training_on_ct_ichs_folder_layout_reaches_its_test_metrics(cache_dir, tmp_path):
    from conftest import FAST_RUN, compose_config
    from ich.train import run as train

    ct_ich_layout(tmp_path / "data", patients=10, slices=6)
    fast = [o for o in FAST_RUN if not o.startswith("data.phantom.")]
    cfg = compose_config("train", [*fast, "data=images", f"data.root={tmp_path / 'data'}", "task=binary",
                                   f"data.labels={tmp_path / 'data' / 'labels.csv'}", f"output_dir={tmp_path / 'run'}"])
    train(cfg)  # the operating points and exams of the test stage pair each prediction with its slice by id
    metrics = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert metrics["data/slices_test"] > 0 and "test/op_sensitivity" in metrics and "test/exam_auroc" in metrics
