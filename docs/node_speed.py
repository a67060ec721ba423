"""Measure the DICOM node's figures of docs/how-to/pacs.md: `python docs/node_speed.py CHECKPOINT` (a run folder or
.ckpt; the figures depend on its backbone and image size, not on how well it was trained).

A node (`python -m ich.serve`, its own process, model loaded once) answers into a real Orthanc. For each of
`--studies` phantom studies of `--slices` slices at `--size` px, dcmtk's storescu sends the study to the node, and
the script times:
- reception: files/s of storescu, from its start until it returns (every file acknowledged, so synced to the spool);
- answer: from storescu's return (the last file acknowledged) until the SR is stored in Orthanc, less serve.quiet_s.
A first study, not counted, warms the node. Then a cold `predict.py` on one study, for comparison. Needs Debian's
`orthanc` and `dcmtk`; it drives them with the test harness (tests/pacs.py), the one place that starts them.
"""

import argparse
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))
from pacs import free_port, phantom_study, start_orthanc, storescu, wait_until  # noqa: E402

QUIET_S = 2.0
POLL_S = 0.02


def cpu_name() -> str:
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return platform.processor() or "unknown CPU"


def sr_stored(pacs, study_uid: str) -> bool:
    return any(s["MainDicomTags"].get("Modality") == "SR" for s in pacs.series(study_uid))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("checkpoint", help="a run folder of train.py or a .ckpt")
    parser.add_argument("--studies", type=int, default=5, help="studies timed (after one that warms the node)")
    parser.add_argument("--slices", type=int, default=40)
    parser.add_argument("--size", type=int, default=512, help="pixels per side, as a head CT")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as work:
        work = Path(work)
        studies = [phantom_study(work / f"study{k}", slices=args.slices, size=args.size, seed=100 + k)
                   for k in range(args.studies + 1)]
        port = free_port()
        with start_orthanc(work / "orthanc", {"ich": ["ICH", "127.0.0.1", port]}) as pacs:
            command = [sys.executable, "-m", "ich.serve", f"ckpt_path={args.checkpoint}", f"serve.port={port}",
                       f"serve.spool={work / 'spool'}", f"serve.results_dir={work / 'results'}",
                       f"serve.quiet_s={QUIET_S}", "serve.allowed_callers=[MODALITY,ORTHANC]",
                       f"serve.destinations=[{{ae_title: {pacs.aet}, host: 127.0.0.1, port: {pacs.port}}}]"]
            log = (work / "node.log").open("w")
            node = subprocess.Popen(command, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT)
            try:
                wait_until(lambda: "Listening" in (work / "node.log").read_text(), 300, "the node", work / "node.log")
                rates, answers = [], []
                for k, study in enumerate(studies):
                    started = time.monotonic()
                    storescu(port, study.folder, aet="MODALITY", called="ICH")
                    last_file = time.monotonic()
                    wait_until(lambda: sr_stored(pacs, study.study_uid), 300, "the SR", work / "node.log")
                    answered = time.monotonic()
                    if k == 0:
                        continue  # the warm-up study
                    rates.append(args.slices / (last_file - started))
                    answers.append(answered - last_file - QUIET_S)
                    print(f"study {k}: {rates[-1]:.0f} files/s in, SR in Orthanc {answers[-1]:.2f} s after the quiet "
                          "period", flush=True)
            finally:
                node.terminate()
                node.wait(60)
                log.close()
        cold_started = time.monotonic()
        subprocess.run([sys.executable, "predict.py", f"ckpt_path={args.checkpoint}", f"input={studies[1].folder}",
                        f"output_dir={work / 'predict'}", "hydra/job_logging=disabled"], cwd=ROOT, check=True,
                       stdout=subprocess.DEVNULL, env={**os.environ, "TQDM_DISABLE": "1"})
        cold = time.monotonic() - cold_started
    print(f"\n{cpu_name()}, {os.cpu_count()} cores; {args.studies} studies of {args.slices} slices at {args.size} px")
    print(f"reception from storescu: median {statistics.median(rates):.0f} files/s ({min(rates):.0f}-{max(rates):.0f})")
    print(f"last file to SR stored in Orthanc, quiet period excluded: median {statistics.median(answers):.2f} s "
          f"({min(answers):.2f}-{max(answers):.2f})")
    print(f"a cold predict.py on one study: {cold:.1f} s wall")


if __name__ == "__main__":
    main()
