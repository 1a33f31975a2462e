"""Compatibility patches for the OpenMMLab 2.x stack on today's torch and numpy.

Imported (and applied) by ``import grpo_rm_mm``, so ``custom_imports=dict(imports=['grpo_rm_mm'])``
in a config is enough: mmengine runs ``custom_imports`` inside ``Config.fromfile``, before the
model is built and before ``init_dist``, in every process, torchrun workers included.

Every patch is a small named function that fixes one reproduced error (quoted in its docstring),
does nothing where it is not needed, and is idempotent. ``applied_patches()`` says which ones ran
in this process. Each has a test in ``tests/test_compat.py`` that fails without it.

Installation-level fixes (no code here): ``setuptools<81`` (mmengine's ``mmseg::`` config lookup and
mmcv's ``setup.py`` import ``pkg_resources``), ``ftfy``/``regex`` (imported by mmseg, not declared),
and ``tools/build/cxx20-g++`` (mmcv 2.1.0's C++ ops against torch 2.14's C++20 headers).
"""
from __future__ import annotations

import atexit
import contextlib
import functools
import os
import sys
import warnings
from collections.abc import Callable

import numpy as np
import torch

_APPLIED: list[str] = []


def _once(fn: Callable[[], bool]) -> Callable[[], bool]:
    """Run a patch at most once; it returns True if it changed anything."""

    @functools.wraps(fn)
    def wrapper() -> bool:
        if fn.__name__ in _APPLIED:
            return False
        changed = fn()
        if changed:
            _APPLIED.append(fn.__name__)
        return changed

    return wrapper


# --- checkpoints --------------------------------------------------------------------------------

@_once
def patch_plain_checkpoints() -> bool:
    """mmengine 0.10.7 pickles its logging state into every checkpoint (``HistoryBuffer``
    objects, numpy arrays and scalars), and torch>=2.6 loads with ``weights_only=True`` by
    default, so its own checkpoints do not load (``tools/test.py CKPT``, ``--resume``,
    ``mmseg.apis.init_model``, mmpretrain's inferencers)::

        _pickle.UnpicklingError: Weights only load failed ... Unsupported global: GLOBAL
        mmengine.logging.history_buffer.HistoryBuffer was not an allowed global by default.

    Fix, on both sides of the file:

    - writing: the runner's ``save_checkpoint`` converts the checkpoint dict with
      :func:`grpo_rm_mm.checkpoints.to_plain` right before ``torch.save``, i.e. after every
      ``before_save_checkpoint`` hook (nothing a hook adds escapes it). This is a patch rather
      than a hook in each config because the file format is the runner's, not a recipe's: a
      stock mmseg/mmpretrain config with ``custom_imports=['grpo_rm_mm']`` writes plain files
      too, and a new config cannot forget it;
    - reading: mmengine's local-file loader becomes
      :func:`grpo_rm_mm.checkpoints.load_checkpoint_file` (``weights_only=True`` always, then
      :func:`~grpo_rm_mm.checkpoints.from_plain`, so ``--resume`` gets its ``HistoryBuffer``
      objects back). A file that still pickles objects is refused with an error naming the
      opt-in :func:`trusted_checkpoints`; ``init_cfg=dict(type='Pretrained', ...)`` backbone
      checkpoints go through the same loader, so a pickled payload there never runs.
    """
    from mmengine.runner import checkpoint
    from mmengine.runner import runner as runner_module

    from .checkpoints import load_checkpoint_file, to_plain

    original_save = runner_module.save_checkpoint
    if getattr(original_save, '_grpo_rm_plain', False):
        return False

    @functools.wraps(original_save)
    def save_checkpoint(ckpt: dict, filename: str, *args, **kwargs):
        return original_save(to_plain(ckpt), filename, *args, **kwargs)

    save_checkpoint._grpo_rm_plain = True  # type: ignore[attr-defined]
    runner_module.save_checkpoint = save_checkpoint

    original_local = checkpoint.load_from_local

    def load_from_local(filename: str, map_location=None):
        filename = os.path.expanduser(filename)
        if not os.path.isfile(filename):
            raise FileNotFoundError(f'{filename} can not be found.')
        return load_checkpoint_file(filename, map_location=map_location)

    load_from_local.__doc__ = original_local.__doc__
    checkpoint.CheckpointLoader.register_scheme(prefixes='', loader=load_from_local, force=True)
    checkpoint.load_from_local = load_from_local
    return True


# --- distributed on CPU ------------------------------------------------------------------------

@_once
def patch_dist_init_without_cuda() -> bool:
    """mmengine's ``_init_dist_pytorch`` always calls ``torch.cuda.set_device(local_rank)``; on a
    machine without a GPU that is::

        RuntimeError: Found no NVIDIA driver on your system.        (CUDA build of torch)
        AttributeError: module 'torch._C' has no attribute '_cuda_setDevice'   (CPU build)

    Fix: without CUDA, skip ``set_device`` and use ``gloo`` (with a warning) if the config asked
    for ``nccl``, which cannot run without GPUs. With CUDA nothing changes.
    """
    if torch.cuda.is_available():
        return False
    from mmengine.dist import utils as dist_utils

    def _init_dist_pytorch(backend, init_backend='torch', **kwargs) -> None:
        if backend == 'nccl':
            warnings.warn('No CUDA device: using the gloo backend instead of nccl.', stacklevel=2)
            backend = 'gloo'
        if init_backend != 'torch':
            raise ValueError(f'init_backend={init_backend!r} needs GPUs; on CPU use "torch"')
        torch.distributed.init_process_group(backend=backend, **kwargs)

    dist_utils._init_dist_pytorch = _init_dist_pytorch
    return True


@_once
def patch_slurm_dist_init_without_cuda() -> bool:
    """mmengine's ``_init_dist_slurm`` (``--launcher slurm``, ``tools/slurm_train.sh``) also
    calls ``torch.cuda.set_device(local_rank)`` unconditionally, so a SLURM job on CPU nodes
    fails like the pytorch launcher did (``Found no NVIDIA driver`` / ``_cuda_setDevice``).

    Fix: without CUDA, the same environment set-up as mmengine's (RANK from ``SLURM_PROCID``,
    WORLD_SIZE from ``SLURM_NTASKS``, LOCAL_RANK from ``SLURM_LOCALID``, MASTER_ADDR from
    ``scontrol show hostname $SLURM_NODELIST`` unless set, MASTER_PORT from ``port``, the
    environment, or 29500), then ``init_process_group`` with gloo instead of nccl. With CUDA
    nothing changes.
    """
    if torch.cuda.is_available():
        return False
    import subprocess

    from mmengine.dist import utils as dist_utils

    def _init_dist_slurm(backend, port=None, init_backend='torch', **kwargs) -> None:
        if backend == 'nccl':
            warnings.warn('No CUDA device: using the gloo backend instead of nccl.', stacklevel=2)
            backend = 'gloo'
        if init_backend != 'torch':
            raise ValueError(f'init_backend={init_backend!r} needs GPUs; on CPU use "torch"')
        proc_id = int(os.environ['SLURM_PROCID'])
        node_list = os.environ['SLURM_NODELIST']
        if port is not None:
            os.environ['MASTER_PORT'] = str(port)
        os.environ.setdefault('MASTER_PORT', '29500')
        if 'MASTER_ADDR' not in os.environ:
            os.environ['MASTER_ADDR'] = subprocess.getoutput(
                f'scontrol show hostname {node_list} | head -n1')
        os.environ['WORLD_SIZE'] = os.environ['SLURM_NTASKS']
        os.environ['LOCAL_RANK'] = os.environ.get('SLURM_LOCALID', '0')
        os.environ['RANK'] = str(proc_id)
        torch.distributed.init_process_group(backend=backend, **kwargs)

    dist_utils._init_dist_slurm = _init_dist_slurm
    return True


@_once
def patch_ddp_device_ids_on_cpu() -> bool:
    """mmengine's ``Runner.wrap_model`` always passes ``device_ids=[LOCAL_RANK]``; torch refuses
    that for a CPU module::

        ValueError: DistributedDataParallel device_ids and output_device arguments only work with
        single-device/multiple-device GPU modules or CPU modules, but got device_ids [0], ...

    Fix: ``MMDistributedDataParallel`` drops ``device_ids``/``output_device`` when the module's
    parameters are on the CPU. GPU runs are unchanged.
    """
    from mmengine.model.wrappers import distributed

    cls = distributed.MMDistributedDataParallel
    if getattr(cls.__init__, '_grpo_rm_cpu', False):
        return False
    original_init = cls.__init__

    @functools.wraps(original_init)
    def __init__(self, module, *args, **kwargs):
        params = list(module.parameters())
        if params and all(p.device.type == 'cpu' for p in params):
            kwargs.pop('device_ids', None)
            kwargs.pop('output_device', None)
        original_init(self, module, *args, **kwargs)

    __init__._grpo_rm_cpu = True  # type: ignore[attr-defined]
    cls.__init__ = __init__
    return True


_UNCAUGHT: list[BaseException] = []  # set by the excepthook of patch_gloo_teardown


def _destroy_process_group(timeout_s: float = 120.0) -> None:
    if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
        return
    if _UNCAUGHT:
        # This rank dies of an error while the others may wait in a collective it will never
        # join (e.g. the gradient all-reduce of the step that raised here). A barrier would then
        # wait forever (gloo's monitored_barrier blocks in its send, whatever its timeout), so
        # leave at once: the launcher (torchrun, srun --kill-on-bad-exit) stops the others.
        return
    # Wait for every rank before tearing gloo down: a rank that destroys its process group while
    # another still finishes its last collective is what aborts.
    with contextlib.suppress(Exception):
        if torch.distributed.get_backend() == 'gloo':
            import datetime
            torch.distributed.monitored_barrier(timeout=datetime.timedelta(seconds=timeout_s))
        else:
            torch.distributed.barrier()
    with contextlib.suppress(Exception):
        torch.distributed.destroy_process_group()


@_once
def patch_gloo_teardown() -> bool:
    """mmengine never calls ``destroy_process_group``; after a successful gloo run a worker
    sometimes dies at interpreter exit with ``terminate called without an active exception``
    (SIGABRT), and torchrun then reports ``ChildFailedError`` (4 of 21 runs in the findings;
    seen here too on torch 2.14.1).

    Fix: at exit, wait for all ranks (a barrier with a timeout), then destroy the process group.
    A no-op when no process group was created, and skipped when the process ends with an
    uncaught exception: an error on one rank only (e.g. raised in its train step) leaves the
    other ranks inside a collective, where a barrier at exit would wait for them forever
    instead of letting the launcher stop the job.
    """
    previous = sys.excepthook

    def excepthook(exc_type, exc, tb) -> None:
        _UNCAUGHT.append(exc)
        previous(exc_type, exc, tb)

    sys.excepthook = excepthook
    atexit.register(_destroy_process_group)
    return True


def _has_accelerator() -> bool:
    from mmengine.device import (
        is_cuda_available,
        is_mlu_available,
        is_musa_available,
        is_npu_available,
    )
    return (is_cuda_available() or is_npu_available() or is_mlu_available()
            or is_musa_available())


@_once
def patch_amp_optim_wrapper_on_cpu() -> bool:
    """mmengine's ``AmpOptimWrapper`` (what ``tools/train.py --amp`` selects) refuses CPUs::

        AssertionError: ``AmpOptimizerWrapper`` is only available training on gpu, npu, mlu
        or musa

    although ``mmengine.runner.amp.autocast`` supports CPU autocast in bfloat16. Fix: without an
    accelerator, build it with ``cast_dtype=torch.bfloat16`` and a disabled ``GradScaler``
    (bfloat16 has float32's exponent range, so it needs no loss scaling); asking for float16 on
    CPU raises a clear error. On GPUs nothing changes.
    """
    if _has_accelerator():
        return False
    from mmengine.optim import AmpOptimWrapper, OptimWrapper

    if getattr(AmpOptimWrapper.__init__, '_grpo_rm_cpu', False):
        return False
    original_init = AmpOptimWrapper.__init__

    @functools.wraps(original_init)
    def __init__(self, loss_scale='dynamic', dtype=None, use_fsdp: bool = False, **kwargs):
        if _has_accelerator():
            return original_init(self, loss_scale=loss_scale, dtype=dtype, use_fsdp=use_fsdp,
                                 **kwargs)
        if isinstance(dtype, str):
            dtype = getattr(torch, dtype, dtype)
        if dtype not in (None, torch.bfloat16):
            raise ValueError(f'AMP on CPU runs in bfloat16 only; got dtype={dtype!r}. Use '
                             f"dtype='bfloat16' (or leave it unset), or train on a GPU.")
        OptimWrapper.__init__(self, **kwargs)
        self._scale_update_param = None
        self.loss_scaler = torch.amp.GradScaler('cpu', enabled=False)
        self.cast_dtype = torch.bfloat16

    __init__._grpo_rm_cpu = True  # type: ignore[attr-defined]
    AmpOptimWrapper.__init__ = __init__
    return True


# --- numpy 2 ------------------------------------------------------------------------------------

def _adjust_hue(img: np.ndarray, hue_factor: float, backend: str | None = None) -> np.ndarray:
    """mmcv 2.1.0's ``adjust_hue`` with its one numpy-2 failure fixed (see the patch below)."""
    import cv2
    from mmcv.image import io as mmcv_io
    from PIL import Image

    if backend is None:
        backend = mmcv_io.imread_backend
    if backend not in ['cv2', 'pillow']:
        raise ValueError(f'backend: {backend} is not supported.'
                         f"Supported backends are 'cv2', 'pillow'")
    if not (-0.5 <= hue_factor <= 0.5):
        raise ValueError(f'hue_factor:{hue_factor} is not in [-0.5, 0.5].')
    if not (isinstance(img, np.ndarray) and (img.ndim in {2, 3})):
        raise TypeError('img should be ndarray with dim=[2 or 3].')
    # numpy 1 wrapped np.uint8(-22.95) to 234; numpy 2 raises. Same shift, explicit modulo:
    shift = np.uint8(int(hue_factor * 255) % 256)
    if backend == 'pillow':
        assert img.dtype == np.uint8, 'Pillow backend only support uint8 type'
        pil_image = Image.fromarray(img[..., ::-1], mode='RGB')
        input_mode = pil_image.mode
        if input_mode in {'L', '1', 'I', 'F'}:
            return pil_image
        h, s, v = pil_image.convert('HSV').split()
        np_h = np.array(h, dtype=np.uint8)
        with np.errstate(over='ignore'):
            np_h += shift
        h = Image.fromarray(np_h, 'L')
        pil_image = Image.merge('HSV', (h, s, v)).convert(input_mode)
        return np.array(pil_image, dtype=img.dtype)[..., ::-1]
    dtype = img.dtype
    img = img.astype(np.uint8)
    h, s, v = cv2.split(cv2.cvtColor(img, cv2.COLOR_BGR2HSV_FULL))
    h = h.astype(np.uint8)
    with np.errstate(over='ignore'):
        h += shift
    return cv2.cvtColor(cv2.merge([h, s, v]), cv2.COLOR_HSV2BGR_FULL).astype(dtype)


@_once
def patch_mmcv_adjust_hue_numpy2() -> bool:
    """mmcv 2.1.0 ``adjust_hue`` (used by mmpretrain's ``ColorJitter`` with ``hue > 0``) does
    ``np.uint8(hue_factor * 255)``, which numpy 2 (NEP 50) refuses for negative factors::

        OverflowError: Python integer -22 out of bounds for uint8

    Fix: the same function with the shift computed as ``int(hue_factor * 255) % 256`` (the
    numpy-1 wrap-around); results for positive factors are identical. Not applied on numpy 1.
    """
    if int(np.__version__.split('.')[0]) < 2:
        return False
    import mmcv
    import mmcv.image
    import mmcv.image.photometric as photometric

    original = photometric.adjust_hue
    if getattr(original, '_grpo_rm_numpy2', False):
        return False
    patched = functools.wraps(original)(_adjust_hue)
    patched._grpo_rm_numpy2 = True  # type: ignore[attr-defined]
    for module in (photometric, mmcv.image, mmcv):
        module.adjust_hue = patched
    return True


def _in1d(ar1, ar2, assume_unique: bool = False, invert: bool = False) -> np.ndarray:
    return np.isin(ar1, ar2, assume_unique=assume_unique, invert=invert).ravel()


@_once
def patch_numpy_in1d_removed() -> bool:
    """numpy 2.4 removed ``np.in1d``; mmpretrain 1.2.0's retrieval metrics (RetrievalRecall,
    RetrievalAveragePrecision) call it::

        AttributeError: module 'numpy' has no attribute 'in1d'

    Fix: provide ``np.in1d`` as ``np.isin(...).ravel()`` (its documented replacement) when absent.
    """
    if hasattr(np, 'in1d'):
        return False
    np.in1d = _in1d  # type: ignore[attr-defined]
    return True


PATCHES: tuple[Callable[[], bool], ...] = (
    patch_plain_checkpoints,
    patch_dist_init_without_cuda,
    patch_slurm_dist_init_without_cuda,
    patch_ddp_device_ids_on_cpu,
    patch_gloo_teardown,
    patch_amp_optim_wrapper_on_cpu,
    patch_mmcv_adjust_hue_numpy2,
    patch_numpy_in1d_removed,
)


def apply_all() -> list[str]:
    """Apply every patch that is needed here; return the names applied in this process."""
    for patch in PATCHES:
        patch()
    return applied_patches()


def applied_patches() -> list[str]:
    """Names of the patches applied in this process so far."""
    return list(_APPLIED)
