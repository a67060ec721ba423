"""The DICOM node (`python -m ich.serve`) as a PACS meets it: pynetdicom sends from this process, a pynetdicom
storage SCP here stands for the destination, and the studies are phantom head CTs written as a scanner would
(valid UIDs, a patient name and an accession number).

What the answers must say comes from outside the node: predict.py's studies.csv on the same files, the DICOM
standard's status codes and SOP classes, and the UIDs this test sent.
"""

import hashlib
import json
import logging
import os
import shutil
import signal
import ssl
import subprocess
import sys
import time
from contextlib import contextmanager
from pathlib import Path

import pandas as pd
import pydicom
import pytest
from pydicom import config
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, generate_uid
from pynetdicom import AE, AllStoragePresentationContexts, evt
from pynetdicom.sop_class import (BasicTextSRStorage, ComprehensiveSRStorage, CTImageStorage,
                                  SecondaryCaptureImageStorage, Verification)

from conftest import FAST_RUN, compose_config
from pacs import echoscu, free_port, phantom_study, start_orthanc, start_storescp, storescu, wait_until
from ich.core.privacy import pseudonym
from ich.export import export
from ich.node.node import Node
from ich.node.spool import Spool
from ich.predict import run as predict_run
from ich.train import run as train


ROOT = Path(__file__).resolve().parent.parent
COMPREHENSIVE_SR = "1.2.840.10008.5.1.4.1.1.88.33"  # PS3.4: Comprehensive SR Storage
SECONDARY_CAPTURE = "1.2.840.10008.5.1.4.1.1.7"  # PS3.4: Secondary Capture Image Storage
CANNOT_UNDERSTAND, OUT_OF_RESOURCES = 0xC210, 0xA700  # PS3.4 Annex B C-STORE statuses
UID_ROOT = "1.2.826.0.1.3680043.8.498.77"  # a root for this test, so that "under uid_root" is checked
SLICES = 8
QUIET_S = 1.0
HEATMAPS = 2


# --- a model, studies and a destination --------------------------------------------------------------------


@pytest.fixture(scope="module")
def checkpoint(cache_dir, tmp_path_factory):
    """A tiny model trained in seconds: the node's answer is compared with predict.py's, not with the truth."""
    path = tmp_path_factory.mktemp("train")
    train(compose_config("train", [*FAST_RUN, f"output_dir={path}", f"data.cache_dir={cache_dir}", "test=false"]))
    return path


@pytest.fixture(scope="module")
def studies(tmp_path_factory) -> list[list[Dataset]]:
    """Three phantom studies as a scanner writes them (tests/pacs.py): valid UIDs, a name, a PatientID and an
    accession number."""
    root = tmp_path_factory.mktemp("phantom")
    folders = [phantom_study(root / str(p), slices=SLICES, size=64, seed=5 + p).folder for p in range(3)]
    return [[pydicom.dcmread(path) for path in sorted(folder.iterdir())] for folder in folders]


def identifiers(study: list[Dataset]) -> set[str]:
    first = study[0]
    values = {str(first.PatientName), str(first.PatientID), str(first.AccessionNumber), str(first.StudyInstanceUID),
              str(first.SeriesInstanceUID)}
    return values | {str(ds.SOPInstanceUID) for ds in study}


def save_folder(study: list[Dataset], folder: Path) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    for k, ds in enumerate(study):
        ds.save_as(folder / f"IM{k:04d}", enforce_file_format=True)
    return folder


@contextmanager
def destination(port: int, refuse: dict[str, int] | None = None, contexts=AllStoragePresentationContexts):
    """A storage SCP on `port` that keeps every dataset it receives (the PACS the answers go to); it answers the
    SOP classes of `refuse` with their failure status instead, and accepts only `contexts`."""
    received: list[Dataset] = []

    def store(event) -> int:
        ds = event.dataset
        ds.file_meta = event.file_meta
        if str(ds.SOPClassUID) in (refuse or {}):
            return refuse[str(ds.SOPClassUID)]
        received.append(ds)
        return 0x0000

    ae = AE(ae_title="DEST")
    ae.supported_contexts = contexts
    server = ae.start_server(("127.0.0.1", port), block=False, evt_handlers=[(evt.EVT_C_STORE, store)])
    try:
        yield received
    finally:
        server.shutdown()


def serve_overrides(checkpoint, tmp_path: Path, port: int, dest_port: int, *more: str, dest_aet: str = "DEST") -> list[str]:
    return [f"ckpt_path={checkpoint}", f"serve.spool={tmp_path / 'spool'}", f"serve.results_dir={tmp_path / 'results'}",
            f"serve.port={port}", f"serve.quiet_s={QUIET_S}", "serve.min_slices=4", f"serve.heatmaps={HEATMAPS}",
            f"serve.uid_root={UID_ROOT}", "serve.retry.first_s=0.2", "serve.retry.max_s=1", "serve.retry.timeout_s=5",
            f"serve.destinations=[{{ae_title: {dest_aet}, host: 127.0.0.1, port: {dest_port}}}]", *more]


@contextmanager
def running_node(checkpoint, tmp_path: Path, *more: str, port: int | None = None, dest_port: int | None = None,
                 dest_aet: str = "DEST"):
    """A node in this process (on free ports unless given); yields (node, its port, the destination's port)."""
    port, dest_port = port or free_port(), dest_port or free_port()
    node = Node(compose_config("serve", serve_overrides(checkpoint, tmp_path, port, dest_port, *more,
                                                        dest_aet=dest_aet)))
    node.start()
    try:
        yield node, port, dest_port
    finally:
        node.stop()


def associate(port: int, calling: str = "PACS", classes=(CTImageStorage, BasicTextSRStorage), tls=None):
    ae = AE(ae_title=calling)
    ae.add_requested_context(Verification)
    for sop_class in classes:
        ae.add_requested_context(sop_class, ExplicitVRLittleEndian)
    return ae.associate("127.0.0.1", port, ae_title="ICH", tls_args=tls)


def send(port: int, items, calling: str = "PACS") -> list[int]:
    """C-STORE each dataset or file in one association; the statuses."""
    assoc = associate(port, calling)
    assert assoc.is_established, "the node did not accept the association"
    with config.disable_value_validation():
        statuses = [int(assoc.send_c_store(item).Status) for item in items]
    assoc.release()
    return statuses


def wait_for(condition, timeout: float = 60.0, what: str = "the answer"):
    return wait_until(condition, timeout, what)


def reports(received: list[Dataset], study_uid: str) -> list[Dataset]:
    return [ds for ds in received if ds.SOPClassUID == COMPREHENSIVE_SR and ds.StudyInstanceUID == study_uid]


def sr_outputs(sr: Dataset) -> dict[str, tuple[float, float]]:
    """output -> (probability, threshold), read from the SR's content with plain pydicom."""
    found = {}
    for item in sr.ContentSequence:
        if item.ValueType == "CONTAINER" and item.ConceptNameCodeSequence[0].CodeValue == "OUTPUT":
            values = {child.ConceptNameCodeSequence[0].CodeValue: child for child in item.ContentSequence}
            found[values["OUTPUT-NAME"].TextValue] = (
                float(values["PROBABILITY"].MeasuredValueSequence[0].NumericValue),
                float(values["THRESHOLD"].MeasuredValueSequence[0].NumericValue))
    return found


def evidence(sr: Dataset) -> set[str]:
    """The SOP instances the SR says it read (its Current Requested Procedure Evidence)."""
    return {sop.ReferencedSOPInstanceUID for study in sr.CurrentRequestedProcedureEvidenceSequence
            for series in study.ReferencedSeriesSequence for sop in series.ReferencedSOPSequence}


def text_items(sr: Dataset) -> str:
    return " ".join(str(item.get("TextValue", "")) for item in sr.ContentSequence)


def predicted(checkpoint, folder: Path, output_dir: Path) -> pd.DataFrame:
    """predict.py's studies.csv on the same files, as the reference the node's SR must match."""
    return predict_run(compose_config("predict", [f"ckpt_path={checkpoint}", f"input={folder}",
                                                  f"output_dir={output_dir}", "min_slices=4"]))


# --- association, reception ------------------------------------------------------------------------------------


def test_c_echo_is_answered_and_an_unknown_calling_ae_title_is_rejected(checkpoint, tmp_path, caplog):
    with running_node(checkpoint, tmp_path, "serve.allowed_callers=[PACS]") as (_, port, _):
        known = associate(port, calling="PACS")
        assert known.is_established and int(known.send_c_echo().Status) == 0x0000
        known.release()
        stranger = associate(port, calling="INTRUDER")
        assert stranger.is_rejected
    assert "INTRUDER" in caplog.text and "serve.allowed_callers" in caplog.text


def test_associations_beyond_the_limit_are_refused_and_the_pdu_is_the_one_configured(checkpoint, tmp_path, caplog):
    with running_node(checkpoint, tmp_path, "serve.max_associations=1", "serve.max_pdu=32768") as (_, port, _):
        first = associate(port)
        assert first.is_established and first.acceptor.maximum_length == 32768
        second = associate(port)
        assert second.is_rejected
        first.release()
    assert "serve.max_associations=1" in caplog.text


def test_a_node_reachable_from_other_machines_must_list_its_callers(checkpoint, tmp_path):
    cfg = compose_config("serve", serve_overrides(checkpoint, tmp_path, free_port(), free_port(), "serve.host=0.0.0.0"))
    with pytest.raises(ValueError, match="serve.allowed_callers"):
        Node(cfg)


def test_a_truncated_file_gets_a_failure_status_and_is_kept_aside(checkpoint, studies, tmp_path):
    cut = tmp_path / "cut.dcm"
    studies[0][0].save_as(cut, enforce_file_format=True)
    cut.write_bytes(cut.read_bytes()[:-3000])
    with running_node(checkpoint, tmp_path) as (node, port, _):
        assert send(port, [cut]) == [CANNOT_UNDERSTAND]
        rejected = node.spool.rejected
        assert len(list(rejected.glob("*.dcm"))) == 1
        assert "cut short" in next(rejected.glob("*.txt")).read_text()
        assert node.spool.study_keys() == []


def test_a_full_spool_refuses_files_with_out_of_resources(checkpoint, studies, tmp_path, caplog):
    with running_node(checkpoint, tmp_path, "serve.max_spool_gb=0.000001") as (node, port, _):
        statuses = send(port, studies[0])
    assert OUT_OF_RESOURCES in statuses
    assert "serve.max_spool_gb" in caplog.text


def test_an_answer_stored_before_a_kill_is_queued_and_recorded_after_it_and_a_half_written_one_is_dropped(tmp_path):
    spool = Spool(tmp_path / "spool", 10**9, ["DEST"])
    key = spool.store("1.2.3.4", "1.2.3.4.5", b"a received file")
    answer = Dataset()
    answer.file_meta = FileMetaDataset()
    answer.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    answer.SOPClassUID, answer.SOPInstanceUID = COMPREHENSIVE_SR, "1.2.3.4.6"
    record = {"number": 1, "covers": [path.name for path in spool.files(key)], "series": ["1.2.3.4.7"], "sr": "1.2.3.4.6",
              "failed": ""}
    spool.commit_answer(key, record, {"sr.dcm": answer})
    # as a kill after the answer's folder was renamed and before it was queued and recorded leaves it
    (spool.studies / key / "state.json").unlink()
    (spool.outboxes / "DEST" / f"{key}-1-sr.dcm").unlink()
    (spool.studies / key / "answers" / ".staging-2").mkdir()
    again = Spool(tmp_path / "spool", 10**9, ["DEST"])
    assert again.recover() == 1
    assert again.answered(key) and again.own_series(key) == {"1.2.3.4.7"}
    assert [path.name for path in again.outbox("DEST")] == [f"{key}-1-sr.dcm"]
    assert sorted(path.name for path in (again.studies / key / "answers").iterdir()) == ["1"]
    assert again.recover() == 0


# --- answers -------------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_a_study_comes_back_as_sr_and_secondary_captures_in_the_same_study(checkpoint, studies, tmp_path, caplog,
                                                                           capsys):
    caplog.set_level(logging.INFO)
    study = studies[0]
    reference = predicted(checkpoint, save_folder(study, tmp_path / "input"), tmp_path / "predict").iloc[0]
    with running_node(checkpoint, tmp_path) as (_, port, dest_port), destination(dest_port) as received:
        assert send(port, study) == [0x0000] * SLICES
        wait_for(lambda: len(received) == 1 + HEATMAPS)
    study_uid = str(study[0].StudyInstanceUID)
    (sr,) = reports(received, study_uid)
    captures = [ds for ds in received if ds.SOPClassUID == SECONDARY_CAPTURE]
    assert len(captures) == HEATMAPS and {ds.StudyInstanceUID for ds in captures} == {study_uid}
    for ds in [sr, *captures]:
        assert ds.PatientID == study[0].PatientID and ds.AccessionNumber == study[0].AccessionNumber
        assert ds.SeriesInstanceUID.startswith(UID_ROOT + ".") and ds.SOPInstanceUID.startswith(UID_ROOT + ".")
        assert ds.SeriesInstanceUID != study[0].SeriesInstanceUID
    assert all(ds.BurnedInAnnotation == "YES" for ds in captures)
    outputs = sr_outputs(sr)
    assert set(outputs) == {"any"}
    assert outputs["any"][0] == pytest.approx(reference["prob_any"], abs=1e-6)
    assert outputs["any"][1] == pytest.approx(reference["threshold_any"], abs=1e-6)
    assert "not for diagnosis" in text_items(sr).lower()
    assert "Trained on the synthetic phantom" in text_items(sr)  # what predict.py says first, said in the SR too
    assert evidence(sr) == {str(ds.SOPInstanceUID) for ds in study}
    results = pd.read_csv(tmp_path / "results" / pseudonym(study_uid) / "1" / "studies.csv")
    assert results["prob_any"].iloc[0] == pytest.approx(reference["prob_any"], abs=1e-6)
    said = caplog.text + capsys.readouterr().out
    assert "answer 1" in said
    assert not [value for value in identifiers(study) if value in said], "a log line names the patient or a UID"


@pytest.mark.slow
def test_a_non_image_object_is_accepted_and_listed_as_not_read(checkpoint, studies, tmp_path):
    study = studies[1]
    report = Dataset()
    report.file_meta = FileMetaDataset()
    report.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    report.SOPClassUID = report.file_meta.MediaStorageSOPClassUID = BasicTextSRStorage
    report.SOPInstanceUID = report.file_meta.MediaStorageSOPInstanceUID = generate_uid()
    for keyword in ("PatientName", "PatientID", "StudyInstanceUID", "AccessionNumber"):
        setattr(report, keyword, getattr(study[0], keyword))
    report.SeriesInstanceUID, report.Modality, report.SeriesNumber = generate_uid(), "SR", 99
    with running_node(checkpoint, tmp_path) as (_, port, dest_port), destination(dest_port) as received:
        assert send(port, [*study, report]) == [0x0000] * (SLICES + 1)
        wait_for(lambda: reports(received, str(study[0].StudyInstanceUID)))
    series = pd.read_csv(tmp_path / "results" / pseudonym(str(study[0].StudyInstanceUID)) / "1" / "series.csv")
    assert series.set_index("number").loc[99, "reason"] == "no_pixel_data"
    assert series.set_index("number").loc[2, "role"] == "used"


@pytest.mark.slow
def test_two_interleaved_studies_are_answered_each_on_its_own_files(checkpoint, studies, tmp_path):
    first, second = studies[0], studies[1]
    mixed = [ds for pair in zip(first, second) for ds in pair]
    with running_node(checkpoint, tmp_path) as (_, port, dest_port), destination(dest_port) as received:
        assert send(port, mixed) == [0x0000] * len(mixed)
        wait_for(lambda: reports(received, str(first[0].StudyInstanceUID))
                 and reports(received, str(second[0].StudyInstanceUID)))
        time.sleep(QUIET_S + 1)
    for study in (first, second):
        (sr,) = reports(received, str(study[0].StudyInstanceUID))
        assert evidence(sr) == {str(ds.SOPInstanceUID) for ds in study}


@pytest.mark.slow
def test_the_same_study_sent_twice_is_answered_once(checkpoint, studies, tmp_path, caplog):
    caplog.set_level(logging.INFO)
    study = studies[2]
    with running_node(checkpoint, tmp_path) as (_, port, dest_port), destination(dest_port) as received:
        send(port, study)
        wait_for(lambda: reports(received, str(study[0].StudyInstanceUID)))
        send(port, study)
        wait_for(lambda: "not answered again" in caplog.text, what="the node's decision on the copy")
        time.sleep(0.5)
    assert len(reports(received, str(study[0].StudyInstanceUID))) == 1


@pytest.mark.slow
def test_a_late_slice_reopens_the_study_and_the_new_answer_names_the_old(checkpoint, studies, tmp_path):
    study = studies[0]
    uid = str(study[0].StudyInstanceUID)
    with running_node(checkpoint, tmp_path) as (_, port, dest_port), destination(dest_port) as received:
        send(port, study[:-1])
        (old,) = wait_for(lambda: reports(received, uid))
        send(port, study[-1:])
        wait_for(lambda: len(reports(received, uid)) == 2, what="the second answer")
    new = next(sr for sr in reports(received, uid) if sr.SOPInstanceUID != old.SOPInstanceUID)
    assert evidence(old) == {str(ds.SOPInstanceUID) for ds in study[:-1]}
    assert evidence(new) == {str(ds.SOPInstanceUID) for ds in study}
    predecessor = new.PredecessorDocumentsSequence[0].ReferencedSeriesSequence[0].ReferencedSOPSequence[0]
    assert predecessor.ReferencedSOPInstanceUID == old.SOPInstanceUID
    replaces = [item.UID for item in new.ContentSequence if item.ConceptNameCodeSequence[0].CodeValue == "REPLACES"]
    assert replaces == [old.SeriesInstanceUID] and new.SeriesInstanceUID != old.SeriesInstanceUID


@pytest.mark.slow
def test_a_destination_that_is_down_gets_the_answer_once_it_is_up(checkpoint, studies, tmp_path):
    study = studies[1]
    with running_node(checkpoint, tmp_path) as (node, port, dest_port):
        send(port, study)
        outbox = node.spool.outboxes / node.forwarder.destinations[0].folder
        wait_for(lambda: len(list(outbox.iterdir())) == 1 + HEATMAPS, what="the answer in the outbox")
        with destination(dest_port) as received:
            wait_for(lambda: len(received) == 1 + HEATMAPS, what="the delivery after the destination came up")
            wait_for(lambda: not list(outbox.iterdir()), what="an empty outbox")
    assert len(reports(received, str(study[0].StudyInstanceUID))) == 1


@pytest.mark.slow
@pytest.mark.parametrize("refusal", ["status", "context"])
def test_an_answer_the_destination_refuses_for_good_is_set_aside_and_the_answers_behind_it_go_on(
        checkpoint, studies, tmp_path, refusal):
    """A PACS that refuses SRs (0xA900, dataset does not match SOP class; or no presentation context for them at
    all) still gets every Secondary Capture of two studies, and each SR waits in undeliverable/ with the reason."""
    sr = str(ComprehensiveSRStorage)
    refuse = {sr: 0xA900} if refusal == "status" else None
    contexts = [c for c in AllStoragePresentationContexts if refusal == "status" or c.abstract_syntax != sr]
    with running_node(checkpoint, tmp_path) as (node, port, dest_port), \
            destination(dest_port, refuse, contexts) as received:
        send(port, studies[0])
        send(port, studies[1])
        outbox = node.spool.outboxes / node.forwarder.destinations[0].folder
        aside = tmp_path / "spool" / "undeliverable" / outbox.name
        wait_for(lambda: len(list(aside.glob("*.dcm"))) == 2 and not list(outbox.iterdir()),
                 what="both SRs set aside and an empty outbox")
        wait_for(lambda: len(received) == 2 * HEATMAPS, what="every Secondary Capture delivered")
        assert node.forwarder.thread.is_alive()
    assert {str(ds.SOPClassUID) for ds in received} == {str(SecondaryCaptureImageStorage)}
    reason = "status 0xA900" if refusal == "status" else "no presentation context accepted for Comprehensive SR"
    assert all(reason in path.read_text() for path in aside.glob("*.txt")) and len(list(aside.glob("*.txt"))) == 2
    assert {pydicom.dcmread(path).SOPClassUID for path in aside.glob("*.dcm")} == {sr}


# --- TLS -------------------------------------------------------------------------------------------------------


def self_signed(folder: Path) -> tuple[Path, Path]:
    """A certificate and key for localhost, made with the openssl command line."""
    if shutil.which("openssl") is None:
        pytest.skip("no openssl on PATH to make a test certificate: apt-get install -y openssl")
    cert, key = folder / "node.pem", folder / "node.key"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1", "-subj", "/CN=localhost",
                    "-addext", "subjectAltName=DNS:localhost,IP:127.0.0.1", "-keyout", str(key), "-out", str(cert)],
                   check=True, capture_output=True)
    return cert, key


def test_tls_associations_work_with_the_sites_certificate_and_plain_ones_are_refused(checkpoint, tmp_path):
    cert, key = self_signed(tmp_path)
    client = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=str(cert))
    with running_node(checkpoint, tmp_path, f"serve.tls.cert={cert}", f"serve.tls.key={key}") as (_, port, _):
        secure = associate(port, tls=(client, "localhost"))
        assert secure.is_established and int(secure.send_c_echo().Status) == 0x0000
        secure.release()
        plain = associate(port)
        assert not plain.is_established


def test_with_a_ca_only_callers_with_a_certificate_it_signed_may_associate(checkpoint, tmp_path):
    cert, key = self_signed(tmp_path)  # the certificate signs itself: it is its own authority
    trusted = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=str(cert))
    with running_node(checkpoint, tmp_path, f"serve.tls.cert={cert}", f"serve.tls.key={key}",
                      f"serve.tls.ca={cert}") as (_, port, _):
        anonymous = associate(port, tls=(trusted, "localhost"))
        assert not anonymous.is_established
        trusted.load_cert_chain(cert, key)
        known = associate(port, tls=(trusted, "localhost"))
        assert known.is_established
        known.release()


# --- a killed node ---------------------------------------------------------------------------------------------


@contextmanager
def node_process(overrides: list[str], log: Path):
    """`python -m ich.serve` as a separate process, its output in `log`; killed at the end if still running."""
    with log.open("ab") as out:
        process = subprocess.Popen([sys.executable, "-m", "ich.serve", *overrides], cwd=ROOT, stdout=out,
                                   stderr=subprocess.STDOUT, env={**os.environ, "OMP_NUM_THREADS": "1"})
    try:
        yield process
    finally:
        if process.poll() is None:
            process.kill()
        process.wait()


def wait_until_listening(port: int, process: subprocess.Popen, log: Path) -> None:
    def echoes() -> bool:
        assert process.poll() is None, f"the node exited:\n{log.read_text()}"
        assoc = associate(port)
        answered = assoc.is_established and int(assoc.send_c_echo().Status) == 0x0000
        if assoc.is_established:
            assoc.release()
        return answered

    wait_for(echoes, timeout=180, what="the node's C-ECHO")


@pytest.mark.slow
def test_a_node_killed_mid_study_completes_it_after_a_restart_and_answers_nothing_twice(checkpoint, studies, tmp_path):
    first, second = studies[0], studies[1]
    port, dest_port = free_port(), free_port()
    overrides = serve_overrides(checkpoint, tmp_path, port, dest_port, "serve.quiet_s=3",
                                f"hydra.run.dir={tmp_path / 'hydra'}")
    log = tmp_path / "node.log"
    outbox = tmp_path / "spool" / "outbox"
    with node_process(overrides, log) as process:
        wait_until_listening(port, process, log)
        send(port, first)  # answered while the destination is down: its answer waits in the outbox
        wait_for(lambda: len([p for p in outbox.rglob("*") if p.is_file()]) == 1 + HEATMAPS, what="the outbox")
        send(port, second[:SLICES // 2])
        process.send_signal(signal.SIGKILL)
    with destination(dest_port) as received, node_process(overrides, log) as process:
        wait_until_listening(port, process, log)
        send(port, second[SLICES // 2:])
        wait_for(lambda: reports(received, str(second[0].StudyInstanceUID)), timeout=120)
        wait_for(lambda: reports(received, str(first[0].StudyInstanceUID)), timeout=30, what="the outbox's answer")
        time.sleep(4)  # a quiet period more: nothing else may come
        process.send_signal(signal.SIGTERM)
        assert process.wait(timeout=60) == 0
    (answer_first,) = reports(received, str(first[0].StudyInstanceUID))
    (answer_second,) = reports(received, str(second[0].StudyInstanceUID))
    assert evidence(answer_first) == {str(ds.SOPInstanceUID) for ds in first}
    assert evidence(answer_second) == {str(ds.SOPInstanceUID) for ds in second}
    assert len(received) == 2 * (1 + HEATMAPS)
    said = log.read_text()
    assert "Stopped." in said
    leaked = [value for study in (first, second) for value in identifiers(study) if value in said]
    assert not leaked, "the node's output names a patient or a UID"


# --- a real PACS (Orthanc) and the reference clients (dcmtk) -----------------------------------------------------


@pytest.mark.slow
def test_orthanc_sends_a_study_to_the_node_and_files_the_answer_in_the_same_study(checkpoint, tmp_path):
    """The round trip a site sets up: Orthanc holds a study, sends it to the node (one of its DicomModalities), and
    the node's SR and Secondary Captures come back into that study, filed with its images."""
    study = phantom_study(tmp_path / "study", slices=SLICES, seed=21)
    reference = predicted(checkpoint, study.folder, tmp_path / "predict").iloc[0]
    port = free_port()
    with start_orthanc(tmp_path / "orthanc", {"ich": ["ICH", "127.0.0.1", port]}) as pacs:
        pacs.upload(study.folder)
        with running_node(checkpoint, tmp_path, "serve.allowed_callers=[ORTHANC]", port=port, dest_port=pacs.port,
                          dest_aet=pacs.aet):
            pacs.send(study.study_uid, "ich")
            (sr_series,) = pacs.wait_for_series(study.study_uid, "SR")
            (sc_series,) = pacs.wait_for_series(study.study_uid, "OT")
            wait_for(lambda: len(pacs.get(f"/series/{sc_series['ID']}")["Instances"]) == HEATMAPS, what="the captures")
        (sr_id,) = sr_series["Instances"]
        sr = pacs.read(sr_id)
        captures = [pacs.read(instance) for instance in pacs.get(f"/series/{sc_series['ID']}")["Instances"]]
        assert len(pacs.instances(study.study_uid)) == SLICES + 1 + HEATMAPS  # one study: nothing filed apart
    for ds in [sr, *captures]:
        assert (ds.StudyInstanceUID, ds.PatientID) == (study.study_uid, study.patient_id)
        assert ds.SeriesInstanceUID.startswith(UID_ROOT + ".") and ds.SOPInstanceUID.startswith(UID_ROOT + ".")
    assert sr.SOPClassUID == COMPREHENSIVE_SR and {ds.SOPClassUID for ds in captures} == {SECONDARY_CAPTURE}
    outputs = sr_outputs(sr)
    assert outputs["any"][0] == pytest.approx(reference["prob_any"], abs=1e-6)
    assert outputs["any"][1] == pytest.approx(reference["threshold_any"], abs=1e-6)
    finding = next(item for item in sr.ContentSequence if item.ConceptNameCodeSequence[0].CodeValue == "121071")
    assert finding.ConceptCodeSequence[0].CodeMeaning == ("Hemorrhage" if reference["positive"] else
                                                         "No hemorrhage found")
    assert evidence(sr) == set(study.sop_uids)


@pytest.mark.slow
def test_dcmtk_clients_echo_and_send_a_study_and_storescp_receives_the_answer(checkpoint, tmp_path):
    """The reference clients: echoscu and storescu talk to the node, dcmtk's storescp stands for the PACS."""
    study = phantom_study(tmp_path / "study", slices=SLICES, seed=22)
    reference = predicted(checkpoint, study.folder, tmp_path / "predict").iloc[0]
    with start_storescp(tmp_path / "dest", aet="ARCHIVE") as archive, \
            running_node(checkpoint, tmp_path, "serve.allowed_callers=[MODALITY]", dest_port=archive.port,
                         dest_aet=archive.aet) as (_, port, _):
        echoscu(port, aet="MODALITY", called="ICH")
        refused = echoscu(port, aet="STRANGER", called="ICH", check=False)
        assert refused.returncode != 0, "an AE title not in serve.allowed_callers was let in"
        storescu(port, study.folder, aet="MODALITY", called="ICH")
        wait_for(lambda: len(archive.received()) == 1 + HEATMAPS)
    received = archive.received()
    (sr,) = [ds for ds in received if ds.SOPClassUID == COMPREHENSIVE_SR]
    assert sr.StudyInstanceUID == study.study_uid
    assert sr_outputs(sr)["any"][0] == pytest.approx(reference["prob_any"], abs=1e-6)


@pytest.mark.slow
def test_an_exported_model_answers_with_an_sr_naming_its_backbone_and_no_heat_maps(checkpoint, studies, tmp_path):
    """A site may run the node on the exported file alone: the SR is the same as predict.py's on that file, and the
    model is named from the file's JSON."""
    model = export(checkpoint, "onnx", tmp_path / "export" / "model.onnx")
    study = studies[1]
    reference = predicted(model, save_folder(study, tmp_path / "input"), tmp_path / "predict").iloc[0]
    with running_node(model, tmp_path) as (_, port, dest_port), destination(dest_port) as received:
        assert send(port, study) == [0x0000] * SLICES
        wait_for(lambda: reports(received, str(study[0].StudyInstanceUID)))
        time.sleep(QUIET_S)  # nothing else may come: an exported model draws no heat maps
    (sr,) = received
    assert sr_outputs(sr)["any"][0] == pytest.approx(reference["prob_any"], abs=1e-6)
    (model_item,) = [item for item in sr.ContentSequence if item.ConceptNameCodeSequence[0].CodeValue == "MODEL"]
    named = {child.ConceptNameCodeSequence[0].CodeValue: child.TextValue for child in model_item.ContentSequence}
    (description,) = model.parent.glob("*.json")  # the JSON export writes beside the file
    backbone = json.loads(description.read_text())["backbone"]
    assert named["BACKBONE"] == backbone and named["CKPT-SHA256"] == hashlib.sha256(model.read_bytes()).hexdigest()
