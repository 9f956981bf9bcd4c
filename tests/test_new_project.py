"""new_project.py copies the scaffold; the README walkthrough runs verbatim on such a copy."""
from __future__ import annotations

import re
import shlex
import subprocess
from pathlib import Path

import pytest

from conftest import PYTHON, ROOT, run_script

WALKTHROUGH = "## Your own model, dataset, loss and metric"


def readme_blocks() -> list[tuple[str, str]]:
    """(language, text) of every fenced block of the README's walkthrough section."""
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    start = text.index(WALKTHROUGH)
    end = text.find("\n## ", start + len(WALKTHROUGH))
    section = text[start: end if end != -1 else None]
    return re.findall(r"```(\w+)\n(.*?)```", section, flags=re.S)


def apply_block(project: Path, language: str, body: str) -> list[str]:
    """Write a code block into the project; return the shell commands of a bash block."""
    first, _, rest = body.partition("\n")
    if language == "bash":
        return [line for line in body.splitlines() if line.strip() and not line.startswith("#")]
    match = re.fullmatch(r"# (append to )?(\S+)", first.strip())
    assert match, f"walkthrough block must start with '# path' or '# append to path': {first!r}"
    path = project / match.group(2)
    if match.group(1):
        assert path.exists(), f"the walkthrough appends to {path}, which the scaffold lacks"
        path.write_text(path.read_text(encoding="utf-8") + "\n\n" + rest, encoding="utf-8")
    else:
        assert not path.exists(), f"the walkthrough would overwrite {path}"
        path.write_text(body if language == "yaml" else rest, encoding="utf-8")
    return []


@pytest.fixture(scope="module")
def project(tmp_path_factory) -> Path:
    dest = tmp_path_factory.mktemp("np") / "my_project"
    proc = run_script("new_project.py", str(dest), cwd=tmp_path_factory.getbasetemp())
    assert proc.returncode == 0, proc.stderr
    return dest


def test_copy_has_the_scaffold_and_nothing_else(project: Path):
    for name in ("train.py", "test.py", "README.md", "requirements.txt", ".ci/run", "configs/digits.yaml",
                 "base/base_trainer.py", "tests/conftest.py", "docs"):
        assert (project / name).exists(), name
    for name in ("saved", "data", ".venv", ".git", "bench", ".pytest_cache", ".hypothesis"):
        assert not (project / name).exists(), name
    assert not list(project.rglob("__pycache__")) and not list(project.rglob("*.pyc"))


def test_refuses_a_non_empty_directory(tmp_path: Path):
    (tmp_path / "taken").mkdir()
    (tmp_path / "taken" / "file.txt").write_text("mine")
    proc = run_script("new_project.py", str(tmp_path / "taken"), cwd=tmp_path)
    assert proc.returncode == 2
    assert "not an empty directory" in proc.stderr and "Traceback" not in proc.stderr
    assert (tmp_path / "taken" / "file.txt").read_text() == "mine"


@pytest.mark.slow
def test_readme_walkthrough_runs_on_a_new_project(project: Path):
    blocks = readme_blocks()
    assert {lang for lang, _ in blocks} >= {"python", "yaml", "bash"}
    commands = []
    for language, body in blocks:
        commands += apply_block(project, language, body)
    assert commands, "the walkthrough has no command to run"
    outputs = []
    for command in commands:
        argv = shlex.split(command)
        assert argv[0] == "python", command
        extra = ["trainer.epochs=2"] if argv[1] == "train.py" else []
        proc = subprocess.run([PYTHON, *argv[1:], *extra], cwd=project, capture_output=True, text=True, timeout=300)
        assert proc.returncode == 0, f"{command}\n{proc.stdout}\n{proc.stderr}"
        outputs.append(proc.stdout)
    assert re.search(r"^balanced_accuracy: \d\.\d{4}$", outputs[-1], flags=re.M), outputs[-1]


@pytest.mark.slow
def test_new_project_trains_its_quickstart(project: Path):
    proc = subprocess.run([PYTHON, "train.py", "-c", "configs/digits.yaml", "trainer.epochs=1", "--run-id", "smoke"],
                          cwd=project, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert (project / "saved" / "digits" / "smoke" / "checkpoints" / "last.pth").is_file()
