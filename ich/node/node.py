"""The node: reception, one worker that answers studies one at a time, and the forwarder, around one loaded model.

A study is answered when no file of it has arrived for `serve.quiet_s`, in the order studies started arriving,
by predict.py's own study answer (ich.inference.answer.predict_study) while reception goes on. A file that arrives after
the answer re-opens the study: it is answered again, and the new SR names the one it replaces. A study whose
files are all covered by its last answer (the same study sent again) is not answered twice.
"""

import itertools
import logging
import threading
import time
from pathlib import Path

import pydicom
from omegaconf import DictConfig, OmegaConf
from pydicom.dataset import Dataset

from ich.data.dicom import admitted_modalities
from ich.data.seen import announce
from ich.inference.answer import failure_reason, load_predictor, predict_study, require_study_inputs
from ich.inference.outputs import Outputs
from ich.inference.study import Scan, group_studies, read_image_header
from ich.node.dicom_results import answer_datasets, model_identity
from ich.node.forward import Destination, Forwarder
from ich.node.receive import Receiver, check_callers, storage_ae, tls_context
from ich.node.spool import Spool

log = logging.getLogger(__name__)

IDLE_S = 0.2  # how often the worker looks for a study whose quiet period is over
# Libraries that log UIDs at INFO or DEBUG (highdicom: the instance it copies the patient from; pynetdicom: each
# request): warnings only, whoever configured logging
QUIET_LOGGERS = ("highdicom", "pynetdicom")


class Arrivals:
    """Studies waiting for their quiet period: the order each started arriving, and when its last file came."""

    def __init__(self):
        self.lock = threading.Lock()
        self.order = itertools.count()
        self.waiting: dict[str, tuple[int, float]] = {}

    def arrived(self, key: str) -> bool:
        """Note a file of `key` now; True when the study was not already waiting."""
        with self.lock:
            first = self.waiting[key][0] if key in self.waiting else next(self.order)
            new = key not in self.waiting
            self.waiting[key] = (first, time.monotonic())
            return new

    def take_due(self, quiet_s: float) -> str | None:
        """The first-arrived study quiet for `quiet_s`, no longer waiting; None if there is none yet."""
        now = time.monotonic()
        with self.lock:
            due = [(first, key) for key, (first, last) in self.waiting.items() if now - last >= quiet_s]
            if not due:
                return None
            key = min(due)[1]
            del self.waiting[key]
            return key


class Node:
    """Built from the serve config: checks its security settings and loads the model; `start` then `stop`."""

    def __init__(self, cfg: DictConfig):
        if OmegaConf.is_missing(cfg, "ckpt_path") or not cfg.ckpt_path:
            raise ValueError("python -m ich.serve needs ckpt_path=PATH: a run folder of train.py, a .ckpt or an "
                             "exported model, e.g. python -m ich.serve ckpt_path=outputs/<date>/<time>")
        serve = cfg.serve
        for name in QUIET_LOGGERS:
            logging.getLogger(name).setLevel(max(logging.WARNING, logging.getLogger(name).level))
        self.host, self.port, self.quiet_s = str(serve.host), int(serve.port), float(serve.quiet_s)
        self.min_slices, self.heatmaps, self.uid_root = int(serve.min_slices), int(serve.heatmaps), str(serve.uid_root)
        allowed = [str(title) for title in serve.allowed_callers]
        check_callers(self.host, allowed)
        self.tls = tls_context(serve.tls.cert, serve.tls.key, serve.tls.ca)
        destinations = [Destination(str(d.ae_title), str(d.host), int(d.port)) for d in serve.destinations]
        self.spool = Spool(Path(serve.spool).expanduser(), int(float(serve.max_spool_gb) * 1e9),
                           [d.folder for d in destinations])
        self.results_dir = Path(serve.results_dir).expanduser()
        self.model = load_predictor(str(cfg.ckpt_path), int(serve.batch_size))
        require_study_inputs(self.model)
        announce(self.model.inputs)
        self.admitted = admitted_modalities(self.model.inputs["modalities"])
        self.about = model_identity(self.model)
        self.arrivals = Arrivals()
        self.ae = storage_ae(str(serve.ae_title), int(serve.max_pdu), int(serve.max_associations), allowed)
        self.receiver = Receiver(self.spool, self.arrived, allowed, int(serve.max_associations))
        self.forwarder = Forwarder(self.spool, destinations, str(serve.ae_title), float(serve.retry.first_s),
                                   float(serve.retry.max_s), float(serve.retry.timeout_s))
        self.stopping = threading.Event()
        self.worker = threading.Thread(target=self.work, name="ich-answer", daemon=True)
        self.server = None

    def start(self) -> None:
        """Read the spool back (unanswered studies wait a quiet period from now), then listen and work."""
        finished = self.spool.recover()
        waiting = sorted((key for key in self.spool.study_keys() if not self.spool.answered(key)),
                         key=self.spool.last_arrival)
        for key in waiting:
            self.arrivals.arrived(key)
        outbox = sum(len(self.spool.outbox(d.folder)) for d in self.forwarder.destinations)
        log.info("Spool %s read back: %d studies to answer, %d answers finished after a stop, %d result files to send.",
                 self.spool.root, len(waiting), finished, outbox)
        self.server = self.ae.start_server((self.host, self.port), block=False, evt_handlers=self.receiver.handlers(),
                                           ssl_context=self.tls)
        self.worker.start()
        self.forwarder.start()
        log.info("Listening as AE title %s on %s:%d%s; a study is answered %g s after its last file.",
                 self.ae.ae_title, self.host, self.port, " over TLS" if self.tls else "", self.quiet_s)

    def stop(self) -> None:
        """Stop listening, let the study being answered finish, stop forwarding; the spool keeps the rest."""
        if self.server is not None:
            self.server.shutdown()
        self.stopping.set()
        if self.worker.is_alive():
            self.worker.join()
        self.forwarder.stop()
        log.info("Stopped.")

    def arrived(self, key: str) -> None:
        if self.arrivals.arrived(key):
            log.info("Study %s: receiving.", key)

    def work(self) -> None:
        while not self.stopping.is_set():
            key = self.arrivals.take_due(self.quiet_s)
            if key is None:
                self.stopping.wait(IDLE_S)
                continue
            try:
                self.answer(key)
            except Exception as err:  # the study's boundary, as in predict.py: one study must not stop the node
                log.error("Study %s could not be answered and waits for its next file or a restart: %s", key,
                          failure_reason(err))

    def answer(self, key: str) -> None:
        """Predict the study from its spooled files, write predict.py's files, store and queue its DICOM answer."""
        files = self.spool.files(key)
        if self.spool.answered(key):
            log.info("Study %s: no new file since its last answer (sent again): not answered again.", key)
            return
        answers = self.spool.state(key)["answers"]
        number = max((answer["number"] for answer in answers), default=0) + 1
        images = [read_image_header(path, self.admitted) for path in files]
        studies = group_studies(images, self.min_slices)
        folder = self.spool.studies / key / "files"
        scan = Scan(root=folder, files=len(files), studies=studies, loose=[i for i in images if not i.study_uid])
        output_dir = self.results_dir / key / str(number)
        output_dir.mkdir(parents=True, exist_ok=True)
        outputs = Outputs(self.model, output_dir, False, self.heatmaps)
        record = {"number": number, "covers": [path.name for path in files], "series": [], "sr": "", "failed": ""}
        datasets = {}
        started = time.monotonic()
        for study in studies:  # one: the spool keeps a folder per study
            try:
                result = predict_study(study, self.model, self.min_slices)
                tiles = outputs.draw_heatmaps(result) if result.read else None  # the SCs, and a positive report
                if result.read:
                    datasets = answer_datasets(result, self.model, outputs, tiles, self.about, self.uid_root, number,
                                               self.previous_sr(key, answers))
                outputs.add(result, folder, tiles)
            except Exception as err:  # the study's boundary, as in predict.py: listed as failed, the node goes on
                record["failed"] = failure_reason(err)
                log.error("Study %s failed and is listed as failed: %s", key, record["failed"])
                outputs.add_failed(study, record["failed"], folder)
                datasets = {}
        outputs.finish(scan, None)
        if datasets:
            record["series"] = sorted({str(ds.SeriesInstanceUID) for ds in datasets.values()})
            record["sr"] = str(datasets["sr.dcm"].SOPInstanceUID)
        self.spool.commit_answer(key, record, datasets)
        self.forwarder.queued()
        verdict = outputs.studies[-1]["verdict"] if outputs.studies else "no study in its files"
        sent = f"{len(datasets)} result objects queued" if datasets else "no DICOM answer (nothing read)"
        replaces = f", replacing answer {answers[-1]['number']}" if answers else ""
        log.info("Study %s: answer %d%s from %d files in %.1f s: %s; %s.", key, number, replaces, len(files),
                 time.monotonic() - started, verdict, sent)

    def previous_sr(self, key: str, answers: list[dict]) -> Dataset | None:
        """The SR of the study's latest answer that has one: the new answer names it as the one it replaces."""
        for answer in reversed(answers):
            if answer["sr"]:
                return pydicom.dcmread(self.spool.studies / key / "answers" / str(answer["number"]) / "sr.dcm")
        return None
