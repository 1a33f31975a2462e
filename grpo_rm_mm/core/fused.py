"""The GRPO-RM objective fused: one entry point, backends chosen by :mod:`.dispatch`.

:func:`grpo_rm_loss_fused` computes what :func:`.objective.grpo_rm_loss` (the straightforward
reference, kept as the test oracle) computes, for every registered group weighting and
surrogate, with the gradient with respect to the logits in closed form: a backend computes
the loss, that gradient, the diagnostics and the data checks in one pass over the inputs
(:mod:`.backends`: Triton on CUDA, a compiled kernel on the CPU, chunks of torch operations
anywhere, the reference as the last resort), and one autograd Function (:class:`_FusedObjective`)
keeps the gradient and scales it in the backward. Peak memory is about that gradient (the
logits' size) and the backend's scratch: no (N, C) tensors of the graph as the reference keeps.

The entry point validates the options once (the reference's own data-independent checks,
same order, same messages), builds the call's :class:`.problem.Problem` (dense (B, C, *S)
inputs as (B, C, S) views, no copy), asks :func:`.dispatch.select` for the backend and runs
it. A backend's failed data check (a counted label outside [0, C), a non-finite value of a
counted query) hands the call to the reference on the same inputs, which raises its error, so
the messages are exactly the reference's; should the reference accept them (finite logits more
than the largest float apart, a custom reward that is non-finite on ignored queries only), its
result is the answer.
"""
from __future__ import annotations

import torch
from torch import Tensor
from torch.autograd.function import once_differentiable

from . import backends
from .dispatch import Backend, select
from .objective import RewardSpec, _empty_batch_loss, check_call, check_valid_argument
from .problem import DelegateToReference, Problem, Solution

__all__ = ['grpo_rm_loss_fused']


# ----------------------------------------------------------------------------- entry point
def grpo_rm_loss_fused(logits: Tensor, labels: Tensor, rewards: RewardSpec,
                       old_logits: Tensor | None = None, ref_logits: Tensor | None = None,
                       valid: Tensor | None = None, clip_eps: float = 0.2,
                       beta: float = 0.0, *, ignore_index: int | None = None,
                       weight: Tensor | None = None, adv_std: str = 'population',
                       adv_eps: float = 1e-6, adv_scale: str = 'std',
                       group_weighting: str = 'uniform', surrogate: str = 'clip',
                       clip_eps_low: float | None = None, clip_eps_high: float | None = None,
                       dual_clip_c: float = 3.0, group_size: int = 8,
                       generator: torch.Generator | None = None, validated: bool = False,
                       chunk_size: int | None = None, diagnostics: bool = True,
                       backend: str = 'auto') -> tuple[Tensor, dict[str, Tensor]]:
    """The GRPO-RM loss and diagnostics of :func:`.grpo_rm_loss`, fused (see the module doc).

    Takes the reference's arguments, with two more forms and more options:

    * ``logits`` may also be dense, (B, C, *S) (e.g. (N, C, H, W) segmentation logits), with
      ``labels``, ``weight`` and ``valid`` of shape (B, *S) and ``old_logits``, ``ref_logits``
      and a reward tensor of the logits' shape: queries are the pixels in (b, *s) order, as
      ``x.movedim(1, -1).reshape(-1, C)`` flattens them, without that copy.
    * ``validated``: the labels were checked by an earlier call (inner steps on a cached
      batch): the label check is skipped (labels must then be classes or ignored).
    * ``chunk_size``: queries per chunk of the torch backend (default: sized for the device).
    * ``diagnostics``: False skips the diagnostics' arithmetic; the returned dict then holds
      ``grpo_queries`` only. Inner steps, whose diagnostics nobody logs, pass False.
    * ``backend``: 'auto' (the first registered backend that runs the call, :mod:`.dispatch`)
      or a backend's name ('triton', 'cpu_native', 'torch_chunked', 'reference'); a named
      backend that cannot run the call is a ValueError giving its reason.

    Returns ``(loss, diagnostics)`` with the reference's keys and values; the loss is
    differentiable with respect to ``logits`` only (the other inputs are constants, as in the
    reference). With a closed-form backend double backward is not supported, nor a second
    backward through the same graph (the saved gradient is scaled in place). Host
    synchronisations: one per call on CUDA (the number of counted queries and the checks' flag),
    two for the torch backend with ``group_weighting='sampled'`` or when a pi_old probability
    underflows to 0.
    """
    beta, eps_low, eps_high = _static_checks(
        logits, labels, old_logits, ref_logits, valid, weight, rewards, clip_eps, beta,
        adv_std, adv_eps, adv_scale, group_weighting, surrogate, clip_eps_low, clip_eps_high,
        dual_clip_c, group_size)
    if chunk_size is not None and (isinstance(chunk_size, bool) or not isinstance(
            chunk_size, int) or chunk_size < 1):
        raise ValueError(f'chunk_size={chunk_size!r} must be a positive int (queries per chunk)')

    b, c = logits.shape[0], logits.shape[1]

    def view3(x: Tensor | None) -> Tensor | None:
        return None if x is None else x.detach().reshape(b, c, -1)

    def view2(x: Tensor | None) -> Tensor | None:
        return None if x is None else x.detach().reshape(b, -1)

    problem = Problem(
        z=view3(logits), y=view2(labels), old=view3(old_logits), ref=view3(ref_logits),
        rewards=rewards, reward_tensor=view3(rewards) if torch.is_tensor(rewards) else None,
        valid=view2(valid), weight=view2(weight), shape=logits.shape,
        ignore_index=ignore_index,
        cdt=torch.float64 if logits.dtype == torch.float64 else torch.float32,
        beta=beta, eps_low=eps_low, eps_high=eps_high, dual_clip_c=float(dual_clip_c),
        weighting=group_weighting, surrogate=surrogate, adv_std=adv_std,
        adv_eps=float(adv_eps), adv_scale=adv_scale, group_size=group_size,
        generator=generator, validated=bool(validated), diagnostics=bool(diagnostics),
        chunk=chunk_size, logits=logits)
    chosen = select(problem, backend)
    if not chosen.closed_form:
        solution = chosen.solve(problem)
        return solution.loss, solution.diagnostics
    state = generator.get_state() if generator is not None else None
    out: dict[str, Solution] = {}
    try:
        loss = _FusedObjective.apply(logits, chosen, problem, out)
    except DelegateToReference:
        loss = None
    if loss is None or out['solution'].delegate:
        # a check failed: the reference raises its error for it; if it accepts the inputs,
        # its result is the answer (the generator restored: the same draws)
        if state is not None:
            generator.set_state(state)
        solution = backends.reference.BACKEND.solve(problem)
        return solution.loss, solution.diagnostics
    solution = out['solution']
    if solution.n_valid == 0:
        return _empty_batch_loss(logits, problem.cdt)
    return loss, solution.diagnostics


# ----------------------------------------------------------------------------- checks
def _static_checks(logits, labels, old_logits, ref_logits, valid, weight, rewards, clip_eps,
                   beta, adv_std, adv_eps, adv_scale, group_weighting, surrogate, clip_eps_low,
                   clip_eps_high, dual_clip_c, group_size) -> tuple[float, float, float]:
    """The reference's data-independent checks (same order, same messages); dense inputs are
    checked through flattened stand-ins on the meta device (shapes and dtypes only)."""
    dense = torch.is_tensor(logits) and logits.ndim > 2
    if dense:
        expected = (logits.shape[0], ) + tuple(logits.shape[2:])
        for name, x, shape in (('labels', labels, expected), ('weight', weight, expected),
                               ('valid', valid, expected),
                               ('old_logits', old_logits, tuple(logits.shape)),
                               ('ref_logits', ref_logits, tuple(logits.shape)),
                               ('rewards', rewards if torch.is_tensor(rewards) else None,
                                tuple(logits.shape))):
            if x is not None and (not torch.is_tensor(x) or tuple(x.shape) != shape):
                got = tuple(x.shape) if torch.is_tensor(x) else type(x).__name__
                raise ValueError(f'{name} of shape {got} do not match dense logits of shape '
                                 f'{tuple(logits.shape)}; expected {shape}')
        c = logits.shape[1]
        n = logits.numel() // c if c else 0

        def meta(x, shape):
            return None if x is None else torch.empty(shape, dtype=x.dtype, device='meta')

        logits_, labels_ = meta(logits, (n, c)), meta(labels, (n, ))
        old_, ref_ = meta(old_logits, (n, c)), meta(ref_logits, (n, c))
        weight_, valid_ = meta(weight, (n, )), meta(valid, (n, ))
    else:
        logits_, labels_, old_, ref_, weight_, valid_ = (logits, labels, old_logits, ref_logits,
                                                         weight, valid)
    checked = check_call(logits_, labels_, old_, ref_, clip_eps, beta, weight=weight_,
                         adv_std=adv_std, adv_eps=adv_eps, adv_scale=adv_scale,
                         group_weighting=group_weighting, surrogate=surrogate,
                         clip_eps_low=clip_eps_low, clip_eps_high=clip_eps_high,
                         dual_clip_c=dual_clip_c, group_size=group_size)
    check_valid_argument(valid_, logits_.shape[0])
    if torch.is_tensor(rewards):
        if not dense and tuple(rewards.shape) != tuple(logits.shape):
            raise ValueError(f'rewards of shape {tuple(rewards.shape)} do not match logits of '
                             f'shape {tuple(logits.shape)}')
    elif not callable(rewards) and not list(rewards):
        raise ValueError('rewards is empty: give at least one reward function')
    return checked


class _FusedObjective(torch.autograd.Function):
    """loss = mean_{valid q} u_q (-surr_q + beta KL_q); the forward has a closed-form backend
    compute the gradient with respect to the logits, the backward scales it."""

    @staticmethod
    def forward(ctx, logits: Tensor, backend: Backend, problem: Problem,
                out: dict[str, Solution]) -> Tensor:
        # the backends compute in their own dtype: nothing for autocast to cast (the context
        # is entered only when autocast is on: it costs a few microseconds a call)
        if torch.is_autocast_enabled(logits.device.type):
            with torch.autocast(logits.device.type, enabled=False):
                solution = backend.solve(problem)
        else:
            solution = backend.solve(problem)
        out['solution'] = solution
        ctx.backend = backend
        ctx.grad_scale = solution.grad_scale
        ctx.save_for_backward(solution.grad)
        return solution.loss

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_loss: Tensor):
        grad, = ctx.saved_tensors
        return ctx.backend.backward(grad, grad_loss, ctx.grad_scale), None, None, None
