"""The node's network side: C-ECHO, C-STORE of any storage class, and who may associate.

A received file is written to the spool and synced before its success status goes back (ich.node.spool); a file
that does not parse gets 0xC210 (cannot understand) and is kept in rejected/ with its reason; a full spool
answers 0xA700 (out of resources). Log lines name studies by pseudonym and callers by AE title: never a name,
PatientID, UID or accession number.
"""

import ipaddress
import logging
import ssl
from collections.abc import Callable
from io import BytesIO

import pydicom
from pydicom import config
from pydicom.dataset import Dataset
from pynetdicom import ALL_TRANSFER_SYNTAXES, AE, AllStoragePresentationContexts, evt
from pynetdicom.sop_class import Verification

from ich.core.privacy import pseudonym
from ich.node.spool import Spool

log = logging.getLogger(__name__)

SUCCESS = 0x0000
OUT_OF_RESOURCES = 0xA700  # PS3.4 C-STORE: Refused, out of resources
CANNOT_UNDERSTAND = 0xC210  # PS3.4 C-STORE: Error, cannot understand
REQUIRED = ("StudyInstanceUID", "SeriesInstanceUID", "SOPInstanceUID")


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:  # a host name other than localhost: it may be reachable from outside
        return False


def check_callers(host: str, allowed: list[str]) -> None:
    """Anyone may send only to a node bound to loopback; elsewhere the callers must be listed."""
    if not allowed and not is_loopback(host):
        raise ValueError(f"serve.allowed_callers is empty and serve.host={host} is reachable from other machines: list "
                         "the AE titles that may send (serve.allowed_callers=[PACS]) or bind to serve.host=127.0.0.1.")


def tls_context(cert: str | None, key: str | None, ca: str | None) -> ssl.SSLContext | None:
    """The server's TLS context from serve.tls (None: plain DICOM); with `ca`, callers must show a certificate
    it signed."""
    if not cert and not key and not ca:
        return None
    if not cert or not key:
        raise ValueError("serve.tls needs both cert and key (PEM files), or neither for plain DICOM.")
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH, cafile=ca or None)
    context.load_cert_chain(cert, key)
    if ca:
        context.verify_mode = ssl.CERT_REQUIRED
    return context


def storage_ae(ae_title: str, max_pdu: int, max_associations: int, allowed: list[str]) -> AE:
    """An AE that answers C-ECHO and stores every storage SOP class in any transfer syntax."""
    ae = AE(ae_title=ae_title)
    ae.maximum_pdu_size = max_pdu
    ae.maximum_associations = max_associations
    ae.require_calling_aet = list(allowed)
    ae.add_supported_context(Verification)
    for context in AllStoragePresentationContexts:
        ae.add_supported_context(context.abstract_syntax, ALL_TRANSFER_SYNTAXES)
    return ae


def parse_problem(data: bytes) -> tuple[Dataset | None, str]:
    """The dataset of a received file, or why it cannot be used ("" when it can): it must parse whole, name its
    study, series and instance, and hold all of its uncompressed pixels."""
    try:
        with config.disable_value_validation():  # real files carry invalid values; they are read as they are
            ds = pydicom.dcmread(BytesIO(data))
            for element in ds:  # values are decoded on access: one that does not decode fails here
                element.value
    except Exception as err:  # a parser fed arbitrary bytes fails in many ways; each means the same here
        return None, f"does not parse ({type(err).__name__})"
    missing = [keyword for keyword in REQUIRED if not str(ds.get(keyword, "") or "").strip()]
    if missing:
        return None, f"no {', '.join(missing)}"
    syntax = ds.file_meta.get("TransferSyntaxUID")
    if "PixelData" in ds and syntax is not None and not syntax.is_compressed:
        samples = int(ds.get("SamplesPerPixel", 1) or 1)
        frames = int(float(ds.get("NumberOfFrames", 1) or 1))
        expected = int(ds.Rows) * int(ds.Columns) * samples * frames * int(ds.BitsAllocated) // 8
        if len(ds.PixelData) < expected:
            return None, f"pixel data cut short: {len(ds.PixelData)} of {expected} bytes (a truncated file)"
    return ds, ""


class Receiver:
    """The event handlers of the storage AE; `arrived(study_key)` tells the node a study got a new file."""

    def __init__(self, spool: Spool, arrived: Callable[[str], None], allowed: list[str], max_associations: int):
        self.spool, self.arrived, self.allowed, self.max_associations = spool, arrived, allowed, max_associations
        self.full = False

    def handlers(self) -> list:
        return [(evt.EVT_C_ECHO, self.on_echo), (evt.EVT_C_STORE, self.on_store), (evt.EVT_REJECTED, self.on_rejected)]

    def on_echo(self, event) -> int:
        return SUCCESS

    def on_rejected(self, event) -> None:
        caller = event.assoc.requestor.ae_title
        if self.allowed and caller not in self.allowed:
            log.warning("Refused an association from AE title %r: not in serve.allowed_callers.", caller)
        else:
            log.warning("Refused an association from AE title %r: serve.max_associations=%d are open.", caller,
                        self.max_associations)

    def on_store(self, event) -> int:
        data = event.encoded_dataset()
        if not self.spool.has_room(len(data)):
            if not self.full:
                log.error("The spool is full (serve.max_spool_gb): files are refused with status 0xA700 until "
                          "space is freed or the limit raised.")
            self.full = True
            return OUT_OF_RESOURCES
        if self.full:
            log.info("The spool has room again: files are accepted.")
            self.full = False
        ds, problem = parse_problem(data)
        if ds is None:
            self.spool.reject(data, str(event.request.AffectedSOPInstanceUID or ""), problem)
            log.warning("Rejected a file with status 0xC210, kept in rejected/: %s.", problem)
            return CANNOT_UNDERSTAND
        study = str(ds.StudyInstanceUID)
        if str(ds.SeriesInstanceUID) in self.spool.own_series(pseudonym(study)):
            return SUCCESS  # this node's own answer, sent back by a PACS: no new input for its study
        self.arrived(self.spool.store(study, str(ds.SOPInstanceUID), data))
        return SUCCESS
