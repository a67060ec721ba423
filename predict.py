"""Predict every study of a new DICOM folder: `python predict.py ckpt_path=outputs/<date>/<time> input=FOLDER_OR_ZIP`."""

import hydra
from omegaconf import DictConfig

from ich import CONFIG_DIR
from ich.cli import friendly_errors, paths_as_written


@paths_as_written
@hydra.main(config_path=str(CONFIG_DIR), config_name="predict", version_base="1.3")
@friendly_errors
def main(cfg: DictConfig) -> None:
    from ich.predict import run

    run(cfg)


if __name__ == "__main__":
    main()
