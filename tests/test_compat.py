"""Each compatibility patch: the original failure is reproduced in a clean interpreter without the
patch, and the same code works with ``import grpo_rm_mm``. So every test here fails if its patch
is removed."""
from __future__ import annotations

import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import free_port, run_cmd

import grpo_rm_mm
from grpo_rm_mm import checkpoints, compat


def run_snippet(code: str, patched: bool, **env: str):
    prefix = 'import grpo_rm_mm\n' if patched else ''
    return run_cmd([sys.executable, '-c', prefix + textwrap.dedent(code)], check=False, **env)


def run_distributed_snippet(code: str, **env: str):
    """``(without, with_patch)``: the snippet run without and with ``import grpo_rm_mm``, each
    on a fresh ``MASTER_PORT``."""
    return tuple(run_snippet(code, patched, **env, MASTER_PORT=str(free_port()))
                 for patched in (False, True))


def test_every_patch_is_applied_on_import() -> None:
    assert set(grpo_rm_mm.compat.applied_patches()) <= {p.__name__ for p in compat.PATCHES}
    names = compat.apply_all()
    assert 'patch_plain_checkpoints' in names
    assert 'patch_mmcv_adjust_hue_numpy2' in names  # numpy 2 is installed
    # idempotent: applying again changes nothing
    assert compat.apply_all() == names


# --- checkpoints ---------------------------------------------------------------------------------

def _legacy_checkpoint(path: Path) -> None:
    """What mmengine writes without the patch: HistoryBuffer and numpy objects pickled."""
    from mmengine.logging import HistoryBuffer
    torch.save({'meta': {'epoch': 1, 'seed': np.int64(3)},
                'state_dict': {'w': torch.ones(2)},
                'message_hub': {'log_scalars': {'loss': HistoryBuffer([1.0, 2.0], [1, 1])}}},
               path)


def test_legacy_checkpoint_is_refused_naming_the_opt_in(tmp_path: Path) -> None:
    from mmengine.logging import HistoryBuffer
    from mmengine.runner.checkpoint import _load_checkpoint

    from grpo_rm_mm.checkpoints import UntrustedCheckpointError
    ckpt = tmp_path / 'iter_1.pth'
    _legacy_checkpoint(ckpt)
    with pytest.raises(UntrustedCheckpointError) as err:
        _load_checkpoint(str(ckpt), map_location='cpu')
    message = str(err.value)
    assert str(ckpt) in message and 'HistoryBuffer' in message
    assert 'with grpo_rm_mm.trusted_checkpoints():' in message
    assert '--cfg-options trusted_checkpoints=True' in message
    # the explicit opt-in reads it (weights_only=False), and only inside the context
    with grpo_rm_mm.trusted_checkpoints():
        loaded = _load_checkpoint(str(ckpt), map_location='cpu')
    assert loaded['meta']['epoch'] == 1
    assert isinstance(loaded['message_hub']['log_scalars']['loss'], HistoryBuffer)
    assert not checkpoints.checkpoint_trusted()


RUNNER_SNIPPET = '''
    import sys, torch
    from mmengine.model import BaseModel
    from mmengine.runner import Runner

    class Toy(BaseModel):
        def __init__(self):
            super().__init__()
            self.lin = torch.nn.Linear(2, 1)
        def forward(self, inputs, labels=None, mode='loss'):
            return dict(loss=((self.lin(inputs) - 1) ** 2).mean())

    def runner(work, **kw):
        data = [dict(inputs=torch.tensor([float(i), 1.0])) for i in range(8)]
        return Runner(model=Toy(), work_dir=work, train_dataloader=dict(
            dataset=data, sampler=dict(type='DefaultSampler', shuffle=False), batch_size=4,
            collate_fn=dict(type='default_collate')), optim_wrapper=dict(
            optimizer=dict(type='SGD', lr=0.1)), train_cfg=dict(by_epoch=True, max_epochs=kw.pop(
            'epochs', 1)), default_hooks=dict(logger=dict(type='LoggerHook', interval=1)), **kw)

    work = sys.argv[1]
    runner(work).train()
    try:
        ckpt = torch.load(work + '/epoch_1.pth', weights_only=True)
        print('WEIGHTS_ONLY OK', sorted(ckpt['message_hub']['log_scalars']))
    except Exception as err:
        print('WEIGHTS_ONLY FAILED', type(err).__name__, str(err).splitlines()[0])
        raise SystemExit(3)
    resumed = runner(work, epochs=2, resume=True)
    resumed.train()
    hub = resumed.message_hub.get_scalar('train/loss')
    print('RESUMED', type(hub).__name__, len(hub.data[0]))
'''


def test_runner_checkpoints_are_plain_and_resume_without_patch_fails(tmp_path: Path) -> None:
    """mmengine's own checkpoints need weights_only=False without the patch; with it they load
    with weights_only=True, and --resume restores the logging state (2 + 2 logged losses)."""
    script = tmp_path / 'snippet.py'
    script.write_text(textwrap.dedent(RUNNER_SNIPPET))
    without = run_cmd([sys.executable, str(script), str(tmp_path / 'a')], check=False)
    assert without.returncode == 3 and 'WEIGHTS_ONLY FAILED UnpicklingError' in without.stdout
    code = f'import runpy, sys; sys.argv = ["x", {str(tmp_path / "b")!r}]; ' \
           f'runpy.run_path({str(script)!r}, run_name="__main__")'
    with_patch = run_snippet(code, patched=True)
    assert with_patch.returncode == 0, with_patch.stderr[-3000:]
    assert "WEIGHTS_ONLY OK ['train/data_time', 'train/loss', 'train/lr', 'train/time']" \
        in with_patch.stdout
    assert 'RESUMED HistoryBuffer 4' in with_patch.stdout


class _Payload:
    """Pickles into a call of ``os.system`` that would create a marker file."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        import os
        return os.system, (f'touch {self.marker}',)


def test_pretrained_backbone_checkpoint_with_payload_is_refused(tmp_path: Path) -> None:
    from mmengine.model import BaseModule
    marker = tmp_path / 'executed'
    ckpt = tmp_path / 'evil.pth'
    torch.save({'state_dict': {'weight': torch.zeros(2, 2)}, 'x': _Payload(marker)}, ckpt)

    class Tiny(BaseModule):
        def __init__(self) -> None:
            super().__init__(init_cfg=dict(type='Pretrained', checkpoint=str(ckpt)))
            self.lin = torch.nn.Linear(2, 2)

    with pytest.raises(Exception, match='Weights only load failed'):
        Tiny().init_weights()
    assert not marker.exists()


# --- distributed on CPU ------------------------------------------------------------------------

DIST_ENV = dict(RANK='0', LOCAL_RANK='0', WORLD_SIZE='1', MASTER_ADDR='127.0.0.1')


@pytest.mark.skipif(torch.cuda.is_available(), reason='the patch is a no-op with CUDA')
def test_init_dist_without_cuda() -> None:
    code = '''
        import torch.distributed as dist
        from mmengine.dist import init_dist
        init_dist('pytorch', backend='nccl')
        print('BACKEND', dist.get_backend())
    '''
    without, with_patch = run_distributed_snippet(code, **DIST_ENV)
    assert without.returncode != 0
    assert 'NVIDIA driver' in without.stderr or '_cuda_setDevice' in without.stderr
    assert with_patch.returncode == 0, with_patch.stderr[-3000:]
    assert 'BACKEND gloo' in with_patch.stdout


@pytest.mark.skipif(torch.cuda.is_available(), reason='the patch is a no-op with CUDA')
def test_slurm_init_dist_without_cuda(tmp_path: Path) -> None:
    """``--launcher slurm`` on CPU: RANK/WORLD_SIZE/LOCAL_RANK from SLURM's variables and the
    master from ``scontrol show hostname`` (a stub here), gloo instead of nccl."""
    (tmp_path / 'scontrol').write_text('#!/usr/bin/env bash\necho 127.0.0.1\n')
    (tmp_path / 'scontrol').chmod(0o755)
    code = '''
        import os, torch.distributed as dist
        from mmengine.dist import init_dist
        init_dist('slurm', backend='nccl')
        print('BACKEND', dist.get_backend(), dist.get_rank(), dist.get_world_size(),
              os.environ['MASTER_ADDR'], os.environ['LOCAL_RANK'])
    '''
    import os
    without, with_patch = run_distributed_snippet(
        code, SLURM_PROCID='0', SLURM_NTASKS='1', SLURM_LOCALID='0', SLURM_NODELIST='node1',
        PATH=f'{tmp_path}{os.pathsep}{os.environ["PATH"]}')
    assert without.returncode != 0
    assert 'NVIDIA driver' in without.stderr or '_cuda_setDevice' in without.stderr
    assert with_patch.returncode == 0, with_patch.stderr[-3000:]
    assert 'BACKEND gloo 0 1 127.0.0.1 0' in with_patch.stdout


def test_ddp_wrapper_accepts_device_ids_for_cpu_module() -> None:
    code = '''
        import torch, torch.distributed as dist
        dist.init_process_group('gloo')
        from mmengine.model import MMDistributedDataParallel
        ddp = MMDistributedDataParallel(module=torch.nn.Linear(2, 2), device_ids=[0])
        print('WRAPPED', type(ddp).__name__)
    '''
    without, with_patch = run_distributed_snippet(code, **DIST_ENV)
    assert without.returncode != 0 and 'device_ids' in without.stderr
    assert with_patch.returncode == 0, with_patch.stderr[-3000:]
    assert 'WRAPPED MMDistributedDataParallel' in with_patch.stdout


def test_process_group_is_destroyed_at_exit() -> None:
    # atexit runs handlers last-registered-first: this probe, registered before grpo_rm_mm is
    # imported, runs after the patch's handler and sees whether the group is still alive.
    code = '''
        import atexit, torch.distributed as dist
        atexit.register(lambda: print('ALIVE_AT_EXIT', dist.is_initialized()))
        {imp}
        dist.init_process_group('gloo')
    '''
    env = dict(DIST_ENV, MASTER_PORT=str(free_port()))
    without = run_cmd([sys.executable, '-c', textwrap.dedent(code.format(imp=''))],
                      check=False, **env)
    assert 'ALIVE_AT_EXIT True' in without.stdout
    env['MASTER_PORT'] = str(free_port())
    with_patch = run_cmd([sys.executable, '-c', textwrap.dedent(
        code.format(imp='import grpo_rm_mm'))], check=False, **env)
    assert with_patch.returncode == 0, with_patch.stderr[-3000:]
    assert 'ALIVE_AT_EXIT False' in with_patch.stdout


TEARDOWN_RANK = '''
    import sys, time, torch, torch.distributed as dist
    import grpo_rm_mm
    if sys.argv[1] == 'without':
        sys.excepthook = sys.__excepthook__  # the error exit goes unnoticed: the old teardown
    dist.init_process_group('gloo')
    print('READY', flush=True)
    if dist.get_rank() == 1:
        raise RuntimeError('an error on rank 1 only')
    dist.all_reduce(torch.ones(1))  # rank 0 waits for a collective rank 1 never joins
'''


@pytest.mark.parametrize('variant', ['without', 'with'])
def test_error_exit_of_one_rank_does_not_wait_for_the_others(variant: str,
                                                            tmp_path: Path) -> None:
    """A rank that dies of an error must not wait at exit in a barrier its peers (stuck in
    another collective) never reach: it exits at once, so the launcher can stop the job."""
    import subprocess
    import time

    from conftest import tool_env
    script = tmp_path / 'rank.py'
    script.write_text(textwrap.dedent(TEARDOWN_RANK))
    port = str(free_port())
    procs = [subprocess.Popen([sys.executable, str(script), variant], stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, text=True, env=tool_env(
                                  RANK=str(r), WORLD_SIZE='2', MASTER_ADDR='127.0.0.1',
                                  MASTER_PORT=port)) for r in (0, 1)]
    try:
        lines = []
        for line in procs[1].stdout:  # the imports take a while on a busy machine
            lines.append(line)
            if line.startswith('READY'):
                break
        deadline = time.monotonic() + 20  # from the moment rank 1 is about to raise
        while procs[1].poll() is None and time.monotonic() < deadline:
            time.sleep(0.2)
        rank1_exited = procs[1].poll() is not None
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
            proc.wait()
    assert any(line.startswith('READY') for line in lines), ''.join(lines)[-3000:]
    if variant == 'without':
        assert not rank1_exited  # stuck in the exit barrier
    else:
        assert rank1_exited and procs[1].returncode == 1
        assert 'an error on rank 1 only' in procs[1].stdout.read()


# --- AMP on CPU --------------------------------------------------------------------------------

@pytest.mark.skipif(torch.cuda.is_available(), reason='the patch is a no-op with CUDA')
def test_amp_optim_wrapper_on_cpu_autocasts_to_bfloat16() -> None:
    code = '''
        import torch
        from mmengine.optim import AmpOptimWrapper
        model = torch.nn.Linear(4, 2)
        w = AmpOptimWrapper(optimizer=torch.optim.SGD(model.parameters(), lr=0.1))
        before = model.weight.detach().clone()
        with w.optim_context(model):
            out = model(torch.randn(3, 4))
        w.update_params(out.float().pow(2).mean())
        print('DTYPE', out.dtype, 'MOVED', bool((model.weight != before).any()))
    '''
    without = run_snippet(code, patched=False)
    assert without.returncode != 0 and 'only available training' in without.stderr
    with_patch = run_snippet(code, patched=True)
    assert with_patch.returncode == 0, with_patch.stderr[-3000:]
    assert 'DTYPE torch.bfloat16 MOVED True' in with_patch.stdout


def test_amp_on_cpu_refuses_float16() -> None:
    from mmengine.optim import AmpOptimWrapper
    if torch.cuda.is_available():
        pytest.skip('CUDA: float16 is fine')
    model = torch.nn.Linear(2, 2)
    with pytest.raises(ValueError, match='bfloat16 only'):
        AmpOptimWrapper(optimizer=torch.optim.SGD(model.parameters(), lr=0.1), dtype='float16')


# --- numpy 2 -----------------------------------------------------------------------------------

def _hue_shift_reference(img_bgr: np.ndarray, hue_factor: float) -> np.ndarray:
    """Independent numpy-1 semantics: H (0..255, cv2 *_FULL) += int(f*255) mod 256."""
    import cv2
    hsv = cv2.cvtColor(img_bgr, cv2.COLOR_BGR2HSV_FULL)
    hsv[..., 0] = ((hsv[..., 0].astype(np.int64) + int(hue_factor * 255)) % 256).astype(np.uint8)
    return cv2.cvtColor(hsv, cv2.COLOR_HSV2BGR_FULL)


@pytest.mark.parametrize('hue', [-0.5, -0.1, -0.01, 0.0, 0.2, 0.5])
def test_adjust_hue_matches_numpy1_semantics(hue: float) -> None:
    import mmcv
    rng = np.random.default_rng(0)
    img = rng.integers(0, 256, size=(16, 16, 3), dtype=np.uint8)
    np.testing.assert_array_equal(mmcv.adjust_hue(img, hue), _hue_shift_reference(img, hue))


def test_adjust_hue_negative_fails_without_patch() -> None:
    code = '''
        import numpy as np, mmcv
        mmcv.adjust_hue(np.zeros((4, 4, 3), np.uint8), -0.1)
        print('OK')
    '''
    without = run_snippet(code, patched=False)
    assert without.returncode != 0 and 'out of bounds for uint8' in without.stderr
    assert 'OK' in run_snippet(code, patched=True).stdout


def test_mmpretrain_color_jitter_with_hue_runs() -> None:
    from mmpretrain.datasets.transforms import ColorJitter
    t = ColorJitter(hue=0.4)
    rng = np.random.default_rng(1)
    for _ in range(20):  # random hue in [-0.4, 0.4]: negative values occur
        out = t(dict(img=rng.integers(0, 256, (8, 8, 3), dtype=np.uint8)))
        assert out['img'].shape == (8, 8, 3)


def test_in1d_and_mmpretrain_retrieval_metric() -> None:
    code = '''
        import torch
        from mmpretrain.evaluation.metrics import RetrievalRecall
        pred = torch.tensor([[0.9, 0.1, 0.0], [0.2, 0.7, 0.1]])
        target = [torch.tensor([0]), torch.tensor([2])]
        print('RECALL', RetrievalRecall.calculate(pred, target, topk=1, target_indices=True))
    '''
    without = run_snippet(code, patched=False)
    if 'RECALL' in without.stdout:
        pytest.skip('this numpy still has np.in1d')
    assert "has no attribute 'in1d'" in without.stderr
    with_patch = run_snippet(code, patched=True)
    assert 'RECALL [tensor(50.)]' in with_patch.stdout, with_patch.stderr[-2000:]
    a, b = np.array([[1, 5], [2, 7]]), np.array([5, 2])
    np.testing.assert_array_equal(np.in1d(a, b), [False, True, True, False])
