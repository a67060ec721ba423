"""Named recipes (conf/experiment) and the learning-rate finder, on the phantom and the CPU."""

import itertools
import json

import numpy as np
import pytest
import torch
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from hydra.core.override_parser.overrides_parser import OverridesParser

from conftest import FAST_RUN, SMALL_PHANTOM, compose_config
from ich import CONFIG_DIR
from ich.core.tasks import LABELS
from ich.data.datamodule import ICHDataModule
from ich.train import build_module, run

RECIPES = sorted(path.stem for path in (CONFIG_DIR / "experiment").glob("*.yaml"))
# Networks whose layer widths fix their input size keep the recipe's size; every other recipe runs at 64 px.
FIXED_INPUT_SIZE = ("simple_cnn", "mlp")


def offline_and_small(recipe_cfg) -> list[str]:
    """Overrides that keep a recipe's backbone, task and data settings but make one batch cheap and offline:
    no ImageNet download, the CPU in float32, small images, four slices a batch."""
    size = [] if recipe_cfg.model.backbone in FIXED_INPUT_SIZE else ["data.image_size=64"]
    return ["model.pretrained=false", "trainer=cpu",
            "data.batch_size=4", "callbacks.progress_bar=null", *size, *SMALL_PHANTOM]


def test_every_paper_has_a_recipe():
    assert {"resnet50_frozen_bn", "fastai_resnet18_onecycle", "class_weighted_multilabel", "rsna_strong",
            "frozen_features_linear", "per_label"} <= set(RECIPES)


@pytest.mark.slow
@pytest.mark.parametrize("recipe", RECIPES)
def test_recipe_runs_one_batch(cache_dir, tmp_path, recipe):
    """`python train.py experiment=NAME` composes and trains, validates and tests one batch."""
    recipe_cfg = compose_config("train", [f"experiment={recipe}", "output_dir=unused"])
    cfg = compose_config(
        "train", [f"experiment={recipe}", *offline_and_small(recipe_cfg), "debug=fdr", f"output_dir={tmp_path}"]
    )
    assert cfg.model.backbone == recipe_cfg.model.backbone and cfg.task.name == recipe_cfg.task.name
    metrics = run(cfg)
    assert {"test/acc", "test/sensitivity", "test/specificity"} <= set(metrics)


def test_recipes_set_what_their_papers_did():
    frozen = compose_config("train", ["experiment=resnet50_frozen_bn", "output_dir=unused"])
    assert frozen.model.backbone == "resnet50" and frozen.model.freeze == "backbone_except_bn"
    assert dict(frozen.model.head) == {"hidden": 256, "dropout": 0.4, "batchnorm": True}
    assert frozen.data.batch_size == 16 and frozen.data.image_size == 224 and list(frozen.data.windows) == ["brain"]
    assert frozen.optimizer._target_ == "torch.optim.Adam" and frozen.model.pretrained

    fastai = compose_config("train", ["experiment=fastai_resnet18_onecycle", "output_dir=unused"])
    assert fastai.scheduler._target_.endswith("OneCycleLR") and fastai.tune_lr
    assert fastai.model.freeze == "backbone" and fastai.model.unfreeze_at_epoch == 1
    assert fastai.data.min_brain_fraction == 0.2 and fastai.data.image_size == 256 and fastai.task.name == "multilabel"

    strong = compose_config("train", ["experiment=rsna_strong", "output_dir=unused"])
    assert strong.model.backbone == "densenet121" and strong.data.context == 1 and len(strong.data.windows) == 3
    assert strong.trainer.precision == "bf16-mixed" and strong.data.image_size == 512 and strong.task.rsna_weights

    weighted = compose_config("train", ["experiment=class_weighted_multilabel", "output_dir=unused"])
    assert weighted.task.class_weights and weighted.data.balance == "undersample"


def multirun_jobs(overrides: list[str]) -> list[list[str]]:
    """The jobs `python train.py -m <overrides>` launches from the config's hydra.sweeper.params, expanded as
    Hydra's basic sweeper expands them (the product of every swept key's values)."""
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base="1.3"):
        sweeper = compose(config_name="train", overrides=overrides, return_hydra_config=True).hydra.sweeper
    assert sweeper._target_.endswith("BasicSweeper"), f"another sweeper reads hydra.sweeper.params: {sweeper._target_}"
    parsed = OverridesParser.create().parse_overrides([f"{key}={value}" for key, value in sweeper.params.items()])
    values = [[f"{override.get_key_element()}={v}" for v in override.sweep_string_iterator()] for override in parsed]
    return [list(job) for job in itertools.product(*values)]


def test_per_label_multirun_trains_the_papers_small_cnn_once_per_label():
    jobs = multirun_jobs(["experiment=per_label"])
    assert jobs == [[f"task.label={label}"] for label in LABELS]
    for job in jobs:
        cfg = compose_config("train", ["experiment=per_label", *job, "output_dir=unused"])
        assert cfg.task.name == "binary" and f"task.label={cfg.task.label}" == job[0]
        assert cfg.model.backbone == "simple_cnn" and cfg.data.image_size == 128 and list(cfg.data.windows) == ["brain"]
        assert cfg.data.balance == "undersample" and cfg.data.balance_ratio == 1.0
        assert cfg.callbacks.early_stopping.patience == 3 and cfg.callbacks.early_stopping.monitor == "val/loss"


def test_a_per_label_run_trains_on_its_label_with_a_training_split_balanced_50_50(cache_dir, tmp_path):
    overrides = ["experiment=per_label", "task.label=subdural", "data.num_workers=0", *SMALL_PHANTOM]
    cfg = compose_config("train", [*overrides, f"output_dir={tmp_path}"])
    datamodule = ICHDataModule.from_config(cfg)
    datamodule.prepare_data()
    datamodule.setup()
    train = datamodule.tables["train"]
    assert np.array_equal(datamodule.datasets["train"].targets[:, 0], train["subdural"].to_numpy())
    assert 0 < train["subdural"].sum() and train["subdural"].mean() == 0.5
    assert train["any"].mean() != 0.5  # balanced on subdural, not on `any`
    assert datamodule.tables["test"]["subdural"].mean() < 0.5  # validation and test keep the label's prevalence
    model = build_module(cfg, datamodule)
    assert model.task.outputs == ("subdural",) and model.hparams.label == "subdural"


def test_command_line_wins_over_a_recipe():
    cfg = compose_config("train", ["experiment=rsna_strong", "data.image_size=128", "trainer=cpu", "output_dir=unused"])
    assert cfg.data.image_size == 128 and cfg.trainer.accelerator == "cpu"


@pytest.mark.slow
def test_lr_finder_plots_and_trains_with_its_suggestion(cache_dir, tmp_path):
    """tune_lr=true: lr_find.png in the run folder, and the one-cycle peak is the suggested lr."""
    # 2 epochs of 17 batches: enough steps for the finder's 24 and for a one-cycle schedule
    overrides = ["tune_lr=true", "lr_find.num_training=24", "scheduler=onecycle", "trainer.max_epochs=2",
                 "data.batch_size=2", "optimizer.lr=0.5", "test=false", "logger=tensorboard"]
    cfg = compose_config("train", [*FAST_RUN, f"output_dir={tmp_path}", *overrides])
    metrics = run(cfg)
    assert (tmp_path / "lr_find.png").stat().st_size > 10_000
    suggestion = metrics["lr_find/lr"]
    assert suggestion != 0.5 and cfg.lr_find.min_lr <= suggestion <= cfg.lr_find.max_lr
    checkpoint = torch.load(tmp_path / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)
    assert checkpoint["hyper_parameters"]["optimizer"]["lr"] == suggestion
    assert checkpoint["optimizer_states"][0]["param_groups"][0]["max_lr"] == suggestion  # OneCycleLR's peak
    # the same run also wrote TensorBoard events (logger=tensorboard)
    assert any((tmp_path / "tensorboard").glob("events.out.tfevents.*"))
    assert json.loads((tmp_path / "metrics.json").read_text())["lr_find/lr"] == suggestion
