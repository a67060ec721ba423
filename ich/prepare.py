"""`python -m ich.prepare data=rsna data.root=DIR [cache=true]`: index every DICOM once, print what was found.

Training builds or reuses the same index (and, with data.cache=true, the slice cache) by itself;
running this first shows the counts (and any unreadable files) before a GPU is booked, and does the
one slow conversion on a machine with many cores.
"""

import hydra
from omegaconf import DictConfig, OmegaConf

from ich import CONFIG_DIR
from ich.cli import friendly_errors, paths_as_written
from ich.data.datamodule import ICHDataModule
from ich.data.multi import data_parts


@paths_as_written
@hydra.main(config_path=str(CONFIG_DIR), config_name="prepare", version_base="1.3")
@friendly_errors
def main(cfg: DictConfig) -> None:
    parts = data_parts(OmegaConf.to_container(cfg.data, resolve=True))  # data=multi: each of its sources
    if all(data["source"] == "images" for data in parts):
        raise ValueError("data=images needs no index: PNG/JPG folders are read as listed in data.labels.")
    for data in parts:
        if data["source"] == "images":
            continue
        datamodule = ICHDataModule(**data)
        index, summary, folder = datamodule.build_index(force=cfg.force, workers=cfg.workers)
        print(f"Index: {folder / 'index.parquet'}")
        for line in summary.lines():
            print(f"  {line}")
        if cfg.cache:
            cache = datamodule.build_cache(index, workers=cfg.workers)
            print(f"Slice cache: {cache.folder}")
            for line in cache.lines():
                print(f"  {line}")


if __name__ == "__main__":
    main()
