"""Past one machine: the layout check (torchrun, SLURM), a 2-node run on localhost through torchrun that ends with
the same weights on every rank and the metrics of one process on the same global batch, the SLURM script run under
a fake SLURM (and requeued), the global batch size, and the training order split across ranks."""

from __future__ import annotations

import csv
import os
import signal
import socket
import stat
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
import yaml
from lightning import Callback, LightningDataModule, Trainer
from torch.utils.data import TensorDataset

from callbacks.requeue import Requeue, slurm_job_to_requeue
from callbacks.scaling import GlobalBatchSize, accumulation_for
from datamodules.loaders import EpochSampler, batches_done, current_epoch, make_loader
from modules.image_classifier import ImageClassifier
from scripts.cluster import launcher, layout_error, slurm_tasks_per_node
from tests.conftest import REPO, Blobs

SRUN = {"SLURM_JOB_ID": "4242", "SLURM_STEP_ID": "0", "SLURM_JOB_NAME": "exp"}


# --- the layout check -------------------------------------------------------------------------------------------


def test_torchrun_layout_must_match_devices_and_nodes() -> None:
    env = {"TORCHELASTIC_RUN_ID": "x", "WORLD_SIZE": "8", "LOCAL_WORLD_SIZE": "4"}
    assert launcher(env) == "torchrun"
    assert layout_error(4, 2, env) is None
    assert "--nproc-per-node" in layout_error(2, 4, env)
    message = layout_error(4, 1, env)
    assert "world size is 8 (2 nodes x 4)" in message and "--trainer.num_nodes=2" in message


def test_slurm_layout_is_checked_against_the_task_layout() -> None:
    good = SRUN | {"SLURM_NNODES": "2", "SLURM_NTASKS": "8", "SLURM_TASKS_PER_NODE": "4(x2)"}
    assert slurm_tasks_per_node(good) == [4, 4]
    assert layout_error(4, 2, good) is None
    # --ntasks-per-node 1 with devices 4: three GPUs per node would sit idle (or the ranks would wait forever)
    message = layout_error(4, 2, good | {"SLURM_NTASKS": "2", "SLURM_TASKS_PER_NODE": "1(x2)"})
    assert "1 tasks per node" in message and "--ntasks-per-node=4" in message
    assert "--nodes" in layout_error(4, 1, good)
    # --ntasks 6 over 2 nodes: SLURM may place 4 + 2
    assert "unevenly" in layout_error(3, 2, good | {"SLURM_NTASKS": "6", "SLURM_TASKS_PER_NODE": "4,2"})
    assert "4 GPUs" in layout_error(8, 2, good | {"SLURM_TASKS_PER_NODE": "8(x2)", "SLURM_GPUS_ON_NODE": "4"})


def test_slurm_job_not_started_by_srun_and_nodes_without_launcher_are_refused() -> None:
    batch = {"SLURM_JOB_ID": "7", "SLURM_JOB_NAME": "exp", "SLURM_NNODES": "2", "SLURM_NTASKS": "8"}
    assert launcher(batch) == "slurm-batch"
    assert "not started by srun" in layout_error(4, 2, batch)
    assert launcher(batch | {"SLURM_STEP_ID": "4294967294"}) == "slurm-batch"  # the batch step's own id
    assert layout_error(1, 1, batch | {"SLURM_NTASKS": "1", "SLURM_NNODES": "1"}) is None
    assert launcher(batch | {"SLURM_JOB_NAME": "interactive"}) == "none"  # Lightning's rule for salloc shells
    assert "no launcher" in layout_error(1, 2, {})
    assert layout_error(1, 2, {"NODE_RANK": "1", "MASTER_ADDR": "node0"}) is None
    assert layout_error(1, 1, {}) is None


def test_a_mismatched_slurm_environment_stops_the_cli_with_one_line(tmp_path: Path) -> None:
    env = _env(tmp_path) | SRUN | {"SLURM_NNODES": "1", "SLURM_NTASKS": "2", "SLURM_TASKS_PER_NODE": "2"}
    env |= {"SLURM_NTASKS_PER_NODE": "2", "SLURM_PROCID": "0", "SLURM_LOCALID": "0", "SLURM_NODEID": "0"}
    command = [sys.executable, str(REPO / "scripts" / "train.py"), "fit", "--config", str(_experiment(tmp_path))]
    done = subprocess.run(command, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 1
    errors = [line for line in done.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "ntasks-per-node" in errors[0] and "devices=" in errors[0], done.stderr[-2000:]


# --- the training order under DDP -------------------------------------------------------------------------------


def test_epoch_sampler_splits_one_order_across_ranks(monkeypatch) -> None:
    single = list(EpochSampler(10, seed=3, epoch=1))
    shares = []
    for rank in range(3):
        monkeypatch.setattr(EpochSampler, "_rank_world", staticmethod(lambda rank=rank: (rank, 3)))
        sampler = EpochSampler(10, seed=3, epoch=1)
        shares.append(list(sampler))
        assert len(sampler) == 4 == len(shares[-1])  # padded: every rank the same number of batches
    assert sorted(sum(shares, [])) == sorted(single + single[:2])
    for step in range(4):  # the ranks' k-th samples together are one process's k-th group of 3
        assert {share[step] for share in shares} == set((single + single[:2])[3 * step : 3 * step + 3])


# --- global batch size ------------------------------------------------------------------------------------------


def test_global_batch_size_accumulates_to_the_same_global_batch(tmp_path: Path) -> None:
    assert accumulation_for(256, 32, 4, 1) == 2
    assert accumulation_for(256, 32, 8, 1) == 1
    with pytest.raises(ValueError, match="not a multiple of data.batch_size=48"):
        accumulation_for(256, 48, 2, 1)
    model = ImageClassifier("resnet_tiny", num_classes=3, pretrained=False)
    trainer = _trainer(tmp_path, [GlobalBatchSize(8)])
    trainer.fit(model, Blobs(n=24, batch_size=4))
    assert trainer.accumulate_grad_batches == 2
    assert trainer.global_step == 3  # 6 batches of 4, two per optimizer step


# --- requeue --------------------------------------------------------------------------------------------------


class SignalAt(Callback):
    """Sends this process SIGUSR1 (what SLURM sends before the time limit) at one step, once per ``marker`` file."""

    def __init__(self, step: int, marker: str):
        self.step, self.marker = step, Path(marker)

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if trainer.global_step == self.step and trainer.is_global_zero and not self.marker.exists():
            self.marker.write_text("signalled\n")
            os.kill(os.getpid(), signal.SIGUSR1)


def test_requeue_saves_last_checkpoint_requeues_and_stops(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setenv("SLURM_JOB_ID", "99")
    assert (
        slurm_job_to_requeue({"SLURM_JOB_ID": "99", "SLURM_ARRAY_JOB_ID": "98", "SLURM_ARRAY_TASK_ID": "3"}) == "98_3"
    )
    record = tmp_path / "requeued.txt"
    (tmp_path / "scontrol.py").write_text(f"import sys\nopen({str(record)!r}, 'w').write(' '.join(sys.argv[1:]))\n")
    requeue = Requeue(command=f"{sys.executable} {tmp_path / 'scontrol.py'} requeue {{job}}")
    model = ImageClassifier("resnet_tiny", num_classes=3, pretrained=False)
    trainer = _trainer(tmp_path, [requeue, SignalAt(2, str(tmp_path / "marker"))], max_epochs=3, checkpoint=True)
    trainer.fit(model, Blobs(n=24, batch_size=4))
    assert requeue.requeued and record.read_text() == "requeue 99"
    assert trainer.global_step == 3  # stopped after the step that saw the signal, not at the end
    saved = torch.load(tmp_path / "ckpt" / "last.ckpt", map_location="cpu", weights_only=False)
    assert saved["global_step"] == 3
    assert signal.getsignal(signal.SIGUSR1) is not requeue._handler  # the previous handler is back


class Numbered(LightningDataModule):
    """24 images whose label is their index (so the batches show which samples trained), in the template's epoch
    order, resumable mid-epoch like every data module here."""

    num_classes = 24

    def __init__(self):
        super().__init__()
        self.data = TensorDataset(
            torch.rand(24, 3, 16, 16, generator=torch.Generator().manual_seed(0)), torch.arange(24)
        )

    def train_dataloader(self):
        epoch, skip = current_epoch(self.trainer), batches_done(self.trainer)
        return make_loader(self.data, 4, 0, shuffle=True, epoch=epoch, skip_batches=skip)

    def val_dataloader(self):
        return make_loader(self.data, 4, 0)


class RecordBatches(Callback):
    def __init__(self):
        self.seen: list[tuple[int, list[int]]] = []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        self.seen.append((trainer.current_epoch, batch[1].tolist()))


def test_a_run_requeued_mid_epoch_resumes_where_it_stopped(tmp_path: Path, monkeypatch) -> None:
    """The resumed epoch serves the batches not yet trained, in the same order: the data of the interrupted run and
    its continuation together are the uninterrupted run's, batch for batch."""
    monkeypatch.delenv("SLURM_JOB_ID", raising=False)

    def model():
        torch.manual_seed(0)
        return ImageClassifier("resnet_tiny", num_classes=24, pretrained=False)

    full = RecordBatches()
    _trainer(tmp_path / "full", [full], max_epochs=2).fit(model(), Numbered())
    first, second = RecordBatches(), RecordBatches()
    stop = [Requeue(), SignalAt(2, str(tmp_path / "marker")), first]
    _trainer(tmp_path / "cut", stop, max_epochs=2, checkpoint=True).fit(model(), Numbered())
    assert len(first.seen) == 3  # stopped after its third batch
    resumed = _trainer(tmp_path / "cut", [second], max_epochs=2, checkpoint=True)
    resumed.fit(model(), Numbered(), ckpt_path=str(tmp_path / "cut" / "ckpt" / "last.ckpt"))
    assert first.seen + second.seen == full.seen
    assert sorted(sum((labels for epoch, labels in full.seen if epoch == 0), [])) == list(range(24))


# --- 2 nodes through torchrun, and SLURM, on localhost ----------------------------------------------------------


@pytest.mark.slow
def test_two_nodes_through_torchrun_match_one_process(tmp_path: Path) -> None:
    """2 nodes x 1 process (gloo, localhost), gradual unfreezing: every rank ends with the same weights, and they
    and the validation metrics are those of one process with the same global batch (32 = 2 x 16)."""
    port = _free_port()
    exp = _experiment(tmp_path)
    nodes = []
    for rank in (0, 1):
        command = [sys.executable, str(REPO / "scripts" / "launch.py"), "torchrun", "--nodes", "2"]
        command += ["--node-rank", str(rank), "--master-port", str(port), "--run-id", "t1", "--"]
        command += ["--config", str(exp), "--trainer.strategy=ddp_find_unused_parameters_true", "--data.batch_size=16"]
        nodes.append(
            subprocess.Popen(
                command, cwd=tmp_path, env=_env(tmp_path), stdout=subprocess.PIPE, stderr=subprocess.STDOUT
            )
        )
    outputs = [node.communicate(timeout=600)[0].decode(errors="replace") for node in nodes]
    assert [node.returncode for node in nodes] == [0, 0], outputs[0][-3000:] + outputs[1][-3000:]
    run = tmp_path / "runs" / "exp" / "torchrun_t1"
    assert (run / "checkpoints" / "last.ckpt").is_file()
    one = subprocess.run(
        [sys.executable, str(REPO / "scripts" / "train.py"), "fit", "--config", str(exp), "--data.batch_size=32"]
        + ["--run_folder", str(tmp_path / "runs" / "exp" / "single")],
        cwd=tmp_path,
        env=_env(tmp_path) | {"RANK_FILE_TAG": "single"},
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert one.returncode == 0, one.stderr[-3000:]
    rank0, rank1, single = (torch.load(tmp_path / f"{tag}.pt") for tag in ("rank0", "rank1", "single0"))
    for key in rank0:
        assert torch.equal(rank0[key], rank1[key]), key
        torch.testing.assert_close(rank0[key], single[key], rtol=0, atol=5e-3, msg=key)
    assert any(not torch.equal(rank0[k], _initial(tmp_path)[k]) for k in rank0 if ".encoder.layers." in k)
    two, alone = _validation(run), _validation(tmp_path / "runs" / "exp" / "single")
    assert [r["epoch"] for r in two] == ["0", "1", "2"]
    for a, b in zip(two, alone, strict=True):
        assert a["val/acc"] == b["val/acc"]
        assert abs(float(a["val/loss"]) - float(b["val/loss"])) < 2e-3
    # prepare_data ran once on each node (its local rank 0) for fit, and once more for the test after it
    prepared = sorted((tmp_path / "prepared.txt").read_text().split())
    assert prepared == ["node0-local0", "node0-local0", "node1-local0", "node1-local0"]


@pytest.mark.slow
def test_slurm_script_runs_under_fake_slurm_and_resumes_after_requeue(tmp_path: Path) -> None:
    """The script scripts/launch.py writes, run by bash with fake srun/scontrol: 2 nodes x 1 task. SIGUSR1 mid-run
    checkpoints and requeues; running the script again (as SLURM would) resumes in the same folder and W&B run."""
    exp = _experiment(tmp_path, wandb=True, signal_step=5)
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    _executable(
        bin_dir / "srun",
        f"""#!/bin/bash
        # A fake srun: SLURM_NTASKS tasks on localhost, one per "node", with the variables srun sets.
        pids=()
        for ((i = 0; i < SLURM_NTASKS; i++)); do
          SLURM_PROCID=$i SLURM_LOCALID=0 SLURM_NODEID=$i SLURM_STEP_ID=0 "$@" > {tmp_path}/task$i.log 2>&1 &
          pids+=($!)
        done
        status=0
        for pid in "${{pids[@]}}"; do wait "$pid" || status=$?; done
        exit $status
        """,
    )
    _executable(bin_dir / "scontrol", f'#!/bin/bash\necho "$@" >> {tmp_path}/scontrol.txt\n')
    script = tmp_path / "job.sbatch"
    write = [sys.executable, str(REPO / "scripts" / "launch.py"), "slurm", "--nodes", "2", "--gpus-per-node", "1"]
    write += ["--time", "00:10:00", "--out", str(script), "--", "--config", str(exp)]
    write += ["--trainer.strategy=ddp_find_unused_parameters_true", "--data.batch_size=16"]
    done = subprocess.run(write, cwd=tmp_path, env=_env(tmp_path), capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    text = script.read_text()
    for line in ("--nodes=2", "--ntasks-per-node=1", "--signal=USR1@", "--requeue", "--time=00:10:00"):
        assert line in text
    assert "--gpus-per-node" not in text  # a CPU experiment
    slurm = {"SLURM_JOB_ID": "4242", "SLURM_JOB_NAME": "exp", "SLURM_NNODES": "2", "SLURM_NTASKS": "2"}
    slurm |= {"SLURM_NTASKS_PER_NODE": "1", "SLURM_TASKS_PER_NODE": "1(x2)", "SLURM_NODELIST": "localhost"}
    env = _env(tmp_path) | slurm | {"PATH": f"{bin_dir}:{os.environ['PATH']}", "MASTER_PORT": str(_free_port())}
    first = subprocess.run(["bash", str(script)], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert first.returncode == 0, (tmp_path / "task0.log").read_text()[-3000:]
    run = tmp_path / "runs" / "exp" / "slurm_4242"
    assert (tmp_path / "scontrol.txt").read_text().split() == ["requeue", "4242"]
    stopped = torch.load(run / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)
    assert 5 <= stopped["global_step"] < 12  # stopped mid-run (3 epochs of 4 steps), not at the end
    env["MASTER_PORT"] = str(_free_port())
    second = subprocess.run(["bash", str(script)], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert second.returncode == 0, (tmp_path / "task0.log").read_text()[-3000:]
    log = (tmp_path / "task0.log").read_text()
    assert "resuming" in log and "test/acc" in log
    finished = torch.load(run / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)
    assert finished["epoch"] == 2 and finished["wandb_run_id"] == stopped["wandb_run_id"]
    assert [r["epoch"] for r in _validation(run)][-1] == "2"
    ids = {p.name.rsplit("-", 1)[-1] for p in (tmp_path / "runs" / "wandb").glob("offline-run-*")}
    assert ids == {stopped["wandb_run_id"]}  # one W&B run for the job, requeue or not
    assert len(list((tmp_path / "runs" / "exp").glob("slurm_*"))) == 1


# --- helpers ----------------------------------------------------------------------------------------------------

HELPERS = '''
import os
import torch
import yaml
from lightning import Callback
from datamodules.digits import DigitsDataModule


class SaveRankState(Callback):
    """Each rank's weights at the start and the end of fit, as <folder>/<tag><rank>.pt."""

    def __init__(self, folder: str):
        self.folder = folder

    def on_fit_start(self, trainer, pl_module):
        if trainer.global_rank == 0 and not os.environ.get("RANK_FILE_TAG"):
            torch.save(pl_module.state_dict(), os.path.join(self.folder, "initial.pt"))

    def on_train_end(self, trainer, pl_module):
        tag = os.environ.get("RANK_FILE_TAG", "rank")
        state = {k: v.detach().clone() for k, v in pl_module.state_dict().items()}
        torch.save(state, os.path.join(self.folder, f"{tag}{trainer.global_rank}.pt"))


class CountingDigits(DigitsDataModule):
    """Digits, recording where prepare_data runs."""

    def prepare_data(self):
        super().prepare_data()
        if os.environ.get("RANK_FILE_TAG"):
            return
        node = os.environ.get("GROUP_RANK", os.environ.get("SLURM_NODEID", "0"))
        local = os.environ.get("LOCAL_RANK", "0")
        with open(os.path.join(os.environ["HELPERS_DIR"], "prepared.txt"), "a") as f:
            f.write(f"node{node}-local{local}\\n")
'''


def _experiment(tmp_path: Path, wandb: bool = False, signal_step: int | None = None) -> Path:
    """A small CPU experiment: vit_tiny (LayerNorm, no dropout: its result does not depend on how the global batch
    is split), digits without augmentation, gradual unfreezing, 3 epochs of 4 steps."""
    (tmp_path / "scaling_helpers.py").write_text(HELPERS)
    loggers = [{"class_path": "lightning.pytorch.loggers.CSVLogger", "init_args": {"save_dir": f"{tmp_path}/runs"}}]
    if wandb:
        loggers.append(
            {
                "class_path": "callbacks.tracking.WandbLogger",
                "init_args": {"project": "scaling-test", "save_dir": f"{tmp_path}/runs"},
            }
        )
    callbacks = [
        {"class_path": "callbacks.unfreezing.GradualUnfreezing", "init_args": {"start_epoch": 1}},
        {"class_path": "scaling_helpers.SaveRankState", "init_args": {"folder": str(tmp_path)}},
    ]
    if signal_step is not None:
        signal_at = {"step": signal_step, "marker": f"{tmp_path}/signalled"}
        callbacks.append({"class_path": "tests.test_scaling.SignalAt", "init_args": signal_at})
    model = {"backbone": "vit_tiny", "pretrained": False, "dropout": 0.0, "lr": 0.01, "backbone_lr": 0.005}
    experiment = {
        "trainer": {
            "accelerator": "cpu",
            "max_epochs": 3,
            "limit_train_batches": 4,
            "limit_val_batches": 2,
            "num_sanity_val_steps": 0,
            "logger": loggers,
            "callbacks+": callbacks,
        },
        "model": {"class_path": "modules.image_classifier.ImageClassifier", "init_args": model},
        "data": {
            "class_path": "scaling_helpers.CountingDigits",
            "init_args": {"image_size": 32, "batch_size": 16, "augment": "none"},
        },
    }
    config = tmp_path / "exp.yaml"
    config.write_text(yaml.safe_dump(experiment, sort_keys=False))
    return config


def _env(tmp_path: Path) -> dict[str, str]:
    """The subprocesses' environment: offline W&B, nothing inherited from this process's runs, the experiment's
    helpers (``scaling_helpers``, written by :func:`_experiment`) and this module importable."""
    env = dict(os.environ, WANDB_MODE="offline")
    for inherited in ("FT_RUN_DIR", "WANDB_SERVICE", "MASTER_PORT", "MASTER_ADDR", "RANK_FILE_TAG"):
        env.pop(inherited, None)
    return env | {"PYTHONPATH": f"{tmp_path}{os.pathsep}{REPO}", "HELPERS_DIR": str(tmp_path)}


def _initial(tmp_path: Path) -> dict:
    return torch.load(tmp_path / "initial.pt")


def _validation(run: Path) -> list[dict[str, str]]:
    with (run / "metrics.csv").open() as f:
        return [r for r in csv.DictReader(f) if r.get("val/acc")]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _executable(path: Path, text: str) -> None:
    path.write_text(textwrap.dedent(text))
    path.chmod(path.stat().st_mode | stat.S_IEXEC)


def _trainer(tmp_path: Path, callbacks: list, max_epochs: int = 1, checkpoint: bool = False) -> Trainer:
    from callbacks.reliability import Checkpoint

    if checkpoint:
        callbacks = [*callbacks, Checkpoint(dirpath=tmp_path / "ckpt", save_last=True)]
    return Trainer(
        default_root_dir=tmp_path,
        max_epochs=max_epochs,
        accelerator="cpu",
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        enable_checkpointing=checkpoint,
        num_sanity_val_steps=0,
        limit_val_batches=1,
        callbacks=callbacks,
    )
