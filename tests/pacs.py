"""Real DICOM parts for the tests: Orthanc as the PACS, dcmtk's command-line clients, a scanner's phantom study.

Each part runs as its own process on free ports, with its files and log in a test's tmp folder, and is stopped
when the `with` block ends. Peers talk over 127.0.0.1, but Orthanc 1.10 and storescp listen on every interface
(neither can bind loopback alone); Orthanc's HTTP answers loopback only. Where Debian's `orthanc` or `dcmtk` is
not installed (`.ci/run` installs both) the test that needs it skips, saying so. A failed command or request
raises AssertionError with the command's exit status and output, or Orthanc's answer and the end of its log.

    with start_storescp(tmp_path / "dest") as dest, \\
            start_orthanc(tmp_path / "pacs", {"dest": [dest.aet, "127.0.0.1", dest.port]}) as pacs:
        pacs.upload(study.folder)
        pacs.send(study.study_uid, "dest")
"""

import functools
import json
import os
import shutil
import socket
import subprocess
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from io import BytesIO
from pathlib import Path

import pydicom
import pytest
from pydicom import config
from pydicom.dataset import Dataset
from pydicom.uid import generate_uid

from ich.data.phantom import generate

HOST = "127.0.0.1"
# dcmtk (the command-line tools, and Orthanc, which Debian links against the same library) leaves Nagle's
# algorithm on unless TCP_NODELAY=1: each small DIMSE message then waits for a delayed ACK, about 90 ms per file
# on loopback (40 files in 3.6 s instead of 0.12 s).
DCMTK_ENV = {**os.environ, "TCP_NODELAY": "1"}
START_S = 30.0  # an Orthanc or storescp that is not answering after this long has failed
COMMAND_S = 120.0  # the most one dcmtk client run may take


# --- processes, ports, waiting ---------------------------------------------------------------------------------


@functools.cache
def find(program: str, package: str) -> str | None:
    """The first `program` on PATH that belongs to `package`. pynetdicom installs Python apps named as dcmtk's
    (echoscu, storescu, storescp) with other options, and an activated virtual environment puts them first.
    Debian installs Orthanc into /usr/sbin, which is not on a user's PATH."""
    for folder in [*os.get_exec_path(), "/usr/sbin"]:
        path = shutil.which(program, path=folder)
        if path and (package != "dcmtk" or "$dcmtk:" in subprocess.run(
                [path, "--version"], capture_output=True, text=True, timeout=COMMAND_S).stdout):
            return path
    return None


def require(program: str, package: str) -> str:
    """The program's path, or a skip naming the Debian package to install."""
    path = find(program, package)
    if path is None:
        pytest.skip(f"cannot run {program} because the Debian package {package} is not installed: "
                    f"apt-get install -y {package}, as .ci/run does")
    return path


def free_port() -> int:
    """A TCP port nothing listens on now (the kernel's choice); the process given it binds it moments later."""
    with socket.socket() as probe:
        probe.bind((HOST, 0))
        return probe.getsockname()[1]


def tail(log: Path, lines: int = 40) -> str:
    text = log.read_text(errors="replace") if log.exists() else "(no log written)"
    return f"--- last lines of {log} ---\n" + "\n".join(text.splitlines()[-lines:])


def wait_until(condition: Callable[[], object], timeout: float, what: str, log: Path | None = None):
    """Poll `condition` until it returns something truthy and return that; fail after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        result = condition()
        if result:
            return result
        if time.monotonic() > deadline:
            where = f"\n{tail(log)}" if log else ""
            raise AssertionError(f"timed out after {timeout:g} s waiting for {what}{where}")
        time.sleep(0.1)


@contextmanager
def running(command: list[str], log: Path, ready: Callable[[], bool], what: str) -> Iterator[subprocess.Popen]:
    """Start `command` with its output in `log`, wait until `ready()`, and terminate it (then wait) on exit."""
    with log.open("wb") as out:
        process = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT, env=DCMTK_ENV)
    try:
        wait_until(lambda: process.poll() is not None or ready(), START_S, f"{what} to start", log)
        if process.poll() is not None:
            raise AssertionError(f"{what} exited with status {process.returncode} at start\n{tail(log)}")
        yield process
    finally:
        process.terminate()
        try:
            process.wait(timeout=15)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


# --- dcmtk ------------------------------------------------------------------------------------------------------


def dcmtk(program: str, *arguments: str, check: bool = True) -> subprocess.CompletedProcess:
    """Run one dcmtk client; with `check`, a non-zero exit fails with the command line and what it printed."""
    command = [require(program, "dcmtk"), *arguments]
    done = subprocess.run(command, capture_output=True, text=True, timeout=COMMAND_S, env=DCMTK_ENV)
    if check and done.returncode != 0:
        raise AssertionError(f"`{' '.join(command)}` exited with status {done.returncode}:\n"
                             f"{done.stdout}{done.stderr}")
    return done


def echoscu(port: int, aet: str = "ECHOSCU", called: str = "ANY-SCP",
            check: bool = True) -> subprocess.CompletedProcess:
    """C-ECHO the node on `port`, calling as `aet`."""
    return dcmtk("echoscu", "-to", "5", "-aet", aet, "-aec", called, HOST, str(port), check=check)


def storescu(port: int, *paths: Path, aet: str = "STORESCU", called: str = "ANY-SCP", options: tuple = (),
             check: bool = True) -> subprocess.CompletedProcess:
    """C-STORE files, and every file under folders (`+sd +r`), to the node on `port` in one association.

    `options` go to storescu as they are: `-nh` to go on after a refused file, `+II` to invent new instance UIDs.
    """
    return dcmtk("storescu", "-to", "5", "+sd", "+r", "-aet", aet, "-aec", called, *options, HOST, str(port),
                 *map(str, paths), check=check)


@dataclass(frozen=True)
class StoreSCP:
    """A running dcmtk storescp: a destination that writes what it receives into `folder`."""

    aet: str
    port: int
    folder: Path
    log: Path

    def received(self) -> list[Dataset]:
        return [pydicom.dcmread(path) for path in sorted(self.folder.iterdir())]


@contextmanager
def start_storescp(folder: Path, aet: str = "DEST") -> Iterator[StoreSCP]:
    """A storescp on a free port accepting every storage class and transfer syntax it knows, for the block."""
    storescp = require("storescp", "dcmtk")
    scp = StoreSCP(aet=aet, port=free_port(), folder=folder / "received", log=folder / "storescp.log")
    scp.folder.mkdir(parents=True)
    command = [storescp, "--verbose", "-aet", aet, "+xa", "-dhl", "-od", str(scp.folder), str(scp.port)]
    with running(command, scp.log, lambda: echoscu(scp.port, called=aet, check=False).returncode == 0, "storescp"):
        yield scp


# --- Orthanc ----------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Orthanc:
    """A running Orthanc: its DICOM and HTTP ports, its log, and the REST calls the tests make."""

    aet: str
    port: int  # DICOM
    http_port: int
    log: Path

    def request(self, method: str, path: str, body: bytes | None = None) -> bytes:
        # no proxy: an http_proxy in the environment must not take loopback requests elsewhere
        opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
        request = urllib.request.Request(f"http://{HOST}:{self.http_port}{path}", data=body, method=method)
        try:
            with opener.open(request, timeout=COMMAND_S) as answer:
                return answer.read()
        except urllib.error.HTTPError as error:
            raise AssertionError(f"Orthanc answered {method} {path} with {error.code}: "
                                 f"{error.read().decode(errors='replace')}\n{tail(self.log)}") from None

    def get(self, path: str):
        return json.loads(self.request("GET", path))

    def post(self, path: str, body: object):
        return json.loads(self.request("POST", path, json.dumps(body).encode()))

    def answering(self) -> bool:
        try:
            self.get("/system")
        except OSError:  # not listening yet (URLError and ConnectionError are OSErrors)
            return False
        return True

    def upload(self, folder: Path) -> list[str]:
        """Every file under `folder` through the REST API (POST /instances); returns their Orthanc ids."""
        answers = [json.loads(self.request("POST", "/instances", path.read_bytes()))
                   for path in sorted(folder.rglob("*")) if path.is_file()]
        return [answer["ID"] for answer in answers]

    def study_id(self, study_uid: str) -> str | None:
        """Orthanc's id of the study with this StudyInstanceUID, None while it holds no such study.

        Orthanc files a study under its patient: an object of the study with another PatientID makes a second
        study beside the first, which fails here (a result filed apart from its images is not seen with them).
        """
        found = self.post("/tools/find", {"Level": "Study", "Query": {"StudyInstanceUID": study_uid}})
        assert len(found) <= 1, (f"Orthanc holds {len(found)} studies with StudyInstanceUID {study_uid}: "
                                 "objects of it came with different PatientIDs")
        return found[0] if found else None

    def series(self, study_uid: str) -> list[dict]:
        """The study's series as Orthanc describes them (`MainDicomTags` with Modality, `Instances`, ...)."""
        study_id = self.study_id(study_uid)
        return self.get(f"/studies/{study_id}/series") if study_id else []

    def instances(self, study_uid: str) -> list[dict]:
        """Every instance of the study (`ID`, `MainDicomTags` with SOPInstanceUID, ...)."""
        study_id = self.study_id(study_uid)
        return self.get(f"/studies/{study_id}/instances") if study_id else []

    def wait_for_series(self, study_uid: str, modality: str, count: int = 1, timeout: float = 60.0) -> list[dict]:
        """The study's series of this Modality (SR, OT, ...) once there are at least `count` of them."""
        def found():
            series = [s for s in self.series(study_uid) if s["MainDicomTags"].get("Modality") == modality]
            return series if len(series) >= count else None

        return wait_until(found, timeout, f"{count} {modality} series in Orthanc's study", self.log)

    def send(self, study_uid: str, modality: str) -> dict:
        """Ask Orthanc to C-STORE the whole study to one of its `DicomModalities`; returns once it is sent."""
        study_id = self.study_id(study_uid)
        assert study_id, f"Orthanc holds no study {study_uid} to send"
        return self.post(f"/modalities/{modality}/store", {"Resources": [study_id], "Synchronous": True})

    def read(self, instance_id: str) -> Dataset:
        """One stored instance's file, as pydicom reads it."""
        return pydicom.dcmread(BytesIO(self.request("GET", f"/instances/{instance_id}/file")))


@contextmanager
def start_orthanc(folder: Path, modalities: dict | None = None, aet: str = "ORTHANC",
                  **settings) -> Iterator[Orthanc]:
    """An empty Orthanc on free ports for the block, its database and log in `folder`.

    `modalities` are Orthanc's DicomModalities, the peers it may send to: {"ich": ["ICH", "127.0.0.1", 11112]}.
    `settings` are further configuration keys, e.g. DicomAlwaysAllowStore=False to accept only those peers.
    """
    program = require("Orthanc", "orthanc")
    folder.mkdir(parents=True, exist_ok=True)
    pacs = Orthanc(aet=aet, port=free_port(), http_port=free_port(), log=folder / "orthanc.log")
    configuration = {
        "Name": "ich-tests",
        "DicomAet": aet,
        "DicomPort": pacs.port,
        "HttpPort": pacs.http_port,
        "StorageDirectory": str(folder / "db"),
        "IndexDirectory": str(folder / "db"),
        "RemoteAccessAllowed": False,  # HTTP from loopback only, and then no user is needed
        "AuthenticationEnabled": False,
        "DicomModalities": modalities or {},
        **settings,
    }
    (folder / "orthanc.json").write_text(json.dumps(configuration, indent=2))
    with running([program, str(folder / "orthanc.json")], pacs.log, pacs.answering, "Orthanc"):
        yield pacs


# --- a study as a scanner sends it ------------------------------------------------------------------------------


@dataclass(frozen=True)
class Study:
    """A phantom head CT written as one folder of DICOM files, with the UIDs a test checks against."""

    folder: Path
    patient_id: str
    study_uid: str
    series_uid: str
    sop_uids: tuple[str, ...]  # in slice order


def phantom_study(folder: Path, slices: int = 40, size: int = 64, seed: int = 0) -> Study:
    """One phantom patient's CT series as a scanner writes it: valid UIDs, a name, a PatientID, an accession
    number (the phantom itself has RSNA's `ID_...` names), one file per slice in `folder`."""
    with tempfile.TemporaryDirectory() as raw:
        summary = generate(raw, patients=1, slices=slices, size=size, seed=seed, quirks=False)
        patient_id, study_uid, series_uid = f"MRN{7730000 + seed}", generate_uid(), generate_uid()
        (image_ids,) = summary["series"].values()
        folder.mkdir(parents=True, exist_ok=True)
        sop_uids = []
        with config.disable_value_validation():  # pydicom checks the `ID_...` UIDs as it replaces them
            for k, image_id in enumerate(image_ids):
                ds = pydicom.dcmread(Path(raw) / "stage_2_train" / f"{image_id}.dcm")
                ds.StudyInstanceUID, ds.SeriesInstanceUID = study_uid, series_uid
                ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
                ds.PatientName, ds.PatientID = f"DOE^JANE{seed}", patient_id
                ds.AccessionNumber, ds.StudyID, ds.SeriesNumber, ds.InstanceNumber = f"ACC{seed:06d}", "1", 2, k + 1
                ds.StudyDate, ds.StudyTime = "20260301", "101500"
                ds.save_as(folder / f"IM{k:04d}", enforce_file_format=True)
                sop_uids.append(ds.SOPInstanceUID)
    return Study(folder, patient_id, study_uid, series_uid, tuple(sop_uids))
