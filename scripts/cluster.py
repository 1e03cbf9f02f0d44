"""The start-up check of a distributed run's layout: the launcher's process layout (torchrun, SLURM, or none) must
agree with the Trainer's ``devices`` and ``num_nodes``, or the run stops with one line before any process group
is formed.

Why our own check: Lightning validates part of this, and the parts it leaves out hang or quietly shrink the job.
On SLURM, ``--ntasks-per-node`` must equal ``devices``; when a script sets ``--ntasks`` without it, or starts Python
without ``srun``, the ranks wait for processes that never come, or fewer GPUs train than were paid for (Lightning
issues 19883, 20391). Several nodes with no launcher at all wait forever for the others.

:func:`layout_error` is a pure function of ``(devices, num_nodes, environment)``, tested with fake environments;
``scripts/train.py`` calls :func:`check_layout` with the Trainer it built.
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping

INTERACTIVE_JOB_NAMES = ("bash", "interactive")  # Lightning's rule: such a SLURM job is not an srun launch


def slurm_tasks_per_node(env: Mapping[str, str]) -> list[int] | None:
    """Tasks on each node of this SLURM step: ``SLURM_TASKS_PER_NODE`` (``"4(x2),3"``), else
    ``SLURM_NTASKS_PER_NODE`` over ``SLURM_NNODES``; None when SLURM states neither."""
    spec = env.get("SLURM_STEP_TASKS_PER_NODE") or env.get("SLURM_TASKS_PER_NODE")
    if spec:
        counts = []
        for part in spec.split(","):
            match = re.fullmatch(r"(\d+)(?:\(x(\d+)\))?", part.strip())
            if not match:
                return None
            counts += [int(match.group(1))] * int(match.group(2) or 1)
        return counts
    if env.get("SLURM_NTASKS_PER_NODE") and env.get("SLURM_NNODES"):
        return [int(env["SLURM_NTASKS_PER_NODE"])] * int(env["SLURM_NNODES"])
    return None


def launcher(env: Mapping[str, str]) -> str:
    """``torchrun``, ``slurm`` (a step started by ``srun``), ``slurm-batch`` (inside a SLURM job, not under
    ``srun``), ``manual`` (``NODE_RANK`` and ``MASTER_ADDR`` set by hand) or ``none``."""
    if "TORCHELASTIC_RUN_ID" in env or ("LOCAL_WORLD_SIZE" in env and "WORLD_SIZE" in env):
        return "torchrun"
    if "SLURM_JOB_ID" in env and env.get("SLURM_JOB_NAME") not in INTERACTIVE_JOB_NAMES:
        step = env.get("SLURM_STEP_ID", env.get("SLURM_STEPID"))
        # The batch script's own step has no id, or a reserved one: batch 4294967291, extern 4294967292, interactive
        # 4294967290 (Slurm >= 20.11); 4294967294 and 4294967295 before.
        reserved = ("4294967290", "4294967291", "4294967292", "4294967294", "4294967295")
        return "slurm" if step is not None and step not in reserved else "slurm-batch"
    if "NODE_RANK" in env and "MASTER_ADDR" in env:
        return "manual"
    return "none"


def layout_error(devices: int, num_nodes: int, env: Mapping[str, str] | None = None) -> str | None:
    """What is wrong with running ``devices`` processes on each of ``num_nodes`` nodes under the launcher that
    ``env`` describes (default: this process's environment), as one line; None when the layout agrees."""
    env = os.environ if env is None else env
    kind = launcher(env)
    want = f"devices={devices} x num_nodes={num_nodes}"
    if kind == "torchrun":
        world, local = int(env.get("WORLD_SIZE", "1")), int(env.get("LOCAL_WORLD_SIZE", env.get("WORLD_SIZE", "1")))
        if local != devices:
            return (
                f"torchrun started {local} processes on this node (--nproc-per-node) but the Trainer has {want}: "
                f"set --trainer.devices={local} or --nproc-per-node={devices}"
            )
        if world != devices * num_nodes:
            return (
                f"torchrun's world size is {world} ({world // max(local, 1)} nodes x {local}) but the Trainer has "
                f"{want} = {devices * num_nodes}: "
                f"set --trainer.num_nodes={world // max(local, 1)} or --nnodes={num_nodes}"
            )
        return None
    if kind == "slurm":
        nodes = int(env.get("SLURM_NNODES", env.get("SLURM_JOB_NUM_NODES", "1")))
        per_node = slurm_tasks_per_node(env)
        ntasks = int(env.get("SLURM_NTASKS", sum(per_node) if per_node else 1))
        if nodes != num_nodes:
            return (
                f"the SLURM job has {nodes} nodes (--nodes) but the Trainer has {want}: "
                f"set --trainer.num_nodes={nodes} or #SBATCH --nodes={num_nodes}"
            )
        if per_node is None or len(set(per_node)) != 1:
            return (
                f"the SLURM step runs {ntasks} tasks spread unevenly or unstated over {nodes} nodes "
                f"(SLURM_TASKS_PER_NODE={env.get('SLURM_TASKS_PER_NODE')}): use #SBATCH --ntasks-per-node={devices}, "
                "not --ntasks"
            )
        if per_node[0] != devices:
            return (
                f"the SLURM job runs {per_node[0]} tasks per node (--ntasks-per-node) but the Trainer has {want}: "
                f"one task per device, so set #SBATCH --ntasks-per-node={devices} or --trainer.devices={per_node[0]}"
            )
        gpus = _slurm_gpus_on_node(env)
        if gpus is not None and gpus < devices and env.get("FT_ACCELERATOR", "gpu") != "cpu":
            return (
                f"SLURM gave this node {gpus} GPUs but the Trainer has {want}: "
                f"set #SBATCH --gpus-per-node={devices} or --trainer.devices={gpus}"
            )
        return None
    if kind == "slurm-batch":
        tasks = int(env.get("SLURM_NTASKS", "1"))
        if tasks > 1 or num_nodes > 1 or devices > 1:
            return (
                f"the Trainer has {want} and this SLURM job {tasks} tasks on {env.get('SLURM_NNODES', '?')} nodes, "
                "but this process was not "
                "started by srun: start it as `srun python scripts/train.py ...` (scripts/launch.py slurm writes such "
                "a script)"
            )
        return None
    if num_nodes > 1 and kind == "none":
        return (
            f"num_nodes={num_nodes} but no launcher started this process (no torchrun, no srun, no NODE_RANK and "
            "MASTER_ADDR): start it on every node with torchrun (scripts/launch.py torchrun) or srun"
        )
    return None


def _slurm_gpus_on_node(env: Mapping[str, str]) -> int | None:
    for key in ("SLURM_GPUS_ON_NODE", "SLURM_GPUS_PER_NODE"):
        value = env.get(key, "")
        match = re.search(r"(\d+)$", value)  # "4" or "a100:4"
        if match:
            return int(match.group(1))
    return None


def check_layout(trainer) -> None:
    """Raise one line (a ``ValueError``) when the launcher's layout and the Trainer's disagree."""
    env = dict(os.environ)
    env["FT_ACCELERATOR"] = "cpu" if type(trainer.accelerator).__name__ == "CPUAccelerator" else "gpu"
    message = layout_error(trainer.num_devices, trainer.num_nodes, env)
    if message:
        raise ValueError(message)
