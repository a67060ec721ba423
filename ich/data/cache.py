"""The slice cache: every indexed slice converted once, at the training size, as int16 HU (128 KB a
slice at 256 px). The windows are applied after the cache, in the loader, so they stay configurable;
windowing is then the only work per slice besides augmentation. (A cache of uint8 windows was
removed: faster per core without augmentation, ~16,600 against ~9,100 images/s here, but augmentation
in the worker, ~1,700 images/s, bounds both, and it froze the windows.)

Reading a 512x512 DICOM costs about a millisecond of CPU (parse, decode, rescale, resize); a row of a
memory-mapped shard costs microseconds.

One folder per preprocessing setting, named by the hash of those settings, so that a changed setting
builds a new cache instead of reading stale pixels:

    slices-<hash>/settings.json    what the pixels depend on: size, reader version, the index
    slices-<hash>/slices.parquet   image_id, path, row, shard and offset in it of every slice, in index order
    slices-<hash>/shard-00000.npy  (rows, size, size) int16, written under a temporary name, renamed when full
    slices-<hash>/manifest.json    the shards known complete, and the slices that failed in each

Only shards listed in the manifest are trusted: an interrupted build resumes with the missing shards
and rewrites whatever else it finds.
"""

import fcntl
import hashlib
import json
import logging
import math
import os
from collections import Counter
from collections.abc import Iterator
from concurrent.futures import ProcessPoolExecutor, as_completed
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import pandas as pd
from tqdm.auto import tqdm

from ich.core.results import write_atomic
from ich.data.dicom import AIR_HU, READER_VERSION, DicomReadError, read_hu_square

log = logging.getLogger(__name__)

CACHE_VERSION = 2
# Large enough that RSNA at 256 px is ~200 files, small enough that a resume redoes little.
SHARD_BYTES = 512 << 20
MANIFEST = "manifest.json"


def cache_settings(index: pd.DataFrame, image_size: int) -> dict:
    """What the cached pixels depend on; a change in any of them means another cache folder."""
    paths = "\n".join(index["path"]).encode()
    return {
        "version": CACHE_VERSION,
        "reader": READER_VERSION,
        "image_size": int(image_size),
        "slices": len(index),
        "index": hashlib.sha1(paths).hexdigest(),  # the files and their order: rows follow the index
    }


def row_layout(settings: dict) -> tuple[tuple[int, ...], type]:
    """Shape and dtype of one slice in a cache of these settings."""
    return (settings["image_size"],) * 2, np.int16


def cache_folder(cache_dir: Path, settings: dict) -> Path:
    key = hashlib.sha1(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:12]
    return Path(cache_dir) / f"slices-{key}"


def shard_name(shard: int) -> str:
    return f"shard-{shard:05d}.npy"


class SliceCache:
    """A complete slice cache, read by row: the position of the slice in the index it was built from.

    Shards are memory-mapped on first use in each process (DataLoader workers open their own).
    """

    def __init__(self, folder: Path) -> None:
        self.folder = Path(folder)
        manifest = _read_manifest(self.folder)
        if manifest is None or _missing_shards(self.folder, manifest):
            raise ValueError(
                f"{self.folder} is not a complete slice cache: run `python -m ich.prepare cache=true` "
                "with the same data settings to finish it."
            )
        self.settings: dict = manifest["settings"]
        self.size: int = self.settings["image_size"]
        self.slices: int = self.settings["slices"]
        self.shard_rows: int = manifest["shard_rows"]
        self.failed: dict[int, dict] = {f["row"]: f for shard in manifest["shards"].values() for f in shard}
        self._shards: dict[int, np.ndarray] = {}

    def __getstate__(self) -> dict:
        # Memory maps stay in the process that opened them; a worker maps the shards again.
        return {**self.__dict__, "_shards": {}}

    def row(self, row: int) -> np.ndarray:
        """One slice as stored: size x size int16 HU, a read-only view into its shard."""
        failure = self.failed.get(row)
        if failure is not None:
            raise DicomReadError(failure["path"], failure["reason"], failure["detail"])
        shard, offset = divmod(row, self.shard_rows)
        rows = self._shards.get(shard)
        if rows is None:
            rows = self._shards[shard] = np.load(self.folder / shard_name(shard), mmap_mode="r")
        return rows[offset]

    def lines(self) -> list[str]:
        """What `python -m ich.prepare cache=true` prints."""
        shards = sorted(self.folder.glob("shard-*.npy"))
        megabytes = sum(s.stat().st_size for s in shards) / 1e6
        out = [
            f"slices: {self.slices} as int16 HU at {self.size}x{self.size}, in {len(shards)} shard(s)",
            f"size on disk: {megabytes / 1000:.1f} GB" if megabytes >= 1000 else f"size on disk: {megabytes:.1f} MB",
        ]
        reasons = Counter(f["reason"] for f in self.failed.values())
        out += [f"failed ({reason}): {count}" for reason, count in sorted(reasons.items())]
        return out


def load_or_build_cache(
    index: pd.DataFrame,
    cache_dir: Path,
    image_size: int,
    workers: int | None = None,
    shard_rows: int | None = None,
) -> SliceCache:
    """The cache of the index's slices (row i = index row i), converted or finished first when needed.

    `workers` processes convert (None = every core); `shard_rows` overrides the shard length of a new
    cache (the default keeps shards near SHARD_BYTES, and several per worker for small datasets).
    """
    settings = cache_settings(index, image_size)
    folder = cache_folder(cache_dir, settings)
    manifest = _read_manifest(folder, settings)
    if manifest is None or _missing_shards(folder, manifest):
        folder.mkdir(parents=True, exist_ok=True)
        with _exclusive(folder):  # a second process wanting the same cache waits and then finds it built
            _build(folder, index, settings, workers or os.cpu_count() or 1, shard_rows)
    return SliceCache(folder)


def _build(folder: Path, index: pd.DataFrame, settings: dict, workers: int, shard_rows: int | None) -> None:
    manifest = _read_manifest(folder, settings)  # again: another process may have built it meanwhile
    if manifest is None:
        others = sorted(p.name for p in folder.parent.glob("slices-*") if p != folder)
        if others:
            log.info("Building a new slice cache %s; those of other data or settings stay (delete them if unused): %s",
                     folder.name, ", ".join(others))
        rows = shard_rows or _default_shard_rows(settings, len(index), workers)
        manifest = _start(folder, index, settings, rows)
    missing = _missing_shards(folder, manifest)
    if not missing:
        return
    for leftover in folder.glob(".shard-*.tmp"):  # from a build that was stopped; never read
        leftover.unlink()
    rows = manifest["shard_rows"]
    paths = index["path"].tolist()
    jobs = [(folder, shard, paths[shard * rows : (shard + 1) * rows], shard * rows, settings) for shard in missing]
    todo = sum(len(job[2]) for job in jobs)
    if len(missing) < len(_shards(manifest)):
        log.info("Resuming the slice cache in %s: %d of %d shards left", folder, len(missing), len(_shards(manifest)))
    progress = tqdm(total=len(paths), initial=len(paths) - todo, desc="Caching slices", unit="slice", mininterval=1.0)
    with progress:
        for shard, failed in _convert_all(jobs, workers):
            manifest["shards"][str(shard)] = failed
            _write_json(folder / MANIFEST, manifest)
            progress.update(min(rows, len(paths) - shard * rows))
    failed = [f for shard in manifest["shards"].values() for f in shard]
    if failed:
        pd.DataFrame(failed).to_csv(folder / "failed.csv", index=False)
        for reason, count in sorted(Counter(f["reason"] for f in failed).items()):
            shown = ", ".join([Path(f["path"]).stem for f in failed if f["reason"] == reason][:10])
            log.warning(
                "%d slice(s) failed while caching (%s): %s; they are skipped in training like unreadable files. "
                "Full list in %s", count, reason, shown, folder / "failed.csv",
            )


def _convert_all(jobs: list[tuple], workers: int) -> Iterator[tuple[int, list[dict]]]:
    """Each job's (shard, failed slices) as it finishes; after an error, no new shard is started."""
    if workers <= 1 or len(jobs) == 1:
        yield from (_convert_shard(*job) for job in jobs)
        return
    with ProcessPoolExecutor(max_workers=min(workers, len(jobs))) as pool:
        futures = [pool.submit(_convert_shard, *job) for job in jobs]
        try:
            for future in as_completed(futures):
                yield future.result()
        finally:
            for future in futures:
                future.cancel()


def _convert_shard(folder: Path, shard: int, paths: list[str], first_row: int, settings: dict) -> tuple[int, list[dict]]:
    """Write one shard under a temporary name and give it its real name only once it is on disk."""
    tmp = folder / f".{shard_name(shard)}.{os.getpid()}.tmp"
    shape, dtype = row_layout(settings)
    rows = np.lib.format.open_memmap(tmp, mode="w+", dtype=dtype, shape=(len(paths), *shape))
    failed = []
    for offset, path in enumerate(paths):
        try:
            rows[offset] = read_hu_square(path, settings["image_size"])
        except DicomReadError as err:  # the index read it fine, so the file changed since: count it, go on
            rows[offset] = AIR_HU  # never read: the manifest lists the slice as failed
            failed.append({"row": first_row + offset, "path": path, "reason": err.reason, "detail": str(err)})
    rows.flush()
    del rows
    with open(tmp, "rb") as file:
        os.fsync(file.fileno())
    os.replace(tmp, folder / shard_name(shard))
    return shard, failed


def _default_shard_rows(settings: dict, slices: int, workers: int) -> int:
    """Shards of up to SHARD_BYTES, and at least four per worker so that small datasets convert in parallel."""
    shape, dtype = row_layout(settings)
    by_bytes = max(1, SHARD_BYTES // (math.prod(shape) * np.dtype(dtype).itemsize))
    return max(1, min(by_bytes, math.ceil(slices / (4 * workers))))


def _start(folder: Path, index: pd.DataFrame, settings: dict, shard_rows: int) -> dict:
    """A new, empty cache: its settings, its slice table, a manifest without shards."""
    for stale in [*folder.glob("shard-*.npy"), folder / "failed.csv"]:
        stale.unlink(missing_ok=True)
    rows = np.arange(len(index))
    table = pd.DataFrame({"image_id": index["image_id"], "path": index["path"], "row": rows,
                          "shard": rows // shard_rows, "offset": rows % shard_rows})
    write_atomic(folder / "slices.parquet", lambda tmp: table.to_parquet(tmp, index=False))
    _write_json(folder / "settings.json", settings)
    manifest = {"settings": settings, "shard_rows": shard_rows, "shards": {}}
    _write_json(folder / MANIFEST, manifest)
    return manifest


def _shards(manifest: dict) -> range:
    return range(math.ceil(manifest["settings"]["slices"] / manifest["shard_rows"]))


def _missing_shards(folder: Path, manifest: dict) -> list[int]:
    """Shards to write: not listed as complete, or listed but no longer a whole shard file."""
    rows, slices = manifest["shard_rows"], manifest["settings"]["slices"]
    shape, dtype = row_layout(manifest["settings"])
    missing = []
    for shard in _shards(manifest):
        expected = (min(rows, slices - shard * rows), *shape)
        if str(shard) not in manifest["shards"]:
            missing.append(shard)
        elif not _is_shard(folder / shard_name(shard), expected, dtype):
            log.warning("Shard %s of the slice cache is missing or damaged: writing it again", folder / shard_name(shard))
            missing.append(shard)
    return missing


def _is_shard(path: Path, shape: tuple[int, ...], dtype: type) -> bool:
    """Whether `path` is an .npy of `shape` and `dtype` whose data is all there (it maps only when it is)."""
    try:
        rows = np.load(path, mmap_mode="r")
    except (OSError, ValueError):  # absent, not an .npy, or shorter than its header says
        return False
    return rows.shape == shape and rows.dtype == dtype


def _read_manifest(folder: Path, settings: dict | None = None) -> dict | None:
    """The manifest, or None when there is none or it belongs to other settings."""
    path = folder / MANIFEST
    if not path.is_file():
        return None
    manifest = json.loads(path.read_text())
    return manifest if settings is None or manifest["settings"] == settings else None


def _write_json(path: Path, value: dict) -> None:
    write_atomic(path, lambda tmp: tmp.write_text(json.dumps(value, indent=1)))


@contextmanager
def _exclusive(folder: Path) -> Iterator[None]:
    with open(folder / ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        yield
