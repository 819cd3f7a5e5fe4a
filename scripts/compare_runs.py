"""Compare runs side by side: one row per run, one column per metric, and optionally a chart.

    python scripts/compare_runs.py outputs/multirun/2026-11-25_10-00-00 --sort eval/fid@nfe10
    python scripts/compare_runs.py 'outputs/runs/*' --metrics 'energy_distance' --plot cmp.png
    python scripts/compare_runs.py --trackio-project denoising-zoo --runs 'sweep_.*' --format csv
    python scripts/compare_runs.py --curves train/loss eval/energy_distance@nfe10 --runs 'lr_.*' --out curves.png

A PATH is a metrics.json file, a folder searched recursively for metrics.json files (a sweep
folder holds one per job), or a glob pattern (quote it; '**' spans folders). A run is named by the
run_name in the .hydra/config.yaml beside its metrics.json (sweep jobs get the launcher's
NAME_<job>), else by its folder; runs of the same name get the end of their path (or trackio's
start time) added. With --trackio-project each run shows the last logged value of each metric.

Numeric metrics are the columns; string entries (checkpoint, solver) appear only when --metrics
names them exactly (re.fullmatch). In the chart, metrics named <name>@nfe<N> are drawn as a line
per run against NFE (log x); any other family (<name>@<key>, or a plain name) as grouped bars.

--curves draws each named metric against the training step, one panel per metric and one line per
run, from the per-step logs in trackio's SQLite store (TRACKIO_DIR; --trackio-project, default
denoising-zoo); the table then shows those metrics' last values.
"""

from __future__ import annotations

import argparse
import csv
import difflib
import glob
import io
import json
import math
import re
import sys
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

import yaml
from omegaconf import DictConfig, OmegaConf

from training.cli import exit_code
from training.errors import UserError

if TYPE_CHECKING:
    from trackio.sqlite_storage import SQLiteStorage

Value = float | str
Series = list[tuple[int, float]]  # (step, value), by step
DEFAULT_PROJECT = "denoising-zoo"  # configs/train.yaml trackio.project
NFE = re.compile(r"@nfe(\d+)$")
GLOB_CHARS = frozenset("*?[")


@dataclass(frozen=True)
class Run:
    label: str  # the run's name; unique_labels makes it unique
    origin: tuple[str, ...]  # where the run came from; its tail tells runs of the same name apart
    values: dict[str, Value]
    series: dict[str, Series] = field(default_factory=dict)  # per-step values (trackio runs only)


@dataclass(frozen=True)
class Family:
    """Columns drawn in one panel: ``<name>@<key>`` share ``name``; a plain metric is its own family."""

    name: str
    columns: tuple[str, ...]
    nfe: tuple[int, ...] | None  # the NFE of each column when every key is nfe<N>: a line chart


def natural_key(text: str) -> tuple[Any, ...]:
    """Sort nfe2 before nfe10 and 2_sweep before 10_sweep."""
    return tuple(int(part) if part.isdigit() else part for part in re.split(r"(\d+)", text))


def compile_regex(pattern: str, option: str) -> re.Pattern[str]:
    try:
        return re.compile(pattern)
    except re.error as e:
        raise UserError(f"invalid regular expression for {option} {pattern!r}: {e}") from e


def few(names: Sequence[str], n: int = 8) -> str:
    """A short list for an error message."""
    more = f", ... ({len(names)} in all)" if len(names) > n else ""
    return (", ".join(names[:n]) or "none") + more


# --- runs from metrics.json files --------------------------------------------------------------


def expand(arg: str) -> list[Path]:
    """The metrics.json files one PATH argument stands for."""
    path = Path(arg)
    if path.exists() or not GLOB_CHARS & set(arg):
        if not path.exists():
            raise UserError(f"{arg} does not exist; give a metrics.json file, a run or sweep folder, or a glob pattern")
        matches = [path]
    else:
        matches = [Path(m) for m in sorted(glob.glob(arg, recursive=True), key=natural_key)]
    files = [f for m in matches for f in metrics_files(m)]
    if not files:
        raise UserError(
            f"no metrics.json found under {arg}; give a folder of finished runs "
            "(outputs/runs/<name>, outputs/multirun/<time>) or a metrics.json file"
        )
    return files


def metrics_files(path: Path) -> list[Path]:
    if path.is_file():
        return [path]
    return sorted(path.rglob("metrics.json"), key=lambda f: natural_key(str(f)))


def read_metrics(path: Path) -> dict[str, Value]:
    """Numbers (as floats) and strings of a flat metrics.json; nulls, booleans and nested values are dropped."""
    try:
        data = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise UserError(f"cannot read {path}: {e}; fix or remove that file (or leave its folder out)") from e
    if not isinstance(data, dict):
        raise UserError(f"{path} is not a JSON object of metrics; give metrics.json files written by launcher.py")
    return {k: v if isinstance(v, str) else float(v) for k, v in data.items() if is_value(v)}


def is_number(v: object) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def is_value(v: object) -> bool:
    return isinstance(v, str) or is_number(v)


def load_yaml(path: Path) -> DictConfig:
    try:
        cfg = OmegaConf.load(path)
    except (OSError, yaml.YAMLError) as e:
        raise UserError(f"cannot read {path}: {e}; fix or remove that file") from e
    if not isinstance(cfg, DictConfig):
        raise UserError(f"{path} is not a YAML mapping; fix or remove that file")
    return cfg


def run_name(run_dir: Path) -> str:
    """The name launcher.py gave the run: Hydra's saved run_name, plus ``_<job>`` in a sweep (the
    launcher renames sweep jobs after Hydra has saved the config); else the folder's name."""
    config = run_dir / ".hydra" / "config.yaml"
    if not config.is_file():
        return run_dir.name
    name = OmegaConf.select(load_yaml(config), "run_name", default=None, throw_on_missing=False)
    if not name:
        return run_dir.name
    hydra = run_dir / ".hydra" / "hydra.yaml"
    if hydra.is_file():
        hcfg = load_yaml(hydra)
        if OmegaConf.select(hcfg, "hydra.mode", default=None) == "MULTIRUN":
            return f"{name}_{OmegaConf.select(hcfg, 'hydra.job.num')}"
    return str(name)


def collect_runs(paths: Iterable[str]) -> list[Run]:
    """One run per metrics.json under ``paths``, in the order given; a file found twice counts once."""
    files = dict.fromkeys(f.resolve() for arg in paths for f in expand(arg))
    return [Run(run_name(f.parent), f.parent.parts, read_metrics(f)) for f in files]


# --- runs from trackio -------------------------------------------------------------------------


def storage() -> type[SQLiteStorage]:
    """trackio's store, imported on first use: trackio fixes its folder from TRACKIO_DIR when it is
    imported, so importing this module (e.g. in tests) must not import it."""
    from trackio.sqlite_storage import SQLiteStorage

    return SQLiteStorage


def last_values(logs: Iterable[dict[str, Any]]) -> dict[str, Value]:
    """The last logged value of each numeric metric; trackio returns logs oldest first."""
    last: dict[str, Value] = {}
    for row in logs:
        last.update({k: float(v) for k, v in row.items() if k not in ("step", "timestamp") and is_number(v)})
    return last


def step_series(logs: Iterable[dict[str, Any]]) -> dict[str, Series]:
    """Each numeric metric's (step, value) points, in step order; a step logged twice (a resumed run
    replays the steps after its last checkpoint) keeps the value logged last; rows without a whole step
    are skipped. trackio returns logs oldest first."""
    by_step: dict[str, dict[int, float]] = {}
    for row in logs:
        step = row.get("step")
        if not isinstance(step, int) or isinstance(step, bool):
            continue
        for k, v in row.items():
            if k not in ("step", "timestamp") and is_number(v):
                by_step.setdefault(k, {})[step] = float(v)
    return {k: sorted(points.items()) for k, points in by_step.items()}


def trackio_runs(project: str) -> list[Run]:
    """Every run of a local trackio project, oldest first."""
    store = storage()
    db = store.get_project_db_path(project)
    if not db.exists():
        raise UserError(
            f"no trackio project '{project}' in {db.parent}; projects there: {few(store.get_projects())} "
            "(set TRACKIO_DIR or fix --trackio-project)"
        )
    records = store.get_run_records(project)
    if not records:
        raise UserError(f"trackio project '{project}' has no runs; log a run first or pick another project")
    runs = []
    for r in records:
        logs = store.get_logs(project, run=r["name"], run_id=r.get("id"), scalar_only=True)
        runs.append(Run(str(r["name"]), (str(r.get("created_at") or r.get("id"))[:19],), last_values(logs),
                        step_series(logs)))  # fmt: skip
    return runs


# --- choosing runs, columns and order ----------------------------------------------------------


def matching_runs(pattern: str, runs: Sequence[Run]) -> list[Run]:
    """The runs whose whole name matches ``pattern``."""
    regex = compile_regex(pattern, "--runs")
    kept = [r for r in runs if regex.fullmatch(r.label)]
    if not kept:
        names = list(dict.fromkeys(r.label for r in runs))
        raise UserError(f"no run name matches --runs {pattern!r} (whole name); runs: {few(names)}")
    return kept


def unique_labels(runs: Sequence[Run]) -> list[Run]:
    """Runs of the same name get the shortest tail of their origin that tells them apart."""
    groups: dict[str, list[int]] = {}
    for i, r in enumerate(runs):
        groups.setdefault(r.label, []).append(i)
    labels = [r.label for r in runs]
    for label, members in groups.items():
        if len(members) < 2:
            continue
        origins = [runs[i].origin for i in members]
        tails: list[str] = []
        for k in range(1, max(map(len, origins)) + 1):
            tails = ["/".join(o[-k:]) for o in origins]
            if len(set(tails)) == len(tails):
                break
        for i, tail in zip(members, tails, strict=True):
            labels[i] = f"{label} ({tail})"
    seen: dict[str, int] = {}
    for i, label in enumerate(labels):  # origins that could not tell runs apart: count
        seen[label] = seen.get(label, 0) + 1
        if seen[label] > 1:
            labels[i] = f"{label} #{seen[label]}"
    return [replace(r, label=label) for r, label in zip(runs, labels, strict=True)]


def numeric_columns(runs: Iterable[Run]) -> list[str]:
    names = {k for r in runs for k, v in r.values.items() if isinstance(v, float)}
    return sorted(names, key=natural_key)


def select_columns(runs: Sequence[Run], pattern: str | None) -> list[str]:
    """Numeric metrics that ``pattern`` finds (re.search; all without one), string entries it names exactly."""
    numeric = numeric_columns(runs)
    if pattern is None:
        return numeric
    regex = compile_regex(pattern, "--metrics")
    names = sorted({k for r in runs for k in r.values}, key=natural_key)
    columns = [k for k in names if (regex.search(k) if k in numeric else regex.fullmatch(k))]
    if not columns:
        raise UserError(f"no metric matches --metrics {pattern!r}; metrics: {few(numeric)}")
    return columns


def number(run: Run, metric: str) -> float | None:
    v = run.values.get(metric)
    return v if isinstance(v, float) and not math.isnan(v) else None


def sort_runs(runs: Sequence[Run], metric: str, descending: bool = False) -> list[Run]:
    """Runs by ``metric``, ascending unless ``descending``; runs without it come last either way."""
    available = numeric_columns(runs)
    if metric not in available:
        raise UserError(f"unknown --sort metric {metric!r}; give one of: {few(available)}")
    keyed = [(v, r) for r in runs if (v := number(r, metric)) is not None]
    keyed.sort(key=lambda pair: pair[0], reverse=descending)
    return [r for _, r in keyed] + [r for r in runs if number(r, metric) is None]


# --- output ------------------------------------------------------------------------------------


def cell(value: Value | None, fmt: str) -> str:
    """Markdown: 4 significant digits, whole numbers in full, '-' if missing. CSV: exact, '' if missing."""
    if value is None:
        return "" if fmt == "csv" else "-"
    if isinstance(value, str):
        return value if fmt == "csv" else value.replace("|", "\\|")
    if fmt == "csv":
        return repr(value)
    return str(int(value)) if value.is_integer() and abs(value) < 1e7 else f"{value:.4g}"


def markdown(rows: list[list[str]]) -> str:
    """A markdown table padded to line up in a terminal; the first row is the header."""
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]

    def line(row: list[str]) -> str:
        cells = [c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(row, widths, strict=True))]
        return "| " + " | ".join(cells) + " |"

    rule = "|" + "|".join("-" * (w + 2) if i == 0 else "-" * (w + 1) + ":" for i, w in enumerate(widths)) + "|"
    return "\n".join([line(rows[0]), rule, *map(line, rows[1:])])


def table(runs: Sequence[Run], columns: Sequence[str], fmt: str = "markdown") -> str:
    rows = [["run", *columns]] + [[run.label, *(cell(run.values.get(c), fmt) for c in columns)] for run in runs]
    if fmt == "markdown":
        return markdown(rows)
    buf = io.StringIO()
    csv.writer(buf, lineterminator="\n").writerows(rows)
    return buf.getvalue().rstrip("\n")


def families(columns: Iterable[str]) -> list[Family]:
    """Group ``<name>@<key>`` columns by name; a family whose keys are all nfe<N> is ordered by NFE."""
    groups: dict[str, list[str]] = {}
    for c in columns:
        groups.setdefault(c.rpartition("@")[0] or c, []).append(c)
    out = []
    for name, cols in groups.items():
        matches = [NFE.search(c) for c in cols]
        if all(matches):
            by_nfe = sorted((int(m.group(1)), c) for m, c in zip(matches, cols, strict=True) if m)
            out.append(Family(name, tuple(c for _, c in by_nfe), tuple(n for n, _ in by_nfe)))
        else:
            out.append(Family(name, tuple(cols), None))
    return out


def plot_format(out: Path, option: str = "--plot") -> str:
    """The image format the file name asks for, checked before any work is done."""
    from matplotlib.backend_bases import FigureCanvasBase

    fmt = out.suffix.lstrip(".").lower()
    if fmt not in FigureCanvasBase.get_supported_filetypes():
        raise UserError(f"cannot write a chart as {out.name!r}; end {option} with .png (or .pdf, .svg)")
    return fmt


def plot(runs: Sequence[Run], columns: Sequence[str], out: Path) -> None:
    """One panel per metric family, one colour per run; written atomically (tmp file, then rename)."""
    from matplotlib.lines import Line2D

    numeric = set(numeric_columns(runs))
    fams = families(c for c in columns if c in numeric)
    if not fams:
        raise UserError("nothing to plot: --metrics selects no numeric metric")
    fmt = plot_format(out)
    colors = run_colors(len(runs))
    fig, axes = panel_figure(len(fams), max_cols=3, panel_size=(4.5, 3.4))
    for ax, fam in zip(axes, fams, strict=True):
        (nfe_panel if fam.nfe else bar_panel)(ax, fam, runs, colors)
    handles = [Line2D([], [], color=c, marker="o", label=r.label) for r, c in zip(runs, colors, strict=True)]
    fig.legend(handles=handles, loc="outside right upper", fontsize=8)
    save_chart(fig, out, fmt)


def run_colors(n: int) -> list[Any]:
    """One colour per run, the same in every panel."""
    from matplotlib import colormaps

    cmap = colormaps["tab10" if n <= 10 else "tab20"]
    return [cmap(i % cmap.N) for i in range(n)]


def panel_figure(count: int, max_cols: int, panel_size: tuple[float, float]) -> tuple[Any, list[Any]]:
    """A figure of ``count`` panels in rows of at most ``max_cols``, room on the right for the legend;
    the panels to draw in (the grid's spare ones hidden)."""
    from matplotlib.figure import Figure  # renders through Agg: no GUI backend, no pyplot state

    ncols = min(max_cols, count)
    nrows = math.ceil(count / ncols)
    fig = Figure(figsize=(panel_size[0] * ncols + 2.5, panel_size[1] * nrows), layout="constrained")
    axes = list(fig.subplots(nrows, ncols, squeeze=False).ravel())
    for ax in axes[count:]:
        ax.set_visible(False)
    return fig, axes[:count]


def save_chart(fig: Any, out: Path, fmt: str) -> None:
    """Written atomically (tmp file, then rename): a chart that exists is complete."""
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.tmp")
    fig.savefig(tmp, format=fmt, dpi=120)
    tmp.replace(out)


def nfe_panel(ax: Any, fam: Family, runs: Sequence[Run], colors: Sequence[Any]) -> None:
    """Value against NFE, one line per run; log y when the values span two decades."""
    assert fam.nfe is not None
    ys_all: list[float] = []
    for run, color in zip(runs, colors, strict=True):
        points = [(n, v) for n, c in zip(fam.nfe, fam.columns, strict=True) if (v := number(run, c)) is not None]
        xs, ys = [n for n, _ in points], [v for _, v in points]
        ax.plot(xs, ys, marker="o", color=color, label=run.label)
        ys_all += ys
    ax.set_xscale("log")
    ax.set_xticks(fam.nfe, [str(n) for n in fam.nfe])
    ax.minorticks_off()
    if ys_all and min(ys_all) > 0 and max(ys_all) >= 100 * min(ys_all):
        ax.set_yscale("log")
    ax.set(title=fam.name, xlabel="NFE")
    ax.grid(alpha=0.3)


def bar_panel(ax: Any, fam: Family, runs: Sequence[Run], colors: Sequence[Any]) -> None:
    """One group of bars per column of the family, one bar per run."""
    width = 0.8 / len(runs)
    for i, (run, color) in enumerate(zip(runs, colors, strict=True)):
        offset = (i - (len(runs) - 1) / 2) * width
        xs = [j + offset for j, c in enumerate(fam.columns) if number(run, c) is not None]
        ys = [v for c in fam.columns if (v := number(run, c)) is not None]
        ax.bar(xs, ys, width, color=color, label=run.label)
    keys = [] if fam.columns == (fam.name,) else [c.rpartition("@")[2] for c in fam.columns]
    ax.set_xticks(range(len(keys)), keys)  # a plain metric is one group: no tick
    ax.set_title(fam.name)
    ax.grid(axis="y", alpha=0.3)


# --- curves ------------------------------------------------------------------------------------


def check_curves(runs: Sequence[Run], metrics: Sequence[str]) -> None:
    """Every --curves metric was logged by at least one of the runs; else one line naming the ones there are."""
    logged = sorted({k for r in runs for k in r.series}, key=natural_key)
    for metric in metrics:
        if metric not in logged:
            close = difflib.get_close_matches(metric, logged, n=1)
            hint = f"did you mean {close[0]}? " if close else ""
            raise UserError(f"no run logged --curves metric {metric!r}; {hint}logged metrics: {few(logged, 12)}")


def plot_curves(runs: Sequence[Run], metrics: Sequence[str], out: Path, title: str) -> None:
    """One panel per metric against the step, one line (one colour, the same in every panel) per run;
    written atomically (tmp file, then rename)."""
    from matplotlib.lines import Line2D

    fmt = plot_format(out, "--out")
    colors = run_colors(len(runs))
    fig, axes = panel_figure(len(metrics), max_cols=2, panel_size=(5.5, 3.8))
    for ax, metric in zip(axes, metrics, strict=True):
        curve_panel(ax, metric, runs, colors)
    handles = [Line2D([], [], color=c, label=r.label) for r, c in zip(runs, colors, strict=True)]
    fig.legend(handles=handles, loc="outside right upper", fontsize=8, title="run")
    fig.suptitle(title)
    save_chart(fig, out, fmt)


def curve_panel(ax: Any, metric: str, runs: Sequence[Run], colors: Sequence[Any]) -> None:
    """``metric`` against the step for each run that logged it; points marked when they are few (an
    evaluation every epoch); log y when the values span two decades."""
    from matplotlib.ticker import MaxNLocator

    values: list[float] = []
    for run, color in zip(runs, colors, strict=True):
        points = run.series.get(metric, [])
        if not points:
            continue
        steps, ys = [s for s, _ in points], [v for _, v in points]
        ax.plot(steps, ys, color=color, marker="o" if len(points) <= 30 else None, markersize=3, linewidth=1.2)
        values += [v for v in ys if math.isfinite(v)]
    if values and min(values) > 0 and max(values) >= 100 * min(values):
        ax.set_yscale("log")
    ax.set(title=metric, xlabel="step")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.grid(alpha=0.3)


# --- command line ------------------------------------------------------------------------------


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="Exit status: 0 done; 2 bad input (no metrics.json found, unreadable file, invalid regex, "
        "unknown --sort metric or trackio project).",
    )
    p.add_argument("paths", nargs="*", metavar="PATH", help="metrics.json file, folder of runs, or glob pattern")
    p.add_argument("--trackio-project", metavar="NAME", help="also compare the runs of this local trackio project")
    p.add_argument("--runs", metavar="REGEX", help="keep runs whose whole name matches (re.fullmatch)")
    p.add_argument("--metrics", metavar="REGEX", help="columns to show (re.search; default: every numeric metric)")
    p.add_argument("--sort", metavar="METRIC", help="order rows by this metric, ascending; runs without it last")
    p.add_argument("--desc", action="store_true", help="with --sort: descending")
    p.add_argument(
        "--format",
        choices=("markdown", "csv"),
        default="markdown",
        help="markdown (4 significant digits, '-' if missing; the default) or csv (exact, empty if missing)",
    )
    p.add_argument("--plot", type=Path, metavar="OUT.png", help="also draw the metrics to this image")
    p.add_argument(
        "--curves",
        nargs="+",
        metavar="METRIC",
        help=f"draw these metrics against the step from trackio (--trackio-project, default {DEFAULT_PROJECT})",
    )
    p.add_argument("--out", type=Path, metavar="CURVES.png", help="with --curves: the image to write")
    args = p.parse_args(argv)
    if args.curves:
        if args.paths:
            p.error("--curves reads trackio's per-step logs; metrics.json PATHs hold final values only: drop them")
        if args.out is None:
            p.error("--curves needs --out CURVES.png")
        args.trackio_project = args.trackio_project or DEFAULT_PROJECT
    elif args.out is not None:
        p.error("--out is the image of --curves; for the table's chart use --plot")
    if not args.paths and not args.trackio_project:
        p.error("give PATHs of metrics.json files or run folders, or --trackio-project")
    if args.desc and not args.sort:
        p.error("--desc needs --sort METRIC")
    return args


def run(args: argparse.Namespace) -> int:
    if args.plot is not None:
        plot_format(args.plot)
    if args.curves:
        plot_format(args.out, "--out")
    runs = collect_runs(args.paths)
    if args.trackio_project:
        runs += trackio_runs(args.trackio_project)
    if args.runs is not None:
        runs = matching_runs(args.runs, runs)
    runs = unique_labels(runs)
    if args.curves:
        check_curves(runs, args.curves)
    columns = select_columns(runs, args.metrics) if args.metrics or not args.curves else list(args.curves)
    if args.sort:
        runs = sort_runs(runs, args.sort, args.desc)
    print(table(runs, columns, args.format))
    if args.plot is not None:
        plot(runs, columns, args.plot)
        print(f"wrote {args.plot}", file=sys.stderr)
    if args.curves:
        drawn = [r for r in runs if any(m in r.series for m in args.curves)]
        plot_curves(drawn, args.curves, args.out, f"trackio project {args.trackio_project}: {len(drawn)} runs")
        print(f"wrote {args.out}", file=sys.stderr)
    return 0


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    return exit_code(lambda: run(args))


if __name__ == "__main__":
    sys.exit(main())
