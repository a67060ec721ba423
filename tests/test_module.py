"""ICHLitModule on the three tasks with a tiny backbone on CPU, and the metrics it logs."""

import math
import warnings

import pytest
import pytorch_lightning as pl
import torch
from omegaconf import OmegaConf
from torch.utils.data import DataLoader

from conftest import compose_config
from ich.core.tasks import LABELS, SUBTYPES
from ich.evaluation.metrics import RSNALogLoss, build_metrics
from ich.training.module import ICHLitModule
from test_model import TINY, no_network, tiny_weights_file  # noqa: F401 (no_network is a fixture)

TASKS = ("binary", "subtype", "multilabel")


def toy_loader(task, n=16, batch_size=8, in_chans=3, size=32, seed=0):
    """Dict batches as the data module yields them; targets follow image brightness, so they can be learnt."""
    g = torch.Generator().manual_seed(seed)
    brightness = torch.rand(n, generator=g) * 2 - 1
    images = brightness[:, None, None, None] + 0.1 * torch.randn(n, in_chans, size, size, generator=g)
    targets = {
        "binary": (brightness > 0).float()[:, None],
        "subtype": ((brightness + 1) / 2 * len(SUBTYPES)).long().clamp(max=len(SUBTYPES) - 1),
        "multilabel": (brightness[:, None] > torch.linspace(-0.6, 0.6, len(LABELS))).float(),
    }[task]
    items = [{"image": images[i], "target": targets[i], "image_id": f"ID_{i:04d}"} for i in range(n)]
    return DataLoader(items, batch_size=batch_size)


def make_trainer(**kwargs):
    options = dict(max_steps=2, accelerator="cpu", logger=False, enable_checkpointing=False)
    options.update(enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0)
    return pl.Trainer(**{**options, **kwargs})


def fit(module, **trainer_kwargs):
    """A few training steps and one validation, on the module's own task and channel count."""
    loader = toy_loader(module.task.name, in_chans=module.hparams.in_chans)
    trainer = make_trainer(**trainer_kwargs)
    trainer.fit(module, loader, loader)
    return trainer


def tiny(task="binary", **kwargs):
    return ICHLitModule(task=task, backbone=TINY, **kwargs)


def config_node(group, name):
    return OmegaConf.to_container(compose_config(None, [f"+{group}={name}"])[group], resolve=True)


EXPECTED_METRICS = {
    "binary": ["val/acc", "val/auroc", "val/sensitivity", "val/specificity", "val/precision", "val/f1"],
    "subtype": ["val/acc", "val/auroc", "val/auroc_epidural", "val/sensitivity_subdural", "val/f1_subarachnoid"],
    "multilabel": ["val/acc", "val/auroc", "val/logloss_weighted", "val/sensitivity_epidural", "val/acc_any"],
}


@pytest.mark.parametrize("task", TASKS)
def test_training_logs_loss_and_metrics_under_stage_names(task):
    module = tiny(task)
    trainer = fit(module)
    logged = set(trainer.callback_metrics)
    assert {"train/loss", "val/loss", "val/auroc_best", "train/auroc", *EXPECTED_METRICS[task]} <= logged
    assert ("val/logloss_weighted" in logged) == (task == "multilabel")
    assert ("val/auroc_any" in logged) == (task == "multilabel")  # per class only with several outputs
    test_metrics = trainer.test(module, toy_loader(task), verbose=False)[0]
    assert {"test/loss", "test/auroc", "test/sensitivity"} <= set(test_metrics)


@pytest.mark.parametrize("task", TASKS)
def test_loss_goes_down_on_a_learnable_toy_problem(task):
    pl.seed_everything(0)
    losses = []

    class Record(pl.Callback):
        def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx):
            losses.append(outputs["loss"].item())

    optimizer = {"_target_": "torch.optim.Adam", "_partial_": True, "lr": 3e-3}
    module = tiny(task, optimizer=optimizer)
    loader = toy_loader(task, n=64, batch_size=16)
    make_trainer(max_steps=40, limit_val_batches=0, callbacks=[Record()]).fit(module, loader, loader)
    assert sum(losses[-5:]) < 0.7 * sum(losses[:5])


def test_checkpoint_reloads_alone_without_network_weights_file_or_init_checkpoint(tmp_path, no_network):
    weights, _ = tiny_weights_file(tmp_path)
    first = tmp_path / "first.ckpt"
    fit(tiny("binary", in_chans=1, weights=str(weights))).save_checkpoint(first)
    module = tiny(
        "multilabel",
        in_chans=1,
        pretrained=True,
        weights=str(weights),
        init_from=str(first),
        head={"hidden": 16, "dropout": 0.2, "batchnorm": True},
        pos_weight=[3.0, 20.0, 5.0, 5.0, 5.0, 5.0],
        rsna_weights=True,
        optimizer=config_node("optimizer", "adam"),
    )
    trainer = fit(module)
    path = tmp_path / "multilabel.ckpt"
    trainer.save_checkpoint(path)
    weights.unlink()
    first.unlink()

    restored = ICHLitModule.load_from_checkpoint(path)

    image = torch.randn(4, 1, 32, 32)
    module.eval()
    restored.eval()
    assert torch.allclose(module(image), restored(image))
    assert torch.equal(restored.criterion.pos_weight, module.criterion.pos_weight)
    assert restored.hparams.task == "multilabel" and restored.hparams.head["hidden"] == 16
    assert module.hparams.weights == str(weights)  # the running module keeps its own record
    assert no_network == []


def test_init_from_keeps_backbone_and_builds_a_new_head_for_another_task(tmp_path):
    path = tmp_path / "binary.ckpt"
    source = tiny("binary")
    fit(source).save_checkpoint(path)

    other_task = tiny("subtype", init_from=str(path))
    same_task = tiny("binary", init_from=str(path))

    for name, value in source.backbone.state_dict().items():
        assert torch.equal(other_task.backbone.state_dict()[name], value), name
    assert other_task.head[-1].out_features == len(SUBTYPES)
    assert torch.equal(same_task.head[-1].weight, source.head[-1].weight)


def test_init_from_another_backbone_names_the_checkpoint(tmp_path):
    path = tmp_path / "binary.ckpt"
    fit(tiny("binary")).save_checkpoint(path)
    with pytest.raises(ValueError, match=rf"model\.init_from={path}.*resnet10t"):
        ICHLitModule(task="binary", backbone="resnet10t", init_from=str(path))


def trainable(module):
    return {name for name, p in module.named_parameters() if p.requires_grad}


def batchnorm_parameters(module):
    return {
        f"backbone.{name}.{param}"
        for name, layer in module.backbone.named_modules()
        if isinstance(layer, torch.nn.BatchNorm2d)
        for param, _ in layer.named_parameters()
    }


def test_freeze_backbone_trains_only_the_head_and_keeps_batchnorm_statistics():
    module = tiny("binary", freeze="backbone")
    head = {f"head.{name}" for name, _ in module.head.named_parameters()}
    assert trainable(module) == head
    before = {k: v.clone() for k, v in module.backbone.state_dict().items()}
    head_before = module.head[-1].weight.clone()
    fit(module)
    for name, value in module.backbone.state_dict().items():  # weights and running statistics alike
        assert torch.equal(value, before[name]), name
    assert not torch.equal(module.head[-1].weight, head_before)


def test_freeze_backbone_except_bn_trains_batchnorm_and_head():
    module = tiny("binary", freeze="backbone_except_bn")
    head = {f"head.{name}" for name, _ in module.head.named_parameters()}
    assert batchnorm_parameters(module)
    assert trainable(module) == head | batchnorm_parameters(module)
    assert trainable(tiny("binary", freeze="none")) == {name for name, _ in module.named_parameters()}


def test_unfreeze_at_epoch_trains_the_backbone_from_that_epoch():
    snapshots = []

    class Snapshot(pl.Callback):
        def on_train_epoch_end(self, trainer, module):
            snapshots.append(module.backbone.layer1[0].conv1.weight.detach().clone())

    module = tiny("binary", freeze="backbone", unfreeze_at_epoch=1)
    initial = module.backbone.layer1[0].conv1.weight.detach().clone()
    fit(module, max_steps=-1, max_epochs=2, callbacks=[Snapshot()])
    assert torch.equal(snapshots[0], initial)
    assert not torch.equal(snapshots[1], initial)
    assert trainable(module) == {name for name, _ in module.named_parameters()}


def test_config_mistakes_get_one_sentence_naming_the_option():
    with pytest.raises(ValueError, match=r"model\.freeze=everything"):
        tiny("binary", freeze="everything")
    with pytest.raises(ValueError, match=r"pos_weight has 1 values.*6 outputs"):
        tiny("multilabel", pos_weight=[2.0])
    with pytest.raises(ValueError, match="rsna_weights.*task=multilabel"):
        tiny("binary", rsna_weights=True)
    with pytest.raises(ValueError, match="class_weights.*task=subtype"):
        tiny("binary", class_weights=[1.0])


def test_loss_weights_are_buffers_that_follow_the_module():
    module = tiny("subtype", class_weights=[5.0, 1.0, 1.0, 2.0, 1.0]).to(torch.float64)
    assert module.criterion.weight.dtype == torch.float64
    assert "criterion.weight" in module.state_dict()


def test_rsna_weighted_loss_is_the_challenge_metric():
    module = tiny("multilabel", rsna_weights=True)
    logits = torch.randn(5, 6)
    target = torch.randint(0, 2, (5, 6)).float()
    metric = RSNALogLoss()
    metric.update(logits.sigmoid(), target)
    assert torch.isclose(module.criterion(logits, target), metric.compute(), atol=1e-5)


@pytest.mark.parametrize("operating_point, threshold", [("sensitivity", 0.25), ("youden", 0.75)])
def test_operating_point_is_chosen_on_calibrated_validation_probabilities(operating_point, threshold):
    """Logit 4 with 3 positives in 4 and logit -4 with 1 in 4: temperature 4 / ln 3 turns them into 0.75 and 0.25.
    Sensitivity 0.95 needs all four positives (threshold 0.25); Youden's J is 0.5 at 0.75 and 0 at 0.25."""
    module = tiny(operating_point=operating_point, target_sensitivity=0.95, calibrate=True)
    logits = torch.tensor([4.0] * 4 + [-4.0] * 4)[:, None]
    targets = torch.tensor([1.0, 1, 1, 0, 0, 0, 0, 1])[:, None]
    module.choose_operating_point(logits, targets)
    assert module.temperature.item() == pytest.approx(4 / math.log(3), rel=1e-5)
    assert module.probabilities(logits)[:2, 0].tolist() == pytest.approx([0.75, 0.75], abs=1e-6)
    assert module.op_thresholds.tolist() == pytest.approx([threshold], abs=1e-6)
    state = module.state_dict()  # buffers: they travel in every checkpoint
    assert state["op_thresholds"].tolist() == pytest.approx([threshold], abs=1e-6)
    assert state["temperature"].item() == pytest.approx(4 / math.log(3), rel=1e-5)


def test_an_unknown_operating_point_is_refused_before_training():
    with pytest.raises(ValueError, match="task.operating_point=best: choose one of sensitivity, youden"):
        tiny(operating_point="best")
    with pytest.raises(ValueError, match=r"task.target_sensitivity=95 is a fraction of positives"):
        tiny(target_sensitivity=95)


def test_rsna_logloss_matches_a_hand_computation():
    probs = torch.tensor([[0.9, 0.1, 0.2, 0.3, 0.4, 0.5], [0.2, 0.0, 0.1, 0.1, 0.7, 1.0]])
    target = torch.tensor([[1, 0, 0, 1, 0, 1], [0, 0, 0, 0, 1, 0]])
    log = math.log
    first = (-2 * log(0.9) - log(0.9) - log(0.8) - log(0.3) - log(0.6) - log(0.5)) / 7
    # a confident mistake (p=1, y=0) is clipped at 1e-15 as the challenge scorer did
    second = (-2 * log(0.8) - log(1.0) - log(0.9) - log(0.9) - log(0.7) - log(1e-15)) / 7
    metric = RSNALogLoss()
    metric.update(probs, target)
    assert metric.compute().item() == pytest.approx((first + second) / 2, rel=1e-5)


def test_auroc_of_an_absent_class_is_nan_and_left_out_of_the_average_silently():
    metrics = build_metrics("multilabel", prefix="val/")
    probs = torch.rand(8, 6)
    target = torch.randint(0, 2, (8, 6))
    target[:, 0] = torch.tensor([0, 1, 0, 1, 0, 1, 0, 1])
    target[:, 1] = 0  # no epidural in this small validation set
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        metrics.update(probs, target)
        values = metrics.compute()
    assert values["val/auroc_epidural"].isnan()
    per_class = torch.stack([values[f"val/auroc_{label}"] for label in LABELS])
    assert torch.isclose(values["val/auroc"], per_class.nanmean())


def test_accuracy_is_fraction_correct_for_subtype_and_mean_label_agreement_for_multilabel():
    probs = torch.tensor([[0.7, 0.1, 0.1, 0.05, 0.05], [0.1, 0.6, 0.1, 0.1, 0.1], [0.2, 0.2, 0.5, 0.05, 0.05]])
    subtype = build_metrics("subtype", prefix="test/")
    subtype.update(probs, torch.tensor([0, 1, 4]))
    assert subtype.compute()["test/acc"].item() == pytest.approx(2 / 3)

    multilabel = build_metrics("multilabel", threshold=0.3, prefix="test/")
    probs = torch.tensor([[0.2, 0.4, 0.1, 0.9, 0.0, 0.35], [0.8, 0.1, 0.1, 0.1, 0.5, 0.25]])
    target = torch.tensor([[0, 1, 0, 0, 0, 0], [1, 0, 0, 0, 0, 1]])
    multilabel.update(probs, target)  # at 0.3: row 1 gets 4 of 6 labels right, row 2 gets 4 of 6
    assert multilabel.compute()["test/acc"].item() == pytest.approx(8 / 12)


@pytest.mark.parametrize("task", TASKS)
def test_predict_returns_per_image_probabilities(task):
    module = tiny(task)
    loader = toy_loader(task)
    batches = make_trainer().predict(module, loader)
    probs = torch.cat([batch["probs"] for batch in batches])
    assert probs.shape == (16, module.task.num_outputs)
    assert ((probs >= 0) & (probs <= 1)).all()
    if task == "subtype":
        assert torch.allclose(probs.sum(dim=1), torch.ones(16))
    assert [i for batch in batches for i in batch["image_id"]] == [f"ID_{i:04d}" for i in range(16)]
    assert torch.equal(torch.cat([batch["target"] for batch in batches]), torch.cat([b["target"] for b in loader]))


@pytest.mark.parametrize(
    ("optimizer", "scheduler", "torch_class", "length"),
    [
        ("adam", "cosine", torch.optim.Adam, ("T_max", 2)),
        ("adamw", "onecycle", torch.optim.AdamW, ("total_steps", 8)),
        ("sgd", "none", torch.optim.SGD, None),
    ],
)
def test_optimizer_and_scheduler_configs_span_the_run(optimizer, scheduler, torch_class, length):
    scheduler_node = config_node("scheduler", scheduler) or None
    module = tiny("binary", optimizer=config_node("optimizer", optimizer), scheduler=scheduler_node)
    loader = toy_loader("binary", n=16, batch_size=4)
    trainer = make_trainer(max_steps=-1, max_epochs=2)  # four batches an epoch: 8 optimizer steps
    trainer.fit(module, loader, loader)
    assert type(trainer.optimizers[0]) is torch_class
    if length is None:
        assert trainer.lr_scheduler_configs == []
        return
    [config] = trainer.lr_scheduler_configs
    key, value = length
    assert getattr(config.scheduler, key) == value
    assert config.interval == scheduler_node["interval"]
    if scheduler == "onecycle":  # the peak defaults to the optimizer's lr
        assert trainer.optimizers[0].param_groups[0]["max_lr"] == module.hparams.optimizer["lr"]


def test_onecycle_trains_a_run_whose_warmup_is_exactly_one_step():
    """4 steps at pct_start 0.25: PyTorch's OneCycleLR alone divides by zero at the first step."""
    module = tiny("binary", scheduler=config_node("scheduler", "onecycle"))
    loader = toy_loader("binary", n=16, batch_size=4)
    trainer = make_trainer(max_steps=-1, max_epochs=1)
    trainer.fit(module, loader, loader)
    assert trainer.global_step == 4 and trainer.lr_scheduler_configs[0].scheduler.total_steps == 4


def test_channels_last_runs_and_compile_keeps_checkpoint_keys():
    module = tiny("binary", channels_last=True)
    assert module.backbone.conv1[0].weight.is_contiguous(memory_format=torch.channels_last)
    assert module(torch.randn(2, 3, 32, 32)).shape == (2, 1)
    compiled = tiny("binary", compile=True)  # compiles lazily at the first forward, which never comes here
    assert compiled.state_dict().keys() == tiny("binary").state_dict().keys()
    checkpoint = {"hyper_parameters": dict(compiled.hparams)}
    compiled.on_save_checkpoint(checkpoint)
    assert checkpoint["hyper_parameters"]["compile"] is False  # a CPU evaluation must not compile
    assert compiled.hparams.compile is True


IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)  # torchvision's published constants


def test_pretrained_backbones_see_their_pretraining_normalisation_and_scratch_ones_plain_0_1(tmp_path):
    """ImageNet weights expect ImageNet-normalised inputs; a model trained from scratch gets [0, 1] as is."""
    weights, _ = tiny_weights_file(tmp_path, name="resnet18")  # pretrained on ImageNet, with its statistics
    image = torch.randint(0, 256, (2, 3, 32, 32), dtype=torch.uint8)
    unit = image.float() / 255
    normalised = (unit - torch.tensor(IMAGENET_MEAN)[:, None, None]) / torch.tensor(IMAGENET_STD)[:, None, None]
    pretrained = ICHLitModule(backbone="resnet18", weights=str(weights)).eval()
    scratch = ICHLitModule(backbone="resnet18").eval()
    with torch.no_grad():
        torch.testing.assert_close(pretrained(image), pretrained.head(pretrained.backbone(normalised)))
        torch.testing.assert_close(scratch(image), scratch.head(scratch.backbone(unit)))
        # nine channels (3 windows x 3 slices): each window keeps its colour channel's statistics
        nine = ICHLitModule(backbone="resnet18", weights=str(weights), in_chans=9).eval()
        stacked = torch.randint(0, 256, (1, 9, 32, 32), dtype=torch.uint8)
        mean, std = torch.tensor(IMAGENET_MEAN * 3)[:, None, None], torch.tensor(IMAGENET_STD * 3)[:, None, None]
        torch.testing.assert_close(nine(stacked), nine.head(nine.backbone((stacked.float() / 255 - mean) / std)))


def test_logits_stay_float32_under_bf16_autocast():
    """bf16 logits tie for nearby slices and blur AUROC; the head is computed in float32."""
    module = tiny().eval()
    images = torch.rand(64, 3, 32, 32)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        logits = module(images)
        features = module.backbone(images)
    assert logits.dtype == torch.float32
    assert logits.unique().numel() == 64, "no two slices share a score (bf16 logits tie)"
    torch.testing.assert_close(logits, module.head(features.float()))
