"""The harness of the node's tests, on real parts only: Orthanc holds a study and sends it, dcmtk's clients talk to it.

These show that what tests/pacs.py starts and asks is real before the node (`python -m ich.serve`) is put
between them: a study stored in Orthanc comes back whole, Orthanc's C-STORE reaches a dcmtk destination, and
dcmtk's storescu and echoscu reach Orthanc. Each test writes its own phantom study, so they share one Orthanc
(which takes seconds to stop) without seeing each other's files.
"""

import numpy as np
import pytest
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, SecondaryCaptureImageStorage, generate_uid

from pacs import HOST, echoscu, free_port, phantom_study, start_orthanc, start_storescp, storescu

# the module's Orthanc and storescp are started once, on one pytest-xdist worker

SLICES = 40  # the study size of the speed target


@pytest.fixture(scope="module")
def dest(tmp_path_factory):
    with start_storescp(tmp_path_factory.mktemp("dest")) as scp:
        yield scp


@pytest.fixture(scope="module")
def pacs(dest, tmp_path_factory):
    """Orthanc with two peers: the storescp, and a port where nothing listens."""
    modalities = {"dest": [dest.aet, HOST, dest.port], "down": ["DOWN", HOST, free_port()]}
    with start_orthanc(tmp_path_factory.mktemp("orthanc"), modalities) as orthanc:
        yield orthanc


def test_a_study_uploaded_through_rest_comes_back_whole(pacs, tmp_path):
    study = phantom_study(tmp_path, SLICES, seed=1)
    ids = pacs.upload(study.folder)

    (series,) = pacs.series(study.study_uid)
    assert series["MainDicomTags"]["Modality"] == "CT"
    assert series["MainDicomTags"]["SeriesInstanceUID"] == study.series_uid
    assert len(series["Instances"]) == len(ids) == SLICES
    back = [pacs.read(instance) for instance in ids]
    assert {ds.StudyInstanceUID for ds in back} == {study.study_uid}
    assert {ds.SOPInstanceUID for ds in back} == set(study.sop_uids)
    # the PACS keeps the file as it was sent, byte for byte
    first = sorted(study.folder.iterdir())[0]
    assert pacs.request("GET", f"/instances/{ids[0]}/file") == first.read_bytes()


def test_orthanc_sends_a_study_by_c_store_and_storescp_receives_every_file(pacs, dest, tmp_path):
    study = phantom_study(tmp_path, SLICES, seed=2)
    pacs.upload(study.folder)

    answer = pacs.send(study.study_uid, "dest")

    assert (answer["InstancesCount"], answer["FailedInstancesCount"]) == (SLICES, 0)
    assert (answer["LocalAet"], answer["RemoteAet"]) == (pacs.aet, dest.aet)
    arrived = [ds for ds in dest.received() if ds.StudyInstanceUID == study.study_uid]
    assert sorted(ds.SOPInstanceUID for ds in arrived) == sorted(study.sop_uids)


def test_storescu_sends_a_folder_into_orthanc_under_its_calling_ae_title_and_echoscu_echoes_it(pacs, tmp_path):
    study = phantom_study(tmp_path, SLICES, seed=3)

    echoscu(pacs.port, aet="SCANNER", called=pacs.aet)
    storescu(pacs.port, study.folder, aet="SCANNER", called=pacs.aet)

    instances = pacs.instances(study.study_uid)
    assert sorted(i["MainDicomTags"]["SOPInstanceUID"] for i in instances) == sorted(study.sop_uids)
    assert pacs.request("GET", f"/instances/{instances[0]['ID']}/metadata/RemoteAET") == b"SCANNER"


def secondary_capture(study_uid: str, patient_id: str) -> Dataset:
    """A small Secondary Capture in `study_uid`, as a node's answer would be."""
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.MediaStorageSOPClassUID = ds.SOPClassUID = SecondaryCaptureImageStorage
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID = generate_uid()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.PatientID, ds.StudyInstanceUID, ds.SeriesInstanceUID = patient_id, study_uid, generate_uid()
    ds.Modality, ds.ConversionType = "OT", "WSD"
    ds.Rows = ds.Columns = 16
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 8, 8, 7, 0
    ds.PixelData = np.arange(256, dtype=np.uint8).tobytes()
    return ds


def test_a_series_stored_later_into_the_study_is_waited_for_and_read_back(pacs, tmp_path):
    study = phantom_study(tmp_path / "study", SLICES, seed=4)
    pacs.upload(study.folder)
    with pytest.raises(AssertionError, match="timed out after 0.3 s waiting for 1 OT series"):
        pacs.wait_for_series(study.study_uid, "OT", timeout=0.3)

    answer = secondary_capture(study.study_uid, study.patient_id)
    (tmp_path / "answer").mkdir()
    answer.save_as(tmp_path / "answer" / "SC0001", enforce_file_format=True)
    storescu(pacs.port, tmp_path / "answer", aet="ICH", called=pacs.aet)

    (series,) = pacs.wait_for_series(study.study_uid, "OT", timeout=10)
    back = pacs.read(series["Instances"][0])
    assert (back.StudyInstanceUID, back.SOPInstanceUID) == (study.study_uid, answer.SOPInstanceUID)
    assert back.PixelData == answer.PixelData


def test_a_peer_that_is_down_fails_storescu_and_orthanc_with_their_own_words(pacs, tmp_path):
    study = phantom_study(tmp_path, slices=2, seed=5)
    pacs.upload(study.folder)

    with pytest.raises(AssertionError, match=r"exited with status 1:\n.*Association Request Failed"):
        storescu(free_port(), study.folder)
    with pytest.raises(AssertionError, match=r'(?s)with 500: .*connecting to AET \\"DOWN'):
        pacs.send(study.study_uid, "down")


def test_an_object_of_the_study_with_another_patient_id_is_filed_apart_and_the_helpers_say_so(pacs, tmp_path):
    study = phantom_study(tmp_path / "study", slices=2, seed=6)
    pacs.upload(study.folder)
    (tmp_path / "answer").mkdir()
    secondary_capture(study.study_uid, "OTHER").save_as(tmp_path / "answer" / "SC0001", enforce_file_format=True)

    pacs.upload(tmp_path / "answer")

    with pytest.raises(AssertionError, match="holds 2 studies with StudyInstanceUID .* different PatientIDs"):
        pacs.series(study.study_uid)
