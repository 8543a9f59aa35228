"""Environment for tests that start the runner in a subprocess."""
from __future__ import annotations

import os
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def repo_env(**extra: str) -> dict[str, str]:
    """os.environ with the repo first on PYTHONPATH; an existing PYTHONPATH is kept after it (packages
    installed with ``pip --target``, as on the GPU machines)."""
    path = os.pathsep.join(p for p in (str(REPO), os.environ.get("PYTHONPATH", "")) if p)
    return {**os.environ, "PYTHONPATH": path, **extra}
