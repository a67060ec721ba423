"""Training from a composed config: `run(cfg)` is what `python train.py` calls, and tests and notebooks too."""

import logging
import math
import os
import time
from pathlib import Path

import hydra
import pytorch_lightning as pl
from omegaconf import DictConfig, OmegaConf
from pytorch_lightning.loggers import WandbLogger

from ich.data.datamodule import ICHDataModule
from ich.module import ICHLitModule
from ich.results import print_metrics, write_json

log = logging.getLogger(__name__)


def build_datamodule(cfg: DictConfig, **overrides) -> ICHDataModule:
    data = OmegaConf.to_container(cfg.data, resolve=True)
    return ICHDataModule(task=cfg.task.name, output_dir=cfg.output_dir, **{**data, **overrides})


def build_module(cfg: DictConfig, datamodule: ICHDataModule) -> ICHLitModule:
    """The LightningModule gets plain values only, so a checkpoint reloads without the config."""
    task = datamodule.task
    weighted = bool(cfg.task.class_weights)
    return ICHLitModule(
        task=task.name,
        in_chans=datamodule.num_channels,
        threshold=float(cfg.task.threshold),
        pos_weight=datamodule.pos_weight() if weighted and task.loss == "bce" else None,
        class_weights=datamodule.class_weights() if weighted and task.loss == "ce" else None,
        rsna_weights=bool(cfg.task.get("rsna_weights", False)),
        optimizer=OmegaConf.to_container(cfg.optimizer, resolve=True),
        scheduler=OmegaConf.to_container(cfg.scheduler, resolve=True) if cfg.get("scheduler") else None,
        channels_last=bool(cfg.trainer.get("channels_last", False)),
        **OmegaConf.to_container(cfg.model, resolve=True),
    )


def _instantiate_all(group: DictConfig | None) -> list:
    """Instantiate every entry of a group of objects; entries set to null are left out."""
    if not group:
        return []
    return [hydra.utils.instantiate(node) for node in group.values() if node is not None]


def _wandb_offline_without_key(cfg: DictConfig) -> None:
    """W&B must never block a run on a login prompt: with no API key anywhere, log offline (`wandb sync` later)."""
    if "wandb" not in (cfg.get("logger") or {}) or os.environ.get("WANDB_API_KEY"):
        return
    netrc = Path.home() / ".netrc"
    if netrc.is_file() and "api.wandb.ai" in netrc.read_text():
        return
    if os.environ.setdefault("WANDB_MODE", "offline") == "offline":
        log.info("No W&B API key found: logging offline under %s/wandb (upload later with `wandb sync`)", cfg.output_dir)


def build_trainer(cfg: DictConfig) -> pl.Trainer:
    _wandb_offline_without_key(cfg)
    kwargs = OmegaConf.to_container(cfg.trainer, resolve=True)
    kwargs.pop("channels_last", None)  # a model setting that lives with the hardware choice
    return pl.Trainer(
        **kwargs,
        default_root_dir=cfg.output_dir,
        callbacks=_instantiate_all(cfg.get("callbacks")),
        logger=_instantiate_all(cfg.get("logger")) or False,
    )


def _numbers(metrics: dict) -> dict[str, float]:
    return {name: float(value) for name, value in sorted(metrics.items())}


def run(cfg: DictConfig) -> dict[str, float]:
    """Train, then test the best checkpoint; returns the flat metrics also written to metrics.json."""
    pl.seed_everything(cfg.seed, workers=True)
    output_dir = Path(cfg.output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    datamodule = build_datamodule(cfg)
    datamodule.prepare_data()
    datamodule.setup()
    model = build_module(cfg, datamodule)
    trainer = build_trainer(cfg)

    started = time.perf_counter()
    trainer.fit(model, datamodule=datamodule, ckpt_path=cfg.get("ckpt_path"))
    metrics = {"time/fit_seconds": time.perf_counter() - started}
    metrics.update({k: v for k, v in _numbers(trainer.callback_metrics).items() if k.startswith("val/")})

    if cfg.get("test"):
        best = trainer.checkpoint_callback.best_model_path if trainer.checkpoint_callback else ""
        (results,) = trainer.test(model, datamodule=datamodule, ckpt_path=best or None, verbose=False)
        metrics.update(_numbers(results))
    for stage, count in datamodule.summary["slices"].items():
        metrics[f"data/slices_{stage}"] = float(count)
    undefined = sorted(k for k, v in metrics.items() if math.isnan(v))
    if undefined:
        log.warning("Undefined on this data (a class absent from the split), written as null: %s", ", ".join(undefined))
    write_json(output_dir / "metrics.json", metrics)
    for logger in trainer.loggers:
        if isinstance(logger, WandbLogger):
            logger.experiment.finish()  # else only the first job of a multirun logs
    print_metrics(metrics, title=f"{cfg.task.name} / {cfg.model.backbone} -> {output_dir}")
    return metrics

