"""Freezing strategies: frozen weights stay bit-identical, BatchNorm follows its policy, resume and DDP are exact."""

from __future__ import annotations

import pytest
import torch
from lightning import Callback, Trainer
from lightning.pytorch.callbacks import ModelCheckpoint

from callbacks.lr_schedule import LRSchedule
from callbacks.unfreezing import Freeze, FreezeUnfreeze, GradualUnfreezing, NoFreeze, UnfreezeMilestones
from modules.image_classifier import ImageClassifier
from tests.conftest import Blobs

GROUPS = ["stem", "layer1", "layer2", "layer3", "layer4"]  # resnet_tiny, shallow to deep


class Snapshots(Callback):
    """Copies of every parameter, BN statistic, trainable set and group LR at the start of each epoch and the end."""

    def __init__(self):
        self.states, self.trainable, self.lrs = [], [], []

    def on_train_epoch_start(self, trainer, pl_module):
        self.states.append({k: v.detach().clone() for k, v in pl_module.state_dict().items()})

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self.trainable.append({n for n, p in pl_module.named_parameters() if p.requires_grad})
        self.lrs.append({g["name"]: g["lr"] for g in trainer.optimizers[0].param_groups})

    def on_train_end(self, trainer, pl_module):
        self.states.append({k: v.detach().clone() for k, v in pl_module.state_dict().items()})


def _fit(tmp_path, strategy, max_epochs=3, ckpt_path=None, extra=(), **model_kwargs):
    torch.manual_seed(0)
    model = ImageClassifier("resnet_tiny", num_classes=3, pretrained=False, dropout=0.0, lr=1e-2, **model_kwargs)
    snapshots = Snapshots()
    trainer = Trainer(
        default_root_dir=tmp_path,
        max_epochs=max_epochs,
        limit_train_batches=3,
        limit_val_batches=1,
        accelerator="cpu",
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        deterministic=True,
        callbacks=[strategy, *extra, snapshots],
        enable_checkpointing=any(isinstance(c, ModelCheckpoint) for c in extra),
    )
    trainer.fit(model, Blobs(), ckpt_path=ckpt_path)
    return model, snapshots


def _changed(before: dict, after: dict, prefix: str) -> bool:
    keys = [k for k in before if k.startswith(prefix) and "running" not in k and "num_batches" not in k]
    assert keys, prefix
    return any(not torch.equal(before[k], after[k]) for k in keys)


def test_gradual_unfreezing_keeps_frozen_weights_bit_identical(tmp_path) -> None:
    _, snap = _fit(tmp_path, GradualUnfreezing(start_epoch=1), max_epochs=3)
    start, after0, after1, end = snap.states[0], snap.states[1], snap.states[2], snap.states[3]
    # Epoch 0: only the head trains.
    assert _changed(start, after0, "head.")
    assert not any(_changed(start, after0, f"backbone.{g}") for g in ("conv1", "layer1", "layer4"))
    # Epoch 1: layer4 joins; layer3 and below stay bit-identical.
    assert _changed(after0, after1, "backbone.layer4.")
    assert not _changed(after0, after1, "backbone.layer3.")
    # Epoch 2: layer3 joins; layer2 is still untouched since the start.
    assert _changed(after1, end, "backbone.layer3.")
    assert not _changed(start, end, "backbone.layer2.") and not _changed(start, end, "backbone.conv1.")
    assert not any(n.startswith("backbone.") for n in snap.trainable[0])
    assert {n.split(".")[1] for n in snap.trainable[3] if n.startswith("backbone.")} == {"layer4"}


class GradientNames(Callback):
    def __init__(self):
        self.names = []

    def on_before_optimizer_step(self, trainer, pl_module, optimizer):
        self.names.append({n for n, p in pl_module.named_parameters() if p.grad is not None})


def test_frozen_layers_get_no_gradient(tmp_path) -> None:
    grads = GradientNames()
    model, _ = _fit(tmp_path, Freeze(), max_epochs=1, extra=[grads])
    assert len(grads.names) == 3
    assert all(names == {"head.1.weight", "head.1.bias"} for names in grads.names)
    assert not any(p.requires_grad for p in model.backbone.parameters())


@pytest.mark.parametrize(
    ("policy", "frozen_stats_move", "trained_stats_move"),
    [
        ("train", True, True),
        ("freeze_stats", False, True),
        ("freeze_all", False, False),
    ],
)
def test_batchnorm_policy(tmp_path, policy: str, frozen_stats_move: bool, trained_stats_move: bool) -> None:
    _, snap = _fit(tmp_path, UnfreezeMilestones({"layer4": 0}, bn_policy=policy), max_epochs=1)
    start, end = snap.states[0], snap.states[-1]
    frozen = "backbone.layer1.0.bn1.running_mean"
    trained = "backbone.layer4.0.bn1.running_mean"
    assert (not torch.equal(start[frozen], end[frozen])) is frozen_stats_move
    assert (not torch.equal(start[trained], end[trained])) is trained_stats_move
    affine_moved = not torch.equal(start["backbone.layer4.0.bn1.weight"], end["backbone.layer4.0.bn1.weight"])
    assert affine_moved is (policy != "freeze_all")
    assert torch.equal(start["backbone.layer1.0.conv1.weight"], end["backbone.layer1.0.conv1.weight"])


def test_phases_of_each_strategy() -> None:
    assert NoFreeze().phases(GROUPS, 3) == [(0, set(GROUPS))]
    assert Freeze().phases(GROUPS, 3) == [(0, set())]
    assert FreezeUnfreeze(2).phases(GROUPS, 4) == [(0, set()), (2, set(GROUPS))]
    assert GradualUnfreezing(1, 2).phases(GROUPS, 4) == [
        (0, set()),
        (1, {"layer3", "layer4"}),
        (2, {"layer1", "layer2", "layer3", "layer4"}),
        (3, set(GROUPS)),
    ]
    milestones = UnfreezeMilestones({"backbone.layer4": 1, "layer3": 3})
    assert milestones.phases(GROUPS, 5) == [(0, set()), (1, {"layer4"}), (3, {"layer3", "layer4"})]


def test_unknown_milestone_group_is_an_error_before_training(tmp_path) -> None:
    with pytest.raises(ValueError, match=r"unknown layer groups \['layer5'\]; this backbone has \['stem'"):
        _fit(tmp_path, UnfreezeMilestones({"layer5": 1}))


def test_milestones_out_of_order_are_an_error(tmp_path) -> None:
    with pytest.raises(ValueError, match="out of order: 'layer3' .*before the deeper 'layer4'"):
        _fit(tmp_path, UnfreezeMilestones({"layer3": 1, "layer4": 2}))


def test_bad_strategy_arguments() -> None:
    with pytest.raises(ValueError, match="bn_policy is 'frozen'"):
        NoFreeze(bn_policy="frozen")
    with pytest.raises(ValueError, match="epochs must be >= 0"):
        UnfreezeMilestones({"layer4": -1})
    with pytest.raises(ValueError, match="groups_per_epoch >= 1"):
        GradualUnfreezing(groups_per_epoch=0)


def test_resume_after_unfreeze_matches_an_uninterrupted_run(tmp_path) -> None:
    every_epoch = ModelCheckpoint(dirpath=tmp_path / "ckpt", save_top_k=-1, every_n_epochs=1, filename="{epoch}")
    schedule = dict(extra=[LRSchedule("cosine", warmup=2)])
    full_model, full = _fit(
        tmp_path / "a", GradualUnfreezing(1), max_epochs=4, **{"extra": [every_epoch, *schedule["extra"]]}
    )
    resumed_model, resumed = _fit(
        tmp_path / "b",
        GradualUnfreezing(1),
        max_epochs=4,
        ckpt_path=str(tmp_path / "ckpt" / "epoch=1.ckpt"),
        **schedule,
    )
    steps_done = 2 * 3  # two epochs of three batches before the checkpoint
    assert resumed.trainable == full.trainable[steps_done:]
    assert resumed.lrs == full.lrs[steps_done:]
    for key, value in full_model.state_dict().items():
        torch.testing.assert_close(resumed_model.state_dict()[key], value, rtol=0, atol=1e-6, msg=key)


class SaveRankState(Callback):
    def __init__(self, folder):
        self.folder = folder

    def on_fit_start(self, trainer, pl_module):
        self.start = {k: v.detach().clone() for k, v in pl_module.state_dict().items()}

    def on_train_end(self, trainer, pl_module):
        state = {k: v.detach().clone() for k, v in pl_module.state_dict().items()}
        torch.save({"start": self.start, "end": state}, self.folder / f"rank{trainer.global_rank}.pt")


def test_ddp_two_processes_gradual_unfreezing_ends_identical(tmp_path) -> None:
    from lightning.pytorch.strategies import DDPStrategy

    torch.manual_seed(0)
    model = ImageClassifier("resnet_tiny", num_classes=3, pretrained=False, dropout=0.0, lr=1e-2)
    ddp = DDPStrategy(start_method="spawn", find_unused_parameters=True, process_group_backend="gloo")
    trainer = Trainer(
        default_root_dir=tmp_path,
        max_epochs=3,
        limit_train_batches=2,
        limit_val_batches=1,
        accelerator="cpu",
        devices=2,
        strategy=ddp,
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        enable_checkpointing=False,
        num_sanity_val_steps=0,
        callbacks=[GradualUnfreezing(1), SaveRankState(tmp_path)],
    )
    trainer.fit(model, Blobs(n=32))
    rank0, rank1 = (torch.load(tmp_path / f"rank{r}.pt") for r in (0, 1))
    for key in rank0["end"]:
        assert torch.equal(rank0["end"][key], rank1["end"][key]), key
    assert _changed(rank0["start"], rank0["end"], "backbone.layer4.")
    assert _changed(rank0["start"], rank0["end"], "backbone.layer3.")
    assert not _changed(rank0["start"], rank0["end"], "backbone.layer2.")


def test_ddp_without_find_unused_parameters_is_refused(tmp_path) -> None:
    from lightning.pytorch.strategies import DDPStrategy

    model = ImageClassifier("resnet_tiny", num_classes=3, pretrained=False)
    trainer = Trainer(
        default_root_dir=tmp_path,
        max_epochs=2,
        accelerator="cpu",
        devices=1,
        strategy=DDPStrategy(process_group_backend="gloo"),
        logger=False,
        enable_progress_bar=False,
        callbacks=[FreezeUnfreeze(1)],
    )
    with pytest.raises(ValueError, match="find_unused_parameters=True"):
        trainer.fit(model, Blobs())


def test_two_freezing_strategies_are_an_error(tmp_path) -> None:
    with pytest.raises(ValueError, match=r"one freezing strategy per run, found 2 .*\['Freeze', 'GradualUnfreezing'\]"):
        _fit(tmp_path, Freeze(), extra=[GradualUnfreezing()])
