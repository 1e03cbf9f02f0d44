"""``model.compile``: a compiled fit with unfreezing trains exactly as the eager one (no stale graph after a phase
change, BatchNorm modes followed), its checkpoints have plain keys, and ``_orig_mod.`` keys written elsewhere load."""

from __future__ import annotations

import warnings

import pytest
import torch
from lightning import Callback, Trainer

from callbacks.unfreezing import FreezeUnfreeze, GradualUnfreezing
from modules import compiling
from modules.compiling import compile_options, is_compiled, strip_compile_prefix
from modules.handoff import load_backbone
from modules.image_classifier import ImageClassifier
from tests.conftest import Blobs

# Dynamo + AOTAutograd (where the stale-graph bug of pytorch #139476 lives) without inductor's code generation:
# seconds instead of minutes on 2 cores, and the same aten operations as eager, so weights agree to rounding.
FAST = {"backend": "aot_eager"}


class Snapshots(Callback):
    """State dicts at the start of each epoch and at the end."""

    def __init__(self):
        self.states = []

    def on_train_epoch_start(self, trainer, pl_module):
        self.states.append({k: v.detach().clone() for k, v in pl_module.state_dict().items()})

    def on_train_end(self, trainer, pl_module):
        self.states.append({k: v.detach().clone() for k, v in pl_module.state_dict().items()})


def _model(compile=False, **kwargs) -> ImageClassifier:
    torch.manual_seed(0)
    return ImageClassifier(
        "resnet_tiny", num_classes=3, pretrained=False, dropout=0.0, lr=1e-2, compile=compile, **kwargs
    )


def _fit(tmp_path, strategy, compile, max_epochs: int, model_kwargs: dict | None = None):
    model, snapshots = _model(compile, **(model_kwargs or {})), Snapshots()
    trainer = Trainer(
        default_root_dir=tmp_path,
        max_epochs=max_epochs,
        limit_train_batches=2,
        limit_val_batches=1,
        num_sanity_val_steps=0,
        accelerator="cpu",
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        enable_checkpointing=False,
        callbacks=[strategy, snapshots],
    )
    trainer.fit(model, Blobs(n=8))
    return model, snapshots, trainer


def _assert_same(eager: dict, compiled: dict, rtol: float = 0.0) -> None:
    assert list(eager) == list(compiled)  # also: no `_orig_mod.` key
    for key, value in eager.items():
        torch.testing.assert_close(compiled[key], value, rtol=rtol, atol=1e-5, msg=key)


def _changed(before: dict, after: dict, prefix: str) -> bool:
    keys = [k for k in before if k.startswith(prefix) and "running" not in k and "num_batches" not in k]
    assert keys, prefix
    return any(not torch.equal(before[k], after[k]) for k in keys)


def test_compile_option_is_checked() -> None:
    assert compile_options(False) is None and compile_options(True) == {}
    assert compile_options({"mode": "max-autotune-no-cudagraphs"}) == {"mode": "max-autotune-no-cudagraphs"}
    with pytest.raises(ValueError, match=r"unknown torch.compile arguments \['modes'\]"):
        _model(compile={"modes": "default"})


def test_gradual_unfreezing_compiled_trains_like_eager_through_each_phase_change(tmp_path, monkeypatch) -> None:
    resets = []
    reset = torch.compiler.reset
    monkeypatch.setattr(compiling.torch.compiler, "reset", lambda: (resets.append(1), reset()))
    # bn_policy freeze_stats: BatchNorm layers of frozen groups switch to eval mode every batch, trained ones not.
    strategy = GradualUnfreezing(start_epoch=1, bn_policy="freeze_stats")
    eager, eager_snap, _ = _fit(tmp_path / "eager", strategy, False, max_epochs=3)
    assert resets == []  # an eager model never resets Dynamo
    strategy = GradualUnfreezing(start_epoch=1, bn_policy="freeze_stats")
    torch._dynamo.utils.counters.clear()
    compiled, snap, _ = _fit(tmp_path / "compiled", strategy, FAST, max_epochs=3)
    assert is_compiled(compiled.backbone) and torch._dynamo.utils.counters["stats"]["unique_graphs"] > 0
    # One recompilation per change of the trainable set: epoch 0 (all frozen), 1 (layer4), 2 (layer3 too).
    assert len(resets) == 3
    for eager_state, state in zip(eager_snap.states, snap.states, strict=True):
        _assert_same(eager_state, state)
    start, after0, after1, end = snap.states
    # The group that unfreezes mid-run trains after its phase change, in the compiled run too.
    assert not _changed(start, after0, "backbone.layer4.") and _changed(after0, after1, "backbone.layer4.")
    assert not _changed(after0, after1, "backbone.layer3.") and _changed(after1, end, "backbone.layer3.")
    # BatchNorm statistics: frozen in frozen groups (eval mode), updated in trained ones.
    assert torch.equal(start["backbone.layer2.0.bn1.running_mean"], end["backbone.layer2.0.bn1.running_mean"])
    assert not torch.equal(after0["backbone.layer4.0.bn1.running_mean"], end["backbone.layer4.0.bn1.running_mean"])


def test_compiled_checkpoint_has_plain_keys_and_loads_strictly_into_an_eager_model(tmp_path) -> None:
    compiled, _, trainer = _fit(tmp_path, FreezeUnfreeze(unfreeze_epoch=1), FAST, max_epochs=2)
    path = tmp_path / "compiled.ckpt"
    trainer.save_checkpoint(path)
    state = torch.load(path, map_location="cpu", weights_only=True)["state_dict"]
    assert not any("_orig_mod" in key for key in state)
    loaded = ImageClassifier.load_from_checkpoint(path, map_location="cpu", weights_only=True, strict=True)
    assert not is_compiled(loaded.backbone)  # rebuilt for eval or export: eager until a Trainer starts
    _assert_same(compiled.state_dict(), loaded.state_dict())
    # The export path: the compiled model itself runs eagerly again, with the same outputs.
    images = torch.rand(2, 3, 32, 32)
    exported = compiled.for_export().eval()
    assert not is_compiled(exported.backbone)
    torch.testing.assert_close(exported(images), loaded.eval()(images), rtol=0, atol=1e-5)


def test_orig_mod_keys_of_a_torch_compile_wrapper_load(tmp_path) -> None:
    source = _model()
    expected = {k: v.clone() for k, v in source.state_dict().items()}
    # Other templates wrap: the whole model (leading `_orig_mod.`) or its backbone (embedded `_orig_mod.`).
    whole = torch.compile(source).state_dict()
    assert all(key.startswith("_orig_mod.") for key in whole)
    source.backbone = torch.compile(source.backbone)
    embedded = source.state_dict()
    assert any(key.startswith("backbone._orig_mod.") for key in embedded)
    hparams = dict(_model().hparams)
    for state in (whole, embedded):
        assert strip_compile_prefix(state).keys() == expected.keys()
        path = tmp_path / "wrapped.ckpt"
        torch.save({"state_dict": state, "hyper_parameters": hparams, "pytorch-lightning_version": "2.6.6"}, path)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            loaded = ImageClassifier.load_from_checkpoint(path, map_location="cpu", weights_only=True, strict=True)
        assert not [w for w in caught if "_orig_mod" in str(w.message)]
        _assert_same(expected, loaded.state_dict())
        # The hand-off loader (model.backbone_checkpoint) reads the same checkpoint's backbone.
        target = _model()
        torch.nn.init.zeros_(target.backbone.conv1.weight)
        load_backbone(target, path)
        torch.testing.assert_close(target.backbone.conv1.weight, expected["backbone.conv1.weight"])
    plain = {"a.weight": torch.zeros(1)}
    assert strip_compile_prefix(plain) is plain


@pytest.mark.slow
def test_inductor_compiled_freeze_unfreeze_trains_like_eager(tmp_path) -> None:
    # The default backend (inductor: C++ generated and built with the machine's compiler): about a minute on 2 cores.
    # SGD: inductor's kernels round differently from eager's, and AdamW's first steps (about lr * sign(gradient))
    # would turn a rounding difference in a near-zero gradient into a full step; SGD keeps it a rounding difference.
    sgd = {"optimizer": torch.optim.SGD}
    eager, eager_snap, _ = _fit(tmp_path / "eager", FreezeUnfreeze(unfreeze_epoch=1), False, 2, sgd)
    compiled, snap, _ = _fit(tmp_path / "compiled", FreezeUnfreeze(unfreeze_epoch=1), True, 2, sgd)
    for eager_state, state in zip(eager_snap.states, snap.states, strict=True):
        _assert_same(eager_state, state, rtol=1e-4)
    assert _changed(snap.states[1], snap.states[2], "backbone.layer1.")  # unfrozen at epoch 1: it trains


def test_plan_says_the_backbone_is_compiled_per_phase() -> None:
    from rich.console import Console

    from scripts.plan import plan
    from tests.conftest import REPO

    console = Console(record=True, width=200)
    args = ["--config", str(REPO / "configs" / "digits.yaml"), "--model.init_args.compile={mode: default}"]
    args += ["--model.init_args.backbone=resnet_tiny", "--model.init_args.pretrained=false"]
    plan([*args, "--data.init_args.image_size=16"], console=console)
    text = console.export_text()
    assert "torch.compile on the backbone (mode=default), in place" in text
    assert "compiled for each of the 2 phase(s)" in text
