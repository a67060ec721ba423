"""`python -m ich.bench` on tiny settings: it runs and writes every figure the speed page's table needs."""

import json

import pytest

from ich.bench import main


def test_bench_writes_every_figure_as_json(tmp_path):
    out = tmp_path / "bench.json"
    result = main(["--slices", "8", "--dicom-size", "64", "--size", "32", "--batch-size", "2", "--steps", "1",
                   "--warmup", "1", "--repeats", "1", "--min-seconds", "0", "--compare-loader", "--loader-workers", "0",
                   "--scale", "--scale-slices", "3000", "--scale-series", "90",
                   "--vs-plain-steps", "1", "--vs-plain-size", "32", "--vs-plain-patients", "8",
                   "--threads", "1", "--peak-tflops", "1", "--out", str(out)])
    written = json.loads(out.read_text())
    assert written == json.loads(json.dumps(result))
    assert set(written["per_core"]) == {"dicom_naive", "dicom_ich", "loader_dicom", "loader_dicom_augmented",
                                        "loader_cache", "loader_cache_augmented", "loader_cache_site_augmented"}
    assert all(rate > 0 for rate in written["per_core"].values())
    model = written["model"]
    assert model["train_images_per_s"] > 0 and model["infer_images_per_s"] > 0
    assert model["forward_gflops_per_image"] > 0 and model["train_gflops_per_image"] > 2 * model["forward_gflops_per_image"]
    assert model["train_peak_fraction"] == round(model["train_tflops_per_s"] / 1, 4)
    assert model["loader_vs_random"]["real_images_per_s"] > 0
    assert set(written["targets"]) == {"dicom_vs_naive", "cache_vs_dicom", "real_vs_random", "ich_vs_plain_images",
                                       "ich_vs_plain_dicom_cache"}
    assert written["projection"]["slices"] == 752_803 and written["projection"]["epoch_hours_cache_path"] > 0
    assert written["machine"]["cores"] >= 1 and written["cache_build"]["images_per_s"] > 0
    for source in ("images", "dicom_cache"):  # train/ich_vs_plain: the same steps through ich and a plain loop
        figures = written["train"]["ich_vs_plain"][source]
        assert figures["ich_images_per_s"] > 0 and figures["plain_images_per_s"] > 0
        # the ratio is of the measured rates; the rates are written rounded to 0.01, hence the tolerance
        assert figures["ratio"] == pytest.approx(figures["ich_images_per_s"] / figures["plain_images_per_s"], rel=0.01)
    assert {"ich_vs_plain_images", "ich_vs_plain_dicom_cache"} <= set(written["targets"])
    scale = written["scale"]
    assert (scale["slices"], scale["series"]) == (3000, 90)
    assert 0.6 * 3000 < scale["train_slices"] < 0.8 * 3000  # 70% of the patients
    # 3 neighbour rows (int64), one float target, a 12-byte id, and the path of every slice of the index
    assert scale["bytes_per_slice"] > 3 * 8 + 4 + 12
    assert scale["setup_s"] > 0 and set(scale["targets"]) == {"setup_s", "worker_rss_growth_mb"}
