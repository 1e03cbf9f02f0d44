"""Requeue a SLURM job before its time limit, and resume it from the same run folder.

SLURM sends ``SIGUSR1`` some time before the limit (``#SBATCH --signal=USR1@120``: 120 s). :class:`Requeue` then
saves ``last.ckpt`` into the run's ``checkpoints/``, asks SLURM to requeue the job (``scontrol requeue``) and stops
training. The requeued job runs the same script, whose ``--run_folder`` names the same folder (by job id), so
``scripts/train.py`` resumes from that ``last.ckpt``, appends to the same ``metrics.csv`` and continues the same W&B
run (its id is in the checkpoint): one run folder and one W&B run per job, however often it is requeued.

Why not Lightning's own (``SLURMEnvironment(auto_requeue=True)``): it saves the checkpoint *inside the signal
handler*, which Python runs between any two bytecodes, in the middle of a backward pass or a collective; the handler
then sometimes never completes and the job is killed without a checkpoint (Lightning issue 21406); its
``hpc_ckpt_N.ckpt`` lands in ``default_root_dir`` where a new run folder never looks for it (issue 20347). Here the
handler only sets a flag; the work happens at the next batch end, in ordinary code, after every rank has agreed to
stop at the same step (one all-reduce of the flag per step), so no rank saves or leaves while others wait in a
collective. ``scripts/train.py`` turns Lightning's handler off whenever it adds this callback.

A job array's task is requeued as ``<array job id>_<task id>`` (requeuing the array job id would requeue every task:
Lightning issue 15022).
"""

from __future__ import annotations

import os
import signal
import subprocess
import threading
from pathlib import Path

from lightning import Callback, LightningModule, Trainer
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn


def slurm_job_to_requeue(env=None) -> str | None:
    """The id ``scontrol requeue`` takes for this job (an array task's own id), or None outside SLURM."""
    env = os.environ if env is None else env
    if env.get("SLURM_ARRAY_JOB_ID") and env.get("SLURM_ARRAY_TASK_ID"):
        return f"{env['SLURM_ARRAY_JOB_ID']}_{env['SLURM_ARRAY_TASK_ID']}"
    return env.get("SLURM_JOB_ID")


class Requeue(Callback):
    """On ``signal_name`` (default ``SIGUSR1``): checkpoint to ``<run>/checkpoints/last.ckpt`` at the next batch end,
    requeue the SLURM job and stop.

    Args:
        signal_name: the signal SLURM is told to send (``#SBATCH --signal=USR1@<seconds>``).
        command: the requeue command, ``{job}`` replaced by the job id (default ``scontrol requeue {job}``).
    """

    def __init__(self, signal_name: str = "SIGUSR1", command: str = "scontrol requeue {job}"):
        self.signum = getattr(signal, signal_name)
        self.command = command
        self.requeued = False  # read by scripts/train.py: a requeued run is not tested and prints no summary
        self._signalled = False
        self._previous = None

    def _handler(self, signum, frame) -> None:  # a flag, nothing more: see the module docstring
        self._signalled = True

    def setup(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        if stage == "fit" and threading.current_thread() is threading.main_thread():
            self._previous = signal.signal(self.signum, self._handler)

    def teardown(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        if self._previous is not None:
            signal.signal(self.signum, self._previous)
            self._previous = None

    def on_train_batch_end(self, trainer: Trainer, pl_module: LightningModule, outputs, batch, batch_idx) -> None:
        if self.requeued:
            return
        # Every rank asks every step (one small all-reduce): they stop at the same step, or none does.
        if not trainer.strategy.reduce_boolean_decision(self._signalled, all=False):
            return
        self.requeued = True
        path = self._save_last(trainer)  # every rank calls it (sharded strategies gather); rank 0 writes
        job = slurm_job_to_requeue()
        if trainer.is_global_zero:
            if job is None:
                rank_zero_warn(f"{signal.Signals(self.signum).name} outside a SLURM job: saved {path}, not requeued")
            else:
                command = self.command.format(job=job).split()
                try:
                    done = subprocess.run(command, capture_output=True, text=True)
                    failure = f"{done.returncode}: {done.stderr.strip()}" if done.returncode else None
                except OSError as err:  # no scontrol on this node (a container)
                    failure = f"{type(err).__name__}: {err}"
                if failure:
                    rank_zero_warn(
                        f"`{' '.join(command)}` failed ({failure}): saved {path}; requeue the job by hand "
                        f"(`scontrol requeue {job}`), or start a new one with --run_folder {path.parent.parent} "
                        "to resume there"
                    )
                else:
                    rank_zero_info(f"requeued SLURM job {job} at step {trainer.global_step}; saved {path}")
        trainer.should_stop = True

    @staticmethod
    def _save_last(trainer: Trainer) -> Path:
        """Save ``last.ckpt`` through the checkpoint callback when it keeps one (so it knows the file as its own and
        goes on writing ``last.ckpt``, not ``last-v1.ckpt``), else to ``<run>/checkpoints/last.ckpt``."""
        callback = trainer.checkpoint_callback
        if isinstance(callback, ModelCheckpoint) and callback.save_last and callback.dirpath:
            callback._save_last_checkpoint(trainer, callback._monitor_candidates(trainer))
            if callback.last_model_path:
                return Path(callback.last_model_path)
        folder = getattr(callback, "dirpath", None)
        if folder is None:
            folder = Path(trainer.log_dir or trainer.default_root_dir) / "checkpoints"
        path = Path(folder) / "last.ckpt"
        trainer.save_checkpoint(path)
        return path


def requeue_flag(trainer: Trainer) -> bool:
    """Whether a :class:`Requeue` callback of ``trainer`` has requeued the job (train.py then skips the test)."""
    return any(isinstance(c, Requeue) and c.requeued for c in trainer.callbacks)
