"""Answers out to `serve.destinations` by C-STORE, from the spool's outbox, so nothing waits only in memory.

A destination that is down, refuses the association, or refuses a file for now (0xA7xx, out of resources; or the
association drops) is tried again after a backoff that doubles from `serve.retry.first_s` up to
`serve.retry.max_s`, for as long as the node runs; what is still in the outbox when it stops is sent after the next
start. A file leaves the outbox once the destination answered success, or once it refused that file for good (any
other failure status, or no presentation context for its SOP class): then it moves to the spool's undeliverable/
folder with the reason, and a warning is logged, so that it does not hold back the answers behind it.
"""

import logging
import threading
import time
from dataclasses import dataclass

import pydicom
from pydicom.uid import ExplicitVRLittleEndian, ImplicitVRLittleEndian
from pynetdicom import AE

from ich.node.spool import Spool, destination_folder

log = logging.getLogger(__name__)

# success, and the warnings that still store the object (PS3.4 C-STORE: coercion, elements discarded, mismatch)
STORED = {0x0000, 0xB000, 0xB006, 0xB007}
# failures worth trying again: Refused, Out of Resources (0xA7xx), and Resource Limitation (PS3.7 C.5)
TRANSIENT_HIGH_BYTE, RESOURCE_LIMITATION = 0xA7, 0x0213


@dataclass
class Destination:
    ae_title: str
    host: str
    port: int
    folder: str = ""
    wait_s: float = 0.0  # the backoff now in force
    next_try: float = 0.0  # time.monotonic() before which it is not tried again
    down: bool = False  # its last try failed

    def __post_init__(self):
        self.folder = destination_folder(self.ae_title, self.host, self.port)


class Forwarder:
    """One thread that empties each destination's outbox, backing off from the ones that fail."""

    def __init__(self, spool: Spool, destinations: list[Destination], ae_title: str, first_s: float, max_s: float,
                 timeout_s: float):
        self.spool, self.destinations = spool, destinations
        self.ae_title, self.first_s, self.max_s, self.timeout_s = ae_title, first_s, max_s, timeout_s
        self.wake, self.stopping = threading.Event(), threading.Event()
        self.thread = threading.Thread(target=self.loop, name="ich-forward", daemon=True)

    def start(self) -> None:
        self.thread.start()

    def stop(self) -> None:
        self.stopping.set()
        self.wake.set()
        self.thread.join(timeout=self.timeout_s + 5)

    def loop(self) -> None:
        while not self.stopping.is_set():
            for destination in self.destinations:
                if time.monotonic() >= destination.next_try and self.spool.outbox(destination.folder):
                    self.send(destination)
            waits = [d.next_try - time.monotonic() for d in self.destinations if self.spool.outbox(d.folder)]
            self.wake.wait(timeout=max(0.05, min(waits, default=1.0)))
            self.wake.clear()

    def send(self, destination: Destination) -> None:
        """Send what waits for one destination in one association; back off if any of it did not go."""
        files = self.spool.outbox(destination.folder)
        classes = sorted({str(pydicom.dcmread(path, stop_before_pixels=True, specific_tags=["SOPClassUID"]).SOPClassUID)
                          for path in files})
        ae = AE(ae_title=self.ae_title)
        ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = ae.connection_timeout = self.timeout_s
        for sop_class in classes:
            ae.add_requested_context(sop_class, [ExplicitVRLittleEndian, ImplicitVRLittleEndian])
        assoc = ae.associate(destination.host, destination.port, ae_title=destination.ae_title)
        sent = refused = 0
        established = assoc.is_established
        if established:
            accepted = {str(context.abstract_syntax) for context in assoc.accepted_contexts}
            for path in files:
                ds = pydicom.dcmread(path)
                if str(ds.SOPClassUID) not in accepted:
                    code = f"no presentation context accepted for {ds.SOPClassUID.name}"
                else:
                    status = assoc.send_c_store(ds)
                    if "Status" not in status:  # no answer: the association dropped or timed out
                        break
                    value = int(status.Status)
                    if value in STORED:
                        self.spool.sent(path)
                        sent += 1
                        continue
                    if value >> 8 == TRANSIENT_HIGH_BYTE or value == RESOURCE_LIMITATION:
                        break
                    code = f"status 0x{value:04X}"
                moved = self.spool.undeliverable(path, f"{destination.folder} refused it: {code}")
                refused += 1
                log.warning("Destination %s refused result file %s for good (%s): kept in %s, the rest go on.",
                            destination.folder, path.name, code, moved.parent)
            if assoc.is_established:
                assoc.release()
        if sent + refused == len(files):
            if destination.down:
                log.info("Destination %s is reachable again.", destination.folder)
            destination.down, destination.wait_s, destination.next_try = False, 0.0, 0.0
            log.info("Sent %d result file(s) to %s%s.", sent, destination.folder,
                     f" ({refused} refused for good, set aside)" if refused else "")
            return
        destination.wait_s = min(self.max_s, max(self.first_s, 2 * destination.wait_s))
        destination.next_try = time.monotonic() + destination.wait_s
        destination.down = True
        what = f"took {sent} of {len(files)} result file(s)" if established else "could not be reached"
        log.warning("Destination %s %s; the rest wait in the outbox, tried again in %.3g s.", destination.folder, what,
                    destination.wait_s)

    def queued(self) -> None:
        """Something new is in an outbox: look now rather than at the next timeout."""
        self.wake.set()
