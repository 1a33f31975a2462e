"""The code base is ruff clean (config: ruff.toml)."""
import shutil
import subprocess
import sys

import pytest
from conftest import REPO


def test_ruff_clean() -> None:
    ruff = shutil.which('ruff') or str(REPO / '.venv' / 'bin' / 'ruff')
    if not shutil.which(ruff):
        pytest.fail('ruff is not installed: run `bash tools/setup_env.sh --tests`')
    proc = subprocess.run([ruff, 'check', '.'], cwd=REPO, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_python_files_compile() -> None:
    proc = subprocess.run([sys.executable, '-m', 'compileall', '-q', 'grpo_rm_mm', 'tools',
                           'configs', 'benchmarks'], cwd=REPO, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout + proc.stderr
