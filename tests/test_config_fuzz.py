"""Property: whatever a config file holds, train.py never ends in a traceback. A mutated config either
validates, and then --dry-run builds everything and runs one batch forward and backward (exit 0),
or it is refused with one-line `error:` messages (exit 2). Nothing is written either way.

Mutations of configs/digits.yaml: drop keys or list items, rename keys (typos, junk, non-strings),
replace values by junk of any type (nested included) or by plausible values of the same type, add
junk keys. Derandomized, so CI sees the
same examples every run; no example database is written.
"""
from __future__ import annotations

import contextlib
import io
import json
import os
import subprocess
import tempfile
import warnings
from pathlib import Path

import torch
import yaml
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from conftest import PYTHON, ROOT

import train

BASE = yaml.safe_load((ROOT / "configs" / "digits.yaml").read_text())
BASE["data_loader"]["args"]["batch_size"] = 16  # one small batch keeps each dry run short

WORDS = ["os.system", "builtins.eval", "../x", "/abs", "1e-3", "ten", "", "accuracy", "max val_loss",
         "min val_accuracy", "DigitsCNN", "Adam", "StepLR", "nll_loss", "cpu", "cuda", "off", "bf16", "epoch"]
SCALARS = st.one_of(
    st.none(), st.booleans(), st.integers(-3, 3), st.integers(), st.floats(width=32),
    st.sampled_from(WORDS), st.text(max_size=6),
)
JUNK = st.recursive(SCALARS, lambda inner: st.one_of(
    st.lists(inner, max_size=3), st.dictionaries(st.one_of(st.sampled_from(WORDS), st.text(max_size=4)), inner,
                                                 max_size=3)), max_leaves=6)


def _locations(node, found=None):
    """Every (container, key) pair of the config, depth first."""
    found = [] if found is None else found
    items = node.items() if isinstance(node, dict) else enumerate(node) if isinstance(node, list) else ()
    for key, value in list(items):
        found.append((node, key))
        _locations(value, found)
    return found


@st.composite
def mutated_configs(draw):
    config = json.loads(json.dumps(BASE))
    for _ in range(draw(st.integers(1, 2))):
        locations = _locations(config)
        container, key = locations[draw(st.integers(0, len(locations) - 1))]
        action = draw(st.sampled_from(["drop", "rename", "junk", "junk", "plausible", "plausible", "add"]))
        value = container[key]
        if action == "plausible":  # a value of the same kind, so that many mutants validate and run
            kind = bool if isinstance(value, bool) else type(value)
            container[key] = draw({int: st.integers(0, 4), float: st.floats(0, 1), bool: st.booleans(),
                                   str: st.sampled_from(WORDS)}.get(kind, JUNK))
        elif action == "drop":
            del container[key]
        elif action == "rename" and isinstance(container, dict):
            key_text = str(key)  # an earlier rename may have made it an integer
            typo = key_text[:-1] if len(key_text) > 1 else key_text + "x"
            new = draw(st.one_of(st.just(typo), st.just(key_text + "s"), st.text(max_size=5), st.integers(0, 3)))
            container[new] = container.pop(key)
        elif action == "add" and isinstance(container, dict):
            container[draw(st.one_of(st.sampled_from(WORDS), st.text(max_size=5)))] = draw(JUNK)
        else:
            container[key] = draw(JUNK)
    return config, draw(st.sampled_from([".yaml", ".json"]))


def _write(directory: Path, config: dict, suffix: str) -> Path:
    path = directory / f"config{suffix}"
    text = json.dumps(config) if suffix == ".json" else yaml.safe_dump(config, allow_unicode=True)
    path.write_text(text, encoding="utf-8")
    return path


def _check_outcome(code, out: str, err: str, directory: Path, config_name: str, config) -> None:
    shown = f"config: {config!r}\nstdout: {out[-2000:]}\nstderr: {err[-2000:]}"
    assert "Traceback" not in err, shown
    assert code in (0, 2), shown
    if code == 0:
        assert "backward ok" in out, shown
    else:
        lines = err.strip().splitlines()
        assert lines and all(line.startswith("error: ") for line in lines), shown
    written = sorted(p.name for p in directory.iterdir())
    assert written == [config_name], f"something was written: {written}\n{shown}"


@settings(max_examples=80, deadline=None, derandomize=True, database=None,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture,
                                 HealthCheck.data_too_large])
@given(mutated_configs())
def test_mutated_config_validates_and_runs_or_exits_2(tmp_path, monkeypatch, case):
    config, suffix = case
    directory = Path(tempfile.mkdtemp(dir=tmp_path))
    path = _write(directory, config, suffix)
    monkeypatch.chdir(directory)  # a relative save_dir would land here, and nothing may land
    out, err = io.StringIO(), io.StringIO()
    deterministic = torch.are_deterministic_algorithms_enabled()
    cublas = os.environ.get("CUBLAS_WORKSPACE_CONFIG")
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err), warnings.catch_warnings():
            warnings.simplefilter("ignore")  # torch's UserWarnings are not the lines under test
            code = train.main(["-c", str(path), "--dry-run"])
    finally:  # trainer.deterministic: true switches a process-wide torch flag
        torch.use_deterministic_algorithms(deterministic)
        if cublas is None:
            os.environ.pop("CUBLAS_WORKSPACE_CONFIG", None)
    event("validated and ran one batch" if code == 0 else "refused")
    _check_outcome(code, out.getvalue(), err.getvalue(), directory, path.name, config)


@settings(max_examples=2, deadline=None, derandomize=True, database=None,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
@given(mutated_configs())
def test_mutated_config_as_a_real_process(tmp_path, case):
    config, suffix = case
    directory = Path(tempfile.mkdtemp(dir=tmp_path))
    path = _write(directory, config, suffix)
    proc = subprocess.run([PYTHON, str(ROOT / "train.py"), "-c", str(path), "--dry-run"], cwd=directory,
                          capture_output=True, text=True, timeout=300,
                          env={**os.environ, "PYTHONWARNINGS": "ignore"})
    _check_outcome(proc.returncode, proc.stdout, proc.stderr, directory, path.name, config)
