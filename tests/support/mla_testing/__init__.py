"""Helpers shared by the tests: tolerances, the transformers oracle, plan references (on sys.path through pytest's
``pythonpath`` setting, pyproject.toml)."""

import os

# Triton kernels on a CPU run under the interpreter, which `import mla_runner` switches on where no GPU is visible.
INTERPRETER = os.environ.get("TRITON_INTERPRET") == "1"
