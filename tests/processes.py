"""`run_command`: run a launcher (torchrun, mpiexec, a benchmark) as the tests' subprocess.

The command gets its own session, so a timeout kills every process it started: a hung
rank fails its test instead of outliving it.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).parents[1]
BIN = Path(sys.executable).parent
PATH = f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}"


def run_command(command: list[str], timeout: float = 240, **env: str) -> str:
    """Run ``command`` in the repository root with this venv first on PATH; return its stdout."""
    environ = {**os.environ, "PATH": PATH, "OMP_NUM_THREADS": "1", **env}
    with subprocess.Popen(
        command,
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=environ,
        start_new_session=True,
    ) as process:
        try:
            stdout, stderr = process.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            stdout, stderr = process.communicate()
            pytest.fail(f"{command} did not finish in {timeout} s\n{stdout}\n{stderr}")
    assert process.returncode == 0, f"{command} exited {process.returncode}\n{stdout}\n{stderr}"
    return stdout
