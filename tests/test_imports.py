"""The server holds no torch: importing its code in a fresh interpreter loads none of it (the
server image has no torch, so an import that slipped in would fail only there)."""

from __future__ import annotations

import subprocess
import sys

import pytest

from flowerpot.launcher import clean_env

CHECK = "import sys, {module}; print(' '.join(sorted(m for m in sys.modules if m.split('.')[0] in {heavy})))"


@pytest.mark.process
@pytest.mark.parametrize("module", ["server.app", "flowerpot.cli"])
def test_importing_the_server_loads_no_torch(module: str) -> None:
    code = CHECK.format(module=module, heavy=("torch", "torchvision", "client"))
    result = subprocess.run([sys.executable, "-c", code], env=clean_env(), capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stdout.split() == []
