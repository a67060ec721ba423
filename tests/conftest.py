"""Shared test setup: offline, a private cache, the real config and a small phantom on real DICOMs."""

import os

# Before anything imports timm, wandb or albumentations: no test may touch the network.
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["WANDB_MODE"] = "offline"
os.environ["NO_ALBUMENTATIONS_UPDATE"] = "1"

import pytest  # noqa: E402
from hydra import compose, initialize_config_dir  # noqa: E402
from hydra.core.global_hydra import GlobalHydra  # noqa: E402

from ich import CONFIG_DIR  # noqa: E402

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
