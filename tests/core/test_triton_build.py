"""The Triton backend's kernels compile for the GPUs users train on, without a GPU.

``benchmarks/triton_build.py --check`` compiles every kernel the backend launches for its
configurations (VOC-shaped float32 first update and inner step, bfloat16 channels-last with
dual clip and KL, float16 (N, C), C = 1000 and the largest C) to cubins for sm_80 and sm_90
with the ptxas shipped in Triton's wheel, and fails on a build error or on a default tile that
spills registers. The interpreter tests (test_triton_backend.py) check the values; this checks
what the interpreter cannot: that the compiled path type-checks, lowers and fits in registers.
"""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

triton = pytest.importorskip('triton')
REPO = Path(__file__).resolve().parents[2]
PTXAS = Path(triton.__file__).parent / 'backends' / 'nvidia' / 'bin' / 'ptxas'


@pytest.mark.skipif(not PTXAS.exists(), reason=f'no ptxas at {PTXAS}')
def test_kernels_build_for_sm80_and_sm90_without_spills():
    env = dict(os.environ, TRITON_INTERPRET='0')
    run = subprocess.run([sys.executable, 'triton_build.py', '--check', '--archs', '80', '90'],
                         cwd=REPO / 'benchmarks', env=env, capture_output=True, text=True,
                         timeout=600)
    assert run.returncode == 0, run.stdout[-4000:] + run.stderr[-4000:]
    assert '# no failed builds or spilling default tiles' in run.stdout
    # every configuration built its three kernels for both targets
    rows = [line for line in run.stdout.splitlines() if line.startswith('| ') and
            ' | objective | ' in line]
    assert len(rows) == 2 * 6, run.stdout
