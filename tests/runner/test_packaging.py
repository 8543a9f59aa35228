"""The package as a user meets it: one import name that shadows nothing, run from the repository root too; every
subpackage in the wheel; the console script's help, completion and job log; the version."""
from __future__ import annotations

import importlib.metadata
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

import mla_runner

REPO = Path(__file__).resolve().parents[2]
tomllib = pytest.importorskip("tomllib")  # Python 3.11+
SCRIPT = shutil.which("mla-runner")
installed = pytest.mark.skipif(SCRIPT is None, reason="mla-runner is not installed as a distribution here")


def run_python(code: str, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", code], cwd=cwd, capture_output=True, text=True, timeout=300)


def test_transformers_imports_beside_it_from_the_repository_root():
    """From the root, where `python -m pytest` and `python -m mla_runner` put the root on sys.path, `kernels` is Hugging
    Face's package (which transformers imports), never the repository's kernels/ folder."""
    code = ("import importlib.util, json, transformers; from transformers import DeepseekV3ForCausalLM; "
            "import mla_runner.kernels.mla_decode; spec = importlib.util.find_spec('kernels'); "
            "print(json.dumps(None if spec is None else spec.origin))")
    try:
        importlib.metadata.distribution("kernels")
        hugging_face_kernels = True
    except importlib.metadata.PackageNotFoundError:
        hugging_face_kernels = False
    for cwd in (REPO, REPO / "tests"):
        proc = run_python(code, cwd)
        assert proc.returncode == 0, proc.stderr[-2000:]
        origin = json.loads(proc.stdout.strip().splitlines()[-1])
        # with Hugging Face's package installed, that is what `kernels` is; without it, at most a namespace
        assert (origin is not None) == hugging_face_kernels, origin
        assert origin is None or not Path(origin).is_relative_to(REPO / "kernels"), origin


def test_nothing_at_the_root_is_another_distributions_top_level_package():
    """The names importable from the repository root and from the test helpers' path are not the top-level packages
    of any installed distribution (other than mla-runner itself)."""
    taken = {name for name, dists in importlib.metadata.packages_distributions().items()
             if any(d.lower() != "mla-runner" for d in dists)}
    for folder in (REPO, REPO / "tests" / "support"):
        importable = {p.stem for p in folder.iterdir()
                      if (p / "__init__.py").is_file() or (p.suffix == ".py" and p.is_file())}
        assert not importable & taken, (folder, importable & taken)
    # kernels/ and models/ are namespace parts of mla_runner: a regular package of the same name elsewhere wins
    assert not (REPO / "kernels" / "__init__.py").exists() and not (REPO / "models" / "__init__.py").exists()


def test_the_wheel_lists_every_subpackage():
    setuptools = tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["setuptools"]
    root = REPO / setuptools["package-dir"]["mla_runner"]
    found = {"mla_runner"}
    for dirpath, dirnames, filenames in os.walk(root, followlinks=True):
        dirnames[:] = [d for d in dirnames if d != "__pycache__"]
        rel = Path(dirpath).relative_to(root)
        if rel.parts and any(f.endswith(".py") for f in filenames):
            found.add(".".join(("mla_runner", *rel.parts)))
    assert found == set(setuptools["packages"]) - {"mla_runner.conf"}  # the configs: package data (.ci/run checks)
    assert setuptools["package-data"]["mla_runner.conf"] == ["*.yaml", "**/*.yaml"]


@installed
def test_version_is_the_distributions():
    assert mla_runner.__version__ == importlib.metadata.version("mla-runner")


@installed
def test_the_console_script_names_the_app_completes_and_logs_as_runner(tmp_path):
    script = SCRIPT
    help_text = subprocess.run([script, "--help"], capture_output=True, text=True, timeout=300).stdout
    assert help_text.startswith("mla-runner: an inference runner") and "attention: " in help_text
    env = {**os.environ, "COMP_LINE": "mla-runner attention=", "COMP_POINT": "21"}
    choices = subprocess.run([script, "-sc", "query=bash"], capture_output=True, text=True, env=env,
                             timeout=300).stdout.split()
    assert {"attention=torch", "attention=triton", "attention=flashmla"} <= set(choices)
    out = tmp_path / "run"
    proc = subprocess.run([script, f"hydra.run.dir={out}", "task.max_tokens=2", "progress=false"], cwd=tmp_path,
                          capture_output=True, text=True, timeout=600,
                          env={**os.environ, "XDG_CACHE_HOME": str(tmp_path / "cache")})
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert (out / "runner.log").is_file() and (out / "completions.jsonl").is_file()
