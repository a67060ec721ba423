"""Images per second on one CPU core from a DICOM file to a 3-window 256x256 float32 array.

Compares the naive way (pixel_array to float64 HU, window at 512, resize each channel) with ich's
(read_slice, fit_to_square(256) on HU, window_stack). Not a test: run it by hand and read the table.

    python benchmarks/dicom_throughput.py --files 200 --out results.json
"""

import os

# Thread pools size themselves when numpy and cv2 load, so pin them to one thread first.
for _variable in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ[_variable] = "1"

import argparse
import json
import math
import platform
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import cv2
import numpy as np
import pydicom
from pydicom import config

from ich.data.dicom import fit_to_square, read_slice
from ich.data.phantom import generate
from ich.data.windows import WINDOWS, parse_windows, window_stack

SIZE = 256
WINDOW_NAMES = ("brain", "subdural", "bone")
SLICES_PER_SERIES = 20


def naive(path: Path) -> np.ndarray:
    """What most public notebooks do: float64 HU, window at full size, resize each channel."""
    # Validation off as in ich: the phantom's RSNA-style "ID_..." UIDs would otherwise make every
    # read pay for a warning, and this benchmark is about the pixels.
    with config.disable_value_validation():
        ds = pydicom.dcmread(path)
        slope, intercept = float(ds.RescaleSlope), float(ds.RescaleIntercept)
        hu = ds.pixel_array.astype(np.float64) * slope + intercept
    channels = []
    for name in WINDOW_NAMES:
        center, width = WINDOWS[name]
        windowed = np.clip((hu - (center - width / 2)) / width, 0, 1)
        channels.append(cv2.resize(windowed, (SIZE, SIZE)))
    return np.stack(channels, axis=-1).astype(np.float32)


def make_ich_way() -> Callable[[Path], np.ndarray]:
    windows = parse_windows(list(WINDOW_NAMES))

    def ich_way(path: Path) -> np.ndarray:
        _, hu = read_slice(path)
        return window_stack(fit_to_square(hu, SIZE), windows)

    return ich_way


def images_per_second(way: Callable[[Path], np.ndarray], files: list[Path]) -> float:
    start = time.perf_counter()
    for path in files:
        way(path)
    return len(files) / (time.perf_counter() - start)


def cpu_model() -> str:
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.exists():
        for line in cpuinfo.read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--files", type=int, default=200, help="number of 512x512 phantom slices to write and read")
    parser.add_argument("--repeats", type=int, default=5, help="timed passes over all files per way")
    parser.add_argument("--out", type=Path, required=True, help="where to write the JSON results")
    args = parser.parse_args()

    cv2.setNumThreads(1)
    if hasattr(os, "sched_setaffinity"):
        os.sched_setaffinity(0, {min(os.sched_getaffinity(0))})
    ways = {"naive": naive, "ich": make_ich_way()}

    with tempfile.TemporaryDirectory() as folder:
        patients = math.ceil(args.files / SLICES_PER_SERIES)
        generate(folder, patients=patients, slices=SLICES_PER_SERIES, size=512, seed=0, quirks=False)
        files = sorted((Path(folder) / "stage_2_train").glob("*.dcm"))[: args.files]
        # Warm-up: page cache, imports and lazy plugin loading; also checks both ways agree.
        difference = float(np.abs(naive(files[0]) - ways["ich"](files[0])).mean())
        for way in ways.values():
            images_per_second(way, files[: min(20, len(files))])
        rates: dict[str, list[float]] = {name: [] for name in ways}
        for _ in range(args.repeats):  # interleaved, so drifts in machine load hit both ways alike
            for name, way in ways.items():
                rates[name].append(images_per_second(way, files))

    median = {name: statistics.median(values) for name, values in rates.items()}
    result = {
        "machine": {"cpu": cpu_model(), "processor": platform.processor(), "python": platform.python_version()},
        "versions": {"numpy": np.__version__, "pydicom": pydicom.__version__, "opencv": cv2.__version__},
        "cores_used": 1,
        "files": args.files,
        "repeats": args.repeats,
        "input": "ich.data.phantom slices, 512x512 16-bit, uncompressed, from the page cache",
        "output": f"{SIZE}x{SIZE}x{len(WINDOW_NAMES)} float32 ({', '.join(WINDOW_NAMES)})",
        "images_per_second": {name: round(rate, 1) for name, rate in median.items()},
        "images_per_second_all_repeats": {name: [round(r, 1) for r in values] for name, values in rates.items()},
        "speedup": round(median["ich"] / median["naive"], 2),
        "mean_abs_difference_first_file": round(difference, 5),
    }
    print(f"{'way':<8}{'images/s (median)':>20}{'ms/image':>10}")
    for name, rate in median.items():
        print(f"{name:<8}{rate:>20.1f}{1000 / rate:>10.2f}")
    print(f"speed-up {result['speedup']}x on one core of {result['machine']['cpu']}")
    args.out.write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
