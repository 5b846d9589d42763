"""How much of a sweep's wall time is spent outside decoding (goal: at most 10% for a 20-job sweep).

Runs a named sweep as a user would (``decodelab sweep NAME ...`` in a subprocess, sequential launcher,
MLflow logging to a fresh sqlite store, resume off) and splits its wall time into
- decoding: every sample's decode wall time (prefill to last token) plus the AR baseline decodes the
  sweep ran itself (baselines already on record are not decoding time of this sweep), and
- everything else: process start and imports, preflight validation of every job, Hydra composition,
  model load, MLflow parent and child runs, fingerprints, plots, summaries and the sweep report.

    .venv/bin/python benchmarks/sweep_overhead.py                    # 20 jobs: draft_length on SmolLM2
    .venv/bin/python benchmarks/sweep_overhead.py --sweep drafters --extra task.limit=2
"""

from __future__ import annotations

import argparse
import json
import re
import subprocess
import sys
import tempfile
import time
from datetime import datetime
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from decodelab.tracking.sweep_folder import SWEEP_SUMMARY_FILE, job_dirs  # noqa: E402

LAUNCH_LINE = re.compile(r"^\[(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3})\]\[HYDRA\] \t#(\d+) :")


def decode_seconds(run_dir: Path) -> tuple[float, float]:
    """(decode wall of the samples, decode wall of the baselines this run computed itself)."""
    spec = base = 0.0
    for line in (run_dir / "samples.jsonl").read_text().splitlines():
        record = json.loads(line)
        spec += record["wall_s"]
        baseline = record.get("baseline")
        if baseline and not baseline.get("cached"):
            base += baseline["wall_s"]
    return spec, base


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sweep", default="draft_length")
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--limit", type=int, default=3)
    parser.add_argument("--max-new-tokens", type=int, default=64)
    parser.add_argument("--extra", nargs="*", default=[], help="more overrides")
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "sweep_overhead.json"))
    args = parser.parse_args()

    work = Path(tempfile.mkdtemp(prefix="decodelab_sweep_overhead_"))
    sweep_dir = work / "sweep"
    command = [str(Path(sys.executable).with_name("decodelab")), "sweep", args.sweep, f"model={args.model}",
               f"task.limit={args.limit}", f"task.max_new_tokens={args.max_new_tokens}", "resume=false",
               "progress=false", "print_table=false", "tracking=mlflow",
               f"tracking.mlflow.tracking_uri=sqlite:///{work}/mlruns.db", f"hydra.sweep.dir={sweep_dir}", *args.extra]
    print("$", " ".join(command), flush=True)
    start = time.perf_counter()
    started_at = datetime.now()
    proc = subprocess.run(command, cwd=work, capture_output=True, text=True)
    wall = time.perf_counter() - start
    if proc.returncode != 0:
        print(proc.stderr[-4000:], file=sys.stderr)
        sys.exit(f"sweep failed with exit code {proc.returncode}")

    launches = {}
    for line in proc.stderr.splitlines() + proc.stdout.splitlines():
        match = LAUNCH_LINE.match(line)
        if match:
            launches[match.group(2)] = datetime.strptime(match.group(1), "%Y-%m-%d %H:%M:%S,%f")
    jobs = job_dirs(sweep_dir)
    rows = []
    spec_total = base_total = 0.0
    for folder in jobs:
        spec, base = decode_seconds(folder)
        spec_total += spec
        base_total += base
        rows.append({"job": folder.name, "decode_s": round(spec, 2), "baseline_decode_s": round(base, 2)})
    first_launch = min(launches.values()) if launches else None
    before_first_job = (first_launch - started_at).total_seconds() if first_launch else None
    decoding = spec_total + base_total
    outside = wall - decoding
    summary = json.loads((sweep_dir / SWEEP_SUMMARY_FILE).read_text())
    result = {
        "command": " ".join(command[1:]), "jobs": len(jobs), "job_status": summary["counts"],
        "wall_s": round(wall, 1), "decoding_s": round(decoding, 1), "outside_decoding_s": round(outside, 1),
        "outside_decoding_fraction": round(outside / wall, 4),
        "startup_and_preflight_s": round(before_first_job, 1) if before_first_job is not None else None,
        "outside_per_job_s": round((outside - (before_first_job or 0.0)) / max(len(jobs), 1), 2),
        "per_job": rows,
    }
    from decodelab.experiment.fingerprint import environment_fingerprint

    result["fingerprint"] = environment_fingerprint(seeds={}, threads=None)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2, default=str) + "\n")
    print(f"jobs: {len(jobs)} ({summary['counts']})")
    print(f"wall {wall:.1f} s = decoding {decoding:.1f} s + outside decoding {outside:.1f} s "
          f"({100 * outside / wall:.1f}% of wall)")
    if before_first_job is not None:
        print(f"  of which before the first job (process start, imports, preflight of every job): "
              f"{before_first_job:.1f} s; per job after that: {result['outside_per_job_s']:.2f} s")
    print(f"written {args.out}")


if __name__ == "__main__":
    main()
