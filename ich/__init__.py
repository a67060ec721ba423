"""ich: train and evaluate intracranial hemorrhage detectors on head CT."""

import os
from pathlib import Path

# albumentations asks PyPI for a newer version at import; training must never wait on the network.
os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")

__version__ = "0.1.0"

# The Hydra configuration groups live beside the package, at the repository root.
CONFIG_DIR = Path(__file__).resolve().parent.parent / "conf"
