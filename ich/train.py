"""Training from a composed config: `run(cfg)` is what `python train.py` calls, and tests and notebooks too.

`objective(cfg)` wraps it for Hydra: the value a sweep optimises, and in a multirun a failed job is scored
as the worst value instead of ending the sweep.
"""

import gc
import logging
import math
import os
import time
from pathlib import Path

import hydra
import matplotlib.pyplot as plt
import pytorch_lightning as pl
import torch
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from omegaconf import DictConfig, OmegaConf
from pytorch_lightning.loggers import WandbLogger

from ich.core.hardware import resolve_trainer
from ich.core.results import predictions_table, print_metrics, write_atomic, write_json
from ich.core.runs import resume_checkpoint, training_run_dir
from ich.data.datamodule import ICHDataModule
from ich.evaluation.exam import report_exams, stage_exams
from ich.evaluation.html_report import write_evaluation_report
from ich.evaluation.operating import honest_metrics, slice_groups, source_metrics
from ich.evaluation.plots import save_reliability_diagram
from ich.models.backbone import check_backbone_name
from ich.training.callbacks import WANDB_RUN_ID_KEY, WandbRunId
from ich.training.module import ICHLitModule, predict_logits
from ich.training.sequence import build_stage_two

log = logging.getLogger(__name__)


def build_module(cfg: DictConfig, datamodule: ICHDataModule) -> ICHLitModule:
    """The LightningModule gets plain values only, so a checkpoint reloads without the config."""
    task = datamodule.task
    weighted = bool(cfg.task.class_weights)
    trainer = resolve_trainer(OmegaConf.to_container(cfg.trainer, resolve=True))
    return ICHLitModule(
        task=task.name,
        label=task.outputs[0] if task.name == "binary" else None,
        in_chans=datamodule.num_channels,
        threshold=float(cfg.task.threshold),
        operating_point=str(cfg.task.operating_point),
        target_sensitivity=float(cfg.task.target_sensitivity),
        calibrate=bool(cfg.task.calibrate),
        pos_weight=datamodule.pos_weight() if weighted and task.loss == "bce" else None,
        class_weights=datamodule.class_weights() if weighted and task.loss == "ce" else None,
        rsna_weights=bool(cfg.task.get("rsna_weights", False)),
        optimizer=OmegaConf.to_container(cfg.optimizer, resolve=True),
        scheduler=OmegaConf.to_container(cfg.scheduler, resolve=True) if cfg.get("scheduler") else None,
        channels_last=bool(trainer.get("channels_last")),
        precision=str(trainer["precision"]),
        inputs=datamodule.inputs,
        data=OmegaConf.to_container(cfg.data, resolve=True),
        **OmegaConf.to_container(cfg.model, resolve=True),
    )


def _instantiate_all(group: DictConfig | None, **extra: dict) -> list:
    """Instantiate every entry of a group of objects; entries set to null are left out.

    `extra` maps an entry name to keyword arguments decided at run time (the W&B group, a resumed run id).
    """
    if not group:
        return []
    return [hydra.utils.instantiate(node, **extra.get(name, {})) for name, node in group.items() if node is not None]


def _wandb_offline_without_key(cfg: DictConfig) -> None:
    """W&B must never block a run on a login prompt: with no API key anywhere, log offline (`wandb sync` later)."""
    if "wandb" not in (cfg.get("logger") or {}) or os.environ.get("WANDB_API_KEY"):
        return
    netrc = Path.home() / ".netrc"
    if netrc.is_file() and "api.wandb.ai" in netrc.read_text():
        return
    if os.environ.setdefault("WANDB_MODE", "offline") == "offline":
        log.info("No W&B API key found: logging offline under %s/wandb (upload later with `wandb sync`)", cfg.output_dir)


def _in_multirun() -> bool:
    return HydraConfig.initialized() and HydraConfig.get().mode == RunMode.MULTIRUN


def _wandb_settings(cfg: DictConfig, resume_from: Path | None) -> dict:
    """Run-time W&B settings: each multirun job is its own run, grouped by its sweep folder and named by its
    overrides; a run resumed from a checkpoint continues the W&B run recorded in that checkpoint."""
    node = (cfg.get("logger") or {}).get("wandb")
    if node is None:
        return {}
    settings = {}
    if _in_multirun():
        job = HydraConfig.get()
        if node.get("group") is None:
            settings["group"] = job.sweep.dir
        if node.get("name") is None:
            settings["name"] = job.job.override_dirname or f"job {job.job.num}"
    run_id = wandb_run_id(resume_from)
    if run_id:
        log.info("Resuming W&B run %s from the checkpoint", run_id)
        settings.update(id=run_id, resume="allow")
    return settings


def wandb_run_id(checkpoint: Path | None) -> str | None:
    """The W&B run id that ich.training.callbacks.WandbRunId stored in a checkpoint (None for another checkpoint)."""
    if checkpoint is None:
        return None
    return torch.load(checkpoint, map_location="cpu", weights_only=True, mmap=True).get(WANDB_RUN_ID_KEY)


def build_trainer(cfg: DictConfig, resume_from: Path | None = None) -> pl.Trainer:
    """The Trainer of the config; `resume_from` is the checkpoint fit() resumes from, if any."""
    _wandb_offline_without_key(cfg)
    kwargs = resolve_trainer(OmegaConf.to_container(cfg.trainer, resolve=True))
    kwargs.pop("channels_last", None)  # a model setting that lives with the hardware choice
    loggers = _instantiate_all(cfg.get("logger"), wandb=_wandb_settings(cfg, resume_from))
    callbacks = _instantiate_all(cfg.get("callbacks"))
    if any(isinstance(logger, WandbLogger) for logger in loggers):
        callbacks.append(WandbRunId())
    return pl.Trainer(**kwargs, default_root_dir=cfg.output_dir, callbacks=callbacks, logger=loggers or False)


def _numbers(metrics: dict) -> dict[str, float]:
    return {name: float(value) for name, value in sorted(metrics.items())}


def _log_config(trainer: pl.Trainer, cfg: DictConfig) -> None:
    """The whole resolved config, once, to every logger (W&B config, CSV hparams.yaml, TensorBoard hparams).

    The module's own hyperparameters follow at fit start; where a name is in both (`task`), the module's wins.
    """
    resolved = OmegaConf.to_container(cfg, resolve=True)
    for logger in trainer.loggers:
        logger.log_hyperparams(resolved)


def find_lr(trainer: pl.Trainer, model: ICHLitModule, datamodule: ICHDataModule, cfg: DictConfig) -> float | None:
    """Lightning's learning-rate range test. Its plot goes to lr_find.png and its suggestion becomes the
    optimizer's lr, which is also the one-cycle schedule's peak (scheduler.max_lr: null)."""
    from pytorch_lightning.tuner import Tuner

    settings = OmegaConf.to_container(cfg.lr_find, resolve=True)
    finder = Tuner(trainer).lr_find(model, datamodule=datamodule, update_attr=False, **settings)
    if finder is None:  # skipped, as under fast_dev_run
        return None
    figure = finder.plot(suggest=True)
    figure.savefig(Path(cfg.output_dir) / "lr_find.png", dpi=100)
    plt.close(figure)
    suggestion = finder.suggestion()
    if suggestion is None:
        log.warning("The learning-rate finder found no clear slope; keeping optimizer.lr=%g", cfg.optimizer.lr)
        return None
    log.info("Learning-rate finder: training with lr %.3g, not %g (plot: lr_find.png)", suggestion, cfg.optimizer.lr)
    model.hparams.optimizer["lr"] = suggestion
    return suggestion


def run(cfg: DictConfig) -> dict[str, float]:
    """Train, choose the operating points on validation, then test the best checkpoint; returns the flat metrics
    also written to metrics.json."""
    cfg, resume_from = resume_config(cfg)
    cfg.trainer = resolve_trainer(OmegaConf.to_container(cfg.trainer, resolve=True))  # logged as decided
    pl.seed_everything(cfg.seed, workers=True)
    output_dir = Path(cfg.output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    if "sequence" in cfg.model:  # stage 2 (model=sequence): a sequence model over a stage-1 checkpoint's series
        datamodule, model = build_stage_two(cfg)
    else:
        check_backbone_name(cfg.model.backbone)  # before the data, which may take minutes to index the first time
        datamodule = ICHDataModule.from_config(cfg)
        datamodule.prepare_data()
        datamodule.setup()
        model = build_module(cfg, datamodule)
    trainer = build_trainer(cfg, resume_from=resume_from)
    try:
        metrics = _train_and_test(cfg, trainer, model, datamodule, resume_from)
    except BaseException:
        _finish_wandb(trainer, exit_code=1)
        raise
    _finish_wandb(trainer, exit_code=0)
    if trainer.is_global_zero:  # under DDP every rank holds the same synced metrics: one writes them
        write_json(output_dir / "metrics.json", metrics)
        print_metrics(metrics, title=f"{cfg.task.name} / {cfg.model.get('backbone', 'sequence')} -> {output_dir}")
    return metrics


def resume_config(cfg: DictConfig) -> tuple[DictConfig, Path | None]:
    """With `ckpt_path`, continue that run: its own config and split, in its own folder.

    Plain `key=value` overrides given with `ckpt_path` (`trainer.max_epochs=20`) still apply.
    """
    if not cfg.get("ckpt_path"):
        return cfg, None
    checkpoint = resume_checkpoint(str(cfg.ckpt_path))
    run_dir = training_run_dir(checkpoint)
    saved = run_dir / ".hydra" / "config.yaml"
    resumed = OmegaConf.load(saved) if saved.is_file() else cfg.copy()
    if saved.is_file() and HydraConfig.initialized():
        given = [o for o in HydraConfig.get().overrides.task if "." in o.split("=", 1)[0] and not o.startswith("ckpt_path")]
        resumed.merge_with(OmegaConf.from_dotlist(given))
    resumed.ckpt_path = str(checkpoint)
    resumed.output_dir = str(run_dir)
    if (run_dir / "split.csv").is_file():
        resumed.data.split_file = str(run_dir / "split.csv")
    log.info("Resuming %s from %s", run_dir, checkpoint.name)
    return resumed, checkpoint


def _train_and_test(
    cfg: DictConfig, trainer: pl.Trainer, model: ICHLitModule, datamodule: ICHDataModule, resume_from: Path | None
) -> dict:
    _log_config(trainer, cfg)
    metrics = {}
    if cfg.get("tune_lr"):
        suggestion = find_lr(trainer, model, datamodule, cfg)
        if suggestion is not None:
            metrics["lr_find/lr"] = suggestion

    started = time.perf_counter()
    # weights_only: a checkpoint holding pickled objects (which could run code) is refused, not executed
    trainer.fit(model, datamodule=datamodule, ckpt_path=resume_from, weights_only=True)
    metrics["time/fit_seconds"] = time.perf_counter() - started
    metrics.update({k: v for k, v in _numbers(trainer.callback_metrics).items() if k.startswith("val/")})
    selection = trainer.checkpoint_callback
    if selection is not None and selection.best_model_score is not None:
        # what a sweep optimises by default: the selected checkpoint's value of the monitored metric
        metrics[f"{selection.monitor}_best"] = float(selection.best_model_score)

    predictor = prediction_trainer(cfg, trainer) if trainer.is_global_zero else None
    if predictor is not None:
        choose_operating_points(predictor, trainer, model, datamodule)
    trainer.strategy.barrier("operating points")  # every rank tests the checkpoint with its thresholds

    if cfg.get("test"):
        best = selection.best_model_path if selection else ""
        (results,) = trainer.test(model, datamodule=datamodule, ckpt_path=best or None, verbose=False, weights_only=True)
        metrics.update(_numbers(results))
        if predictor is not None:
            metrics.update(operating_point_metrics(cfg, predictor, model, datamodule, metrics, best or "last weights"))
    for stage, count in datamodule.summary["slices"].items():
        metrics[f"data/slices_{stage}"] = float(count)
    undefined = sorted(k for k, v in metrics.items() if math.isnan(v))
    if undefined:
        log.warning("Undefined on this data (a class absent from the split), written as null: %s", ", ".join(undefined))
    return metrics


def prediction_trainer(cfg: DictConfig, trainer: pl.Trainer) -> pl.Trainer:
    """One device at the training run's precision, for the validation and test predictions the operating points
    are chosen and read on: the probabilities of the test stage, so its figures and their intervals agree."""
    return pl.Trainer(accelerator=cfg.trainer.accelerator, devices=1, precision=trainer.precision, logger=False,
                      enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                      default_root_dir=cfg.output_dir)


def choose_operating_points(predictor: pl.Trainer, trainer: pl.Trainer, model: ICHLitModule,
                            datamodule: ICHDataModule) -> None:
    """Temperature and thresholds of the best checkpoint and of last.ckpt, each chosen on its own validation
    predictions (SliceClassifier.choose_operating_points) and written into its file: a .ckpt alone carries them.

    Lightning writes last.ckpt when it writes a best one, so the two often hold the same step: then they are
    chosen once. Without checkpoint files (fast_dev_run) the model in memory gets them.
    """
    selection = trainer.checkpoint_callback
    paths = {Path(p) for p in (selection.best_model_path, selection.last_model_path) if p} if selection else set()
    loader, table = datamodule.loader(datamodule.datasets["val"]), datamodule.tables["val"]
    if not paths:
        model.choose_operating_points(predictor, loader, table)
        return
    chosen_at: dict[int, dict[str, torch.Tensor]] = {}  # global step -> the buffers chosen for its weights
    for path in sorted(paths):
        checkpoint = torch.load(path, map_location="cpu", weights_only=True)
        step = checkpoint["global_step"]
        if step not in chosen_at:
            chosen = type(model).load_from_checkpoint(path, map_location="cpu", weights_only=True)
            chosen.choose_operating_points(predictor, loader, table)
            chosen_at[step] = {name: getattr(chosen, name).detach().cpu() for name in chosen.OPERATING_BUFFERS}
        checkpoint["state_dict"].update(chosen_at[step])
        write_atomic(path, lambda tmp: torch.save(checkpoint, tmp))


def operating_point_metrics(cfg: DictConfig, predictor: pl.Trainer, model: ICHLitModule,
                            datamodule: ICHDataModule, tested: dict[str, float], checkpoint: str) -> dict[str, float]:
    """The tested model's operating points, patient-level intervals, calibration and exam level on the test
    split (ich.evaluation.operating.honest_metrics and ich.evaluation.exam, as evaluate.py reports them); exams.csv, reliability.png and
    report.html (with
    the `tested` metrics of the test stage) in the run folder."""
    loader, table = datamodule.loader(datamodule.datasets["test"]), datamodule.tables["test"]
    ids, logits, targets = predict_logits(predictor, model, loader)
    patients, _ = slice_groups(table, ids)
    temperature = float(model.temperature)
    output_dir = Path(cfg.output_dir)
    save_reliability_diagram(output_dir / "reliability.png", model.task, logits, targets, temperature)
    honest = honest_metrics(model.task, logits, targets, model.op_thresholds.cpu().numpy(), temperature, patients,
                            resamples=int(cfg.bootstrap), seed=int(cfg.seed))
    honest.update(source_metrics(model.task, logits, targets, model.op_thresholds.cpu().numpy(), temperature, table,
                                 ids, resamples=int(cfg.bootstrap), seed=int(cfg.seed)))
    exams = stage_exams(model, predictor, loader, table, ids, logits, targets)
    honest.update(report_exams(model.task, exams, model.exam_thresholds(), output_dir, int(cfg.bootstrap),
                               int(cfg.seed)))
    table = predictions_table(model.task, ids, datamodule.tables["test"].set_index("image_id")["patient"],
                              model.probabilities(logits), targets)
    slices = getattr(datamodule, "slices", datamodule)  # stage 2 reports on its encoder's slices
    write_evaluation_report(output_dir / "report.html",
                            title=f"{model.task.name} / {model.hparams.get('backbone', 'sequence')}: test stage",
                            checkpoint=checkpoint, data=f"{slices.source} {slices.root or ''}".strip(),
                            model=model, datamodule=slices, metrics={**tested, **honest}, predictions=table)
    return honest


def _finish_wandb(trainer: pl.Trainer, exit_code: int) -> None:
    """End this job's W&B run, failed or not: in a multirun the next job would otherwise log into it."""
    for logger in trainer.loggers:
        if isinstance(logger, WandbLogger) and trainer.is_global_zero:
            logger.experiment.finish(exit_code=exit_code)


# --- what train.py returns to Hydra ----------------------------------------------------------------------


def objective(cfg: DictConfig) -> float | None:
    """Run and return `optimized_metric`. In a multirun a failing job (an exception, out of memory, a NaN loss,
    an undefined metric) is logged with its overrides and scored as the worst value, so the sweep goes on."""
    sweeping = _in_multirun()
    if sweeping:
        _check_multirun_launch(cfg)
    name = cfg.get("optimized_metric") or "val/loss_best"
    try:
        metrics = run(cfg)
    except Exception:
        if not sweeping:
            raise
        worst = _worst_score()
        log.exception("Job %s failed; scored %s so the sweep goes on", _job_overrides(), worst)
        _release_memory()
        return worst
    value = metrics.get(name)
    if value is not None and not math.isnan(value):
        return value
    if name not in metrics:
        log.warning("optimized_metric=%s is not among this run's metrics: choose one from metrics.json.", name)
    if sweeping:
        worst = _worst_score()
        log.warning("Job %s has no value of %s; scored %s", _job_overrides(), name, worst)
        return worst
    return value


def _check_multirun_launch(cfg: DictConfig) -> None:
    """DDP in a local multirun relaunches the whole sweep on every GPU and hangs; SLURM gives each job its own."""
    trainer = cfg.trainer
    ddp = str(trainer.get("strategy") or "").startswith("ddp")
    several = trainer.get("devices") not in (1, "1", [0]) or int(trainer.get("num_nodes") or 1) > 1
    on_slurm = "submitit" in str(HydraConfig.get().launcher.get("_target_", ""))
    if ddp and several and not on_slurm:
        raise ValueError(
            "trainer=ddp cannot run inside a local multirun (-m): sweep with one GPU per trial (trainer=gpu), "
            "or submit the sweep with launcher=slurm, or run each DDP job on its own without -m."
        )


def _worst_score() -> float:
    """The worst value for the sweep's direction (an Optuna study records -inf/inf like any other score)."""
    direction = str(HydraConfig.get().sweeper.get("direction", "maximize"))
    return math.inf if "minimize" in direction else -math.inf


def _job_overrides() -> str:
    return " ".join(HydraConfig.get().overrides.task) or "(no overrides)"


def _release_memory() -> None:
    """A failed trial's model may still hold GPU memory; the next trial runs in this same process."""
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
