"""Forward + backward time and peak memory of the GRPO-RM loss against cross-entropy.

One run measures, at classification shapes ((1024, 10), (1024, 1000)) and segmentation shapes
((8, 21, 112, 112), (4, 21, 448, 448): VOC's 21 classes, labels with 255-ignored pixels):

- ``GRPORMLoss`` with the default backend ('auto': the compiled kernel on the CPU) and the
  reference one, each as the first update of a batch (pi_old = the current policy, what the
  GRPO-RM heads pass) and as an inner step (a cached pi_old, ``validated=True``,
  ``diagnostics=False``: as the heads call it);
- mmseg's ``CrossEntropyLoss`` (segmentation and classification) and mmpretrain's
  ``CrossEntropyLoss`` (classification).

Time: ``loss(logits, labels).backward()`` on a leaf tensor of logits, all variants of a shape
interleaved (A, B, ..., then reversed) after warm-up rounds, a round being a few calls at the
classification shapes (``CASES[case]['calls']``); medians of wall and process-CPU time per
call, and their ratios to cross-entropy. On CUDA (when available) times come from CUDA events.

Peak memory: the growth of the process's peak resident memory during one forward + backward,
above the inputs. On CPU each shape runs in a fresh subprocess: after building the inputs it
returns freed heap memory to the OS (``malloc_trim``), resets the peak (``/proc/self/clear_refs``
= 5, Linux) and reads ``VmHWM - VmRSS`` from ``/proc/self/status`` after the call: page-level,
so it sees every allocation (torch's CPU allocator has no counters; tracemalloc does not see
torch). After one untimed call of every variant, each is measured twice, in alternating
orders, and the larger growth is reported. On CUDA: ``torch.cuda.max_memory_allocated``
minus the allocated memory before the call, after ``reset_peak_memory_stats``.

    .venv/bin/python benchmarks/loss_cost.py [--threads 1] [--reps 9] [--device cpu|cuda]
        [--channels-last] [--cases ...] [--no-memory]
"""
from __future__ import annotations

import argparse
import ctypes
import json
import re
import subprocess
import sys
import time
import warnings
from collections.abc import Callable
from pathlib import Path

import common as c
import torch

TARGET_SEG = 1.5    # GRPO-RM / CE at segmentation shapes: time and peak memory
TARGET_CLS = 1.5    # GRPO-RM / CE at classification shapes: time
VOC_IMAGES_PER_GPU = 64

# calls: forward + backward calls per timed round (sub-millisecond calls are timed in
# batches, so that timer and scheduling noise stays small next to a round)
CASES = {
    'cls-10': dict(shape=(1024, 10), task='cls', reps=1.0, calls=32),
    'cls-1000': dict(shape=(1024, 1000), task='cls', reps=1.0, calls=4),
    'seg-112': dict(shape=(8, 21, 112, 112), task='seg', reps=1.0, calls=1),
    'seg-448': dict(shape=(4, 21, 448, 448), task='seg', reps=0.5, calls=1),
}
GRPO_VARIANTS = {
    'GRPO-RM fused, first update': ('auto', False),
    'GRPO-RM fused, inner step': ('auto', True),
    'GRPO-RM reference, first update': ('reference', False),
    'GRPO-RM reference, inner step': ('reference', True),
}
CE_SEG = 'mmseg CrossEntropyLoss'
CE_CLS = 'mmpretrain CrossEntropyLoss'


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('--out', default=str(c.RESULTS / 'loss_cost.txt'),
                        help='copy of the printed output (default: %(default)s)')
    parser.add_argument('--threads', type=int, default=1,
                        help='torch CPU threads (default 1: steadier on a shared machine)')
    parser.add_argument('--reps', type=int, default=9,
                        help='timed rounds per shape (halved for the largest; default '
                        '%(default)s)')
    parser.add_argument('--warmup', type=int, default=1, help='untimed rounds first')
    parser.add_argument('--cases', nargs='+', default=list(CASES), choices=list(CASES))
    parser.add_argument('--device', default='cuda' if torch.cuda.is_available() else 'cpu',
                        choices=['cpu', 'cuda'])
    parser.add_argument('--no-memory', action='store_true', help='time only')
    parser.add_argument('--channels-last', action='store_true',
                        help='segmentation logits (and pi_old) in channels-last memory format, '
                        'as the GRPO-RM seg head (its LayerNorm) leaves them')
    parser.add_argument('--memory-child', nargs=3, metavar=('CASE', 'DEVICE', 'FORMAT'),
                        help=argparse.SUPPRESS)
    return parser.parse_args()


# --------------------------------------------------------------------------- inputs and calls
def make_inputs(case: str, device: str, channels_last: bool = False) -> dict:
    """Logits (leaf, requires grad), labels with 255-ignored pixels (segmentation: 10 %), and
    a cached pi_old near the logits (for the inner-step variants); ``channels_last``: the
    segmentation logits and pi_old in that memory format."""
    spec = CASES[case]
    shape = spec['shape']
    g = torch.Generator().manual_seed(0)
    logits = (torch.randn(shape, generator=g) * 2).to(device).requires_grad_(True)
    label_shape = (shape[0], ) + tuple(shape[2:])
    labels = torch.randint(0, shape[1], label_shape, generator=g)
    if spec['task'] == 'seg':
        labels[torch.rand(label_shape, generator=g) < 0.1] = 255
    old = (logits.detach().cpu() + 0.1 * torch.randn(shape, generator=g)).to(device)
    if channels_last and spec['task'] == 'seg':
        logits = logits.detach().contiguous(memory_format=torch.channels_last).requires_grad_()
        old = old.contiguous(memory_format=torch.channels_last)
    return dict(logits=logits, labels=labels.to(device), old=old)


def make_calls(case: str, inputs: dict) -> dict[str, Callable[[], None]]:
    """Variant name -> a function running one forward + backward."""
    from mmpretrain.models.losses import CrossEntropyLoss as ClsCE
    from mmseg.models.losses import CrossEntropyLoss as SegCE

    from grpo_rm_mm.models.losses import GRPORMLoss

    z, y, old = inputs['logits'], inputs['labels'], inputs['old']
    seg = CASES[case]['task'] == 'seg'
    calls: dict[str, Callable[[], None]] = {}
    for name, (impl, inner) in GRPO_VARIANTS.items():
        loss_fn = GRPORMLoss(backend=impl, log_diagnostics=False)

        def run(loss_fn=loss_fn, inner=inner) -> None:
            extra = dict(old_logits=old, validated=True, diagnostics=False) if inner else {}
            if not seg:
                extra['avg_factor'] = z.shape[0]
            loss_fn(z, y, **extra).backward()
            z.grad = None

        calls[name] = run
    seg_ce = SegCE(avg_non_ignore=True) if seg else SegCE()

    def run_seg_ce() -> None:
        seg_ce(z, y, ignore_index=255).backward()
        z.grad = None

    calls[CE_SEG] = run_seg_ce
    if not seg:
        cls_ce = ClsCE()

        def run_cls_ce() -> None:
            cls_ce(z, y, avg_factor=z.shape[0]).backward()
            z.grad = None

        calls[CE_CLS] = run_cls_ce
    return calls


# --------------------------------------------------------------------------- time
def cuda_interleaved(fns: dict[str, Callable[[], None]], reps: int,
                     warmup: int) -> dict[str, c.Timings]:
    """As ``common.interleaved``, timed with CUDA events (wall = CPU column = event time)."""
    names = list(fns)
    for _ in range(warmup):
        for n in names:
            fns[n]()
    out = {n: c.Timings() for n in names}
    for r in range(reps):
        for n in (names if r % 2 == 0 else names[::-1]):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fns[n]()
            end.record()
            torch.cuda.synchronize()
            seconds = start.elapsed_time(end) / 1e3
            out[n].wall.append(seconds)
            out[n].cpu.append(seconds)
    return out


# --------------------------------------------------------------------------- memory
def _status_mib(key: str) -> float:
    text = Path('/proc/self/status').read_text()
    return int(re.search(rf'{key}:\s+(\d+) kB', text).group(1)) / 1024


def _trim() -> None:
    try:
        ctypes.CDLL('libc.so.6').malloc_trim(0)
    except OSError:  # not glibc
        pass


def memory_child(case: str, device: str, memory_format: str) -> None:
    """Runs in a fresh process: peak growth (MiB) of one forward + backward per variant, two
    rounds in alternating orders; prints ``{variant: [growth, growth]}`` as JSON."""
    torch.set_num_threads(1)
    warnings.filterwarnings('ignore')
    inputs = make_inputs(case, device, memory_format == 'channels_last')
    calls = make_calls(case, inputs)
    names = list(calls)
    for n in names:  # warm-up: one-time allocations (lazy initialisation) are not the loss's
        calls[n]()
    growth: dict[str, list[float]] = {n: [] for n in names}
    for r in range(2):
        for n in (names if r == 0 else names[::-1]):
            if device == 'cuda':
                torch.cuda.synchronize()
                torch.cuda.empty_cache()
                base = torch.cuda.memory_allocated()
                torch.cuda.reset_peak_memory_stats()
                calls[n]()
                torch.cuda.synchronize()
                growth[n].append((torch.cuda.max_memory_allocated() - base) / 2**20)
            else:
                _trim()
                base = _status_mib('VmRSS')
                Path('/proc/self/clear_refs').write_text('5')  # peak RSS := current RSS
                calls[n]()
                growth[n].append(_status_mib('VmHWM') - base)
    print(json.dumps(growth))


def measure_memory(case: str, device: str, channels_last: bool) -> dict[str, float]:
    """Peak growth per variant (the larger of two rounds), from a fresh subprocess."""
    memory_format = 'channels_last' if channels_last else 'contiguous'
    proc = subprocess.run([sys.executable, __file__, '--memory-child', case, device,
                           memory_format],
                          capture_output=True, text=True, check=True)
    growth = json.loads(proc.stdout.strip().splitlines()[-1])
    return {name: max(values) for name, values in growth.items()}


# --------------------------------------------------------------------------- report
def main() -> None:
    args = parse_args()
    if args.memory_child:
        memory_child(*args.memory_child)
        return
    c.setup(args.threads)
    warnings.filterwarnings('ignore', message='Default ``avg_non_ignore``')
    with c.tee_stdout(args.out):
        t_start = time.perf_counter()
        c.print_header('loss forward + backward: time and peak memory, GRPO-RM / CE')
        device = args.device
        if device == 'cuda':
            print(f'# device: {torch.cuda.get_device_name()}')
        else:
            print('# device: CPU; time = medians of interleaved rounds; memory = growth of '
                  'the peak RSS above the inputs, each shape in a fresh subprocess')
        print('# labels: random classes, segmentation with 10 % of the pixels 255 (ignored); '
              'logits ~ N(0, 4); inner steps: pi_old = logits + N(0, 0.01), validated=True, '
              'diagnostics=False')
        if args.channels_last:
            print('# segmentation logits and pi_old in channels-last memory format')
        results: dict[str, dict] = {}
        for case in args.cases:
            spec = CASES[case]
            inputs = make_inputs(case, device, args.channels_last)
            calls = make_calls(case, inputs)
            reps = max(3, int(round(args.reps * spec['reps'])))
            timer = cuda_interleaved if device == 'cuda' else c.interleaved
            per_round = spec['calls']
            rounds = {name: (lambda fn=fn, k=per_round: [fn() for _ in range(k)])
                      for name, fn in calls.items()}
            times = timer(rounds, reps, args.warmup, **({} if device == 'cuda' else dict(
                desc=case)))
            for t in times.values():  # per call
                t.wall[:] = [x / per_round for x in t.wall]
                t.cpu[:] = [x / per_round for x in t.cpu]
            memory = {} if args.no_memory else measure_memory(case, device, args.channels_last)
            logits_mib = inputs['logits'].numel() * inputs['logits'].element_size() / 2**20
            results[case] = dict(times=times, memory=memory, logits_mib=logits_mib,
                                 reps=reps)
            del inputs, calls
            report_case(case, results[case])
        summary(results)
        print(f'# total {time.perf_counter() - t_start:.0f} s')


def report_case(case: str, res: dict) -> None:
    spec = CASES[case]
    times, memory = res['times'], res['memory']
    bases = [CE_SEG] + ([CE_CLS] if spec['task'] == 'cls' else [])
    print(f'\n### {case}: logits {spec["shape"]} float32 ({res["logits_mib"]:.1f} MiB), '
          f'{res["reps"]} interleaved rounds of {spec["calls"]} call(s)\n')
    head = '| variant | median wall ms | median CPU ms | ' + ' | '.join(
        f'time / {b.split()[0]} CE' for b in bases)
    if memory:
        head += ' | peak growth MiB | x logits | ' + ' | '.join(
            f'memory / {b.split()[0]} CE' for b in bases)
    print(head + ' |')
    print('|---' * (head.count('|')) + '|')
    for name, t in times.items():
        row = (f'| {name} | {t.wall_median * 1e3:.1f} | {t.cpu_median * 1e3:.1f} | ' +
               ' | '.join(f'{t.cpu_median / times[b].cpu_median:.2f}' for b in bases))
        if memory:
            mem = memory[name]
            row += (f' | {mem:.0f} | {mem / res["logits_mib"]:.2f} | ' + ' | '.join(
                f'{mem / max(memory[b], 1e-9):.2f}' for b in bases))
        print(row + ' |')


def summary(results: dict) -> None:
    print('\n### Targets (CPU time ratios; memory ratios)\n')
    for case, res in results.items():
        spec = CASES[case]
        target = TARGET_SEG if spec['task'] == 'seg' else TARGET_CLS
        bases = [CE_SEG] + ([CE_CLS] if spec['task'] == 'cls' else [])
        times, memory = res['times'], res['memory']
        for name in ('GRPO-RM fused, first update', 'GRPO-RM fused, inner step'):
            for b in bases:
                ratio = times[name].cpu_median / times[b].cpu_median
                line = (f'{case}: {name} / {b}: time {ratio:.2f} '
                        f'({"PASS" if ratio <= target else "FAIL"} <= {target})')
                if memory and spec['task'] == 'seg':
                    mem = memory[name] / max(memory[b], 1e-9)
                    line += (f', peak memory {mem:.2f} '
                             f'({"PASS" if mem <= target else "FAIL"} <= {target})')
                print(line)
    if 'seg-448' in results and results['seg-448']['memory']:
        res = results['seg-448']
        per_image = {name: res['memory'][name] / CASES['seg-448']['shape'][0]
                     for name in res['memory']}
        print(f'\nVOC config (21 classes, 448 x 448 labels, {VOC_IMAGES_PER_GPU} images per '
              f'GPU), the loss alone, from the seg-448 growth per image:')
        for name in ('GRPO-RM fused, first update', 'GRPO-RM fused, inner step',
                     'GRPO-RM reference, first update', CE_SEG):
            gib = per_image[name] * VOC_IMAGES_PER_GPU / 1024
            print(f'  {name}: {per_image[name]:.1f} MiB per image -> {gib:.1f} GiB')


if __name__ == '__main__':
    main()
