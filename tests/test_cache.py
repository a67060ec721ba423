"""The slice cache on real phantom DICOMs: same tensors as the DICOM path, resumable, never stale."""

import json
import os
import re
import shutil

import numpy as np
import pandas as pd
import pytest
import torch

from ich.data import cache as cache_module
from ich.data.cache import SliceCache, load_or_build_cache
from ich.data.datamodule import ICHDataModule, resolve_workers
from ich.data.dataset import CacheLoader, SliceDataset, as_bytes
from ich.data.dicom import DicomReadError, read_hu_square
from ich.data.windows import parse_windows
from conftest import PHANTOM, SMALL_PHANTOM, compose_config
from conftest import make_datamodule as datamodule



def phantom_index(cache_dir, tmp_path) -> pd.DataFrame:
    return ICHDataModule(source="phantom", cache_dir=str(cache_dir), phantom=PHANTOM, output_dir=str(tmp_path)).build_index()[0]


def unaugmented_items(dataset: SliceDataset) -> list[dict]:
    plain = dataset.subset(np.arange(len(dataset)))  # no transform
    return [plain[i] for i in range(len(plain))]


@pytest.mark.parametrize("context", [0, 1])
def test_cache_gives_the_dicom_paths_tensors(cache_dir, tmp_path, monkeypatch, context):
    windows = ["brain", "subdural", [600, 2800]]
    dicom = datamodule(cache_dir, tmp_path, context=context, windows=windows)
    from_dicom = {stage: unaugmented_items(dataset) for stage, dataset in dicom.datasets.items()}
    cached = datamodule(cache_dir, tmp_path, context=context, windows=windows, cache=True)
    # From here on no DICOM may be read: the cached data module must not need them.
    monkeypatch.setattr("ich.data.dataset.read_hu_square", lambda *args: pytest.fail("read a DICOM"))
    for stage in ("train", "val", "test"):
        expected, got = from_dicom[stage], unaugmented_items(cached.datasets[stage])
        assert [item["image_id"] for item in got] == [item["image_id"] for item in expected]
        for want, have in zip(expected, got):
            assert have["image"].shape == (3 * (2 * context + 1), 64, 64)
            assert torch.equal(have["image"], want["image"]) and torch.equal(have["target"], want["target"])
    batch = next(iter(cached.train_dataloader()))  # augmentation still runs after the cache
    assert batch["image"].shape[1:] == (3 * (2 * context + 1), 64, 64)


def test_changed_settings_build_another_cache(cache_dir, tmp_path, monkeypatch):
    index = phantom_index(cache_dir, tmp_path)
    small = load_or_build_cache(index, tmp_path, 32, workers=1)
    assert load_or_build_cache(index, tmp_path, 32, workers=1).folder == small.folder  # same settings: reused
    larger = load_or_build_cache(index, tmp_path, 48, workers=1)
    assert larger.folder != small.folder and larger.row(0).shape == (48, 48)
    fewer = load_or_build_cache(index.iloc[1:].reset_index(drop=True), tmp_path, 32, workers=1)
    assert fewer.folder != small.folder
    assert np.array_equal(fewer.row(0), small.row(1))  # rows follow the index it was built from
    monkeypatch.setattr(cache_module, "READER_VERSION", cache_module.READER_VERSION + 1)
    assert load_or_build_cache(index, tmp_path, 32, workers=1).folder not in {small.folder, fewer.folder}
    assert json.loads((small.folder / "settings.json").read_text())["image_size"] == 32


def test_interrupted_build_resumes_and_never_trusts_a_partial_shard(cache_dir, tmp_path, monkeypatch):
    index = phantom_index(cache_dir, tmp_path)
    calls = []

    def power_cut_after_20_slices(path, size):
        calls.append(path)
        if len(calls) > 20:
            raise RuntimeError("power cut")
        return read_hu_square(path, size)

    monkeypatch.setattr(cache_module, "read_hu_square", power_cut_after_20_slices)
    with pytest.raises(RuntimeError, match="power cut"):
        load_or_build_cache(index, tmp_path, 32, workers=1, shard_rows=8)
    folder = next(tmp_path.glob("slices-*"))
    manifest = json.loads((folder / "manifest.json").read_text())
    assert sorted(manifest["shards"]) == ["0", "1"]  # shard 2 was cut off halfway
    assert list(folder.glob(".shard-00002.npy.*.tmp"))
    with pytest.raises(ValueError, match="not a complete slice cache"):
        SliceCache(folder)
    (folder / "shard-00003.npy").write_bytes(b"\x93NUMPY half a shard")  # a file the manifest does not list
    done = {name: (folder / name).stat() for name in ("shard-00000.npy", "shard-00001.npy")}

    monkeypatch.setattr(cache_module, "read_hu_square", read_hu_square)
    cache = load_or_build_cache(index, tmp_path, 32, workers=1, shard_rows=8)
    assert cache.folder == folder
    for name, before in done.items():  # resumed, not restarted
        assert (folder / name).stat().st_mtime_ns == before.st_mtime_ns
    assert not list(folder.glob(".*.tmp"))
    for row, path in enumerate(index["path"]):
        assert np.array_equal(cache.row(row), read_hu_square(path, 32))


def test_a_damaged_shard_is_written_again(cache_dir, tmp_path):
    index = phantom_index(cache_dir, tmp_path)
    cache = load_or_build_cache(index, tmp_path, 32, workers=1, shard_rows=16)
    shard = cache.folder / "shard-00001.npy"
    shard.write_bytes(shard.read_bytes()[:1000])  # truncated after the manifest listed it
    with pytest.raises(ValueError, match="not a complete slice cache"):
        SliceCache(cache.folder)
    again = load_or_build_cache(index, tmp_path, 32, workers=1)
    assert np.array_equal(again.row(20), read_hu_square(index["path"][20], 32))


def test_slices_failing_during_caching_are_counted_and_skipped(cache_dir, tmp_path, caplog):
    index = phantom_index(cache_dir, tmp_path).head(12).copy()
    copies = tmp_path / "dicoms"
    copies.mkdir()
    index["path"] = [str(shutil.copy(path, copies)) for path in index["path"]]
    broken = index["image_id"][5]
    (copies / f"{broken}.dcm").write_bytes(b"damaged after indexing")
    cache = load_or_build_cache(index, tmp_path / "cache", 32, workers=2)
    assert [f["reason"] for f in cache.failed.values()] == ["unreadable"]
    assert broken in caplog.text and (cache.folder / "failed.csv").is_file()
    assert "failed (unreadable): 1" in cache.lines()
    with pytest.raises(DicomReadError):
        cache.row(5)
    dataset = SliceDataset(np.arange(12)[:, None], np.zeros((12, 1), np.float32), as_bytes(index["image_id"]),
                           CacheLoader(cache, tuple(parse_windows(["brain"]))))
    assert dataset[5] is None and dataset[4] is not None  # skipped with a warning, like an unreadable DICOM


def test_prepare_builds_the_cache_and_prints_it(cache_dir, capsys):
    from ich.prepare import main

    main(compose_config("prepare", ["cache=true", "data.image_size=32", *SMALL_PHANTOM]))
    out = capsys.readouterr().out
    read = re.search(r"read: (\d+)", out).group(1)  # the phantom's corrupt file is not in the index
    assert "Slice cache:" in out and f"slices: {read} as int16 HU at 32x32" in out


def test_train_py_runs_on_the_slice_cache(cache_dir, tmp_path):
    """The speed page's advice for a loader-bound GPU, through the real conf/."""
    from conftest import FAST_RUN
    from ich.train import run

    metrics = run(compose_config("train", [*FAST_RUN, f"output_dir={tmp_path}", "data.cache=true"]))
    assert metrics["data/slices_train"] > 0 and "test/auroc" in metrics


def test_num_workers_auto_follows_the_cores(cache_dir, tmp_path):
    cores = len(os.sched_getaffinity(0))
    assert resolve_workers("auto") == max(1, min(8, cores)) and resolve_workers(3) == 3
    assert resolve_workers("auto", devices=64) == 1
    assert resolve_workers("auto", on_cpu=True) == 1 and resolve_workers(0, on_cpu=True) == 0
    with pytest.raises(ValueError, match="data.num_workers"):
        ICHDataModule(num_workers="many")
