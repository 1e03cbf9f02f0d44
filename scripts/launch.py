"""Launch an experiment on several processes or nodes: torchrun, or a SLURM batch script written from the experiment.

    # on each of 2 nodes (node rank 0 and 1), 8 GPUs each:
    python scripts/launch.py torchrun --nodes 2 --node-rank 0 --master-addr node0 --run-id exp1 -- \\
        --config configs/text_sst2.yaml --config configs/presets/ddp.yaml --data.data_dir ../shared/data/sst2
    # a SLURM job: nodes, GPUs per node, CPUs and time from the experiment (flags override), then `sbatch` it
    python scripts/launch.py slurm --nodes 2 --gpus-per-node 4 --time 04:00:00 [--submit] -- \\
        --config configs/digits.yaml --config configs/presets/ddp.yaml

Everything after ``--`` is what ``scripts/train.py fit`` takes. The launcher adds what must agree across processes:
``--trainer.num_nodes``, ``--trainer.devices`` (one process per device) and ``--run_folder``, one folder for the
whole job on a filesystem every node sees (``runs/<name>/<run id>``; a SLURM job's id), so a restarted or requeued
job resumes from its ``last.ckpt`` in that folder and continues its W&B run. ``scripts/train.py`` checks the layout
again at start-up (``scripts/cluster.py``).

The SLURM script asks for ``--ntasks-per-node`` = GPUs per node (one task per device: the layout Lightning needs),
``--signal=USR1@<grace>`` and ``--requeue``: before the time limit ``callbacks.requeue.Requeue`` saves
``last.ckpt``, requeues the job, and the requeued job resumes in the same folder.
"""

from __future__ import annotations

import argparse
import os
import shlex
import subprocess
import sys
import time
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

TRAIN = "scripts/train.py"


def resolved_config(train_args: list[str]) -> dict:
    """The experiment as ``scripts/train.py fit`` would run it (base config, experiment, presets and flags), parsed
    without building anything."""
    command = [sys.executable, str(REPO / TRAIN), "fit", *train_args, "--print_config"]
    env = {k: v for k, v in os.environ.items() if k not in ("WANDB_SERVICE",)}
    done = subprocess.run(command, cwd=REPO, capture_output=True, text=True, env=env)
    if done.returncode != 0:
        lines = [line for line in done.stderr.strip().splitlines() if line.strip()]
        raise SystemExit(f"error: the experiment does not parse: {lines[-1] if lines else done.returncode}")
    return yaml.safe_load(done.stdout)


def run_root(config: dict) -> Path:
    """``<save_dir>/<name>`` of the experiment's first folder logger (``runs/<name>``)."""
    loggers = config.get("trainer", {}).get("logger") or []
    for logger in loggers if isinstance(loggers, list) else [loggers]:
        if isinstance(logger, dict) and str(logger.get("class_path", "")).endswith(("CSVLogger", "TensorBoardLogger")):
            args = logger.get("init_args") or {}
            return Path(args.get("save_dir") or "runs") / (args.get("name") or config.get("name") or "run")
    return Path("runs") / (config.get("name") or "run")


def _int_devices(value, what: str) -> int:
    try:
        devices = int(value)
    except (TypeError, ValueError):
        devices = -1
    if devices < 1:
        raise SystemExit(
            f"error: trainer.devices is {value!r}: {what} needs a number of devices per node; give --gpus-per-node "
            "(or --procs-per-node)"
        )
    return devices


def _local_devices(trainer: dict) -> int:
    """``trainer.devices`` as a count on this node (``-1``/``auto`` on a GPU experiment: this node's GPUs)."""
    devices = trainer.get("devices")
    if str(devices) in ("-1", "auto") and str(trainer.get("accelerator")) in ("gpu", "cuda", "auto"):
        import torch

        if torch.cuda.device_count():
            return torch.cuda.device_count()
    return _int_devices(devices, "torchrun")


def torchrun_command(args, config: dict) -> list[str]:
    procs = args.procs_per_node or _local_devices(config["trainer"])
    if args.run_id is None and args.run_folder is None:
        if args.nodes > 1:
            raise SystemExit("error: give --run-id (RUN_ID=...), the same on every node: it names the job's run folder")
        args.run_id = time.strftime("%Y%m%d-%H%M%S")  # one node: a new run each time
    folder = Path(args.run_folder) if args.run_folder else run_root(config) / f"torchrun_{args.run_id}"
    command = [
        sys.executable,
        "-m",
        "torch.distributed.run",  # torchrun, from this Python
        f"--nnodes={args.nodes}",
        f"--nproc-per-node={procs}",
        f"--node-rank={args.node_rank}",
        f"--master-addr={args.master_addr}",
        f"--master-port={args.master_port}",
    ]
    if args.max_restarts:
        command.append(f"--max-restarts={args.max_restarts}")
    return [
        *command,
        TRAIN,
        "fit",
        *args.train_args,
        f"--trainer.num_nodes={args.nodes}",
        f"--trainer.devices={procs}",
        f"--run_folder={folder}",
    ]


def sbatch_script(args, config: dict) -> str:
    """The SLURM batch script for the experiment: resources from ``config`` unless the flags give them."""
    trainer = config.get("trainer", {})
    nodes = args.nodes or int(trainer.get("num_nodes") or 1)
    cpu = str(trainer.get("accelerator")) == "cpu"
    per_node = args.gpus_per_node or _int_devices(trainer.get("devices"), "a SLURM job")
    workers = int(((config.get("data") or {}).get("init_args") or {}).get("num_workers") or 0)
    cpus = args.cpus_per_task or max(1, workers + 1)  # the loader's workers plus the training process
    time = args.time or _slurm_time(trainer.get("max_time")) or "24:00:00"
    name = config.get("name") or "run"
    root = run_root(config)
    root = root if root.is_absolute() else REPO / root  # sbatch may be run from any folder
    python = shlex.quote(args.python or sys.executable)
    train = " ".join(
        shlex.quote(a)
        for a in [
            *args.train_args,
            f"--trainer.num_nodes={nodes}",
            f"--trainer.devices={per_node}",
        ]
    )
    lines = [
        "#!/bin/bash",
        f"# Written by scripts/launch.py slurm for the experiment {name!r}; submit with: sbatch <this file>",
        f"#SBATCH --job-name={name}",
        f"#SBATCH --nodes={nodes}",
        "# One task per device: --ntasks-per-node must equal trainer.devices (scripts/train.py checks it at start-up).",
        f"#SBATCH --ntasks-per-node={per_node}",
    ]
    if not cpu:
        lines.append(f"#SBATCH --gpus-per-node={per_node}")
    lines += [
        f"#SBATCH --cpus-per-task={cpus}",
        f"#SBATCH --time={time}",
        f"# {args.grace} s before the limit SLURM signals the tasks: they save last.ckpt and requeue the job, whose",
        "# next start resumes in the same run folder (callbacks/requeue.py); a requeued job appends to its log.",
        f"#SBATCH --signal=USR1@{args.grace}",
        "#SBATCH --requeue",
        "#SBATCH --open-mode=append",
        f"#SBATCH --output={root}/slurm-%j.out",
    ]
    lines += [f"#SBATCH --partition={args.partition}"] if args.partition else []
    lines += [f"#SBATCH --account={args.account}"] if args.account else []
    lines += [f"#SBATCH {extra}" for extra in args.sbatch or []]
    lines += [
        "",
        "set -euo pipefail",
        f"cd {shlex.quote(str(REPO))}",
        f"mkdir -p {shlex.quote(str(root))}",
        "# One folder per job (an array task: per task), the same after every requeue: the run resumes there.",
        'JOB="${SLURM_ARRAY_JOB_ID:-$SLURM_JOB_ID}${SLURM_ARRAY_TASK_ID:+_$SLURM_ARRAY_TASK_ID}"',
        f'RUN={shlex.quote(str(root))}/slurm_"$JOB"',
        f'srun {python} {TRAIN} fit {train} --run_folder "$RUN"',
        "",
    ]
    return "\n".join(lines)


def _slurm_time(max_time) -> str | None:
    """A SLURM time limit from ``trainer.max_time`` (``DD:HH:MM:SS`` or a dict), with 10 minutes to spare."""
    if not max_time:
        return None
    if isinstance(max_time, dict):
        seconds = sum(int(max_time.get(k, 0)) * s for k, s in (("days", 86400), ("hours", 3600), ("minutes", 60)))
        seconds += int(max_time.get("seconds", 0))
    else:
        days, hours, minutes, secs = (int(p) for p in str(max_time).split(":"))
        seconds = ((days * 24 + hours) * 60 + minutes) * 60 + secs
    seconds += 600
    return f"{seconds // 86400}-{seconds % 86400 // 3600:02d}:{seconds % 3600 // 60:02d}:{seconds % 60:02d}"


def main(argv: list[str] | None = None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    train_args = argv[argv.index("--") + 1 :] if "--" in argv else []
    argv = argv[: argv.index("--")] if "--" in argv else argv
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="launcher", required=True)
    run = sub.add_parser("torchrun", help="start this node's processes with torchrun")
    run.add_argument("--nodes", type=int, default=1)
    run.add_argument("--node-rank", type=int, default=0)
    run.add_argument("--master-addr", default="127.0.0.1", help="node rank 0's address")
    run.add_argument("--master-port", type=int, default=29500)
    run.add_argument("--procs-per-node", type=int, default=None, help="default: trainer.devices")
    run.add_argument(
        "--run-id",
        default=None,
        help="the job's id, the same on every node: runs/<name>/torchrun_<id>, resumed when it has a last.ckpt "
        "(required with --nodes > 1; one node: a new timestamp)",
    )
    run.add_argument("--run-folder", default=None, help="the run folder instead of runs/<name>/torchrun_<id>")
    run.add_argument("--max-restarts", type=int, default=0, help="torchrun restarts a failed group, resuming")
    run.add_argument("--dry-run", action="store_true", help="print the command, do not run it")
    slurm = sub.add_parser("slurm", help="write (and --submit) a SLURM batch script")
    slurm.add_argument("--nodes", type=int, default=None, help="default: trainer.num_nodes")
    slurm.add_argument("--gpus-per-node", type=int, default=None, help="default: trainer.devices")
    slurm.add_argument("--cpus-per-task", type=int, default=None, help="default: data.num_workers + 1")
    slurm.add_argument("--time", default=None, help="HH:MM:SS or D-HH:MM:SS (default: trainer.max_time + 10 min)")
    slurm.add_argument("--partition", default=None)
    slurm.add_argument("--account", default=None)
    slurm.add_argument("--grace", type=int, default=180, help="seconds before the limit to checkpoint and requeue")
    slurm.add_argument("--sbatch", action="append", help="another #SBATCH line, e.g. --sbatch=--mem=64G")
    slurm.add_argument("--python", default=None, help="the Python on the nodes (default: this one)")
    slurm.add_argument("--out", default=None, help="where to write the script (default: runs/<name>/<name>.sbatch)")
    slurm.add_argument("--submit", action="store_true", help="run sbatch on it")
    args = parser.parse_args(argv)
    args.train_args = train_args
    if not any(a == "--config" or a.startswith("--config=") for a in train_args):
        raise SystemExit("error: give the experiment after --: -- --config configs/<experiment>.yaml [...]")
    config = resolved_config(train_args)
    if args.launcher == "torchrun":
        command = torchrun_command(args, config)
        print(shlex.join(command), flush=True)
        if not args.dry_run:
            os.chdir(REPO)
            os.execv(command[0], command)
        return
    script = sbatch_script(args, config)
    out = Path(args.out) if args.out else REPO / run_root(config) / f"{config.get('name') or 'run'}.sbatch"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(script)
    print(f"wrote {out}")
    if args.submit:
        subprocess.run(["sbatch", str(out)], check=True)


if __name__ == "__main__":
    main()
