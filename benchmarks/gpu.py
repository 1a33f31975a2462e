"""The objective's backends on a GPU, and the device-independent counts behind the estimates.

On a CUDA machine (nothing downloaded; about 5 minutes on one GPU):

1. loss forward + backward, mmseg ``CrossEntropyLoss`` vs GRPO-RM on the ``torch_chunked`` and
   ``triton`` backends, at (64, 21, 448, 448) (the VOC config's 64 images per GPU),
   (8, 21, 112, 112), (1024, 10) and (1024, 1000), first update (pi_old = the current policy)
   and inner step (a cached pi_old, ``validated``, no diagnostics): CUDA-event time (median of
   repeats after warm-up) and peak CUDA memory above the inputs;
2. the VOC config's train step (``configs/grpo_rm_voc.py`` vs ``configs/ce_voc.py``: DINOv2
   ViT-S/14 with random weights, frozen, 448 crops, the configured 64 images per GPU or the
   largest batch that fits) in images/s, GRPO-RM (its 4 inner steps) / CE;
3. the classification config's train step (``configs/grpo_rm_cifar10.py`` vs
   ``configs/ce_cifar10.py``, 224 px) at batch 1024.

``--cpu-counts`` (any machine, no GPU): per logit element, the bytes each path moves and the
kernel launches per call, counted by a dispatch-mode counter (:class:`OpCounter`: every
non-view operator reads its tensor arguments and writes its outputs; a Triton launch reads and
writes its tensor arguments once) on CPU tensors, forward and backward (the backward with
grad_output 2, so the CPU's shortcut for an unscaled gradient does not hide the scaling pass a
CUDA backward makes). The torch backend runs with the chunks it takes on CUDA (and, for
comparison, the CPU's); its launches at the VOC shape are ``a + b * main chunks + c * label
chunks``, the chunk counts from its own chunking at that shape and the coefficients from
counted calls (checked on another call). The Triton kernels run in Triton's interpreter.

    .venv/bin/python benchmarks/gpu.py                # CUDA: -> benchmarks/results/gpu.txt
    .venv/bin/python benchmarks/gpu.py --cpu-counts   # -> benchmarks/results/gpu_counts.txt
    .venv/bin/python benchmarks/gpu.py --smoke        # every part, tiny, on the CPU
"""
from __future__ import annotations

import argparse
import contextlib
import math
import os
import statistics
import sys
import time
from collections.abc import Callable, Iterator

if '--cpu-counts' in sys.argv or '--smoke' in sys.argv:
    # the Triton kernels on CPU tensors: chosen when they are defined, before any import
    os.environ.setdefault('TRITON_INTERPRET', '1')

import common as c  # noqa: E402
import torch  # noqa: E402
from torch.utils._python_dispatch import TorchDispatchMode  # noqa: E402
from torch.utils._pytree import tree_flatten  # noqa: E402

VOC_SHAPE = (64, 21, 448, 448)
SHAPES = {'seg-448 (VOC, 64 per GPU)': VOC_SHAPE, 'seg-112': (8, 21, 112, 112),
          'cls-10': (1024, 10), 'cls-1000': (1024, 1000)}
SMOKE_SHAPES = {'seg-56': (2, 21, 56, 56), 'cls-10': (64, 10)}
PATHS = ('mmseg CE', 'torch_chunked', 'triton')
TARGETS = dict(time=1.0, memory=0.5, step=0.97)
#: "a handful" of launches per call, the Triton path's target (mmseg CE makes 11)
HANDFUL = 5


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    mode = parser.add_mutually_exclusive_group()
    mode.add_argument('--cpu-counts', action='store_true',
                      help='bytes and launches per call of each path, counted on the CPU')
    mode.add_argument('--smoke', action='store_true',
                      help='every part at tiny sizes on the CPU (checks the script)')
    parser.add_argument('--out', default=None, help='copy of the printed output (default: '
                        'results/gpu.txt, results/gpu_counts.txt with --cpu-counts)')
    parser.add_argument('--reps', type=int, default=15, help='timed calls per variant')
    parser.add_argument('--steps', type=int, default=8, help='timed train steps per model')
    parser.add_argument('--skip-steps', action='store_true', help='loss timings only')
    return parser.parse_args()


# --------------------------------------------------------------------------- the calls
def make_inputs(shape: tuple[int, ...], device: str, seed: int = 0) -> dict:
    """Logits (leaf), labels (segmentation: 10 % of the pixels 255) and a cached pi_old near
    the logits, as benchmarks/loss_cost.py makes them."""
    g = torch.Generator().manual_seed(seed)
    logits = (torch.randn(shape, generator=g) * 2).to(device).requires_grad_(True)
    label_shape = (shape[0], ) + tuple(shape[2:])
    labels = torch.randint(0, shape[1], label_shape, generator=g)
    if len(shape) > 2:
        labels[torch.rand(label_shape, generator=g) < 0.1] = 255
    old = (logits.detach().cpu() + 0.1 * torch.randn(shape, generator=g)).to(device)
    return dict(logits=logits, labels=labels.to(device), old=old)


def make_call(path: str, inner: bool, x: dict, grad_output: float = 1.0,
              chunk_size: int | None = None) -> Callable[[], None] | None:
    """One forward + backward of ``path`` on ``x``; None where it has no such variant (CE has
    no inner step)."""
    from mmseg.models.losses import CrossEntropyLoss

    from grpo_rm_mm.models.losses import GRPORMLoss

    z, y, old = x['logits'], x['labels'], x['old']
    gout = torch.tensor(grad_output, device=z.device)
    if path == 'mmseg CE':
        if inner:
            return None
        ce = CrossEntropyLoss(avg_non_ignore=True)

        def run_ce() -> None:
            ce(z, y, ignore_index=255).backward(gout)
            z.grad = None

        return run_ce
    loss_fn = GRPORMLoss(backend=path, log_diagnostics=False, chunk_size=chunk_size)
    extra = dict(old_logits=old, validated=True, diagnostics=False) if inner else {}

    def run() -> None:
        loss_fn(z, y, **extra).backward(gout)
        z.grad = None

    return run


# --------------------------------------------------------------------------- counting
class OpCounter(TorchDispatchMode):
    """Counts the operators that launch a kernel (every non-view operator but allocations)
    and the bytes they move (the sizes of their tensor arguments and outputs)."""

    NO_KERNEL = ('aten::empty', 'aten::empty_like', 'aten::empty_strided', 'aten::new_empty',
                 'aten::detach', 'aten::alias', 'aten::lift_fresh', 'aten::_local_scalar_dense')

    def __init__(self) -> None:
        super().__init__()
        self.launches = 0
        self.bytes = 0
        self.paused = False

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if not self.paused and not func.is_view and func._schema.name not in self.NO_KERNEL:
            self.launches += 1
            self.bytes += tensor_bytes((args, kwargs or {})) + tensor_bytes(out)
        return out


def tensor_bytes(tree: object) -> int:
    leaves, _ = tree_flatten(tree)
    return sum(t.numel() * t.element_size() for t in leaves if isinstance(t, torch.Tensor))


@contextlib.contextmanager
def counted_triton_launches(counter: OpCounter) -> Iterator[None]:
    """The Triton backend's kernels (as its ``_kernels()`` hands them to the launcher) counted
    as launches of their tensor arguments' bytes: each read or written once, but the scaling
    kernel's gradient (its first argument) read and written (the interpreter's own host copies
    not counted)."""
    from grpo_rm_mm.core.backends import triton_cuda

    class Counted:
        def __init__(self, kernel, in_place: tuple[int, ...] = ()) -> None:
            self.kernel = kernel
            self.in_place = in_place

        def __getitem__(self, grid):
            launch = self.kernel[grid]

            def run(*args, **kwargs):
                counter.launches += 1
                counter.bytes += tensor_bytes((args, kwargs)) + tensor_bytes(
                    [args[i] for i in self.in_place])
                counter.paused = True
                try:
                    return launch(*args, **kwargs)
                finally:
                    counter.paused = False

            return run

    kernels = triton_cuda._kernels

    def counted() -> tuple:
        objective, finish, scale = kernels()
        return Counted(objective), Counted(finish), Counted(scale, in_place=(0, ))

    triton_cuda._kernels = counted
    try:
        yield
    finally:
        triton_cuda._kernels = kernels


def count(path: str, inner: bool, shape: tuple[int, ...], chunk_size: int | None = None
          ) -> tuple[int, int, int]:
    """``(launches, bytes, logit elements)`` of one forward + backward on CPU tensors."""
    x = make_inputs(shape, 'cpu')
    run = make_call(path, inner, x, grad_output=2.0, chunk_size=chunk_size)
    run()  # untimed first call: one-time work (a backend's setup) is not per call
    counter = OpCounter()
    triton = counted_triton_launches(counter) if path == 'triton' else contextlib.nullcontext()
    with triton, counter:
        run()
    return counter.launches, counter.bytes, x['logits'].numel()


def torch_chunk_counts(shape: tuple[int, ...], chunk: int) -> tuple[int, int]:
    """(main chunks, label-pass chunks) of the torch backend at ``shape`` and ``chunk``."""
    from grpo_rm_mm.core.backends import torch_chunked as tc

    b, s = shape[0], math.prod(shape[2:])
    return (len(list(tc._chunks(b, s, chunk))),
            len(list(tc._chunks(b, s, max(chunk, tc.LABEL_PASS_QUERIES)))))


def torch_launch_model(inner: bool) -> tuple[tuple[float, float, float], int, int]:
    """Coefficients ``(a, b, c)`` of the torch backend's launches per call, ``a + b * main
    chunks + c * label chunks``, from three counted calls, and (predicted, counted) on a
    fourth."""
    from grpo_rm_mm.core.backends import torch_chunked as tc

    small, many = (2, 21, 64, 64), (tc.LABEL_PASS_QUERIES // 4096 + 44, 21, 64, 64)
    fits = [(small, 8192), (small, 4096), (many, tc.LABEL_PASS_QUERIES)]
    (m1, l1), (m2, l2), (m3, l3) = (torch_chunk_counts(s, q) for s, q in fits)
    n1, n2, n3 = (count('torch_chunked', inner, s, q)[0] for s, q in fits)
    assert (m1, l1, m2, l2, m3, l3) == (1, 1, 2, 1, 2, 2), 'the fit needs other shapes'
    b = n2 - n1
    cc = n3 - n2
    a = n1 - b - cc
    check_shape, check_chunk = small, 1000
    m4, l4 = torch_chunk_counts(check_shape, check_chunk)
    predicted = a + b * m4 + cc * l4
    return (a, b, cc), predicted, count('torch_chunked', inner, check_shape, check_chunk)[0]


def cpu_counts() -> None:
    from grpo_rm_mm.core.dispatch import BACKENDS
    TRITON = 'triton' in BACKENDS

    from grpo_rm_mm.core.backends import torch_chunked as tc

    c.print_header('kernel launches and bytes moved per logit element, counted on the CPU '
                   '(device-independent)')
    print('# bytes: every non-view operator reads its tensor arguments and writes its outputs; '
          'a Triton launch reads or writes each tensor argument once. Forward + backward.')
    if not TRITON:
        print('# no triton backend is registered: its rows are missing')
    numel_voc = math.prod(VOC_SHAPE)
    measure = (2, 21, 112, 112)
    rows = []
    for inner in (False, True):
        variant = 'inner step' if inner else 'first update'
        for path in PATHS:
            if path == 'mmseg CE' and inner or path == 'triton' and not TRITON:
                continue
            if path == 'torch_chunked':
                (a, b, cc), predicted, counted = torch_launch_model(inner)
                for device_type in ('cuda', 'cpu'):
                    chunk = tc.default_chunk_size(numel_voc, VOC_SHAPE[1], device_type)
                    n, nbytes, numel = count(path, inner, measure, chunk)
                    mains, labels = torch_chunk_counts(VOC_SHAPE, chunk)
                    voc = a + b * mains + cc * labels
                    note = (f'{a} + {b} x {mains} chunks + {cc} x {labels} label chunks '
                            f'(model check: {predicted} predicted, {counted} counted)')
                    rows.append((f'torch_chunked, {device_type} chunks', variant,
                                 nbytes / numel, n, voc, note))
                continue
            small = (1, 21, 56, 56)
            n_small, _, _ = count(path, inner, small)
            n, nbytes, numel = count(path, inner, measure)
            note = (f'{n_small} at {small}, {n} at {measure}: '
                    + ('independent of the size' if n == n_small else 'GROWS with the size'))
            rows.append((path, variant, nbytes / numel, n, n, note))
    ce_bytes = next(r[2] for r in rows if r[0] == 'mmseg CE')
    ce_launches = next(r[3] for r in rows if r[0] == 'mmseg CE')
    print(f'\n| path | call | bytes / logit element | x CE | launches per call at {measure} '
          f'| launches at {VOC_SHAPE} | how |')
    print('|---|---|---:|---:|---:|---:|---|')
    for name, variant, per_el, n, voc, note in rows:
        print(f'| {name} | {variant} | {per_el:.1f} | {per_el / ce_bytes:.2f} | {n} | {voc} '
              f'| {note} |')
    print(f'\n# mmseg CE: {ce_launches} launches per call at any size')
    cuda_row = next(r for r in rows if r[0] == 'torch_chunked, cuda chunks')
    cpu_row = next(r for r in rows if r[0] == 'torch_chunked, cpu chunks')
    print(f'# torch_chunked at the VOC shape, first update: {cuda_row[4]} launches with CUDA '
          f'chunks vs {cpu_row[4]} with the CPU chunks ({cpu_row[4] / cuda_row[4]:.1f}x fewer; '
          f'target >= 10x: {"PASS" if cpu_row[4] >= 10 * cuda_row[4] else "FAIL"})')
    for row in rows:
        if row[0] == 'triton':
            verdict = 'PASS' if row[2] <= ce_bytes else 'FAIL'
            few = 'PASS' if row[3] <= HANDFUL and 'independent' in row[5] else 'FAIL'
            print(f'# triton, {row[1]}: {row[2] / ce_bytes:.2f}x CE bytes (target <= 1.0: '
                  f'{verdict}); {row[3]} launches, {row[5]} (target <= {HANDFUL} at any '
                  f'size: {few}); on CUDA the call also makes one host read (a 16-byte copy), '
                  f'which is no operator on CPU tensors')


# --------------------------------------------------------------------------- GPU timings
def time_call(run: Callable[[], None], reps: int, device: str) -> tuple[float, float]:
    """(median ms per call, peak memory MiB above the inputs)."""
    for _ in range(3):
        run()
    if device == 'cuda':
        torch.cuda.synchronize()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        run()
        torch.cuda.synchronize()
        peak = (torch.cuda.max_memory_allocated() - base) / 2**20
        times = []
        for _ in range(reps):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            run()
            end.record()
            torch.cuda.synchronize()
            times.append(start.elapsed_time(end))
        return statistics.median(times), peak
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        run()
        times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times), float('nan')


def loss_timings(shapes: dict, reps: int, device: str) -> None:
    from grpo_rm_mm.core.dispatch import BACKENDS
    TRITON = 'triton' in BACKENDS

    print('\n## loss forward + backward (CUDA events, median; peak memory above the inputs)')
    print('| shape | path | first update ms | x CE | inner step ms | x CE | peak MiB first '
          '(inner) | x CE |')
    print('|---|---|---:|---:|---:|---:|---:|---:|')
    for label, shape in shapes.items():
        x = make_inputs(shape, device)
        n = reps if x['logits'].numel() < 1e8 else max(5, reps // 3)
        results = {}
        for path in PATHS:
            if path == 'triton' and not TRITON:
                continue
            for inner in (False, True):
                run = make_call(path, inner, x)
                if run is not None:
                    results[path, inner] = time_call(run, n, device)
        ce_ms, ce_mib = results['mmseg CE', False]
        for path in PATHS:
            if (path, False) not in results:
                continue
            (t1, m1) = results[path, False]
            t2, m2 = results.get((path, True), (float('nan'), float('nan')))
            print(f'| {label} {shape} | {path} | {t1:.3f} | {t1 / ce_ms:.2f} | {t2:.3f} | '
                  f'{t2 / ce_ms:.2f} | {m1:.0f} ({m2:.0f}) | {m1 / ce_mib:.2f} |')
        if shape == VOC_SHAPE and ('triton', False) in results:
            t, m = results['triton', False]
            print(f'# targets at {shape}: triton time {t / ce_ms:.2f}x CE (<= {TARGETS["time"]}:'
                  f' {"PASS" if t / ce_ms <= TARGETS["time"] else "FAIL"}), peak memory '
                  f'{m / ce_mib:.2f}x CE (<= {TARGETS["memory"]}: '
                  f'{"PASS" if m / ce_mib <= TARGETS["memory"] else "FAIL"})')
        del x


def seg_batch(batch: int, crop: int, device: str) -> dict:
    from mmengine.structures import PixelData
    from mmseg.structures import SegDataSample

    g = torch.Generator().manual_seed(0)
    inputs, samples = [], []
    for _ in range(batch):
        inputs.append(torch.randint(0, 256, (3, crop, crop), dtype=torch.uint8,
                                    generator=g).to(device))
        label = torch.randint(0, 21, (1, crop, crop), generator=g)
        label[:, : crop // 8] = 255
        sample = SegDataSample(gt_sem_seg=PixelData(data=label.to(device)))
        sample.set_metainfo(dict(img_shape=(crop, crop), pad_shape=(crop, crop),
                                 ori_shape=(crop, crop)))
        samples.append(sample)
    return dict(inputs=inputs, data_samples=samples)


def cls_batch(batch: int, size: int, device: str) -> dict:
    from mmpretrain.structures import DataSample

    g = torch.Generator().manual_seed(0)
    inputs = [torch.randint(0, 256, (3, size, size), dtype=torch.uint8, generator=g).to(device)
              for _ in range(batch)]
    labels = torch.randint(0, 10, (batch, ), generator=g)
    samples = [DataSample().set_gt_label(int(y)) for y in labels]
    return dict(inputs=inputs, data_samples=samples)


def build_model(path: str, scope: str, device: str, crop: int | None = None):
    """``(model, optim_wrapper)`` of a config, the pretrained weights' ``init_cfg`` removed
    (random weights: nothing is downloaded)."""
    from mmengine.config import Config
    from mmengine.optim import build_optim_wrapper
    from mmengine.registry import DefaultScope, init_default_scope

    cfg = Config.fromfile(str(c.REPO / path))
    cfg.model.backbone.pop('init_cfg', None)
    if crop is not None and 'data_preprocessor' in cfg.model:
        cfg.model.data_preprocessor['size'] = (crop, crop)
    init_default_scope(scope)
    if scope == 'mmseg':
        from mmseg.registry import MODELS
    else:
        from mmpretrain.registry import MODELS
    with DefaultScope.overwrite_default_scope(scope):
        model = MODELS.build(cfg.model)
    model.init_weights()
    model.to(device)
    return model, build_optim_wrapper(model, cfg.optim_wrapper)


def images_per_second(model, wrapper, data: dict, steps: int, device: str) -> float:
    model.train()
    for _ in range(2):
        model.train_step(data, wrapper)
    if device == 'cuda':
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(steps):
        model.train_step(data, wrapper)
    if device == 'cuda':
        torch.cuda.synchronize()
    return steps * len(data['inputs']) / (time.perf_counter() - t0)


def train_steps(steps: int, device: str, smoke: bool) -> None:
    crop, batch = (56, 2) if smoke else (448, 64)
    print(f'\n## VOC config train step: frozen DINOv2 ViT-S/14 (random weights), {crop} crops')
    ips = {}
    for name, cfg_path in (('CE', 'configs/ce_voc.py'), ('GRPO-RM', 'configs/grpo_rm_voc.py')):
        b = batch
        while True:
            try:
                model, wrapper = build_model(cfg_path, 'mmseg', device, crop)
                ips[name] = images_per_second(model, wrapper, seg_batch(b, crop, device),
                                              steps, device)
                break
            except torch.OutOfMemoryError:
                del model, wrapper
                torch.cuda.empty_cache()
                b //= 2
                if b == 0:
                    raise
        print(f'| {name} | batch {b} per GPU | {ips[name]:.1f} images/s |')
        del model, wrapper
        if device == 'cuda':
            torch.cuda.empty_cache()
    ratio = ips['GRPO-RM'] / ips['CE']
    print(f'# GRPO-RM / CE images/s: {ratio:.3f} (target >= {TARGETS["step"]}: '
          f'{"PASS" if ratio >= TARGETS["step"] else "FAIL"}); GRPO-RM takes the config\'s 4 '
          f'inner steps on the head per batch')

    size, batch = (28, 8) if smoke else (224, 1024)
    print(f'\n## classification config train step: batch {batch}, {size} px')
    cls = {}
    for name, cfg_path in (('CE', 'configs/ce_cifar10.py'),
                           ('GRPO-RM', 'configs/grpo_rm_cifar10.py')):
        model, wrapper = build_model(cfg_path, 'mmpretrain', device)
        cls[name] = images_per_second(model, wrapper, cls_batch(batch, size, device), steps,
                                      device)
        print(f'| {name} | {cls[name]:.1f} images/s |')
        del model, wrapper
    print(f'# GRPO-RM / CE images/s: {cls["GRPO-RM"] / cls["CE"]:.3f}')


def main() -> None:
    args = parse_args()
    out = args.out or str(c.RESULTS / ('gpu_counts.txt' if args.cpu_counts else 'gpu.txt'))
    if args.smoke:
        out = args.out
    torch.manual_seed(0)
    with c.tee_stdout(out):
        if args.cpu_counts:
            cpu_counts()
            return
        device = 'cpu' if args.smoke else 'cuda'
        if device == 'cuda' and not torch.cuda.is_available():
            sys.exit('gpu.py: no CUDA device; --cpu-counts gives the device-independent counts, '
                     '--smoke checks the script on the CPU')
        c.print_header('GRPO-RM objective backends on a GPU vs mmseg cross-entropy')
        if device == 'cuda':
            print(f'# device: {torch.cuda.get_device_name()}')
        loss_timings(SMOKE_SHAPES if args.smoke else SHAPES, 2 if args.smoke else args.reps,
                     device)
        if not args.skip_steps:
            train_steps(1 if args.smoke else args.steps, device, args.smoke)


if __name__ == '__main__':
    main()
