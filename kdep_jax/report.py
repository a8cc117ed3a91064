"""Transfer results of several runs in one table, as in the paper: mean top-1 over seeds per dataset, and the
average over datasets; plus the accuracy curves.

    python -m kdep_jax.report runs/cifar100_kdep runs/cifar100_scratch runs/demo --output runs/report

Each run directory holds a `results.json` (a list of rows with at least `init`, `dataset` and `top1`; a
transfer workdir holds one row, a demo/KDEP workdir one per transfer it ran). Writes `results.md`,
`results.csv` and `curves.png` into the output directory and prints the markdown. The functions
`gather_rows`, `summarize`, `to_markdown`, `to_csv` and `plot_curves` work the same from a notebook.
"""
from __future__ import annotations

import argparse
import csv
import dataclasses
import io
import json
import math
import sys

from etils import epath

from kdep_jax.errors import UserError

RESULTS_FILE = "results.json"
METRICS_FILE = "metrics.jsonl"
REQUIRED_KEYS = ("init", "dataset", "top1")
# Two rows with the same values here describe the same run; with different values, different seeds or runs.
RUN_KEYS = ("init", "source", "arch", "linear_probe", "dataset", "epochs", "seed")


class ReportError(UserError):
    """A results file that is missing or not a list of result rows; the message names the file."""


@dataclasses.dataclass(frozen=True)
class Cell:
    mean: float
    std: float | None  # sample standard deviation over seeds; None for a single seed
    count: int


@dataclasses.dataclass(frozen=True)
class TableRow:
    label: str  # the initialisation: its kind and source tag, arch, and "linear probe" when it was one
    cells: dict[str, Cell]  # dataset -> cell; datasets this init was not run on are absent
    average: float | None  # mean of the cells over all of the table's datasets; None when one is missing


@dataclasses.dataclass(frozen=True)
class Table:
    datasets: list[str]
    rows: list[TableRow]


def read_rows(path) -> list[dict]:
    """The rows of one results.json, checked, so that a wrong file fails here with its name, not later."""
    path = epath.Path(path)
    if not path.exists():
        raise ReportError(f"{path} does not exist: pass run directories whose transfer has finished (the "
                          f"transfer stage writes {RESULTS_FILE} into its workdir).")
    try:
        rows = json.loads(path.read_text())
    except json.JSONDecodeError as error:
        raise ReportError(f"{path} is not JSON ({error}); it is not a {RESULTS_FILE} written by kdep_jax.") from None
    if not isinstance(rows, list) or not rows:
        raise ReportError(f"{path} holds a {type(rows).__name__}{'' if rows else ' (empty)'}, not a list of result "
                          f"rows; it is not a {RESULTS_FILE} written by kdep_jax.")
    for index, row in enumerate(rows):
        missing = [key for key in REQUIRED_KEYS if not isinstance(row, dict) or key not in row]
        if missing or isinstance(row["top1"], bool) or not isinstance(row["top1"], (int, float)):
            raise ReportError(f"{path}: row {index} ({json.dumps(row)[:200]}) needs {', '.join(REQUIRED_KEYS)} "
                              f"with a numeric top1 (missing: {', '.join(missing) or 'none'}); it is not a "
                              f"{RESULTS_FILE} written by kdep_jax.")
    return rows


def gather_rows(dirs) -> list[dict]:
    """All rows of the runs' results.json files; the same run given twice is an error, not a second seed."""
    rows, seen = [], {}
    for directory in dirs:
        path = epath.Path(directory) / RESULTS_FILE
        for row in read_rows(path):
            key = tuple(row.get(name) for name in RUN_KEYS)
            if key in seen:
                raise ReportError(f"{path} and {seen[key]} both hold the run {json.dumps(dict(zip(RUN_KEYS, key)))}: "
                                  f"pass each run once (a demo workdir already holds its transfer_* runs).")
            seen[key] = path
            rows.append(row)
    return rows


def row_label(row: dict) -> str:
    """What the table's row is about: runs that differ only in seed share it (never runs of other budgets)."""
    parts = [row.get("source") or row["init"]]
    if row.get("arch"):
        parts.append(row["arch"])
    if row.get("linear_probe"):
        parts.append("linear probe")
    if row.get("epochs") is not None:
        parts.append(f"{row['epochs']} epochs")
    return " · ".join(parts)


def summarize(rows: list[dict]) -> Table:
    """Mean (and std, count) of top-1 over seeds for each (init, dataset); rows and datasets in first-seen order."""
    values: dict[str, dict[str, list[float]]] = {}
    datasets: list[str] = []
    for row in rows:
        values.setdefault(row_label(row), {}).setdefault(row["dataset"], []).append(float(row["top1"]))
        if row["dataset"] not in datasets:
            datasets.append(row["dataset"])
    table_rows = []
    for label, by_dataset in values.items():
        cells = {dataset: _cell(top1s) for dataset, top1s in by_dataset.items()}
        complete = all(dataset in cells for dataset in datasets)
        average = sum(cells[dataset].mean for dataset in datasets) / len(datasets) if complete else None
        table_rows.append(TableRow(label, cells, average))
    return Table(datasets, table_rows)


def _cell(top1s: list[float]) -> Cell:
    mean = sum(top1s) / len(top1s)
    std = math.sqrt(sum((x - mean) ** 2 for x in top1s) / (len(top1s) - 1)) if len(top1s) > 1 else None
    return Cell(mean, std, len(top1s))


def _format_cell(cell: Cell | None) -> str:
    if cell is None:
        return "–"
    spread = f" ± {cell.std:.2f}" if cell.std is not None else ""
    return f"{cell.mean:.2f}{spread} (n={cell.count})"


def to_markdown(table: Table) -> str:
    """A markdown table: top-1 (%) mean ± std over seeds (n = seeds), and the average over datasets."""
    header = ["init", *table.datasets, "average"]
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join(["---"] + ["---:"] * (len(header) - 1)) + "|"]
    for row in table.rows:
        cells = [_format_cell(row.cells.get(dataset)) for dataset in table.datasets]
        average = "–" if row.average is None else f"{row.average:.2f}"
        lines.append("| " + " | ".join([row.label, *cells, average]) + " |")
    return "\n".join(lines) + "\n"


def to_csv(table: Table) -> str:
    """The same table for spreadsheets: per dataset its mean, std and seed count as separate columns."""
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(["init", *[f"{d}{suffix}" for d in table.datasets for suffix in ("", " std", " n")], "average"])
    for row in table.rows:
        values = []
        for dataset in table.datasets:
            cell = row.cells.get(dataset)
            values += ["", "", 0] if cell is None else [cell.mean, "" if cell.std is None else cell.std, cell.count]
        writer.writerow([row.label, *values, "" if row.average is None else row.average])
    return buffer.getvalue()


def comparison_table(rows: list[dict], pretraining: dict[str, dict]) -> str:
    """The methods comparison (`configs/demo.py:compare`) as markdown: per pre-training method (and scratch), its
    wall time and the images its student saw, and the downstream top-1 mean ± std over seeds."""
    lines = ["| method | pre-training wall time | images seen | downstream top-1 (mean ± std over seeds) |",
             "|---|---:|---:|---:|"]
    methods = list(dict.fromkeys(row["method"] for row in rows))
    for method in methods:
        cell = _cell([float(row["top1"]) for row in rows if row["method"] == method])
        record = pretraining.get(method)
        wall = f"{record['seconds'] / 60:.1f} min" if record else "–"
        images = f"{record['images']:,}" if record else "–"
        lines.append(f"| {method} | {wall} | {images} | {_format_cell(cell)} |")
    return "\n".join(lines) + "\n"


def curve_runs(dirs) -> list[tuple[str, list[tuple[int, float]]]]:
    """(label, [(step, eval_top1), ...]) for each finished transfer run in `dirs` and their transfer_* subdirs."""
    curves = []
    for directory in map(epath.Path, dirs):
        for run in [directory, *sorted(directory.glob("transfer_*"))]:
            if not (run / METRICS_FILE).exists() or not (run / RESULTS_FILE).exists():
                continue
            metrics = map(json.loads, (run / METRICS_FILE).read_text().splitlines())
            points = [(row["step"], row["eval_top1"]) for row in metrics if "eval_top1" in row]
            rows = read_rows(run / RESULTS_FILE)
            if points and len(rows) == 1:  # a transfer workdir; a demo workdir's rows are in its transfer_* runs
                row = rows[0]
                curves.append((f"{row_label(row)} · {row['dataset']} · seed {row.get('seed', '?')}", points))
    return curves


def plot_curves(curves, path) -> None:
    """Eval top-1 against step, one line per run, as a PNG (matplotlib's object API: no global backend state)."""
    from matplotlib.figure import Figure

    figure = Figure(figsize=(7, 4.5), layout="constrained")
    axes = figure.add_subplot()
    for label, points in curves:
        steps, top1s = zip(*points)
        axes.plot(steps, top1s, marker="o", markersize=3, label=label)
    axes.set(xlabel="step", ylabel="eval top-1 (%)", title="Transfer accuracy")
    axes.grid(alpha=0.3)
    if curves:
        axes.legend(fontsize="small")
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=120)
    epath.Path(path).write_bytes(buffer.getvalue())


def write_report(dirs, output) -> str:
    """Writes results.md, results.csv and curves.png into `output`; returns the markdown."""
    table = summarize(gather_rows(dirs))
    output = epath.Path(output)
    output.mkdir(parents=True, exist_ok=True)
    markdown = to_markdown(table)
    (output / "results.md").write_text(markdown)
    (output / "results.csv").write_text(to_csv(table))
    plot_curves(curve_runs(dirs), output / "curves.png")
    return markdown


def main(argv=None) -> int:
    """CLI entry point; returns the exit code (2 for bad input, with a one-paragraph message)."""
    parser = argparse.ArgumentParser(prog="python -m kdep_jax.report", description=__doc__.split("\n\n")[0])
    parser.add_argument("run_dirs", nargs="+", metavar="RUN_DIR", help=f"workdirs holding a {RESULTS_FILE}")
    parser.add_argument("--output", default=".", help="where results.md, results.csv and curves.png go")
    args = parser.parse_args(argv)
    try:
        print(write_report(args.run_dirs, args.output), end="")
    except ReportError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
