"""The node's spool: every acknowledged file is on disk before its success status goes back, and each study's
answers are recorded only once their files are stored, so a SIGKILL at any point loses nothing acknowledged.

Layout under `serve.spool` (names are pseudonyms, ich.core.privacy; the files themselves hold the identifiers):

    tmp/                                  files being written: synced, then renamed into place
    studies/<study>/files/<instance>.dcm  what was received, one file per SOP instance
    studies/<study>/answers/<n>/          the n-th answer: its SR and Secondary Capture files, and answer.json
    studies/<study>/state.json            the answers recorded, written after their files are stored and queued
    outbox/<destination>/<file>           answers waiting for a destination (hard links to the answer's files)
    rejected/<name>.dcm and .txt          what did not parse, and why
    undeliverable/<destination>/<file>    answers a destination refused for good, each with a .txt saying why

An answer becomes real when its folder is renamed from a staging name to its number; `recover` finishes the
queueing and recording of any answer a kill interrupted after that point, and the staging folder of one it
interrupted before is dropped (the study is still unanswered, so it is answered again).
"""

import json
import os
import re
import shutil
import tempfile
import threading
import time
from io import BytesIO
from pathlib import Path

import pydicom
from pydicom.dataset import Dataset

from ich.core.privacy import pseudonym

STATE = "state.json"
ANSWER = "answer.json"
STAGING = ".staging-"  # an answer folder being written; renamed to its number once complete


def sync_folder(folder: Path) -> None:
    """fsync a folder, so that a rename or a new name in it survives a power cut, not just a killed process."""
    handle = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(handle)
    finally:
        os.close(handle)


def destination_folder(ae_title: str, host: str, port: int) -> str:
    """A destination's outbox folder name: its AE title, host and port, in characters any file system takes."""
    return re.sub(r"[^A-Za-z0-9._-]", "_", f"{ae_title.strip()}@{host}_{port}")


def encoded(ds: Dataset) -> bytes:
    """A dataset as a DICOM file (Part 10: preamble and file meta), in memory."""
    buffer = BytesIO()
    pydicom.dcmwrite(buffer, ds, enforce_file_format=True)
    return buffer.getvalue()


class Spool:
    """The spool folder and its byte count, shared by the reception threads, the worker and the forwarder."""

    def __init__(self, root: Path, max_bytes: int, destinations: list[str]):
        self.root, self.max_bytes, self.destinations = root, max_bytes, destinations
        self.tmp, self.studies, self.outboxes, self.rejected = (root / name for name in
                                                                 ("tmp", "studies", "outbox", "rejected"))
        for folder in (self.tmp, self.studies, self.rejected, *(self.outboxes / d for d in destinations)):
            folder.mkdir(parents=True, exist_ok=True)
        for leftover in self.tmp.iterdir():  # half-written by a killed process: never acknowledged
            leftover.unlink()
        self.lock = threading.Lock()
        self.used = folder_bytes(root)

    # --- what arrives ------------------------------------------------------------------------------------

    def has_room(self, size: int) -> bool:
        with self.lock:
            return self.used + size <= self.max_bytes

    def write_synced(self, path: Path, data: bytes) -> None:
        """Write to a temporary file, fsync it, rename it over `path` and fsync the folder: all or nothing."""
        handle, draft = tempfile.mkstemp(dir=self.tmp)
        with os.fdopen(handle, "wb") as file:
            file.write(data)
            file.flush()
            os.fsync(file.fileno())
        os.replace(draft, path)
        sync_folder(path.parent)
        with self.lock:
            self.used += len(data)

    def folder(self, path: Path) -> Path:
        """`path` made if missing, its parent synced so that the new name survives too."""
        if not path.is_dir():
            path.mkdir(parents=True, exist_ok=True)
            sync_folder(path.parent)
        return path

    def store(self, study_uid: str, instance_uid: str, data: bytes) -> str:
        """Keep one received file in its study's folder; returns the study's key. A file sent again replaces
        its earlier copy (same SOP instance, same name)."""
        key = pseudonym(study_uid)
        files = self.folder(self.folder(self.studies / key) / "files")
        self.write_synced(files / f"{pseudonym(instance_uid)}.dcm", data)
        return key

    def reject(self, data: bytes, instance_uid: str, reason: str) -> Path:
        """Keep a file that did not parse aside, with its reason beside it, for someone to look at."""
        name = f"{time.time_ns()}-{pseudonym(instance_uid) or 'no-uid'}"
        self.write_synced(self.rejected / f"{name}.txt", (reason + "\n").encode())
        self.write_synced(self.rejected / f"{name}.dcm", data)
        return self.rejected / f"{name}.dcm"

    # --- studies -----------------------------------------------------------------------------------------

    def study_keys(self) -> list[str]:
        return sorted(path.name for path in self.studies.iterdir() if (path / "files").is_dir())

    def files(self, key: str) -> list[Path]:
        folder = self.studies / key / "files"
        return sorted(folder.iterdir()) if folder.is_dir() else []

    def last_arrival(self, key: str) -> float:
        """When the study's newest file was stored (wall clock, seconds)."""
        return max((path.stat().st_mtime for path in self.files(key)), default=0.0)

    def state(self, key: str) -> dict:
        path = self.studies / key / STATE
        return json.loads(path.read_text()) if path.is_file() else {"answers": []}

    def answered(self, key: str) -> bool:
        """Whether the study's last answer read every file it holds now (a file sent again is no new file)."""
        answers = self.state(key)["answers"]
        return bool(answers) and set(answers[-1]["covers"]) == {path.name for path in self.files(key)}

    def own_series(self, key: str) -> set[str]:
        """The series of this node's own answers to the study: echoed back by a PACS, they are no new input."""
        return {uid for answer in self.state(key)["answers"] for uid in answer["series"]}

    def answer_files(self, key: str, number: int) -> list[Path]:
        folder = self.studies / key / "answers" / str(number)
        return sorted(path for path in folder.iterdir() if path.suffix == ".dcm")

    # --- answers -----------------------------------------------------------------------------------------

    def commit_answer(self, key: str, record: dict, datasets: dict[str, Dataset]) -> None:
        """Store an answer's files and record (all of them, or nothing), queue it for every destination, then
        write it into the study's state."""
        answers = self.folder(self.studies / key / "answers")
        staging = answers / f"{STAGING}{record['number']}"
        shutil.rmtree(staging, ignore_errors=True)
        staging.mkdir()
        for name, ds in datasets.items():
            self.write_synced(staging / name, encoded(ds))
        self.write_synced(staging / ANSWER, json.dumps(record).encode())
        os.replace(staging, answers / str(record["number"]))  # the answer exists from here on
        sync_folder(answers)
        self.finish_answer(key, record)

    def finish_answer(self, key: str, record: dict) -> None:
        """Queue a stored answer for each destination and record it: both steps may be repeated safely."""
        for destination in self.destinations:
            outbox = self.outboxes / destination
            for path in self.answer_files(key, record["number"]):
                link = outbox / f"{key}-{record['number']}-{path.name}"
                if not link.exists():
                    os.link(path, link)
            sync_folder(outbox)
        state = self.state(key)
        if record["number"] not in [answer["number"] for answer in state["answers"]]:
            state["answers"].append(record)
            self.write_synced(self.studies / key / STATE, json.dumps(state, indent=1).encode())

    def recover(self) -> int:
        """Finish what a kill interrupted: answers stored but not yet queued or recorded; staging folders of
        answers never stored are dropped. Returns how many answers were finished."""
        finished = 0
        for key in self.study_keys():
            answers = self.studies / key / "answers"
            if not answers.is_dir():
                continue
            recorded = {answer["number"] for answer in self.state(key)["answers"]}
            for folder in sorted(answers.iterdir(), key=lambda path: path.name):
                if folder.name.startswith(STAGING):
                    shutil.rmtree(folder)
                elif int(folder.name) not in recorded:
                    self.finish_answer(key, json.loads((folder / ANSWER).read_text()))
                    finished += 1
        return finished

    # --- the outbox --------------------------------------------------------------------------------------

    def outbox(self, destination: str) -> list[Path]:
        """Files waiting for `destination`, oldest answer first."""
        return sorted((self.outboxes / destination).iterdir(), key=lambda path: (path.stat().st_mtime, path.name))

    def sent(self, path: Path) -> None:
        path.unlink()
        sync_folder(path.parent)

    def undeliverable(self, path: Path, reason: str) -> Path:
        """Move an outbox file that its destination refused for good to undeliverable/<destination>/, beside a .txt
        with `reason`, so the answers behind it go on; returns where it is now."""
        folder = self.folder(self.folder(self.root / "undeliverable") / path.parent.name)
        self.write_synced(folder / f"{path.name}.txt", (reason + "\n").encode())
        moved = folder / path.name
        os.replace(path, moved)
        sync_folder(folder)
        sync_folder(path.parent)
        return moved


def folder_bytes(root: Path) -> int:
    """Bytes under `root`, each file once however many hard links it has (the outbox links answers)."""
    seen, total = set(), 0
    for path in root.rglob("*"):
        if path.is_file():
            stat = path.stat()
            if (stat.st_dev, stat.st_ino) not in seen:
                seen.add((stat.st_dev, stat.st_ino))
                total += stat.st_size
    return total
