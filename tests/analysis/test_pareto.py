"""Pareto fronts per category, worked out by hand on made-up rows, and the per-category plot and table."""

from __future__ import annotations

from pathlib import Path

from decodelab.analysis.pareto import PLOT_FILE, Row, choose_metric, pareto_fronts, pareto_plot, summary_rows


def row(strategy: str, throughput: float, quality: float, category: str = "qa", drafter: str = "none") -> Row:
    return Row(strategy, drafter, category, quality, throughput, metric="distinct_2", job=strategy)


def labels(rows) -> list:
    return [r.strategy for r in rows]


def test_dominated_rows_are_excluded_per_category():
    rows = [row("greedy", 10.0, 0.5), row("beam", 4.0, 0.8), row("sample", 9.0, 0.4),  # sample: greedy beats it
            row("dola", 3.0, 0.7),  # beam beats it on both
            row("fast", 20.0, 0.1),
            row("greedy", 10.0, 0.2, "math"), row("beam", 4.0, 0.9, "math"), row("mbr", 2.0, 0.9, "math")]
    fronts = pareto_fronts(rows)
    assert list(fronts) == ["math", "qa"]
    assert labels(fronts["qa"]) == ["beam", "greedy", "fast"]  # by throughput
    # Equal quality, slower: mbr is beaten by beam (as good on one axis, better on the other).
    assert labels(fronts["math"]) == ["beam", "greedy"]


def test_ties_on_both_axes_are_all_kept_ties_on_one_are_not():
    rows = [row("a", 5.0, 0.5), row("b", 5.0, 0.5), row("c", 5.0, 0.4), row("d", 4.0, 0.5), row("e", 1.0, 0.9)]
    assert labels(pareto_fronts(rows)["qa"]) == ["e", "a", "b"]
    assert labels(pareto_fronts([row("only", 1.0, 0.0)])["qa"]) == ["only"] and pareto_fronts([]) == {}


def test_metric_preference_and_rows_from_a_summary():
    summaries = [{"rouge_l/summarization": 0.3, "distinct_2/summarization": 0.9, "exact_match/rag": 1.0,
                  "distinct_2/qa": 0.7, "distinct_2/rag": 0.5},
                 {"distinct_2/summarization": 0.8, "exact_match/math": float("nan"),
                  "mauve/translation": 0.7, "distinct_2/translation": 0.9}]
    assert [choose_metric(summaries, c) for c in ("summarization", "rag", "qa", "math", "translation", "none")] == [
        "rouge_l", "exact_match", "distinct_2", None, "mauve", None]
    summary = {"rouge_l/summarization": 0.25, "throughput_tok_s/summarization": 40.0,
               "target_forwards_per_token/summarization": 0.5, "aux_forwards_per_token/summarization": 1.0,
               "distinct_2/qa": 0.6, "throughput_tok_s/qa": 30.0}
    rows = summary_rows("3", "cad", "suffix", summary, {"summarization": "rouge_l", "qa": "distinct_2",
                                                         "rag": "exact_match"})
    assert rows == [Row("cad", "suffix", "summarization", 0.25, 40.0, 1.5, "rouge_l", "3"),
                    Row("cad", "suffix", "qa", 0.6, 30.0, None, "distinct_2", "3")]  # no rag: not in the summary
    assert rows[0].label == "cad|suffix"


def test_plot_file_is_written(tmp_path: Path):
    rows = [row("greedy", 10.0, 0.5), row("beam", 4.0, 0.8), row("greedy", 10.0, 0.2, "math"),
            row("beam", 4.0, 0.9, "math"), row("greedy", 8.0, 0.3, "rag"), row("top_p", 9.0, 0.6, "rag"),
            row("greedy", 12.0, 0.4, "translation"), row("greedy", 11.0, 0.4, "translation", drafter="suffix")]
    path = pareto_plot(rows, tmp_path / PLOT_FILE)
    from PIL import Image

    with Image.open(path) as image:
        image.verify()
        assert image.format == "PNG" and image.size[0] > 600 and image.size[1] > 300  # 3 x 2 panels


def _job(folder: Path, strategy: str, drafter: str, per_category: dict) -> None:
    import json

    import yaml

    folder.mkdir(parents=True)
    (folder / "config.yaml").write_text(yaml.safe_dump({"strategy": {"name": strategy}, "drafter": {"name": drafter},
                                                        "output_dir": str(folder)}))
    summary = {"status": "FINISHED", "num_samples": 2, "drafted_tokens": 0}
    for category, values in per_category.items():
        summary[f"num_samples/{category}"] = 1
        summary.update({f"{key}/{category}": value for key, value in values.items()})
    (folder / "summary.json").write_text(json.dumps(summary))


def test_report_has_the_pareto_table_and_plot(tmp_path: Path, capsys):
    """A made-up sweep folder: the report's table per category names its metric, marks the front, and the
    CLI says which metric each category's front is taken on."""
    from decodelab.analysis.report import write_report
    from decodelab.cli.report import cli

    sweep = tmp_path / "sweep"
    _job(sweep / "0", "greedy", "none", {"summarization": {"rouge_l": 0.3, "distinct_2": 0.5, "throughput_tok_s": 50.0,
                                                           "target_forwards_per_token": 1.0},
                                         "qa": {"distinct_2": 0.4, "throughput_tok_s": 60.0}})
    _job(sweep / "1", "beam", "none", {"summarization": {"rouge_l": 0.4, "distinct_2": 0.9, "throughput_tok_s": 20.0,
                                                         "target_forwards_per_token": 1.0},
                                       "qa": {"distinct_2": 0.3, "throughput_tok_s": 30.0}})
    _job(sweep / "2", "cad", "suffix", {"summarization": {"rouge_l": 0.2, "distinct_2": 0.6, "throughput_tok_s": 40.0,
                                                          "target_forwards_per_token": 0.5,
                                                          "aux_forwards_per_token": 0.5},
                                        "qa": {"distinct_2": 0.5, "throughput_tok_s": 10.0}})
    result = write_report(sweep, tmp_path / "rep", log_to_mlflow=False)
    assert result["pareto_metrics"] == {"qa": "distinct_2", "summarization": "rouge_l"}
    assert (tmp_path / "rep" / PLOT_FILE) in result["plots"]
    markdown = result["markdown"].read_text(encoding="utf-8")
    section = markdown.split("## Pareto front per category (quality vs throughput)\n\n")[1].split("\n\n")[0]
    lines = [[c.strip() for c in line.strip("|").split("|")] for line in section.splitlines()[2:]]
    assert lines == [
        ["qa", "distinct_2", "0", "greedy", "none", "0.400", "60.00", "—", "yes"],
        ["qa", "distinct_2", "2", "cad", "suffix", "0.500", "10.00", "—", "yes"],
        ["qa", "distinct_2", "1", "beam", "none", "0.300", "30.00", "—", ""],
        ["summarization", "rouge_l", "0", "greedy", "none", "0.300", "50.00", "1.00", "yes"],
        ["summarization", "rouge_l", "1", "beam", "none", "0.400", "20.00", "1.00", "yes"],
        ["summarization", "rouge_l", "2", "cad", "suffix", "0.200", "40.00", "1.00", ""]]
    cli([str(sweep), "--out", str(tmp_path / "rep2")])
    out = capsys.readouterr().out
    assert "Pareto quality metric per category: qa=distinct_2, summarization=rouge_l" in out
    assert f"wrote {tmp_path.resolve() / 'rep2' / PLOT_FILE}" in out
