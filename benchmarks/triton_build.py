"""The Triton backend's kernels compiled ahead of time for GPU architectures, without a GPU.

For each configuration (a call of the objective: shape, dtype, layout, options) the backend's
launcher runs with its kernels replaced by recorders (nothing launches; CPU tensors stand in
for CUDA ones), and every kernel it would launch is compiled by Triton for each target
(``GPUTarget('cuda', arch, 32)``) down to a cubin with the ptxas that comes with Triton; ``ptxas
-v`` gives its registers per thread and spill bytes. Integer arguments equal to 1 are
specialised as constants, as Triton's JIT does; its alignment hints are not reproduced, so the
compiled code may differ from the JIT's in vector widths (not in registers by much).

    .venv/bin/python benchmarks/triton_build.py            # -> benchmarks/results/triton_build.txt
    .venv/bin/python benchmarks/triton_build.py --check    # exit 1 on a failed build or spills

``--check`` fails when a kernel does not compile for a target, or when a kernel at the
backend's default tiles spills registers (the tests run it).
"""
from __future__ import annotations

import argparse
import inspect
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path

# compiled kernels: Triton decides at import whether its functions are interpreted
os.environ['TRITON_INTERPRET'] = '0'

import common as c  # noqa: E402
import torch  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
ARCHS = (80, 90)
TYPES = {torch.float32: 'fp32', torch.float16: 'fp16', torch.bfloat16: 'bf16',
         torch.float64: 'fp64', torch.int64: 'i64', torch.int32: 'i32', torch.uint8: 'u8',
         torch.bool: 'i1'}
#: name -> (logits shape, dtype, channels-last, pi_old logits, pi_ref logits, options)
CONFIGS = {
    'VOC first update, fp32 (B, C, H, W)': ((2, 21, 64, 64), torch.float32, False, False,
                                            False, dict(group_weighting='pi_old')),
    'VOC inner step, fp32, no diagnostics': ((2, 21, 64, 64), torch.float32, False, True,
                                             False, dict(group_weighting='pi_old',
                                                         validated=True, diagnostics=False)),
    'bf16 channels-last, dual clip, KL': ((2, 21, 64, 64), torch.bfloat16, True, True, True,
                                          dict(group_weighting='pi_old', beta=0.1,
                                               surrogate='dual_clip')),
    'fp16 (N, C) C=10, uniform': ((1024, 10), torch.float16, False, True, False,
                                  dict(group_weighting='uniform')),
    'fp32 (N, C) C=1000': ((1024, 1000), torch.float32, False, True, False,
                           dict(group_weighting='pi_old')),
    'fp32 (N, C) C=4096 (the largest)': ((8, 4096), torch.float32, False, True, False,
                                         dict(group_weighting='pi_old')),
}


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    parser.add_argument('--check', action='store_true',
                        help='exit 1 if a kernel does not build or a default tile spills')
    parser.add_argument('--archs', type=int, nargs='+', default=list(ARCHS),
                        help='compute capabilities to build for (80: A100, 90: H100/H200)')
    parser.add_argument('--out', default=None, help='results file (default: none with '
                        '--check, else benchmarks/results/triton_build.txt)')
    return parser.parse_args()


def recorded_launches(config: tuple) -> list[tuple]:
    """``(kernel function, args, kwargs)`` of every kernel one call of ``config`` launches
    (forward and backward), recorded instead of launched."""
    sys.path.insert(0, str(REPO / 'tests' / 'core'))
    from test_triton_backend import REWARDS, inputs, make_problem

    from grpo_rm_mm.core.backends import triton_cuda as tc
    from grpo_rm_mm.core.rewards import fused_reward_terms

    calls: list[tuple] = []

    class Recorder:
        def __init__(self, fn) -> None:
            self.fn = fn

        def __getitem__(self, grid):
            return lambda *args, **kwargs: calls.append((self.fn, args, kwargs))

    shape, dtype, channels_last, old, ref, options = config
    x = inputs(shape, dtype=dtype, old=old, ref=ref,
               layout='channels_last' if channels_last else 'contiguous')
    rewards = REWARDS['acc+uni']
    problem = make_problem(x['logits'], x['labels'], rewards, x.get('old'), x.get('ref'),
                           **options)
    kernels = tc._kernels
    tc._kernels = lambda: (Recorder(tc._objective_kernel_fn), Recorder(tc._finish_kernel_fn),
                           Recorder(tc._scale_kernel_fn))
    try:
        out = tc.launch(problem, fused_reward_terms(rewards))
        tc.scale_gradient(out.grad, torch.ones(()), 0.5)
    finally:
        tc._kernels = kernels
    return calls


def build(fn, args: tuple, kwargs: dict, arch: int) -> dict:
    """Compile one launch for ``sm_<arch>``: registers, spill bytes, shared memory."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    signature, constants = {}, {}
    for name, value in zip(inspect.signature(fn).parameters, args):
        if torch.is_tensor(value):
            signature[name] = '*' + TYPES[value.dtype]
        elif isinstance(value, bool):
            signature[name] = 'i1'
        elif isinstance(value, int):
            if value == 1:
                signature[name], constants[name] = 'constexpr', 1
            else:
                signature[name] = 'i32' if -2 ** 31 <= value < 2 ** 31 else 'i64'
        else:
            signature[name] = 'fp32'
    options = {k: v for k, v in kwargs.items() if k in ('num_warps', 'num_stages')}
    for name, value in kwargs.items():
        if name not in options:
            signature[name], constants[name] = 'constexpr', value
    kernel = triton.compile(ASTSource(fn=triton.jit(fn), signature=signature,
                                      constexprs=constants),
                            target=GPUTarget('cuda', arch, 32), options=options)
    ptxas = Path(triton.__file__).parent / 'backends' / 'nvidia' / 'bin' / 'ptxas'
    with tempfile.TemporaryDirectory() as tmp:
        ptx = Path(tmp) / 'kernel.ptx'
        ptx.write_text(kernel.asm['ptx'])
        gpu = f'sm_{arch}a' if arch >= 90 else f'sm_{arch}'
        report = subprocess.run([str(ptxas), '-v', '--gpu-name', gpu, str(ptx), '-o',
                                 str(Path(tmp) / 'kernel.cubin')],
                                capture_output=True, text=True, check=True)
    text = report.stdout + report.stderr
    return dict(registers=int(re.search(r'Used (\d+) registers', text).group(1)),
                spills=int(re.search(r'(\d+) bytes spill stores', text).group(1)),
                shared=int(kernel.metadata.shared),
                warps=options.get('num_warps', 4),
                tile=(f"{kwargs['BLOCK_C']} x {kwargs['BLOCK_Q']}" if 'BLOCK_Q' in kwargs
                      else str(kwargs.get('BLOCK', kwargs.get('BLOCK_R', '')))))


def main() -> int:
    args = parse_args()
    out = args.out if args.out or args.check else str(c.RESULTS / 'triton_build.txt')
    failures = []
    with c.tee_stdout(out):
        c.print_header('the Triton kernels compiled for GPU architectures without a GPU '
                       '(registers per thread and spills from ptxas -v)')
        import triton
        print(f'# triton {triton.__version__}\n')
        print('| configuration | kernel | sm | tile | warps | registers | spill bytes '
              '| shared bytes |')
        print('|---|---|---:|---|---:|---:|---:|---:|')
        for name, config in CONFIGS.items():
            for fn, call_args, kwargs in recorded_launches(config):
                kernel = fn.__name__.strip('_').removesuffix('_kernel_fn')
                for arch in args.archs:
                    try:
                        r = build(fn, call_args, kwargs, arch)
                    except Exception as exc:  # a failed build is the finding
                        failures.append(f'{name}, {kernel}, sm_{arch}: {exc}')
                        print(f'| {name} | {kernel} | {arch} | | | BUILD FAILED | | |')
                        continue
                    if r['spills'] and kernel == 'objective':
                        failures.append(f'{name}, {kernel}, sm_{arch}: {r["spills"]} bytes '
                                        f'of spill stores at the default tile {r["tile"]}')
                    print(f'| {name} | {kernel} | {arch} | {r["tile"]} | {r["warps"]} '
                          f'| {r["registers"]} | {r["spills"]} | {r["shared"]} |', flush=True)
        print(f'\n# {"no" if not failures else len(failures)} failed builds or spilling '
              f'default tiles')
        for failure in failures:
            print(f'# FAIL {failure}')
    return 1 if args.check and failures else 0


if __name__ == '__main__':
    sys.exit(main())
