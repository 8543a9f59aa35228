"""The benchmark scripts of the repository's benchmarks/ folder, loaded as modules for the tests.

The scripts are run as files (``python benchmarks/bench_mla_decode.py``), not installed or importable as a
package; ``load_benchmark("bench_mla_decode")`` executes benchmarks/bench_mla_decode.py once per process (under
the module name ``benchmarks.bench_mla_decode`` in ``sys.modules``) and returns that module.
"""
from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from types import ModuleType

# tests/support/mla_testing/benchmarks.py -> the repository root
BENCHMARKS = Path(__file__).resolve().parents[3] / "benchmarks"


def load_benchmark(name: str) -> ModuleType:
    """benchmarks/<name>.py as a module (``name`` without ``.py``), loaded on the first call and cached."""
    key = f"benchmarks.{name}"
    if key in sys.modules:
        return sys.modules[key]
    path = BENCHMARKS / f"{name}.py"
    if not path.is_file():
        raise FileNotFoundError(f"no benchmark script {path}")
    spec = importlib.util.spec_from_file_location(key, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[key] = module  # before running it, as an import does (dataclasses, pickling look it up)
    try:
        spec.loader.exec_module(module)
    except BaseException:
        del sys.modules[key]
        raise
    return module
