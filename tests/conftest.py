"""Shared test setup: offline, a private cache, the real config and a small phantom on real DICOMs."""

import atexit
import os
import re
import shutil
import subprocess
import tempfile
from contextlib import contextmanager

# Before anything imports timm, wandb or albumentations: no test may touch the network.
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["WANDB_MODE"] = "offline"
os.environ["NO_ALBUMENTATIONS_UPDATE"] = "1"
# One fixed pseudonym salt: patient splits follow the pseudonyms' order, so every run splits alike (the former
# default salt: the splits the tests were written against). Tests of an installation's own salt unset it, and the
# salt they make goes to a private config folder, never the real home.
os.environ["ICH_ID_SALT"] = "ich-default-salt"
os.environ["XDG_CONFIG_HOME"] = tempfile.mkdtemp(prefix="ich-config-")
atexit.register(shutil.rmtree, os.environ["XDG_CONFIG_HOME"], ignore_errors=True)
# pytest-xdist's workers (`-n auto` in pyproject.toml) share the cores: each worker's torch, and the commands
# it starts, get an equal share of them, not all of them each (oversubscribed oneDNN threads wait on each other).
_WORKERS = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
if _WORKERS > 1:
    os.environ["OMP_NUM_THREADS"] = str(max(1, len(os.sched_getaffinity(0)) // _WORKERS))

import pytest  # noqa: E402
import torch  # noqa: E402
from hydra import compose, initialize_config_dir  # noqa: E402
from hydra.core.global_hydra import GlobalHydra  # noqa: E402

from ich import CONFIG_DIR  # noqa: E402

@contextmanager
def one_thread():
    """Train on one thread: a tiny model's weights, and so its verdicts on the phantom, then do not depend on how
    many cores or xdist workers the run has (a sum over 2 threads rounds otherwise than over 1)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


# A phantom small enough to write and train on in seconds, big enough for three non-empty splits.
SMALL_PHANTOM = ["data.phantom.patients=10", "data.phantom.slices=6", "data.phantom.size=128"]
FAST_RUN = [
    "model=tiny",
    "trainer=cpu",
    "trainer.max_epochs=1",
    "data.image_size=64",
    "data.num_workers=0",
    "data.batch_size=8",
    "callbacks.progress_bar=null",
    *SMALL_PHANTOM,
]


@pytest.fixture(scope="session")
def cache_dir(tmp_path_factory):
    """One cache for the session, so the phantom and its index are written once."""
    path = tmp_path_factory.mktemp("ich-cache")
    os.environ["ICH_CACHE_DIR"] = str(path)
    return path


def compose_config(name: str, overrides: list[str]):
    """Compose the real conf/ with overrides, as the command line would."""
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base="1.3"):
        return compose(config_name=name, overrides=overrides)


# The same small phantom as SMALL_PHANTOM, as data module arguments.
PHANTOM = {"patients": 10, "slices": 6, "size": 128, "seed": 0, "quirks": True}


def make_datamodule(cache_dir, tmp_path, **kwargs):
    """A set-up data module on the small phantom at 64 px; keyword arguments override its settings."""
    from ich.data.datamodule import ICHDataModule

    settings = dict(source="phantom", cache_dir=str(cache_dir), image_size=64, num_workers=0, batch_size=8,
                    phantom=PHANTOM, output_dir=str(tmp_path), seed=1)
    dm = ICHDataModule(**{**settings, **kwargs})
    dm.prepare_data()
    dm.setup()
    return dm


# --- report.html in a real browser ------------------------------------------------------------------

BROWSERS = ("chromium", "chromium-browser", "google-chrome")
# Appended to a copy of the page in the browser test only: the reports themselves hold no script.
PROBE = ('<script>addEventListener("load", () => { document.body.dataset.widths = '
         'Array.from(document.images, image => image.naturalWidth).join(","); });</script>')


def open_in_chromium(path, tmp_path) -> tuple:
    """Open a written page in headless Chromium, failing on any console message (errors, failed loads).

    Returns the screenshot (a PNG path) and the natural width of every image of the page in document order
    (0 for an image that did not decode). Skips the test where no Chromium is installed.
    """
    browser = next((shutil.which(name) for name in BROWSERS if shutil.which(name)), None)
    if browser is None:
        pytest.skip("no chromium on PATH: apt-get install -y chromium")

    def run(*arguments: str) -> subprocess.CompletedProcess:
        # Chromium prints each console message (errors, failed loads) as a line with `:CONSOLE` on stderr
        command = [browser, "--headless=new", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                   f"--user-data-dir={tmp_path / 'profile'}", "--enable-logging=stderr", "--v=0", *arguments]
        opened = subprocess.run(command, capture_output=True, text=True, timeout=120, check=True)
        console = [line for line in opened.stderr.splitlines() if ":CONSOLE" in line]
        assert not console, "\n".join(console)
        return opened

    screenshot = tmp_path / "screenshot.png"
    run(f"--screenshot={screenshot}", "--window-size=1280,2000", path.as_uri())
    probe = tmp_path / "probe.html"
    probe.write_text(path.read_text(encoding="utf-8").replace("</body>", PROBE + "</body>"), encoding="utf-8")
    widths = re.search(r'data-widths="([^"]*)"', run("--dump-dom", probe.as_uri()).stdout)
    assert widths, "the page did not load"
    return screenshot, [int(width) for width in widths.group(1).split(",") if width]
