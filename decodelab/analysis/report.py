"""``decodelab report SWEEP``: one page comparing the jobs of a sweep, so nobody has to read logs.

SWEEP is a sweep folder (layout in decodelab/sweep_dir.py) or an MLflow parent run id, whose child runs
(tag ``mlflow.parentRunId``) are the jobs: their config.yaml, summary.json and samples.jsonl artifacts are
downloaded into a temporary folder and read like run folders, so both sources give the same tables.
The report is ``report.md``, ``report.html`` (the same tables, the PNGs embedded by relative path, no
external CSS/JS) and PNG plots, in ``<sweep>/report/`` (``reports/<run id>/`` for a run id) or ``--out``.
When the sweep has an MLflow parent run the files are also logged to it (best effort: the local files
are written first and a tracker failure is only a warning).
"""

from __future__ import annotations

import html
import json
import math
import re
import tempfile
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple

import yaml

from decodelab.analysis import pareto
from decodelab.experiment import plots
from decodelab.drafters.registry import REGISTRY
from decodelab.config import DEFAULT_TRACKING_URI
from decodelab.errors import UserError, warn
from decodelab.tracking.sweep_folder import (MULTIRUN_DIR, is_sweep, job_dirs, named_sweeps, read_sweep_meta,
                                             run_dirs, sweep_names)
from decodelab.experiment.telemetry import acceptance_stats, merge_steps
from decodelab.tracking.run_folder import (CONFIG_FILE, FINISHED, SAMPLES_FILE, SUMMARY_FILE, FolderError,
                                          RunFolder, write_json)
from decodelab.tracking.mlflow_remote import RUN_DIR_TAG, flatten

REPORT_FOLDER = "report"
MISSING = "—"
QUALITY_KEYS = ("rouge_l", "exact_match", "pass@1")
# Always different (output_dir) or shown in a column of its own (drafter.name).
IGNORED_CONFIG_KEYS = ("output_dir", "drafter.name")
# Shown once above the tables when every job shares them: what the numbers were measured on.
SETTING_KEYS = ("model.name", "backend.device", "backend.dtype", "strategy.name", "task.name", "task.limit",
                "task.max_new_tokens", "baseline")
MLFLOW_RUN_ID = re.compile(r"[0-9a-f]{32}")
PLOT_FILES = ("speedup_vs_draft_length.png", "acceptance_histograms.png", "per_position_acceptance.png",
              "concurrency.png")
CONCURRENCY_KEY = "task.concurrency"
# Serving metrics against concurrency: (summary key, panel label).
CONCURRENCY_PANELS = (("batch_throughput_tok_s", "throughput (tok/s, all requests of a batch)"),
                      ("tpot_s", "mean TPOT (ms)"), ("mean_accepted_length", "tau (tokens per step)"))


@dataclass
class Job:
    """One job of the sweep as read from its run folder."""

    name: str
    run_dir: Path
    config: Dict[str, Any]
    summary: Dict[str, Any]
    status: str
    error: Optional[str]
    varied: Dict[str, Any] = field(default_factory=dict)  # this job's values of the keys that vary in the sweep

    @property
    def drafter(self) -> str:
        drafter = self.config.get("drafter")
        return str(drafter["name"]) if isinstance(drafter, dict) and drafter.get("name") else "?"

    @property
    def strategy(self) -> str:
        strategy = self.config.get("strategy")
        return str(strategy["name"]) if isinstance(strategy, dict) and strategy.get("name") else "?"

    @property
    def finished(self) -> bool:
        return self.status == FINISHED

    @property
    def label(self) -> str:
        """Short name for plot legends: job, drafter and the varied values."""
        extra = [f"{k.rsplit('.', 1)[-1]}={format_value(v)}" for k, v in self.varied.items()]
        return " ".join([f"{self.name}: {self.drafter}", *extra])

    def metric(self, key: str, category: Optional[str] = None) -> Optional[float]:
        """A finite number from summary.json (``key/<category>`` per category), else None."""
        value = self.summary.get(key if category is None else f"{key}/{category}")
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            return None
        return float(value)


@dataclass
class Table:
    title: str
    headers: List[str]
    rows: List[List[str]]


@dataclass
class Plot:
    title: str
    file: Optional[str]  # None: skipped
    note: str  # what it shows, or why it was skipped


def load_job(run_dir: Path, name: str) -> Job:
    """A run folder with config.yaml but no summary.json is a job that never finished."""
    folder = RunFolder(run_dir)
    try:
        config = folder.config()
    except FolderError:
        config = {}
    status, error, summary = folder.status()
    return Job(name, run_dir, config, summary, status, error)


def varied_keys(configs: Sequence[Dict[str, Any]]) -> List[str]:
    """Flattened config keys whose values differ between the jobs that have them.

    A key only some drafters have (``drafter.num_speculative_tokens``) varies only when those jobs disagree,
    so a sweep over drafters lists the drafter, not every option of every drafter.
    """
    flat = [flatten(config, ".") for config in configs]
    keys = list(dict.fromkeys(key for f in flat for key in f))
    out = []
    for key in keys:
        if key in IGNORED_CONFIG_KEYS:
            continue
        values = {json.dumps(f[key], sort_keys=True, default=str) for f in flat if key in f}
        if len(values) > 1:
            out.append(key)
    return out


def format_value(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, (list, dict)):
        return json.dumps(value)
    return str(value)


def _num(value: Optional[float], digits: int = 3) -> str:
    return MISSING if value is None else f"{value:.{digits}f}"


def _speedup_cell(job: Job, category: Optional[str]) -> str:
    speedup = job.metric("speedup", category)
    if speedup is None:
        return MISSING
    low, high = job.metric("speedup_ci_low", category), job.metric("speedup_ci_high", category)
    return _num(speedup) + (f" [{low:.3f}, {high:.3f}]" if low is not None and high is not None else "")


def _categories(jobs: Sequence[Job]) -> List[str]:
    return sorted({key.split("/", 1)[1] for job in jobs for key in job.summary if key.startswith("num_samples/")})


def results_table(jobs: Sequence[Job], varied: Sequence[str], category: Optional[str]) -> Table:
    """One row per finished job: speedup with its CI, tau, alpha, losslessness, quality, throughput."""
    quality = [q for q in QUALITY_KEYS if any(job.metric(q, category) is not None for job in jobs)]
    headers = ["job", "drafter", *varied, "speedup [95% CI]", "tau", "alpha", "lossless", *quality, "tok/s", "n"]
    rows = []
    for job in jobs:
        if category is not None and job.metric("num_samples", category) is None:
            continue
        rows.append([job.name, job.drafter, *(format_value(job.varied[k]) if k in job.varied else MISSING
                                              for k in varied),
                     _speedup_cell(job, category), _num(job.metric("mean_accepted_length", category)),
                     _num(job.metric("acceptance_rate", category)), _num(job.metric("lossless_rate", category)),
                     *(_num(job.metric(q, category)) for q in quality),
                     _num(job.metric("throughput_tok_s", category), 2), _num(job.metric("num_samples", category), 0)])
    return Table(f"Results: {category or 'overall'}", headers, rows)


def pareto_metrics(jobs: Sequence[Job]) -> Dict[str, str]:
    """Category -> the quality key its Pareto front is taken on (decodelab/analysis/pareto.py)."""
    chosen = {c: pareto.choose_metric([job.summary for job in jobs], c) for c in _categories(jobs)}
    return {category: metric for category, metric in chosen.items() if metric}


def pareto_rows(jobs: Sequence[Job]) -> List[pareto.Row]:
    metrics = pareto_metrics(jobs)
    return [row for job in jobs for row in pareto.summary_rows(job.name, job.strategy, job.drafter, job.summary, metrics)]


def pareto_table(jobs: Sequence[Job]) -> Table:
    """Every finished job per category on that category's quality metric; front: no job is faster and better."""
    rows = pareto_rows(jobs)
    fronts = {id(row) for front in pareto.pareto_fronts(rows).values() for row in front}
    ordered = sorted(rows, key=lambda r: (r.category, id(r) not in fronts, -r.throughput))
    return Table("Pareto front per category (quality vs throughput)",
                 ["category", "metric", "job", "strategy", "drafter", "quality", "tok/s", "fwd/tok", "front"],
                 [[r.category, r.metric, r.job, r.strategy, r.drafter, _num(r.quality), _num(r.throughput, 2),
                   _num(r.forwards_per_token, 2), "yes" if id(r) in fronts else ""] for r in ordered])


def failures_table(jobs: Sequence[Job], varied: Sequence[str]) -> Table:
    headers = ["job", "drafter", *varied, "status", "error"]
    rows = [[job.name, job.drafter, *(format_value(job.varied[k]) if k in job.varied else MISSING for k in varied),
             job.status, " ".join(str(job.error).split()) if job.error else MISSING]
            for job in jobs if not job.finished]
    return Table("Failed and unfinished jobs", headers, rows)


# ---------------------------------------------------------------------------------------------- plots

def _acceptance(job: Job) -> Tuple[List[int], List[float]]:
    """Accepted-per-step histogram and per-position acceptance: from summary.json, else from the samples."""
    histogram = job.summary.get("accepted_histogram")
    per_position = job.summary.get("per_position_acceptance")
    if not isinstance(per_position, list):
        positions = []
        while job.metric(f"acceptance_rate_pos_{len(positions)}") is not None:
            positions.append(job.metric(f"acceptance_rate_pos_{len(positions)}"))
        per_position = positions or None
    if isinstance(histogram, list) and per_position is not None:
        return histogram, per_position
    if job.metric("drafted_tokens") == 0:
        return [], []
    stats = acceptance_stats(merge_steps(RunFolder(job.run_dir).samples()))
    return (histogram if isinstance(histogram, list) else stats["accepted_histogram"],  # type: ignore[return-value]
            per_position if per_position is not None else stats["per_position_acceptance"])


def draft_length_keys() -> List[str]:
    """Every config key that holds a draft length: the run-level one and each drafter's own field."""
    return ["draft_length"] + sorted({f"drafter.{cls.draft_length_key}" for cls in REGISTRY.values()
                                      if cls.draft_length_key})


def _configured_length(job: Job) -> Tuple[Optional[str], Optional[float]]:
    """The config key holding this job's draft length and its value (None, None for drafters without one)."""
    flat = flatten(job.config, ".")
    drafter = REGISTRY.get(str(flat.get("drafter.name")))
    # The run-level draft_length first: when set it overrides the drafter's own field.
    keys = ["draft_length"] + ([f"drafter.{drafter.draft_length_key}"] if drafter and drafter.draft_length_key else [])
    for key in keys:
        if isinstance(flat.get(key), (int, float)) and not isinstance(flat[key], bool):
            return key, float(flat[key])
    return None, None


def _line(job: Job, keys: Sequence[str]) -> str:
    """A plot line's label: the drafter and this job's values of ``keys`` (those it has)."""
    return " ".join([job.drafter] + [f"{k.rsplit('.', 1)[-1]}={format_value(job.varied[k])}"
                                     for k in keys if k in job.varied])


def _speedup_plot(jobs: Sequence[Job], varied: Sequence[str], out_dir: Path) -> Plot:
    title = "Speedup vs draft length"
    measured = [job for job in jobs if job.metric("speedup") is not None]
    if not measured:
        return Plot(title, None, "no finished job has a speedup (it needs a drafter other than none and a baseline)")
    # The configured length when the sweep varies it (every plotted job must have one), else the measured one.
    lengths = {job.name: _configured_length(job) for job in measured}
    length_keys = draft_length_keys()
    configured = (any(k in length_keys for k in varied)
                  and all(value is not None for _, value in lengths.values()))
    other = [k for k in varied if k not in length_keys]
    lines: Dict[str, List[plots.ErrorPoint]] = {}
    for job in measured:
        x = lengths[job.name][1] if configured else job.metric("mean_draft_length")
        if x is None:
            continue
        lines.setdefault(_line(job, other), []).append((x, job.metric("speedup") or 0.0,
                                                        job.metric("speedup_ci_low"), job.metric("speedup_ci_high")))
    if not lines:
        return Plot(title, None, "no job with a speedup records its draft length")
    used = dict.fromkeys(str(key).rsplit(".", 1)[-1] for key, _ in lengths.values())
    xlabel = (f"configured draft length ({' / '.join(used)})" if configured
              else "mean draft length per step (measured)")
    plots.speedup_plot(lines, out_dir / PLOT_FILES[0], xlabel, title)
    return Plot(title, PLOT_FILES[0], f"One line per drafter (and other varied settings); x: {xlabel}; "
                                      "error bars: bootstrap 95% interval over prompts; dashed: the AR baseline.")


def _concurrency_plot(jobs: Sequence[Job], varied: Sequence[str], out_dir: Path) -> List[Plot]:
    """Throughput, TPOT and tau against task.concurrency, one line per drafter (and other varied settings):
    only for sweeps that vary the concurrency."""
    if CONCURRENCY_KEY not in varied:
        return []
    title = "Serving metrics vs concurrency"
    other = [k for k in varied if k not in (CONCURRENCY_KEY, "drafter")]
    panels: Dict[str, Dict[str, List[Tuple[float, float]]]] = {label: {} for _, label in CONCURRENCY_PANELS}
    for job in jobs:
        concurrency = flatten(job.config, ".").get(CONCURRENCY_KEY)
        line = _line(job, other)
        for key, label in CONCURRENCY_PANELS:
            value = job.metric(key)
            if value is not None and isinstance(concurrency, int):
                panels[label].setdefault(line, []).append((concurrency, value * 1000 if key == "tpot_s" else value))
    panels = {label: lines for label, lines in panels.items() if lines}
    if not panels:
        return [Plot(title, None, "no finished job records batch throughput, TPOT or tau")]
    plots.panels_plot(panels, out_dir / PLOT_FILES[3], "concurrent requests (task.concurrency)", title)
    return [Plot(title, PLOT_FILES[3], "One line per drafter: throughput of all requests decoded together (batch "
                                       "tokens over the batch's engine time), mean TPOT per request, and tau "
                                       "(drafter=none: 1).")]


def _acceptance_plots(jobs: Sequence[Job], out_dir: Path) -> List[Plot]:
    series = [(job.label, *_acceptance(job)) for job in jobs]
    series = [(label, hist, pos) for label, hist, pos in series if pos and sum(hist)]
    titles = ("Accepted draft tokens per step", "Per-position acceptance")
    if not series:
        reason = "no finished job drafted any tokens"
        return [Plot(titles[0], None, reason), Plot(titles[1], None, reason)]
    plots.histogram_plot({label: hist for label, hist, _ in series}, out_dir / PLOT_FILES[1], titles[0])
    plots.per_position_plot({label: pos for label, _, pos in series}, out_dir / PLOT_FILES[2], titles[1])
    return [Plot(titles[0], PLOT_FILES[1], "Share of verification steps that accepted 0, 1, 2, ... drafted tokens."),
            Plot(titles[1], PLOT_FILES[2], "Acceptance rate of the i-th drafted token, given it was verified.")]


def _pareto_plots(jobs: Sequence[Job], out_dir: Path) -> List[Plot]:
    out = []
    for quality in QUALITY_KEYS:
        points = [(job.name, job.metric("throughput_tok_s"), job.metric(quality)) for job in jobs]
        points = [(label, x, y) for label, x, y in points if x is not None and y is not None]
        if not points:
            continue
        file = f"pareto_{quality.replace('@', '_at_')}.png"
        title = f"Speed vs quality ({quality})"
        plots.pareto_plot(points, out_dir / file, "throughput (tok/s)", quality, title)  # type: ignore[arg-type]
        out.append(Plot(title, file, "Points are labelled by job (see the tables); red: Pareto-optimal jobs "
                                        "(no other job is both faster and better), connected."))
    rows = pareto_rows(jobs)
    if len({row.job for row in rows}) > 1:  # one job alone is no comparison
        title = "Quality vs throughput per category"
        pareto.pareto_plot(rows, out_dir / pareto.PLOT_FILE, title)
        metrics = ", ".join(f"{c}: {m}" for c, m in pareto_metrics(jobs).items())
        out.append(Plot(title, pareto.PLOT_FILE, f"One panel per category, points labelled strategy|drafter; red: "
                                                 f"the Pareto front, connected. Quality metric ({metrics})."))
    if not out:
        return [Plot("Speed vs quality", None, f"no finished job has a quality metric ({', '.join(QUALITY_KEYS)})")]
    return out


def make_plots(jobs: Sequence[Job], varied: Sequence[str], out_dir: Path) -> List[Plot]:
    for stale in [*(out_dir / f for f in PLOT_FILES), *out_dir.glob("pareto_*.png")]:
        stale.unlink(missing_ok=True)  # a plot skipped this time must not show last time's figure
    finished = [job for job in jobs if job.finished]
    return [_speedup_plot(finished, varied, out_dir), *_acceptance_plots(finished, out_dir),
            *_concurrency_plot(finished, varied, out_dir), *_pareto_plots(finished, out_dir)]


# ---------------------------------------------------------------------------------------------- rendering

@dataclass
class Report:
    title: str
    intro: List[str]
    tables: List[Table]
    failures: Table
    plots: List[Plot]


def _md_cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


def render_markdown(report: Report) -> str:
    lines = [f"# {report.title}", "", *(f"{line}  " for line in report.intro), ""]
    for table in [*report.tables, report.failures]:
        lines += [f"## {table.title}", ""]
        if not table.rows:
            lines += ["None." if table is report.failures else "No finished jobs.", ""]
            continue
        lines.append("| " + " | ".join(map(_md_cell, table.headers)) + " |")
        lines.append("|" + "|".join("---" for _ in table.headers) + "|")
        lines += ["| " + " | ".join(map(_md_cell, row)) + " |" for row in table.rows]
        lines.append("")
    lines += ["## Plots", ""]
    for plot in report.plots:
        lines += [f"### {plot.title}", ""]
        lines += [f"![{plot.title}]({plot.file})", "", plot.note, ""] if plot.file else [f"_Skipped: {plot.note}._", ""]
    return "\n".join(lines)


_CSS = ("body{font-family:system-ui,sans-serif;margin:2em;max-width:1400px;color:#222}"
        "table{border-collapse:collapse;margin:0.5em 0 1.5em}"
        "th,td{border:1px solid #ccc;padding:3px 8px;text-align:right;white-space:nowrap}"
        "th{background:#f0f0f0}td:first-child,td:nth-child(2){text-align:left}"
        "td.error{text-align:left;white-space:normal;max-width:60em}img{max-width:100%;border:1px solid #eee}"
        ".skipped{color:#888;font-style:italic}")


def render_html(report: Report) -> str:
    esc = html.escape
    parts = ["<!DOCTYPE html>", '<html lang="en"><head><meta charset="utf-8">', f"<title>{esc(report.title)}</title>",
             f"<style>{_CSS}</style></head><body>", f"<h1>{esc(report.title)}</h1>",
             "<p>" + "<br>".join(esc(line) for line in report.intro) + "</p>"]
    for table in [*report.tables, report.failures]:
        parts.append(f"<h2>{esc(table.title)}</h2>")
        if not table.rows:
            parts.append("<p>None.</p>" if table is report.failures else "<p>No finished jobs.</p>")
            continue
        parts.append("<table><thead><tr>" + "".join(f"<th>{esc(h)}</th>" for h in table.headers) + "</tr></thead><tbody>")
        for row in table.rows:
            cells = [f'<td class="error">{esc(c)}</td>' if h == "error" else f"<td>{esc(c)}</td>"
                     for h, c in zip(table.headers, row)]
            parts.append("<tr>" + "".join(cells) + "</tr>")
        parts.append("</tbody></table>")
    parts.append("<h2>Plots</h2>")
    for plot in report.plots:
        parts.append(f"<h3>{esc(plot.title)}</h3>")
        if plot.file:
            parts.append(f'<img src="{esc(plot.file)}" alt="{esc(plot.title)}"><p>{esc(plot.note)}</p>')
        else:
            parts.append(f'<p class="skipped">Skipped: {esc(plot.note)}.</p>')
    parts.append("</body></html>")
    return "\n".join(parts) + "\n"


def build_report(jobs: List[Job], title: str, source: str, out_dir: Path) -> Report:
    """Tables and plots for ``jobs`` (plots written into ``out_dir``); fills each job's ``varied``."""
    varied = varied_keys([job.config for job in jobs])
    for job in jobs:
        flat = flatten(job.config, ".")
        job.varied = {k: flat[k] for k in varied if k in flat}
    finished = [job for job in jobs if job.finished]
    counts = {status: sum(job.status == status for job in jobs) for status in dict.fromkeys(j.status for j in jobs)}
    flat_all = [flatten(job.config, ".") for job in jobs]
    drafter_varies = ["drafter.name"] if len({job.drafter for job in jobs}) > 1 else []
    settings = [f"{k}={format_value(flat_all[0][k])}" for k in SETTING_KEYS
                if flat_all and k in flat_all[0] and k not in varied and all(k in f for f in flat_all)]
    intro = [f"Source: {source}",
             f"Jobs: {len(jobs)} ({', '.join(f'{n} {s.lower()}' for s, n in counts.items())})",
             "Varied across jobs: " + (", ".join([*drafter_varies, *varied]) or "nothing"),
             "Same in every job: " + (", ".join(settings) or MISSING),
             "speedup: throughput over the autoregressive baseline of the same config, with its bootstrap 95% "
             "interval over prompts; tau: mean accepted length per verification step (bonus token included); "
             "alpha: accepted / drafted tokens; lossless: share of prompts identical to the baseline; "
             f"tok/s: new tokens / wall time; n: prompts. {MISSING}: not measured.",
             f"Generated {datetime.now().isoformat(timespec='seconds')}"]
    tables = [results_table(finished, varied, None)]
    tables += [results_table(finished, varied, category) for category in _categories(finished)]
    tables.append(pareto_table(finished))
    return Report(title, intro, tables, failures_table(jobs, varied), make_plots(jobs, varied, out_dir))


# ---------------------------------------------------------------------------------------------- sources

def _mlflow_client(tracking_uri: str):
    from decodelab.tracking.mlflow_remote import existing_store_client

    return existing_store_client(tracking_uri)


def _child_runs(client, parent_id: str) -> list:
    from mlflow.entities import ViewType

    experiments = [e.experiment_id for e in client.search_experiments(view_type=ViewType.ALL)]
    runs, token = [], None
    while True:
        page = client.search_runs(experiments, filter_string=f"tags.mlflow.parentRunId = '{parent_id}'",
                                  run_view_type=ViewType.ALL, max_results=1000, page_token=token)
        runs.extend(page)
        token = page.token
        if not token:
            return runs


def _params_config(params: Dict[str, str]) -> Dict[str, Any]:
    """Rebuild a nested config from flattened params (a run that died before logging config.yaml)."""
    config: Dict[str, Any] = {}
    for key, text in params.items():
        try:
            value = yaml.safe_load(text) if text != "None" else None
        except yaml.YAMLError:
            value = text
        node = config
        *parents, leaf = key.split(".")
        for part in parents:
            child = node.setdefault(part, {})
            node = child if isinstance(child, dict) else {}  # flatten never makes a key both leaf and branch
        node[leaf] = value
    return config


def download_sweep(parent_id: str, tracking_uri: str, dest: Path) -> Dict[str, Any]:
    """Child runs of an MLflow parent as run folders under ``dest``, named like their job folders."""
    import mlflow.artifacts
    from mlflow.exceptions import MlflowException

    client = _mlflow_client(tracking_uri)
    try:
        parent = client.get_run(parent_id)
    except MlflowException:
        raise UserError(f"SWEEP: {parent_id} is not a sweep folder nor a run in the MLflow store {tracking_uri}") from None
    children = _child_runs(client, parent_id)
    if not children:
        raise UserError(f"SWEEP: MLflow run {parent_id} has no child runs (tag mlflow.parentRunId); is it a sweep's parent?")
    for child in children:
        name = Path(child.data.tags.get(RUN_DIR_TAG, "")).name or child.info.run_name or child.info.run_id
        folder = dest / name
        if folder.exists():
            folder = dest / f"{name}-{child.info.run_id[:8]}"
        folder.mkdir(parents=True)
        for artifact in (CONFIG_FILE, SUMMARY_FILE, SAMPLES_FILE):
            try:
                mlflow.artifacts.download_artifacts(run_id=child.info.run_id, artifact_path=artifact,
                                                    dst_path=str(folder), tracking_uri=tracking_uri)
            except Exception:  # noqa: BLE001 - a job that died before finishing logged no artifacts
                pass
        if not (folder / CONFIG_FILE).is_file():
            (folder / CONFIG_FILE).write_text(yaml.safe_dump(_params_config(child.data.params), sort_keys=False),
                                              encoding="utf-8")
        if not (folder / SUMMARY_FILE).is_file() and child.info.status in ("FAILED", "KILLED"):
            error = child.data.tags.get("decodelab.error") or f"MLflow run ended {child.info.status} without summary.json"
            write_json(folder / SUMMARY_FILE, {"status": child.info.status, "error": error})
    return {"name": parent.info.run_name, "mlflow_parent_run_id": parent_id, "mlflow_tracking_uri": tracking_uri}


def _folder_jobs(sweep_dir: Path) -> List[Job]:
    jobs = []
    for run_dir in run_dirs(sweep_dir):
        inside = run_dir.parent.resolve() == sweep_dir.resolve()
        jobs.append(load_job(run_dir, run_dir.name if inside else f"{run_dir.name} (reused)"))
    return jobs


def log_to_parent(meta: Dict[str, Any], files: Sequence[Path], default_uri: str) -> Optional[str]:
    """Log the report files to the sweep's MLflow parent run; returns the run id, None if none or it failed."""
    run_id = meta.get("mlflow_parent_run_id")
    if not run_id:
        return None
    uri = meta.get("mlflow_tracking_uri") or default_uri
    try:
        client = _mlflow_client(uri)
        for path in files:
            client.log_artifact(run_id, str(path), artifact_path=REPORT_FOLDER)
    except Exception as err:  # noqa: BLE001 - best effort: the local report is already written
        message = " ".join(str(err).split())[:300]
        warn(f"report not logged to MLflow run {run_id} at {uri}: {message}")
        return None
    return str(run_id)


def _sweep_folder(sweep: str) -> Path:
    """The folder a SWEEP argument names: a sweep folder itself, else the latest folder of a named sweep, given by
    its name (under multirun/) or as multirun/<name>."""
    path = Path(sweep).expanduser()
    if path.is_dir() and (is_sweep(path) or job_dirs(path)):
        return path
    found = named_sweeps(path.name, path.parent) if path.is_dir() else named_sweeps(sweep)
    return found[-1] if found else path


def write_report(sweep: Path | str, out_dir: Optional[Path] = None, tracking_uri: str = DEFAULT_TRACKING_URI,
                 log_to_mlflow: bool = True) -> Dict[str, Any]:
    """Write report.md, report.html and the PNGs for a sweep folder or an MLflow parent run id.

    Returns {"out_dir", "markdown", "html", "plots" (PNG paths), "skipped" (plot title -> reason),
    "jobs" (job name -> status), "mlflow_run_id" (the parent the files were logged to, or None),
    "pareto_metrics" (category -> the quality key of its Pareto front)}.
    """
    sweep_path = _sweep_folder(str(sweep))
    if sweep_path.is_dir():
        jobs = _folder_jobs(sweep_path)
        if not jobs:
            raise UserError(f"SWEEP: {sweep_path} has no job folders (subfolders with config.yaml); is it a sweep folder?")
        meta = read_sweep_meta(sweep_path)
        out = Path(out_dir) if out_dir is not None else sweep_path / REPORT_FOLDER
        return _write(jobs, meta, str(meta.get("name") or sweep_path.resolve().name), str(sweep_path.resolve()),
                      out, tracking_uri, log_to_mlflow)
    if not MLFLOW_RUN_ID.fullmatch(str(sweep)):
        names = sweep_names()
        raise UserError(f"SWEEP: {sweep} is neither a sweep folder, a sweep name under {MULTIRUN_DIR}/ "
                        f"({', '.join(names) if names else 'none found'}) nor an MLflow run id (32 hex characters)")
    with tempfile.TemporaryDirectory(prefix="decodelab-report-") as tmp:
        meta = download_sweep(str(sweep), tracking_uri, Path(tmp))
        jobs = _folder_jobs(Path(tmp))
        out = Path(out_dir) if out_dir is not None else Path("reports") / str(sweep)
        return _write(jobs, meta, str(meta.get("name") or sweep), f"MLflow run {sweep} at {tracking_uri}",
                      out, tracking_uri, log_to_mlflow)


def _write(jobs: List[Job], meta: Dict[str, Any], name: str, source: str, out_dir: Path, tracking_uri: str,
           log_to_mlflow: bool) -> Dict[str, Any]:
    out_dir = out_dir.expanduser().resolve()
    out_dir.mkdir(parents=True, exist_ok=True)
    report = build_report(jobs, f"decodelab sweep report: {name}", source, out_dir)
    markdown, page = out_dir / "report.md", out_dir / "report.html"
    markdown.write_text(render_markdown(report), encoding="utf-8")
    page.write_text(render_html(report), encoding="utf-8")
    pngs = [out_dir / plot.file for plot in report.plots if plot.file]
    logged = log_to_parent(meta, [markdown, page, *pngs], tracking_uri) if log_to_mlflow else None
    return {"out_dir": out_dir, "markdown": markdown, "html": page, "plots": pngs,
            "skipped": {plot.title: plot.note for plot in report.plots if not plot.file},
            "jobs": {job.name: job.status for job in jobs}, "mlflow_run_id": logged,
            "pareto_metrics": pareto_metrics([job for job in jobs if job.finished])}
