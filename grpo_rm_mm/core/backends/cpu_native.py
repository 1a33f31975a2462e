"""The compiled CPU backend of the fused objective (``core/csrc/objective_cpu.cpp``).

The kernel computes, for a range of queries, what one chunk of the torch backend computes
(loss terms, the diagnostics' sums and the closed-form gradient) in five passes over each
query's outputs, vectorised either over a tile of queries or, where a query's outputs are
adjacent (S == 1) and fill at least :data:`ROW_MIN_VECTORS` vectors, over the query's own
outputs; the torch backend (:mod:`.torch_chunked`) does the same in some thirty separate
passes. It covers:

* CPU tensors, float32 or float64 logits (pi_old / pi_ref logits and query weights are cast to
  that dtype, as the torch path computes in it); dense logits whose classes are their innermost
  dimension in memory (channels-last) are read in place as B S queries of C adjacent outputs,
  and their gradient is written in that layout;
* the 'uniform' and 'pi_old' group weightings, both surrogates, KL to pi_ref, query weights, a
  valid mask, an ignore index, both advantage conventions;
* rewards that carry a ``fused_term`` ``(name, coefficient)`` with a name of
  :data:`..rewards.FUSED_REWARDS` (the registered accuracy, uniformity and confidence-penalty
  rewards and their weighted registry classes), summed with their coefficients.

Anything else (CUDA tensors, bf16/fp16 logits, 'sampled' draws, custom reward callables or a
reward tensor) is not supported (:meth:`CpuNativeBackend.supports` says why): 'auto' then
takes the torch backend. The kernel is built with the
package (``setup.py``: a portable build and, on x86-64, AVX2 + FMA and AVX-512 ones; the
widest the CPU runs is imported); where it could not be built, :data:`AVAILABLE` is False and
the backend is unavailable.

The kernel checks nothing; :func:`plan` checks its arguments once (device, dtype, layout). A
counted label outside [0, C) or a non-finite input value is reported back (the solution's
``delegate``), and the caller then hands the call to the reference, which raises its error.

Large inputs are split into ranges of queries run by ``torch.get_num_threads()`` threads (the
kernel releases the GIL); each range returns its own sums, added in range order.
"""
from __future__ import annotations

import importlib
import math
import threading
from dataclasses import dataclass

import torch
from torch import Tensor

from ..dispatch import Backend
from ..problem import Problem, Solution, diagnostics_from_sums
from ..rewards import fused_reward_terms

try:
    from .. import _objective_cpu  # type: ignore[attr-defined]
except ImportError:  # built without a compiler: the backend is unavailable
    _objective_cpu = None
else:
    # the same kernel with wider vectors, the widest build the CPU runs
    for _build, _supported in (('_objective_cpu_avx512', _objective_cpu.cpu_has_avx512),
                               ('_objective_cpu_avx2', _objective_cpu.cpu_has_avx2_fma)):
        if _supported():
            try:
                _objective_cpu = importlib.import_module(f'..{_build}', __package__)
                break
            except ImportError:  # not built (a compiler without the instruction set)
                pass

__all__ = ['AVAILABLE', 'CpuNativeBackend', 'KernelPlan', 'plan', 'run']

AVAILABLE = _objective_cpu is not None
KERNEL_WEIGHTINGS = {'uniform': 0, 'pi_old': 1}
KERNEL_SURROGATES = {'clip': 0, 'dual_clip': 1}
#: elements (queries x C) per thread below which a call is not split
MIN_ELEMENTS_PER_THREAD = 1 << 18
#: vectors of the build's width that a query's outputs, when adjacent (S == 1), must fill for
#: the kernel to vectorise across them (its row layout) rather than across a tile of queries
#: (its tile layout): the crossover measured with 4-, 8- and 16-float vectors
ROW_MIN_VECTORS = 16


@dataclass
class KernelPlan:
    """The kernel's arguments for one call: contiguous CPU tensors of the compute dtype."""

    z: Tensor                # (B, C, S), or (B S, C, 1) for classes-last logits
    old: Tensor | None
    ref: Tensor | None
    y: Tensor                # (B, S) int64, or (B S, 1)
    valid: Tensor | None     # (B, S) bool, or (B S, 1)
    weight: Tensor | None    # (B, S), or (B S, 1)
    rewards: tuple[float, float, float]
    #: the logits' classes are their innermost dimension (channels-last dense logits, e.g. a
    #: head whose last layers run in that memory format): read as B S queries of C adjacent
    #: outputs, no copy; the gradient is written in the same layout
    classes_last: bool = False

    def gradient(self, shape: torch.Size) -> tuple[Tensor, Tensor]:
        """An uninitialised gradient: ``(for the kernel, as the logits)``, the second of the
        logits' ``shape`` (B, C, *S) and, for classes-last logits, their strides; the same
        memory."""
        if not self.classes_last:
            grad = torch.empty(shape, dtype=self.z.dtype)
            return grad, grad
        n, c = self.z.shape[0], self.z.shape[1]
        grad = torch.empty((n, c, 1), dtype=self.z.dtype)
        b = shape[0]
        return grad, grad.view(b, n // b, c).transpose(1, 2).view(shape)


def plan(z: Tensor, y: Tensor, old: Tensor | None, ref: Tensor | None, valid: Tensor | None,
         weight: Tensor | None, rewards: object, weighting: str,
         surrogate: str) -> KernelPlan | None:
    """The kernel's arguments, or None when the call must take the torch path (module doc).
    ``z``, ``old``, ``ref``: (B, C, S) views; ``y``, ``valid``, ``weight``: (B, S)."""
    if (not AVAILABLE or z.device.type != 'cpu' or z.dtype not in (torch.float32, torch.float64)
            or weighting not in KERNEL_WEIGHTINGS or surrogate not in KERNEL_SURROGATES
            or y.is_floating_point() or y.dtype == torch.bool):
        return None
    terms = fused_reward_terms(rewards)
    if terms is None:
        return None
    others = [x for x in (old, ref, valid, weight) if x is not None]
    if any(x.device.type != 'cpu' for x in others + [y]):
        return None

    b, c, s = z.shape
    # classes-last logits ((B, S, C) in memory) are B S rows of C outputs: (B S, C, 1) views
    classes_last = s > 1 and z.transpose(1, 2).is_contiguous()
    shape = (b * s, c, 1) if classes_last else (b, c, s)

    def outputs(x: Tensor | None) -> Tensor | None:  # (B, C, S) -> the kernel's layout
        if x is None:
            return None
        x = x.transpose(1, 2) if classes_last else x
        return x.to(z.dtype).contiguous().view(shape)

    def per_query(x: Tensor | None, dtype: torch.dtype) -> Tensor | None:  # (B, S)
        return None if x is None else x.to(dtype).contiguous().view(shape[0], shape[2])

    return KernelPlan(z=outputs(z), old=outputs(old), ref=outputs(ref),
                      y=per_query(y, torch.int64),
                      valid=None if valid is None else per_query(valid, valid.dtype),
                      weight=per_query(weight, z.dtype), rewards=terms,
                      classes_last=classes_last)


def _ptr(x: Tensor | None) -> int:
    return 0 if x is None else x.data_ptr()


def run(kp: KernelPlan, grad: Tensor, *, ignore_index: int | None, weighting: str,
        surrogate: str, eps_low: float, eps_high: float, dual_clip_c: float, beta: float,
        adv_std: str, adv_scale: str, adv_eps: float,
        diagnostics: bool) -> tuple[int, bool, list[float]]:
    """Fill ``grad`` (``kp.z``'s shape, contiguous, its dtype) with the gradient of the
    loss (already divided by the number of counted queries) and return ``(n_valid, bad,
    sums)``: ``bad`` flags a counted label outside [0, C) or a non-finite input value;
    ``sums`` are the 8 sums over the counted queries of :data:`..problem.STAT_ROWS`."""
    b, c, s = kp.z.shape
    queries = b * s
    has_ignore = ignore_index is not None
    ignore = int(ignore_index) if has_ignore else 0
    n_valid = _objective_cpu.count(kp.y.data_ptr(), _ptr(kp.valid), queries, has_ignore,
                                   ignore)
    kappa = -1.0 / max(n_valid, 1)
    rows = s == 1 and c * kp.z.element_size() >= ROW_MIN_VECTORS * _objective_cpu.vector_bytes()
    args = (kp.z.dtype == torch.float64, kp.z.data_ptr(), _ptr(kp.old), _ptr(kp.ref),
            kp.y.data_ptr(), _ptr(kp.valid), _ptr(kp.weight), grad.data_ptr(), c, s, rows)
    options = (has_ignore, ignore, KERNEL_WEIGHTINGS[weighting], KERNEL_SURROGATES[surrogate],
               float(eps_low), float(eps_high), float(dual_clip_c), float(beta),
               adv_std == 'unbiased', adv_scale == 'none', float(adv_eps), *kp.rewards,
               kappa, bool(diagnostics))
    threads = min(torch.get_num_threads(), max(1, kp.z.numel() // MIN_ELEMENTS_PER_THREAD))
    if threads == 1:
        bad_label, nonfinite, part = _objective_cpu.objective(*args, 0, queries, *options)
        return n_valid, bool(bad_label or nonfinite), list(part)
    bounds = [queries * i // threads for i in range(threads + 1)]
    results: list = [None] * threads

    def work(i: int) -> None:
        results[i] = _objective_cpu.objective(*args, bounds[i], bounds[i + 1], *options)

    workers = [threading.Thread(target=work, args=(i, )) for i in range(1, threads)]
    for worker in workers:
        worker.start()
    work(0)
    for worker in workers:
        worker.join()
    bad = False
    sums = [0.0] * 8
    for bad_label, nonfinite, part in results:
        bad |= bool(bad_label or nonfinite)
        sums = [a + v for a, v in zip(sums, part)]
    return n_valid, bad, sums


class CpuNativeBackend(Backend):
    """The compiled kernel (module doc); no host synchronisation (CPU tensors)."""

    name = 'cpu_native'

    def supports(self, problem: Problem) -> str | None:
        return self._plan(problem)[1]

    def _plan(self, problem: Problem) -> tuple[KernelPlan | None, str | None]:
        """The kernel's arguments, made once per call (kept in ``problem.prepared``), or the
        reason it cannot run."""
        if self.name in problem.prepared:
            return problem.prepared[self.name]
        problem.prepared[self.name] = answer = self._make_plan(problem)
        return answer

    def _make_plan(self, problem: Problem) -> tuple[KernelPlan | None, str | None]:
        if not AVAILABLE:
            return None, 'the compiled CPU kernel was not built (no compiler at install time)'
        if problem.reward_tensor is None:
            kp = plan(problem.z, problem.y, problem.old, problem.ref, problem.valid,
                      problem.weight, problem.rewards, problem.weighting, problem.surrogate)
            if kp is not None:
                return kp, None
        return None, (f'it needs CPU float32/float64 logits, group_weighting in '
                      f'{tuple(KERNEL_WEIGHTINGS)}, surrogate in {tuple(KERNEL_SURROGATES)} '
                      f'and rewards of grpo_rm_mm.core.rewards (or their registered classes); '
                      f'got {problem.device.type} {problem.z.dtype}, {problem.weighting!r}, '
                      f'{problem.surrogate!r}')

    def solve(self, problem: Problem) -> Solution:
        kp, reason = self._plan(problem)
        if kp is None:
            raise ValueError(f'the cpu_native backend cannot run this call: {reason}')
        grad_rows, grad = kp.gradient(problem.shape)
        n_valid, bad, sums = run(
            kp, grad_rows, ignore_index=problem.ignore_index, weighting=problem.weighting,
            surrogate=problem.surrogate, eps_low=problem.eps_low, eps_high=problem.eps_high,
            dual_clip_c=problem.dual_clip_c, beta=problem.beta, adv_std=problem.adv_std,
            adv_scale=problem.adv_scale, adv_eps=problem.adv_eps,
            diagnostics=problem.diagnostics)
        inv_n = 1.0 / max(n_valid, 1)
        means = [v * inv_n for v in sums]
        # the loss a tensor of its own (not a view: it may be added to in place, as mmseg's
        # decode heads sum losses of one name)
        return Solution(loss=torch.tensor(means[0], dtype=problem.cdt), grad=grad,
                        n_valid=n_valid, delegate=bad or not all(map(math.isfinite, sums)),
                        diagnostics=diagnostics_from_sums(means, n_valid, problem.num_classes,
                                                          problem.diagnostics, problem.cdt))


BACKEND = CpuNativeBackend()
