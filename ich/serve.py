"""`python -m ich.serve ckpt_path=<run, .ckpt or exported file>`: a DICOM node that answers head CT studies sent
by a PACS (see ich.node); it runs until SIGTERM or Ctrl-C."""

import signal
import threading

import hydra
from omegaconf import DictConfig

from ich import CONFIG_DIR
from ich.cli import friendly_errors, paths_as_written
from ich.node.node import Node


@paths_as_written
@hydra.main(config_path=str(CONFIG_DIR), config_name="serve", version_base="1.3")
@friendly_errors
def main(cfg: DictConfig) -> None:
    node = Node(cfg)
    stop = threading.Event()
    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, lambda *_: stop.set())
    node.start()
    while not stop.wait(1.0):
        pass
    node.stop()


if __name__ == "__main__":
    main()
