"""Train a hemorrhage detector: `python train.py model=densenet121 task=multilabel`."""

import hydra
from omegaconf import DictConfig

from ich import CONFIG_DIR
from ich.cli import friendly_errors


@hydra.main(config_path=str(CONFIG_DIR), config_name="train", version_base="1.3")
@friendly_errors
def main(cfg: DictConfig) -> float | None:
    from ich.train import run

    metrics = run(cfg)
    return metrics.get(cfg.get("optimized_metric") or "val/auroc_best")


if __name__ == "__main__":
    main()
