"""The commands README.md and docs/ show keep working as the code under them changes.

Every ``python launcher.py ...`` in a bash block composes (each combination of a ``-m`` sweep) and passes the
launcher's own checks and the compatibility check; every ``python scripts/X.py ...`` parses with the script's
own argument parser, and ``--help`` of each script shown exits 0; every ``make`` target exists; links between
the pages resolve. Each docs page opens with a command that runs offline in seconds, and runs here (slow).
The README's worked example (a new model and a new sampler) is written into a copy of the tree and trained.
"""

from __future__ import annotations

import argparse
import importlib
import os
import re
import runpy
import shlex
import shutil
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from hydra._internal.core_plugins.basic_sweeper import BasicSweeper
from hydra.core.override_parser.overrides_parser import OverridesParser
from omegaconf import OmegaConf

import launcher
from training import compat
from training.compose import CONFIG_DIR, compose_config
from training.train import train

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
PAGES = sorted((ROOT / "docs").glob("*.md"))
FENCE = re.compile(r"^```(\w*)\n(.*?)^```", re.S | re.M)
EXAMPLE_FILE = re.compile(r"^# ((?:models|solvers|losses|dataloaders|evaluation|configs)/[\w/]+\.(?:py|yaml))\n")
MULTIRUN = {"-m", "--multirun"}


@dataclass(frozen=True)
class Command:
    page: str
    line: str
    program: str  # launcher.py | scripts/X.py | make | another program
    args: tuple[str, ...]

    def __str__(self) -> str:
        return f"{self.page}: {self.line}"


def code_blocks(path: Path) -> list[tuple[str, str]]:
    """``(language, body)`` of each fenced block of a markdown file, in order."""
    return FENCE.findall(path.read_text())


def parse_command(page: str, line: str) -> Command | None:
    """A shell line as the program it runs and its arguments; None for a blank or comment line."""
    words = shlex.split(line, comments=True)
    if not words:
        return None
    line = " ".join(words)  # comments and continuation gaps dropped: the command as the shell runs it
    if words[0] == "make":
        return Command(page, line, "make", tuple(words[1:]))
    for i, word in enumerate(words):
        if word == "launcher.py" or re.fullmatch(r"scripts/\w+\.py", word):
            return Command(page, line, word, tuple(words[i + 1 :]))
    return Command(page, line, words[0], tuple(words[1:]))


def commands(path: Path) -> Iterator[Command]:
    """The commands of a page's bash blocks, backslash continuations joined."""
    for language, body in code_blocks(path):
        if language == "bash":
            for line in body.replace("\\\n", " ").splitlines():
                if (command := parse_command(path.relative_to(ROOT).as_posix(), line)) is not None:
                    yield command


def example_files() -> dict[str, str]:
    """The README's worked example: ``relative path -> text`` of each block that opens with ``# <path>``."""
    files = {}
    for language, body in code_blocks(README):
        if language in ("python", "yaml") and (match := EXAMPLE_FILE.match(body)):
            files[match.group(1)] = body
    return files


ALL = [c for page in (README, *PAGES) for c in commands(page)]
LAUNCHER = [c for c in ALL if c.program == "launcher.py" and "--help" not in c.args]
SCRIPTS = [c for c in ALL if c.program.startswith("scripts/")]
MAKE = [c for c in ALL if c.program == "make"]
HELP = sorted({c.program for c in SCRIPTS} | {"launcher.py"})


def test_the_pages_show_commands_of_every_kind():
    assert PAGES and len(LAUNCHER) > 40 and len(SCRIPTS) > 30
    assert {c.args for c in MAKE} >= {("demo",), ("test",)}  # the two set-up commands
    assert len(example_files()) >= 4


# ---------------------------------------------------------------------------------------------
# the tree the commands see: the configs plus the README's example files


@pytest.fixture(scope="module")
def example_tree(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """A copy of configs/ with the example's YAML files, and its modules importable as part of their packages."""
    root = tmp_path_factory.mktemp("example")
    shutil.copytree(CONFIG_DIR, root / "configs")
    packages = {}
    for relative, text in example_files().items():
        target = root / relative
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_text(text)
        if relative.endswith(".py"):
            packages[relative.split("/")[0]] = target.parent
    originals = {name: list(importlib.import_module(name).__path__) for name in packages}
    for name, folder in packages.items():
        importlib.import_module(name).__path__.append(str(folder))
    yield root
    for name, path in originals.items():
        importlib.import_module(name).__path__[:] = path
    for relative in example_files():  # the example's modules leave no trace for later tests
        sys.modules.pop(relative.removesuffix(".py").replace("/", "."), None)


def combinations(args: list[str]) -> list[list[str]]:
    """The override lists of one command: one, or one per job of a ``-m`` sweep."""
    if not MULTIRUN & set(args):
        return [args]
    overrides = OverridesParser.create().parse_overrides([a for a in args if a not in MULTIRUN])
    return [job for batch in BasicSweeper.split_arguments(overrides, None) for job in batch]


@pytest.mark.parametrize("command", LAUNCHER, ids=str)
def test_every_launcher_command_composes_and_passes_the_launchers_checks(command, example_tree, tmp_path):
    args = launcher.translate_flags(list(command.args))
    configs = example_tree / "configs"
    problem = (
        launcher.check_run_name(args)
        or launcher.check_group_options(args, configs)
        or launcher.check_override_keys(args, configs)
    )
    assert problem is None, problem
    for job in combinations(args):
        cfg = compose_config([*job, f"paths.run_dir={tmp_path}/run"], config_dir=configs)
        OmegaConf.to_container(cfg, resolve=True, throw_on_missing=False)
        if cfg.eval_checkpoint is None:  # an eval-only run is checked against its checkpoint's config
            compat.check(compat.Spec.from_config(cfg, compat.choices_of(cfg)))


class Parsed(Exception):
    """Raised once a script's parser accepted its arguments, before the script does any work."""


@pytest.mark.parametrize("command", SCRIPTS, ids=str)
def test_every_script_command_parses(command, monkeypatch):
    original = argparse.ArgumentParser.parse_args

    def parse_then_stop(self, args=None, namespace=None):
        original(self, args, namespace)
        raise Parsed

    monkeypatch.setattr(argparse.ArgumentParser, "parse_args", parse_then_stop)
    monkeypatch.setattr(sys, "argv", [command.program, *command.args])
    with pytest.raises((Parsed, SystemExit)) as stopped:  # SystemExit: --help, or argparse's error (status 2)
        runpy.run_path(str(ROOT / command.program), run_name="__main__")
    assert stopped.type is Parsed or stopped.value.code == 0, command


# Runs each program as ``python PROGRAM --help`` would, in one interpreter (torch is imported once): the
# program's own folder first on sys.path, so a package the install does not provide fails here as for a user.
HELP_RUNNER = """
import os, runpy, sys, traceback
failures = []
for program in sys.argv[1:]:
    sys.argv = [program, "--help"]
    sys.path[0] = os.path.dirname(os.path.abspath(program))
    try:
        runpy.run_path(program, run_name="__main__")
    except SystemExit as e:
        if e.code not in (0, None):
            failures.append(f"{program}: exit status {e.code}")
    except BaseException:
        failures.append(f"{program}: {traceback.format_exc(limit=-3)}")
print("\\n".join(failures), file=sys.stderr)
sys.exit(1 if failures else 0)
"""


def test_help_of_every_program_shown_exits_0():
    programs = sorted(HELP, key=lambda p: p == "launcher.py")  # the launcher last: it puts the root on sys.path
    done = subprocess.run(
        [sys.executable, "-c", HELP_RUNNER, *programs],
        cwd=ROOT,
        env=offline_env(),
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert done.returncode == 0, done.stderr[-4000:]


@pytest.mark.parametrize("command", MAKE, ids=str)
def test_every_make_target_exists(command):
    done = subprocess.run(["make", "-n", *command.args], cwd=ROOT, capture_output=True, text=True, timeout=30)
    assert done.returncode == 0, done.stderr


def slug(heading: str) -> str:
    """GitHub's anchor of a markdown heading."""
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


@pytest.mark.parametrize("page", [README, *PAGES], ids=lambda p: p.name)
def test_links_between_pages_resolve(page):
    for target in re.findall(r"\]\(([^)\s]+)\)", page.read_text()):
        if target.startswith(("http://", "https://")):
            continue
        file, _, anchor = target.partition("#")
        linked = (page.parent / file).resolve() if file else page
        assert linked.is_file(), f"{page.name}: {target}"
        if anchor:
            headings = re.findall(r"^#+ (.+)$", linked.read_text(), re.M)
            assert anchor in {slug(h) for h in headings}, f"{page.name}: {target}"
    if page == README:
        assert {p.name for p in PAGES} <= set(re.findall(r"\(docs/([\w-]+\.md)\)", page.read_text()))


REPO_FILE = re.compile(
    r"\b((?:models|adapters|paths|losses|solvers|dataloaders|evaluation|training|scripts|configs|tests|hydra_plugins)"
    r"/[\w./-]*\.(?:py|yaml))\b"
)


@pytest.mark.parametrize("page", [README, *PAGES], ids=lambda p: p.name)
def test_every_file_the_pages_name_exists(page):
    """Modules, scripts and configs named in the prose too: a move or rename has to update the pages."""
    named = set(REPO_FILE.findall(page.read_text())) - set(example_files())
    assert not [f for f in sorted(named) if not (ROOT / f).is_file()], page.name


# ---------------------------------------------------------------------------------------------
# each page's first command, for real


def offline_env(**extra: str) -> dict[str, str]:
    return {**os.environ, "HF_HUB_OFFLINE": "1", **extra}


def first_command(page: Path) -> Command:
    """The page's opening command: the first line of a bash block that comes right after the title."""
    text = page.read_text()
    lines = [line for line in text.splitlines() if line.strip()]
    assert lines[0].startswith("# ") and lines[1] == "```bash", f"{page.name} does not open with a command"
    return next(commands(page))


def mirror(tmp_path: Path) -> Path:
    """A folder that looks like the repository (links to its files) but keeps outputs and logs to itself."""
    root = tmp_path / "repo"
    root.mkdir()
    for entry in ROOT.iterdir():
        if entry.name not in {".git", ".venv", "outputs", "EXPERIMENT_LOG.md"}:
            (root / entry.name).symlink_to(entry)
    return root


@pytest.mark.slow
@pytest.mark.parametrize("page", PAGES, ids=lambda p: p.name)
def test_each_pages_first_command_runs(page, tmp_path):
    command = first_command(page)
    root = mirror(tmp_path)
    args = list(command.args)
    if command.program == "launcher.py" and "--help" not in args:
        args += [
            f"paths.root={tmp_path}/outputs",
            f"paths.experiment_log={tmp_path}/EXPERIMENT_LOG.md",
            f"hydra.run.dir={tmp_path}/run",
            f"hydra.sweep.dir={tmp_path}/multirun",
            "trackio.enabled=false",
        ]
    done = subprocess.run(
        [sys.executable, command.program, *args],
        cwd=root,
        env=offline_env(TRACKIO_DIR=str(tmp_path / "trackio")),
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert done.returncode == 0, f"{command}\n{done.stdout[-2000:]}\n{done.stderr[-3000:]}"
    if command.program == "launcher.py" and "--help" not in args:
        made = tmp_path / ("multirun/summary.md" if MULTIRUN & set(args) else "run/metrics.json")
        assert made.is_file(), done.stdout[-2000:]
        assert not (root / "outputs").exists()  # everything went where the overrides said


# ---------------------------------------------------------------------------------------------
# the README's worked example


def test_the_worked_example_trains_samples_and_scores(example_tree, tmp_path):
    cfg = compose_config(
        [
            "run_name=example",
            "model=res_mlp",
            "solver=ralston",
            "debug=smoke",
            "device=cpu",
            f"paths.root={tmp_path}/outputs",
            f"paths.run_dir={tmp_path}/run",
            f"paths.experiment_log={tmp_path}/log.md",
        ],
        config_dir=example_tree / "configs",
    )
    metrics, objects = train(cfg)
    assert type(objects["model"]).__name__ == "ResMLP" and objects["solver"].name == "ralston"
    scores = {k: v for k, v in metrics.items() if k.startswith("eval/energy_distance@")}
    assert scores and all(v >= 0 for v in scores.values())
    assert metrics["eval/nfe_used@nfe1"] == 2  # two stages: one step even at a budget of one
