"""Markdown tables of what `tools/gpu_check.sh OUT` measured, for docs/performance.md and docs/recipes.md.

    python3 tools/summarize_gpu_check.py OUT

Every figure comes from a file the check wrote (bench_*.json, */metrics.jsonl, */wall_seconds.txt,
environment.txt); a run that failed or never ran shows as such, never as a number.
"""

from __future__ import annotations

import json
import re
import statistics
import sys
from pathlib import Path

SEED_SUFFIX = re.compile(r"_seed(\d+)$")
FAILED_STEP = re.compile(r"^(?:train|bench) (\S+) failed \((\d+)\)$")


def failed_steps(out: Path) -> dict[str, str]:
    """Each step that gpu_check.sh saw exit non-zero, and its exit status (124: its timeout)."""
    log = out / "steps.log"
    matches = (FAILED_STEP.match(line) for line in (log.read_text().splitlines() if log.exists() else []))
    return {match[1]: match[2] for match in matches if match}


def bench_rows(out: Path) -> list[str]:
    rows = ["| bench | precision | compile | fused pool | CUDA graphs | vgg_dist img/s | baseline img/s | "
            "warm-up s (compiling) | peak memory MiB |", "|---|---|---|---|---|---|---|---|---|"]
    for path in sorted(out.glob("bench_*.json")):
        result = json.loads(path.read_text())
        ours, baseline = result["vgg_dist"], result.get("baseline")
        compiled = f"yes ({result['compile_mode']})" if ours["compiled"] else "no"
        baseline_speed = format_number(baseline["images_per_sec"] if baseline else None, ",.0f")
        rows.append(f"| {path.stem.removeprefix('bench_')} | {result['precision']} | {compiled} | "
                    f"{result['fused_pool']} | {result.get('cuda_graphs', False)} | {ours['images_per_sec']:,.0f} | "
                    f"{baseline_speed} | {ours['warmup_seconds']:.1f} | {ours['peak_memory_bytes'] / 2**20:,.0f} |")
    for log in sorted(out.glob("bench_*.log")):
        if not (out / f"{log.stem}.json").exists():
            rows.append(f"| {log.stem.removeprefix('bench_')} | failed: {last_line(log)} |")
    return rows


def run_summary(run: Path) -> dict | None:
    metrics = run / "metrics.jsonl"
    if not metrics.exists():
        return None
    epochs = [json.loads(line) for line in metrics.read_text().splitlines()]
    train_seconds = sum(epoch["seconds"] for epoch in epochs)
    later = [epoch for epoch in epochs[1:] if epoch["examples_per_sec"]]
    memory = [epoch["peak_memory_bytes"] for epoch in later if epoch["peak_memory_bytes"] is not None]
    wall = run / "wall_seconds.txt"
    return {
        "epochs": len(epochs), "test_acc": epochs[-1]["test_acc"],
        "run_images_per_sec": sum(epoch["train_samples"] for epoch in epochs) / train_seconds,
        "later_images_per_sec": statistics.median(e["examples_per_sec"] for e in later) if later else None,
        "first_epoch_seconds": epochs[0]["seconds"],
        "train_and_eval_seconds": train_seconds + sum(epoch["eval_seconds"] for epoch in epochs),
        "wall_seconds": float(wall.read_text()) if wall.exists() else None,
        "memory_mib": (min(memory) / 2**20, max(memory) / 2**20) if memory else None,
    }


def run_rows(out: Path) -> list[str]:
    rows = ["| run | epochs | test acc | img/s, whole run | img/s, epochs 2+ (median) | epoch 1 s | "
            "train + eval s | wall s | peak memory, epochs 2+ (MiB) |", "|---|---|---|---|---|---|---|---|---|"]
    seeds: dict[str, list[float]] = {}
    failed = failed_steps(out)
    for run in sorted(path for path in out.iterdir() if (path / "log.txt").exists()):
        summary = run_summary(run)
        if summary is None:
            rows.append(f"| {run.name} | failed: {last_line(run / 'log.txt')} |")
            continue
        if run.name in failed:  # it trained some epochs, then stopped: its figures are not a whole run
            rows.append(f"| {run.name} | stopped with exit status {failed[run.name]} after {summary['epochs']} "
                        f"epoch(s): {last_line(run / 'log.txt')} |")
            continue
        seeds.setdefault(SEED_SUFFIX.sub("", run.name), []).append(summary["test_acc"])
        memory = summary["memory_mib"]
        memory_range = f"{memory[0]:,.0f}–{memory[1]:,.0f}" if memory else ""
        rows.append(
            f"| {run.name} | {summary['epochs']} | {summary['test_acc']:.4f} | {summary['run_images_per_sec']:,.0f} | "
            f"{format_number(summary['later_images_per_sec'], ',.0f')} | {summary['first_epoch_seconds']:.1f} | "
            f"{summary['train_and_eval_seconds']:.1f} | {format_number(summary['wall_seconds'], '.1f')} | "
            f"{memory_range} |")
    for name, accuracies in seeds.items():
        if len(accuracies) > 1:
            rows.append(f"\n{name}: {len(accuracies)} seeds, mean test acc {statistics.mean(accuracies):.4f} "
                        f"(sd {statistics.stdev(accuracies):.4f}; {', '.join(f'{a:.4f}' for a in accuracies)})")
    return rows


def format_number(value: float | None, spec: str) -> str:
    return "" if value is None else format(value, spec)


def last_line(path: Path) -> str:
    lines = [line for line in path.read_text(errors="replace").splitlines() if line.strip()]
    return lines[-1].replace("|", "/") if lines else "no output"


def main(argv: list[str]) -> int:
    if len(argv) != 1 or not Path(argv[0]).is_dir():
        print("usage: python3 tools/summarize_gpu_check.py OUT (the directory gpu_check.sh wrote)", file=sys.stderr)
        return 2
    out = Path(argv[0])
    environment = out / "environment.txt"
    if environment.exists():
        print(last_line(environment) + "\n")
    print("\n".join(bench_rows(out)) + "\n")
    print("\n".join(run_rows(out)))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
