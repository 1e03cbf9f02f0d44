"""The command line of `make bench`: which sections run (``--only``), one after another on one :class:`Context`,
each failure caught so it cannot hide the other sections, and the report: ``results.md`` (printed too) and
``results.json`` with a description of the machine."""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
import traceback
from collections.abc import Callable, Mapping
from pathlib import Path

import torch

from scripts.benchmarks.harness import CUDA, REPO, BenchConfig, Context, environ_restored

Section = Callable[[Context], dict]


def machine() -> dict:
    """The CPU, device and library versions the numbers were measured with."""
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    import lightning
    import transformers

    return {
        "cpu": cpu,
        "cpu_cores": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "lightning": lightning.__version__,
        "transformers": transformers.__version__,
        "device": torch.cuda.get_device_name() if CUDA else "cpu",
        "python": platform.python_version(),
    }


def _cell(value) -> str:
    if isinstance(value, float):
        return f"{value:.4g}" if abs(value) < 1000 else f"{value:,.0f}"
    if isinstance(value, list):
        return ", ".join(_cell(v) for v in value)
    return str(value)


def _table(columns: list[str], rows: list[list]) -> list[str]:
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    return lines + ["| " + " | ".join(_cell(v) for v in row) + " |" for row in rows]


def markdown(report: dict) -> str:
    """``results.md``: the machine, then per section its table, ratios, goals and note (or why it has none)."""
    m = report["machine"]
    lines = [
        "# Benchmarks (`make bench`)",
        "",
        f"Machine: {m['cpu']}, {m['cpu_cores']} cores, {m['torch_threads']} torch threads, device **{m['device']}**; "
        f"torch {m['torch']}, lightning {m['lightning']}, transformers {m['transformers']}, Python {m['python']}. "
        f"Total {report['wall_s'] / 60:.1f} min.",
        "",
    ]
    for name, section in report["sections"].items():
        if "skipped" in section or "error" in section:
            lines += [
                f"## {name}",
                "",
                f"**{'Skipped' if 'skipped' in section else 'Failed'}**: "
                f"{section.get('skipped') or section.get('error')}",
                "",
            ]
            continue
        lines += [f"## {section['title']}", "", section["setup"] + ".", ""]
        lines += _table(section["columns"], section["rows"]) + [""]
        for key, value in section.get("ratio", {}).items():
            lines.append(f"- {key}: **{_cell(value)}**")
        goals = section.get("goals") or (
            [{"goal": section["goal"], "met": section.get("goal_met")}] if section.get("goal") else []
        )
        for goal in goals:
            verdict = {True: "met", False: "**MISSED**", None: "see the note"}[goal["met"]]
            lines.append(f"- goal: {goal['goal']}: {verdict}")
        if section.get("note"):
            lines.append(f"- {section['note']}")
        if "profile" in section:
            profile = section["profile"]
            lines += ["", f"{profile['title']}:", ""] + _table(profile["columns"], profile["rows"])
        lines.append("")
    return "\n".join(lines)


def run_sections(sections: Mapping[str, Section], context: Context) -> list[str]:
    """Run ``sections`` in order, recording each result in ``context`` (a failure as ``{"error": ...}``) with the
    environment put back after each; returns the names that failed."""
    failed = []
    for name, section in sections.items():
        print(f"[bench] {name} ...", file=sys.stderr, flush=True)
        try:
            with environ_restored():
                result = section(context)
        except Exception as error:  # one broken section must not hide the others; the exit status reports it
            traceback.print_exc()
            result = {"error": f"{type(error).__name__}: {error}"}
            failed.append(name)
        context.record(name, result)
    return failed


def main(sections: Mapping[str, Section], argv: list[str] | None = None, description: str | None = None) -> dict:
    """Parse the command line, run the chosen ``sections`` (in their order) and write and print the report; exits
    with the failed sections' names when any failed."""
    parser = argparse.ArgumentParser(description=description, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--only", choices=list(sections), nargs="+", help="run only these sections")
    parser.add_argument("--out", default=str(REPO / "bench"), help="folder of results.md and results.json")
    parser.add_argument("--samples", type=int, default=2000, help="SST-2 training sentences of the text section")
    parser.add_argument("--reps", type=int, default=3, help="timed epochs per side in the overhead section")
    parser.add_argument(
        "--full-bf16-run", action="store_true", help="train the default experiment in bf16 even where bf16 is slow"
    )
    args = parser.parse_args(argv)
    start = time.perf_counter()
    report = {"machine": machine()}
    context = Context(BenchConfig(samples=args.samples, reps=args.reps, full_bf16_run=args.full_bf16_run))
    chosen = {name: section for name, section in sections.items() if name in (args.only or sections)}
    failed = run_sections(chosen, context)
    report["sections"] = dict(context.earlier)
    report["wall_s"] = time.perf_counter() - start
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps(report, indent=1, default=str) + "\n")
    (out / "results.md").write_text(markdown(report))
    print(markdown(report))
    print(f"written to {out / 'results.md'} and {out / 'results.json'}", file=sys.stderr)
    if failed:
        raise SystemExit(f"bench sections failed: {', '.join(failed)}")
    return report
