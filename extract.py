"""Cache frozen-backbone features of the train/val/test splits: `python extract.py model=xception`."""

import hydra
from omegaconf import DictConfig

from ich import CONFIG_DIR
from ich.cli import friendly_errors, paths_as_written


@paths_as_written
@hydra.main(config_path=str(CONFIG_DIR), config_name="extract", version_base="1.3")
@friendly_errors
def main(cfg: DictConfig) -> None:
    from ich.classical.features import run

    run(cfg)


if __name__ == "__main__":
    main()
