"""Train a hemorrhage detector: `python train.py model=densenet121 task=multilabel`."""

import hydra
from omegaconf import DictConfig

from ich import CONFIG_DIR
from ich.cli import friendly_errors, paths_as_written


@paths_as_written
@hydra.main(config_path=str(CONFIG_DIR), config_name="train", version_base="1.3")
@friendly_errors
def main(cfg: DictConfig) -> float | None:
    """Returns `optimized_metric` for sweepers; see ich.train.objective."""
    from ich.train import objective

    return objective(cfg)


if __name__ == "__main__":
    main()
