"""FSDP2 (``configs/presets/fsdp.yaml``: Lightning's ModelParallelStrategy, ``modules/sharding.py``) on CPU with gloo,
2 processes: the engine's gradual unfreezing and named LR groups work on sharded parameters, frozen groups stay
bit-identical, activation checkpointing gives the same weights, and the checkpoint loads into a single-device model."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from modules.image_classifier import ImageClassifier
from modules.sharding import shard_units
from tests.conftest import REPO

FIT = """
import sys
from pathlib import Path

import torch
from lightning import Callback, Trainer
from lightning.pytorch.callbacks import ModelCheckpoint

from callbacks.unfreezing import GradualUnfreezing
from modules.image_classifier import ImageClassifier
from modules.sharding import FSDP2Strategy, is_sharded
from tests.conftest import Blobs


class RecordGroups(Callback):
    # rank 0 writes the optimizer's group names and LRs at the end, and whether the model was sharded; every rank
    # writes which groups' local shards changed in each epoch
    @staticmethod
    def full(tensor):  # the whole parameter, gathered from its shards (a collective: every rank calls it)
        tensor = tensor.detach()
        return tensor.full_tensor() if hasattr(tensor, "full_tensor") else tensor.clone()

    def on_train_epoch_start(self, trainer, pl_module):
        self.before = {k: self.full(v) for k, v in pl_module.named_parameters()}

    def on_train_epoch_end(self, trainer, pl_module):
        changed = sorted(
            name for name, group in pl_module.named_parameters()
            if not torch.equal(self.full(group), self.before[name])
        )
        with open(folder / f"changed-{trainer.current_epoch}-{trainer.global_rank}.txt", "w") as f:
            f.write("\\n".join(changed))

    def on_train_end(self, trainer, pl_module):
        if trainer.is_global_zero:
            groups = [(g.get("name"), g["lr"]) for g in trainer.optimizers[0].param_groups]
            torch.save({"groups": groups, "sharded": is_sharded(pl_module)}, folder / "groups.pt")


folder, checkpointing = Path(sys.argv[1]), sys.argv[2] == "1"
torch.manual_seed(0)
model = ImageClassifier(
    "vit_tiny", num_classes=3, pretrained=False, dropout=0.0, lr=1e-2, activation_checkpointing=checkpointing
)
strategy = FSDP2Strategy()
trainer = Trainer(
    default_root_dir=folder,
    max_epochs=2,
    limit_train_batches=2,
    limit_val_batches=1,
    accelerator="cpu",
    devices=2,
    strategy=strategy,
    logger=False,
    enable_progress_bar=False,
    enable_model_summary=False,
    num_sanity_val_steps=0,
    callbacks=[GradualUnfreezing(1), ModelCheckpoint(dirpath=folder / "ckpt", save_last=True), RecordGroups()],
)
trainer.fit(model, Blobs(n=32))
"""


def _fit(folder: Path, activation_checkpointing: bool = False) -> Path:
    """Fit in a script of its own: Lightning starts the second process by running the script again."""
    folder.mkdir(parents=True)
    script = folder / "fit.py"
    script.write_text(FIT)
    env = {k: v for k, v in os.environ.items() if k not in ("MASTER_PORT", "MASTER_ADDR", "FT_RUN_DIR")}
    env["PYTHONPATH"] = str(REPO)
    done = subprocess.run(
        [sys.executable, str(script), str(folder), "1" if activation_checkpointing else "0"],
        cwd=folder,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    return folder / "ckpt" / "last.ckpt"


@pytest.mark.slow
def test_fsdp_trains_with_unfreezing_and_its_checkpoint_loads_on_one_device(tmp_path: Path) -> None:
    torch.manual_seed(0)
    initial = ImageClassifier("vit_tiny", num_classes=3, pretrained=False, dropout=0.0, lr=1e-2).state_dict()
    last = _fit(tmp_path / "plain")
    record = torch.load(tmp_path / "plain" / "groups.pt")
    assert record["sharded"]
    names = [name for name, _ in record["groups"]]
    assert "head" in names and any(n and n != "head" for n in names), names  # the engine's named groups

    # One full state dict with the plain model's keys: loads strictly into a model on one device.
    single = ImageClassifier.load_from_checkpoint(last, map_location="cpu")
    state = single.state_dict()
    assert set(state) == set(initial)
    # GradualUnfreezing(1) over 2 epochs: the deepest group trained in epoch 1, the shallowest never did
    groups = single.layer_groups
    first, deepest = next(iter(groups.values())), list(groups.values())[-1]
    frozen = [k for k in state if any(k.startswith("backbone." + p) for p in first)]
    trained = [k for k in state if any(k.startswith("backbone." + p) for p in deepest)]
    assert frozen and all(torch.equal(state[k], initial[k]) for k in frozen)
    assert any(not torch.equal(state[k], initial[k]) for k in trained)
    head = [k for k in state if k.startswith("head.")]
    assert head and all(not torch.equal(state[k], initial[k]) for k in head if k.endswith("weight"))

    # Under FSDP the freezing strategy's phases hold: epoch 0 trains the head alone, epoch 1 the deepest group too.
    for rank in (0, 1):
        epoch0 = (tmp_path / "plain" / f"changed-0-{rank}.txt").read_text().split()
        epoch1 = (tmp_path / "plain" / f"changed-1-{rank}.txt").read_text().split()
        assert epoch0 and all(name.startswith("head.") for name in epoch0), epoch0
        assert any(any(name.startswith("backbone." + p) for p in deepest) for name in epoch1), epoch1
        assert not any(any(name.startswith("backbone." + p) for p in first) for name in epoch1), epoch1

    # Activation checkpointing recomputes; it does not change the result.
    rerun = torch.load(_fit(tmp_path / "ac", activation_checkpointing=True), map_location="cpu", weights_only=False)
    for key, value in torch.load(last, map_location="cpu", weights_only=False)["state_dict"].items():
        torch.testing.assert_close(rerun["state_dict"][key], value, rtol=0, atol=1e-5, msg=key)


def test_shard_units_are_the_layer_groups() -> None:
    model = ImageClassifier("vit_tiny", num_classes=3, pretrained=False)
    units = shard_units(model.backbone, model.layer_groups)
    encoder, backbone = model.backbone.encoder, model.backbone
    # the groups' modules, shallow to deep; class_token and pos_embedding are parameters, left to the root unit
    assert units == [backbone.conv_proj, encoder.layers.encoder_layer_0, encoder.layers.encoder_layer_1, encoder.ln]


def test_fsdp_preset_selects_fsdp2_with_a_full_checkpoint() -> None:
    preset = yaml.safe_load((REPO / "configs" / "presets" / "fsdp.yaml").read_text())
    strategy = preset["trainer"]["strategy"]
    assert strategy["class_path"] == "modules.sharding.FSDP2Strategy"
    assert strategy["init_args"]["save_distributed_checkpoint"] is False
