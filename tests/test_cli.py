"""First contact: the `benchmark` command, its `--help` page and Hydra's shell completion."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import PROJECT

pytestmark = pytest.mark.e2e
DATASETS = [
    "caltech256",
    "csv",
    "dogs_vs_cats",
    "hymenoptera",
    "imagefolder",
    "simpsons",
    "synthetic",
]


def console_script(bin_dir: Path, site: Path) -> Path:
    """The `benchmark` command as `pip install` writes it for `[project.scripts]`, over a
    site folder that holds the installed packages (benchmark, hydra_plugins) and not the
    checkout's root: what an installed command sees, whatever the current directory."""
    tomllib = pytest.importorskip("tomllib")
    scripts = tomllib.loads((PROJECT / "pyproject.toml").read_text())["project"]["scripts"]
    module, function = scripts["benchmark"].split(":")
    site.mkdir()
    for package in ("benchmark", "hydra_plugins"):
        (site / package).symlink_to(PROJECT / package, target_is_directory=True)
    bin_dir.mkdir()
    script = bin_dir / "benchmark"
    script.write_text(
        f"#!{sys.executable}\n"
        "import re\nimport sys\n"
        f"from {module} import {function}\n"
        "if __name__ == '__main__':\n"
        "    sys.argv[0] = re.sub(r'(-script\\.pyw|\\.exe)?$', '', sys.argv[0])\n"
        f"    sys.exit({function}())\n"
    )
    script.chmod(0o755)
    return script


def test_the_console_script_runs_python_m_benchmark():
    tomllib = pytest.importorskip("tomllib")
    scripts = tomllib.loads((PROJECT / "pyproject.toml").read_text())["project"]["scripts"]
    assert scripts == {"benchmark": "benchmark.__main__:main"}


def test_help_describes_the_tool_its_groups_and_examples(tmp_path):
    shown = subprocess.run(
        [sys.executable, "-m", "benchmark", "strategy=freeze", "--help"],
        cwd=PROJECT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert shown.returncode == 0, shown.stderr[-3000:]
    text = shown.stdout
    assert text.startswith("benchmark: fine-tune or freeze, on your data, with which backbone?")
    assert f"dataset: {', '.join(DATASETS)}" in text  # Hydra's $APP_CONFIG_GROUPS
    for group in ("augment:", "backbone:", "colour:", "head:", "optim:", "strategy:", "trainer:"):
        assert f"\n{group} " in text, group
    assert "hydra/launcher: basic, gpus" in text
    assert "strategy=freeze backbone=efficientnet_lite0" in text  # this command's choices
    assert "benchmark -m colour=rgb,gray strategy=finetune,freeze seed=0,1,2" in text
    assert "python -m benchmark.report" in text
    assert "== Config ==" not in text  # the composed config is `--cfg job`'s, not the help's


def test_bash_completion_of_the_installed_command(tmp_path):
    """What `eval "$(benchmark -sc install=bash)"` then <TAB> does in bash, from any folder."""
    script = console_script(tmp_path / "bin", tmp_path / "site")
    env = {**os.environ, "PATH": f"{script.parent}{os.pathsep}{os.environ['PATH']}"}
    env["PYTHONPATH"] = str(tmp_path / "site")
    complete = r"""
eval "$(benchmark -sc install=bash)"
for line in "benchmark dat" "benchmark dataset="; do
  COMP_LINE="$line"; COMP_POINT=${#COMP_LINE}
  read -ra COMP_WORDS <<< "$COMP_LINE"; COMP_CWORD=$(( ${#COMP_WORDS[@]} - 1 ))
  hydra_bash_completion
  echo "$line -> ${COMPREPLY[*]}"
done
"""
    done = subprocess.run(
        ["bash", "-c", complete],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    lines = dict(line.split(" -> ") for line in done.stdout.splitlines() if " -> " in line)
    assert lines.get("benchmark dat", "").split() == ["data.", "dataset.", "dataset="], done
    assert lines.get("benchmark dataset=", "").split() == [f"dataset={d}" for d in DATASETS]
