"""scripts/compare_runs.py on metrics.json files laid out as the launcher writes them, and on a trackio store."""

from __future__ import annotations

import csv
import io
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from PIL import Image

from scripts.compare_runs import (
    Run,
    check_curves,
    collect_runs,
    families,
    main,
    select_columns,
    sort_runs,
    step_series,
    table,
    unique_labels,
)
from training.errors import UserError

ROOT = Path(__file__).resolve().parents[1]
SWEEP = "multirun/2026-11-25_10-00-00"
FID = {"sweep_0": 9.5, "sweep_1": 4.25, "sweep_2": 7.0}


def write_run(run_dir: Path, metrics: dict[str, object], run_name: str | None = None, job: int | None = None) -> Path:
    """A run folder: metrics.json, and the .hydra files Hydra writes when ``run_name`` is given."""
    run_dir.mkdir(parents=True)
    (run_dir / "metrics.json").write_text(json.dumps(metrics))
    if run_name is not None:
        (run_dir / ".hydra").mkdir()
        (run_dir / ".hydra" / "config.yaml").write_text(f"run_name: {run_name}\nseed: 0\n")
        mode = "RUN" if job is None else "MULTIRUN"
        (run_dir / ".hydra" / "hydra.yaml").write_text(f"hydra:\n  mode: {mode}\n  job:\n    num: {job or 0}\n")
    return run_dir


@pytest.fixture
def outputs(tmp_path: Path) -> Path:
    """A three-job sweep (named sweep, so sweep_0..2) plus two single runs named quickstart."""
    for job, fid in enumerate(FID.values()):
        metrics = {
            "eval/fid@nfe2": fid * 2,
            "eval/fid@nfe10": fid,
            "params": 658.0,
            "train/final_loss": 0.123456789 * (job + 1),
            "solver": "euler",
        }
        if job == 1:
            del metrics["eval/fid@nfe2"]
        write_run(tmp_path / SWEEP / f"{job}_sweep", metrics, run_name="sweep", job=job)
    for time, loss in [("2026-11-25_09-00-00", 2.5), ("2026-11-25_11-00-00", 1.5)]:
        write_run(
            tmp_path / "runs" / "quickstart" / time,
            {"eval/energy_distance@nfe4": 0.5, "train/final_loss": loss, "checkpoint": "last.pt"},
            run_name="quickstart",
        )
    return tmp_path


def rows(markdown: str) -> dict[str, list[str]]:
    """A markdown table as {first cell: cells}, header included under 'run'."""
    lines = markdown.splitlines()
    assert set(lines[1]) <= {"|", "-", ":"}
    cells = [[c.strip() for c in line.strip("|").split("|")] for line in [lines[0], *lines[2:]]]
    return {row[0]: row[1:] for row in cells}


def run_main(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


# --- collecting runs -------------------------------------------------------------------------


def test_runs_are_named_as_the_launcher_names_them(outputs):
    runs = unique_labels(collect_runs([str(outputs)]))
    assert [r.label for r in runs] == [
        "sweep_0",
        "sweep_1",
        "sweep_2",
        "quickstart (2026-11-25_09-00-00)",
        "quickstart (2026-11-25_11-00-00)",
    ]
    assert runs[0].values["solver"] == "euler" and runs[0].values["eval/fid@nfe10"] == FID["sweep_0"]


def test_without_hydra_config_the_folder_names_the_run(tmp_path):
    write_run(tmp_path / "a" / "lr_1e-3", {"x": 1})
    write_run(tmp_path / "b" / "lr_1e-3", {"x": 2})
    labels = [r.label for r in unique_labels(collect_runs([str(tmp_path / "a"), str(tmp_path / "b")]))]
    assert labels == ["lr_1e-3 (a/lr_1e-3)", "lr_1e-3 (b/lr_1e-3)"]


def test_globs_files_and_repeats(outputs):
    pattern = str(outputs / "multirun" / "*" / "*_sweep")
    one = str(outputs / SWEEP / "1_sweep" / "metrics.json")
    runs = collect_runs([pattern, one])  # the file is also under the pattern: counted once
    assert [r.label for r in runs] == ["sweep_0", "sweep_1", "sweep_2"]


# --- the table -------------------------------------------------------------------------------


def test_markdown_table_has_numeric_columns_and_dashes_for_missing(outputs):
    runs = unique_labels(collect_runs([str(outputs / SWEEP)]))
    columns = select_columns(runs, None)
    assert columns == ["eval/fid@nfe2", "eval/fid@nfe10", "params", "train/final_loss"]  # nfe2 before nfe10
    got = rows(table(runs, columns, "markdown"))
    assert got["run"] == columns
    assert got["sweep_0"] == ["19", "9.5", "658", "0.1235"]  # 4 significant digits, whole numbers in full
    assert got["sweep_1"] == ["-", "4.25", "658", "0.2469"]


def test_metrics_regex_filters_columns_and_strings_need_an_exact_name(outputs):
    runs = collect_runs([str(outputs / SWEEP)])
    assert select_columns(runs, "fid") == ["eval/fid@nfe2", "eval/fid@nfe10"]
    assert select_columns(runs, "nfe10|solver") == ["eval/fid@nfe10", "solver"]
    assert "solver" not in select_columns(runs, "o")  # re.search would find it; strings must be named


def test_sort_ascending_descending_and_missing_last(outputs):
    runs = unique_labels(collect_runs([str(outputs / SWEEP)]))
    assert [r.label for r in sort_runs(runs, "eval/fid@nfe10")] == ["sweep_1", "sweep_2", "sweep_0"]
    assert [r.label for r in sort_runs(runs, "eval/fid@nfe10", descending=True)] == ["sweep_0", "sweep_2", "sweep_1"]
    assert [r.label for r in sort_runs(runs, "eval/fid@nfe2", descending=True)][-1] == "sweep_1"
    assert [r.label for r in sort_runs(runs, "eval/fid@nfe2")][-1] == "sweep_1"


def test_main_prints_sorted_filtered_markdown(outputs, capsys):
    code, out, err = run_main(capsys, str(outputs), "--metrics", "final_loss", "--sort", "train/final_loss", "--desc")
    assert code == 0, err
    got = rows(out)
    assert got["run"] == ["train/final_loss"]
    assert list(got)[1:] == [
        "quickstart (2026-11-25_09-00-00)",
        "quickstart (2026-11-25_11-00-00)",
        "sweep_2",
        "sweep_1",
        "sweep_0",
    ]


def test_csv_parses_back_to_the_same_numbers(outputs, capsys):
    code, out, err = run_main(capsys, str(outputs), "--format", "csv", "--runs", "sweep_.*")
    assert code == 0, err
    parsed = list(csv.DictReader(io.StringIO(out)))
    runs = unique_labels(collect_runs([str(outputs / SWEEP)]))
    assert [row["run"] for row in parsed] == [r.label for r in runs]
    for row, run in zip(parsed, runs, strict=True):
        for column in ("eval/fid@nfe2", "eval/fid@nfe10", "params", "train/final_loss"):
            expected = run.values.get(column)
            assert (float(row[column]) if row[column] else None) == expected  # exact, '' when missing


# --- the chart -------------------------------------------------------------------------------


def test_nfe_metrics_form_line_families_and_others_bars():
    got = families(["eval/fid@nfe10", "eval/fid@nfe2", "eval/kid@nfe2", "eval/is@cfg1", "eval/is@cfg2", "params"])
    by_name = {f.name: f for f in got}
    assert by_name["eval/fid"].nfe == (2, 10)
    assert by_name["eval/fid"].columns == ("eval/fid@nfe2", "eval/fid@nfe10")  # ordered by NFE
    assert by_name["eval/kid"].nfe == (2,)
    assert by_name["eval/is"].nfe is None and by_name["eval/is"].columns == ("eval/is@cfg1", "eval/is@cfg2")
    assert by_name["params"].nfe is None and by_name["params"].columns == ("params",)
    mixed = families(["eval/fid@nfe2", "eval/fid@best"])
    assert [(f.name, f.nfe) for f in mixed] == [("eval/fid", None)]  # not all NFE: bars


def test_plot_writes_a_png_atomically(outputs, capsys):
    out = outputs / "charts" / "new" / "cmp.png"
    code, _, err = run_main(capsys, str(outputs), "--plot", str(out))
    assert code == 0, err
    with Image.open(out) as image:
        assert image.format == "PNG" and image.width > 0 and image.height > 0
    assert [p.name for p in out.parent.iterdir()] == ["cmp.png"]  # no tmp file left behind


# --- errors ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["empty"], "no metrics.json found under"),
        (["absent"], "does not exist"),
        (["nothing*"], "no metrics.json found under"),
        (["runs", "--sort", "eval/fid"], "unknown --sort metric 'eval/fid'; give one of: eval/energy_distance@nfe4"),
        (["runs", "--metrics", "fid("], "invalid regular expression for --metrics"),
        (["runs", "--runs", "["], "invalid regular expression for --runs"),
        (["runs", "--runs", "quick"], "no run name matches --runs 'quick' (whole name); runs: quickstart"),
        (["runs", "--metrics", "zzz"], "no metric matches --metrics 'zzz'"),
        (["runs", "--plot", "cmp.txt"], "end --plot with .png"),
    ],
)
def test_bad_input_is_a_one_line_error(outputs, capsys, monkeypatch, argv, message):
    (outputs / "empty").mkdir()
    monkeypatch.chdir(outputs)
    code, out, err = run_main(capsys, *argv)
    assert code == 2 and out == ""
    assert err.startswith("error: ") and err.count("\n") == 1 and message in err, err


def test_invalid_json_names_the_file(outputs):
    bad = outputs / SWEEP / "1_sweep" / "metrics.json"
    bad.write_text("{not json")
    with pytest.raises(UserError, match=f"cannot read {bad}"):
        collect_runs([str(outputs / SWEEP)])
    bad.write_text("[1, 2]")
    with pytest.raises(UserError, match="not a JSON object"):
        collect_runs([str(bad)])


# --- trackio ---------------------------------------------------------------------------------


def in_trackio(trackio_dir: Path, *argv: str, code: str | None = None) -> subprocess.CompletedProcess:
    """The script (or ``code``) in a fresh interpreter: trackio reads TRACKIO_DIR once, on import."""
    env = {**os.environ, "TRACKIO_DIR": str(trackio_dir), "HF_HUB_OFFLINE": "1"}
    command = ["-c", code] if code is not None else ["scripts/compare_runs.py", *argv]
    return subprocess.run([sys.executable, *command], cwd=ROOT, env=env, capture_output=True, text=True, timeout=60)


def test_trackio_project_shows_each_runs_last_value(tmp_path):
    logged = in_trackio(
        tmp_path,
        code="""
import trackio
for name, values in [("a", [3.0, 2.0]), ("b", [5.0]), ("other", [1.0])]:
    trackio.init(project="p", name=name, auto_log_cpu=False, auto_log_gpu=False)
    for v in values:
        trackio.log({"eval/fid@nfe10": v})
    trackio.finish()
""",
    )
    assert logged.returncode == 0, logged.stderr
    done = in_trackio(tmp_path, "--trackio-project", "p", "--runs", "a|b", "--sort", "eval/fid@nfe10")
    assert done.returncode == 0, done.stderr
    assert rows(done.stdout) == {"run": ["eval/fid@nfe10"], "a": ["2"], "b": ["5"]}

    missing = in_trackio(tmp_path, "--trackio-project", "absent")
    assert missing.returncode == 2
    assert missing.stderr.startswith("error: no trackio project 'absent'") and "projects there: p" in missing.stderr
    assert missing.stderr.count("\n") == 1


# --- curves ----------------------------------------------------------------------------------

TRAIN_TWO_RUNS = """
import json, sys
from pathlib import Path
from tests.conftest import tiny_config
from training.train import train
from scripts.compare_runs import trackio_runs
tmp = Path(sys.argv[1])
for name, lr in [("lr_small", "1e-3"), ("lr_big", "3e-2")]:
    train(tiny_config(tmp / name, [f"run_name={name}", f"optimizer.lr={lr}", "trackio.enabled=true",
                                   "trackio.project=p", "trainer.log_every=2", "epochs=2",
                                   "checkpoint.archive_every_epochs=0"]))
print(json.dumps({r.label: {m: [s for s, _ in r.series[m]] for m in ("train/loss", "eval/energy_distance@nfe4")}
                  for r in trackio_runs("p")}))
"""


def test_curves_draw_what_trackio_logged_per_step(tmp_path):
    """Runs logged at steps of their own (a run without the score, a run with a step twice): one line each."""
    logged = in_trackio(
        tmp_path,
        code="""
import trackio
for name, points in [("a", [(2, 3.0), (4, 2.0), (6, 1.5)]), ("b", [(2, 5.0), (4, 4.0), (4, 3.5)]), ("c", [])]:
    trackio.init(project="p", name=name, auto_log_cpu=False, auto_log_gpu=False)
    for step, v in points:
        trackio.log({"train/loss": v, **({"eval/fid@nfe10": 10 * v} if name == "a" else {})}, step=step)
    trackio.log({"train/lr": 1e-3}, step=8)
    trackio.finish()
""",
    )
    assert logged.returncode == 0, logged.stderr
    out = tmp_path / "curves.png"
    done = in_trackio(tmp_path, "--curves", "train/loss", "eval/fid@nfe10", "--trackio-project", "p", "--out", str(out))
    assert done.returncode == 0, done.stderr
    assert rows(done.stdout) == {"run": ["train/loss", "eval/fid@nfe10"], "a": ["1.5", "15"], "b": ["3.5", "-"],
                                 "c": ["-", "-"]}  # fmt: skip
    assert f"wrote {out}" in done.stderr
    with Image.open(out) as image:
        assert image.format == "PNG" and image.width >= 1000 and image.height >= 400


@pytest.mark.slow
def test_curves_draw_real_training_runs_per_step(tmp_path):
    """Two tiny moons runs logged to a trackio store; --curves draws their loss and score against the step."""
    env = {**os.environ, "TRACKIO_DIR": str(tmp_path / "trackio"), "HF_HUB_OFFLINE": "1"}
    trained = subprocess.run([sys.executable, "-c", TRAIN_TWO_RUNS, str(tmp_path)], cwd=ROOT, env=env,
                             capture_output=True, text=True, timeout=120)  # fmt: skip
    assert trained.returncode == 0, trained.stderr
    steps = json.loads(trained.stdout.strip().splitlines()[-1])
    for run in ("lr_small", "lr_big"):  # a log point every 2 steps; an evaluation after epoch 1, then the final one
        assert steps[run] == {"train/loss": list(range(2, 17, 2)), "eval/energy_distance@nfe4": [8, 16]}
    out = tmp_path / "curves.png"
    done = in_trackio(tmp_path / "trackio", "--curves", "train/loss", "eval/energy_distance@nfe4",
                      "--trackio-project", "p", "--out", str(out))  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert rows(done.stdout)["run"] == ["train/loss", "eval/energy_distance@nfe4"]
    assert set(rows(done.stdout)) == {"run", "lr_small", "lr_big"}
    with Image.open(out) as image:
        assert image.format == "PNG" and image.width >= 1000 and image.height >= 400
    assert [p.name for p in out.parent.glob(".*.tmp")] == []


def test_a_step_logged_twice_keeps_its_last_value():
    logs = [{"step": 2, "train/loss": 5.0}, {"step": 4, "train/loss": 4.0, "note": "x"}, {"step": 2, "train/loss": 4.5},
            {"step": None, "train/loss": 1.0}, {"step": 3, "eval/fid@nfe10": 9.0, "timestamp": 123.0}]  # fmt: skip
    assert step_series(logs) == {"train/loss": [(2, 4.5), (4, 4.0)], "eval/fid@nfe10": [(3, 9.0)]}


def test_curves_of_a_metric_no_run_logged_name_those_logged():
    runs = [Run("a", ("a",), {}, {"train/loss": [(2, 1.0)], "eval/fid@nfe10": [(8, 3.0)]})]
    check_curves(runs, ["train/loss"])
    with pytest.raises(UserError, match=r"^no run logged --curves metric 'eval/fid@nfe1'; did you mean eval/fid@nfe10"):
        check_curves(runs, ["eval/fid@nfe1"])


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--curves", "train/loss"], "--curves needs --out CURVES.png"),
        (["runs", "--curves", "train/loss", "--out", "c.png"], "metrics.json PATHs hold final values only"),
        (["runs", "--out", "c.png"], "--out is the image of --curves"),
    ],
)
def test_curves_arguments_are_checked(capsys, argv, message):
    with pytest.raises(SystemExit) as e:
        main(argv)
    assert e.value.code == 2 and message in capsys.readouterr().err
