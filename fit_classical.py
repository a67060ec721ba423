"""Fit a classical classifier on frozen-backbone features: `python fit_classical.py model=xception classifier=svm`."""

import hydra
from omegaconf import DictConfig

from ich import CONFIG_DIR
from ich.cli import friendly_errors, paths_as_written


@paths_as_written
@hydra.main(config_path=str(CONFIG_DIR), config_name="fit_classical", version_base="1.3")
@friendly_errors
def main(cfg: DictConfig) -> float | None:
    from ich.classical.fit import run

    metrics = run(cfg)
    return metrics.get(cfg.get("optimized_metric") or "val/auroc")


if __name__ == "__main__":
    main()
