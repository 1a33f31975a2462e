"""The GRPO-RM objective fused: chunked, closed-form gradient, one host sync. Plain torch.

On the CPU the default (``kernel='auto'``) hands the calls it covers to a compiled kernel
(:mod:`.native`: float32/float64 logits, 'uniform' / 'pi_old' weightings, the core rewards)
that computes the same formulas in a few vectorised passes per query; everything below describes
the torch implementation, which runs everywhere else (CUDA tensors among them).

:func:`grpo_rm_loss_fused` computes what :func:`.objective.grpo_rm_loss` (the straightforward
reference, kept as the test oracle) computes, for every registered group weighting ('uniform',
'pi_old', 'sampled') and surrogate ('clip', 'dual_clip'), at a fraction of its memory:

* **Chunks.** The queries are processed in chunks of ``chunk_size`` (about
  ``DEFAULT_CHUNK_ELEMENTS / C`` queries by default). Dense predictions (B, C, *S) are read in
  place through a (B, C, S) view, a chunk being a block of pixels of one image or a block of
  whole images, so nothing of size (N, C) is copied to flatten them; only the chunk's
  temporaries exist at a time (in float32, or float64 for float64 logits, also under bf16/fp16
  autocast).
* **Closed-form gradient, computed in the forward pass.** Per query, with ``p = softmax(z)``,
  ``w`` the group weights, ``A`` the advantages and ``ratio_i = exp(clamp(log p_i -
  log p_old_i, +-LOG_RATIO_CLAMP))``::

      g_i       = -w_i A_i ratio_i  where the unclipped branch is active and the log ratio is
                  inside the clamp, else 0                        (d surrogate loss / d log p_i)
      g_i      += beta p_i (log p_i - log ref_i + 1)                (d KL / d log p_i; p_i > 0)
      dL / dz_k = u_q / n_valid * (g_k - p_k sum_i g_i)             (through the log-softmax)

  which is exactly the gradient autograd gives the reference (the KL part equals
  ``beta p_k (log p_k - log ref_k - KL)`` since ``sum_i p_i = 1``). The chunk's gradient is
  written into one (N, C) tensor in the logits' dtype; that tensor is all the autograd node
  keeps, and its backward scales it in place by ``grad_output``. Peak memory is that tensor,
  the chunk's scratch buffers (reused from chunk to chunk, see
  :class:`_Workspace`) and, for 'sampled', the (N, C) uint8 draw counts.
* **Checks in the same pass, one host synchronisation.** Labels are checked per chunk
  (counted queries in [0, C)); a non-finite logit, pi_old / pi_ref logit, query weight or
  reward of a counted query makes one of the summed statistics (entropy, KL, reward, loss)
  NaN or infinite, since NaN and inf propagate through the chunk's arithmetic. The number of
  valid queries, the label flag and the finiteness of the sums are read back in **one**
  ``tolist()`` at the end of the call: that read is needed anyway for ``grpo_queries`` and
  the all-ignored-batch case. 'sampled' needs **two**: the draws are made before the chunks,
  over the valid queries (their number sizes the draw), so the number of valid queries and
  the finiteness of the draws' source are read first. 'pi_old' takes a second pass and read
  only when a probability of pi_old underflows to exactly 0 (a logit gap beyond about 87 in
  float32, 745 in float64): a group is flat when its outputs *with weight* share a reward,
  and the one-pass flat test over all outputs is exact only while every weight is positive,
  which the same read reports. With ``validated=True`` (inner steps
  on a batch whose labels an earlier call validated) the label check is skipped. If a check
  fails, the reference is called on the same inputs and raises its error, so the messages
  are exactly the reference's; should the reference accept them (finite logits more than
  the largest float apart, a custom reward that is non-finite on ignored queries only), its
  result is returned. The data-independent checks are the reference's own
  (:func:`.check_call`).

'sampled' draws: the counts are drawn **once over the valid queries, as the reference does**:
pi_old of the valid queries in query order (computed as the reference computes it), one
``torch.multinomial`` call with the given generator; the chunks then read those counts. So the
same generator state gives the same draws as the reference, on CPU and on CUDA.

Rewards are evaluated per chunk. A reward with an ``unchecked(probs, labels, dim, out)`` or
``add_unchecked(out, labels, dim)`` attribute (the registered ones) is called on the chunk's
(n, C, L) probabilities without checks; another
callable is called as ``fn(probs (n, C), labels (n,))`` on every query of the chunk (ignored
queries with label 0, their rewards then discarded), so rewards must be computed row by row,
as every reward of this project is.
"""
from __future__ import annotations

import math
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.autograd.function import once_differentiable
from torch.autograd.graph import increment_version

from . import native
from .objective import (
    DIAGNOSTIC_KEYS,
    LOG_RATIO_CLAMP,
    RewardSpec,
    _empty_batch_loss,
    check_call,
    check_valid_argument,
    grpo_rm_loss,
)

__all__ = ['DEFAULT_CHUNK_ELEMENTS', 'FUSED_SURROGATES', 'FUSED_WEIGHTINGS',
           'MAX_CHUNK_ELEMENTS', 'default_chunk_size', 'grpo_rm_loss_fused']

#: Elements (queries x C) per chunk by default: a quarter of the input, within
#: [DEFAULT_CHUNK_ELEMENTS, MAX_CHUNK_ELEMENTS]. The chunk's scratch buffers (up to about a
#: dozen of chunk size) then stay below the (N, C) tensors of a large input, and there are few
#: enough chunks that the per-operation overhead of each stays small next to the arithmetic.
DEFAULT_CHUNK_ELEMENTS = 1 << 18
MAX_CHUNK_ELEMENTS = 1 << 20
#: ``kernel=`` choices of :func:`grpo_rm_loss_fused`
KERNELS = ('auto', 'native', 'torch')
FUSED_WEIGHTINGS = ('uniform', 'pi_old', 'sampled')
FUSED_SURROGATES = ('clip', 'dual_clip')

#: ``kernel(out, probs, labels, tmp)``: writes / adds a reward into ``out`` (n, C, L) from
#: ``probs`` (n, C, L) and ``labels`` (n, L); ``tmp`` is a scratch buffer of ``out``'s shape
RewardKernel = Callable[[Tensor, Tensor, Tensor, Tensor], Tensor]


class _DelegateToReference(Exception):
    """A check failed: the reference is called to raise its error."""


@dataclass
class _Problem:
    """One call's inputs as (B, C, S) / (B, S) views, and its options."""

    z: Tensor                      # (B, C, S) logits
    y: Tensor                      # (B, S) labels
    old: Tensor | None             # (B, C, S)
    ref: Tensor | None             # (B, C, S)
    reward_tensor: Tensor | None   # (B, C, S) precomputed rewards
    kernels: list[RewardKernel]
    valid: Tensor | None           # (B, S) bool
    weight: Tensor | None          # (B, S)
    ignore_index: int | None
    cdt: torch.dtype
    beta: float
    eps_low: float
    eps_high: float
    dual_clip_c: float
    weighting: str
    surrogate: str
    adv_std: str
    adv_eps: float
    adv_scale: str
    group_size: int
    validated: bool
    chunk: int
    diagnostics: bool = True       # compute the diagnostics (else only the loss)
    exact_flat: bool = False       # 'pi_old': flat groups tested over the weighted outputs

    @property
    def num_classes(self) -> int:
        return self.z.shape[1]


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
                       kernel: str = 'auto') -> tuple[Tensor, dict[str, Tensor]]:
    """The GRPO-RM loss and diagnostics of :func:`.grpo_rm_loss`, fused (see the module doc).

    Takes the reference's arguments, with two more forms and two more options:

    * ``logits`` may also be dense, (B, C, *S) (e.g. (N, C, H, W) segmentation logits), with
      ``labels``, ``weight`` and ``valid`` of shape (B, *S) and ``old_logits``, ``ref_logits``
      and a reward tensor of the logits' shape: queries are the pixels in (b, *s) order, as
      ``x.movedim(1, -1).reshape(-1, C)`` flattens them, without that copy.
    * ``validated``: the labels were checked by an earlier call (inner steps on a cached
      batch): the label check is skipped (labels must then be classes or ignored).
    * ``chunk_size``: queries per chunk (default :func:`default_chunk_size`).
    * ``diagnostics``: False skips the diagnostics' arithmetic (about a third of an inner
      step's passes); the returned dict then holds ``grpo_queries`` only. Inner steps, whose
      diagnostics nobody logs, pass False.
    * ``kernel``: 'auto' runs the compiled CPU kernel (:mod:`.native`) where it covers the
      call and the chunked torch implementation elsewhere; 'native' requires the kernel
      (ValueError where it does not cover the call); 'torch' always takes the torch path.

    Returns ``(loss, diagnostics)`` with the reference's keys and values; the loss is
    differentiable with respect to ``logits`` only (the other inputs are constants, as in the
    reference). Double backward is not supported, nor a second backward through the same
    graph (the saved gradient is scaled in place). Host synchronisations: one per call, two
    with ``group_weighting='sampled'`` or when a pi_old probability underflows to 0 (module
    doc).
    """
    beta, eps_low, eps_high = _static_checks(
        logits, labels, old_logits, ref_logits, valid, weight, rewards, clip_eps, beta,
        adv_std, adv_eps, adv_scale, group_weighting, surrogate, clip_eps_low, clip_eps_high,
        dual_clip_c, group_size)
    if group_weighting not in FUSED_WEIGHTINGS or surrogate not in FUSED_SURROGATES:
        # a weighting / surrogate registered later has no closed form here
        raise ValueError(f'the fused GRPO-RM objective supports group_weighting in '
                         f'{FUSED_WEIGHTINGS} and surrogate in {FUSED_SURROGATES}, got '
                         f'{group_weighting!r}, {surrogate!r}; use the reference '
                         f'grpo_rm_loss (GRPORMLoss(implementation="reference"))')
    if kernel not in KERNELS:
        raise ValueError(f'kernel={kernel!r} is unknown; use one of {KERNELS}')
    if chunk_size is not None and (isinstance(chunk_size, bool) or not isinstance(
            chunk_size, int) or chunk_size < 1):
        raise ValueError(f'chunk_size={chunk_size!r} must be a positive int (queries per chunk)')

    b, c = logits.shape[0], logits.shape[1]

    def view3(x: Tensor | None) -> Tensor | None:
        return None if x is None else x.detach().reshape(b, c, -1)

    def view2(x: Tensor | None) -> Tensor | None:
        return None if x is None else x.detach().reshape(b, -1)

    cdt = torch.float64 if logits.dtype == torch.float64 else torch.float32
    prob = _Problem(
        z=logits.detach().reshape(b, c, -1), y=view2(labels), old=view3(old_logits),
        ref=view3(ref_logits), reward_tensor=view3(rewards) if torch.is_tensor(rewards) else None,
        kernels=[],
        valid=view2(valid), weight=view2(weight), ignore_index=ignore_index, cdt=cdt,
        beta=beta, eps_low=eps_low, eps_high=eps_high, dual_clip_c=float(dual_clip_c),
        weighting=group_weighting, surrogate=surrogate, adv_std=adv_std,
        adv_eps=float(adv_eps), adv_scale=adv_scale, group_size=group_size,
        validated=bool(validated), diagnostics=bool(diagnostics),
        chunk=chunk_size or default_chunk_size(logits.numel(), c))
    plan = None
    if kernel != 'torch':
        plan = native.plan(prob.z, prob.y, prob.old, prob.ref, prob.valid, prob.weight,
                           rewards, group_weighting, surrogate)
        if plan is None and kernel == 'native':
            raise ValueError(
                f"kernel='native' does not cover this call (compiled kernel available: "
                f"{native.AVAILABLE}): it needs CPU float32/float64 logits, group_weighting in "
                f"{tuple(native.KERNEL_WEIGHTINGS)} and rewards of grpo_rm_mm.core.rewards "
                f"{native.KERNEL_REWARDS} (or their registered classes); got "
                f"{logits.device.type} {logits.dtype}, {group_weighting!r}; use kernel='auto'")
    if plan is None and not torch.is_tensor(rewards):
        prob.kernels = _reward_kernels(rewards)  # the torch path's reward kernels
    out: dict = {}
    state = generator.get_state() if generator is not None else None
    try:
        loss = _FusedObjective.apply(logits, prob, generator, out, plan)
    except _DelegateToReference:
        loss = None
    if loss is None or out['delegate']:
        # a check failed: the reference raises its error for it; if it accepts the inputs
        # (finite logits too far apart, a custom reward non-finite on ignored queries only),
        # its result is the answer (the generator restored: the same draws)
        if state is not None:
            generator.set_state(state)
        return _reference(logits, labels, rewards, old_logits, ref_logits, valid, clip_eps,
                          beta, ignore_index, weight, adv_std, adv_eps, adv_scale,
                          group_weighting, surrogate, clip_eps_low, clip_eps_high,
                          dual_clip_c, group_size, generator)
    if out['n_valid'] == 0:
        return _empty_batch_loss(logits, cdt)
    return loss, out['diagnostics']


def default_chunk_size(numel: int, num_classes: int) -> int:
    """Queries per chunk for logits of ``numel`` elements and C = ``num_classes``: a quarter
    of the elements, clamped to [DEFAULT_CHUNK_ELEMENTS, MAX_CHUNK_ELEMENTS], over C."""
    elements = min(max(numel // 4, DEFAULT_CHUNK_ELEMENTS), MAX_CHUNK_ELEMENTS)
    return max(1, elements // max(num_classes, 1))


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


def _flat(x: Tensor | None, dense: bool, queries: bool = False) -> Tensor | None:
    if x is None or not dense:
        return x
    return x.reshape(-1) if queries else x.movedim(1, -1).reshape(-1, x.shape[1])


def _reference(logits, labels, rewards, old_logits, ref_logits, valid, clip_eps, beta,
               ignore_index, weight, adv_std, adv_eps, adv_scale, group_weighting, surrogate,
               clip_eps_low, clip_eps_high, dual_clip_c, group_size,
               generator) -> tuple[Tensor, dict[str, Tensor]]:
    """The reference objective on the same inputs (dense ones flattened into queries)."""
    dense = logits.ndim > 2
    return grpo_rm_loss(
        _flat(logits, dense), _flat(labels, dense, True),
        _flat(rewards, dense) if torch.is_tensor(rewards) else rewards,
        old_logits=_flat(old_logits, dense), ref_logits=_flat(ref_logits, dense),
        valid=_flat(valid, dense, True), clip_eps=clip_eps, beta=beta,
        ignore_index=ignore_index, weight=_flat(weight, dense, True), adv_std=adv_std,
        adv_eps=adv_eps, adv_scale=adv_scale, group_weighting=group_weighting,
        surrogate=surrogate, clip_eps_low=clip_eps_low, clip_eps_high=clip_eps_high,
        dual_clip_c=dual_clip_c, group_size=group_size, generator=generator)


# ----------------------------------------------------------------------------- rewards
def _reward_kernels(spec: Callable | Sequence[Callable]) -> list[RewardKernel]:
    """Kernels that sum the rewards into a chunk's buffer: dense ones first (the first
    writes, the others add through a scratch buffer), rewards that are non-zero only at the
    label (``add_unchecked``) last, added in place. The order changes no value when the
    dense rewards are 0 at the label, as the registered ones are."""
    fns = [spec] if callable(spec) else list(spec)
    dense: list[Callable] = []
    sparse: list[RewardKernel] = []
    for fn in fns:
        add, unchecked = getattr(fn, 'add_unchecked', None), getattr(fn, 'unchecked', None)
        if callable(add):
            sparse.append(lambda out, p, y, tmp, k=add: k(out, y, 1))
        elif callable(unchecked):
            dense.append(lambda p, y, out, k=unchecked: k(p, y, 1, out=out))
        else:
            dense.append(_row_wise(fn))
    kernels: list[RewardKernel] = []
    for i, kernel in enumerate(dense):
        if i == 0:
            kernels.append(lambda out, p, y, tmp, k=kernel: k(p, y, out))
        else:
            kernels.append(lambda out, p, y, tmp, k=kernel: out.add_(k(p, y, tmp)))
    if not dense:
        kernels.append(lambda out, p, y, tmp: out.zero_())
    return kernels + sparse


def _row_wise(fn: Callable[..., Tensor]) -> RewardKernel:
    """A reward ``fn(probs (n, C), labels (n,))`` as a kernel on (n, C, L) chunks."""

    def kernel(p: Tensor, y: Tensor, out: Tensor) -> Tensor:
        nb, c, length = p.shape
        p2 = p.permute(0, 2, 1).reshape(-1, c)
        term = fn(p2, y.reshape(-1))
        if not torch.is_tensor(term) or tuple(term.shape) != tuple(p2.shape):
            raise _DelegateToReference  # the reference names the reward and the shapes
        return out.copy_(term.detach().reshape(nb, length, c).permute(0, 2, 1))

    return kernel


# ----------------------------------------------------------------------------- chunks
def _chunks(b: int, s: int, q: int) -> Iterator[tuple[int, int, int, int]]:
    """``(b0, b1, s0, s1)`` blocks of about ``q`` queries covering (B, S) in query order:
    near-equal pixel ranges of one image when ``S > 2 q``, else groups of whole images (one
    image when ``q <= S <= 2 q``: fewer, larger chunks cost fewer operator calls)."""
    if s > 2 * q:
        parts = -(-s // q)
        step = -(-s // parts)
        for i in range(b):
            for j in range(0, s, step):
                yield i, i + 1, j, min(j + step, s)
    else:
        nb = max(1, q // s)
        for i in range(0, b, nb):
            yield i, min(i + nb, b), 0, s


def _valid_block(prob: _Problem, y: Tensor, valid: Tensor | None) -> tuple[Tensor, Tensor]:
    """``(mask, in_range)`` of a (n, L) block of labels: mask = counted (valid, not ignored,
    and, unless validated, a class in [0, C)); in_range False marks a counted-but-bad label."""
    mask = torch.ones_like(y, dtype=torch.bool) if valid is None else valid.clone()
    if prob.ignore_index is not None:
        mask &= y != prob.ignore_index
    if prob.validated:
        return mask, mask
    in_range = (y >= 0) & (y < prob.num_classes)
    return mask & in_range, in_range | ~mask


class _Workspace:
    """Chunk-sized scratch buffers, reused from chunk to chunk through ``out=`` / in-place ops.

    Fresh (chunk)-sized temporaries would be freed at the end of every chunk; the C allocator
    then gives large blocks back to the OS and the next chunk page-faults them in again (a
    cost comparable to the arithmetic on CPU). One buffer per role, allocated on first use
    at the size of the first (largest) chunk, avoids that.
    """

    def __init__(self, dtype: torch.dtype, device: torch.device) -> None:
        self.dtype, self.device = dtype, device
        self.buffers: dict[str, Tensor] = {}

    def __call__(self, name: str, shape: torch.Size | tuple[int, ...]) -> Tensor:
        numel = math.prod(shape)
        buf = self.buffers.get(name)
        if buf is None or buf.numel() < numel:
            buf = self.buffers[name] = torch.empty(numel, dtype=self.dtype, device=self.device)
        return buf[:numel].view(shape)


def _softmax_pair(x: Tensor, ws: _Workspace, name: str) -> tuple[Tensor, Tensor, Tensor]:
    """``(log p, p, max log p)`` along dim 1 of (n, C, L) logits, in the workspace's dtype,
    with one ``exp``: ``d = x - max``, ``p = exp(d) / sum exp(d)``,
    ``log p = d - log sum exp(d)`` (so the largest ``log p`` is ``-log sum exp(d)``, (n, 1, L)).
    A non-finite logit makes its row's ``p log p`` terms NaN (which the call's final check
    sees); as in the reference, finite logits more than the largest float apart (some 3e38
    in float32) give ``log p = -inf``."""
    if x.dtype != ws.dtype:
        x = ws(name + '.x', x.shape).copy_(x)
    d = torch.sub(x, x.amax(dim=1, keepdim=True), out=ws(name + '.logp', x.shape))
    e = torch.exp(d, out=ws(name + '.p', x.shape))
    total = e.sum(dim=1, keepdim=True)
    log_total = total.log()
    return d.sub_(log_total), e.div_(total), log_total.neg_()


def _indicator_le0(t: Tensor) -> Tensor:
    """``[t <= 0]`` as 0/1 in t's dtype, in place, by arithmetic (``1 - sign`` clamped at 1):
    comparisons and ``where`` on (N, C)-sized tensors are several times slower on CPU."""
    return t.sign_().neg_().add_(1.0).clamp_max_(1.0)


def _advantages(prob: _Problem, ws: _Workspace, acc: _Accumulator, r: Tensor,
                w: Tensor | None) -> tuple[Tensor, Tensor | None]:
    """Advantages (n, C, L) of rewards ``r`` under group weights ``w`` (None: uniform 1/C),
    as :func:`.advantages.weighted_advantages` along dim 1 (flat groups get exactly 0), and,
    for 'pi_old' weights, ``sum_i w_i r_i`` (n, 1, L) (the expected reward, reused as the
    diagnostic), else None.

    A group is flat when the outputs *with weight* share one reward. Under 'pi_old' every
    weight is positive unless a probability underflows to exactly 0 (logit gaps beyond some
    87 in float32), so the flat test there is over all outputs, and an exact zero weight in
    the chunk is flagged (``acc.zero_weight``): the call is then redone with
    ``prob.exact_flat``, which excludes the outputs without weight (as 'sampled' always does).
    """
    c = prob.num_classes
    tmp = ws('tmp', r.shape)
    r_max = r.amax(dim=1, keepdim=True)
    r_min = r.amin(dim=1, keepdim=True)
    expected = None
    if w is None:
        mean = r.sum(dim=1, keepdim=True) * (1.0 / c)
        flat = r_max <= r_min
    else:
        total = w.sum(dim=1, keepdim=True)
        # a query without weight (an uncounted query under 'sampled') is treated as flat
        empty = total <= 0
        total = torch.where(empty, torch.ones_like(total), total)
        weighted_sum = torch.mul(w, r, out=tmp).sum(dim=1, keepdim=True)
        mean = weighted_sum / total
        if prob.weighting == 'pi_old':
            expected = weighted_sum
        if prob.weighting == 'pi_old' and not prob.exact_flat:
            acc.zero_weight |= w.amin() <= 0
            flat = (r_max <= r_min) | empty
        else:
            # outputs without weight are pushed out of the max / min by the largest float
            # (exact for |r| < 1e38): r - big * [w == 0] and r + big * [w == 0]
            big = torch.finfo(r.dtype).max
            unweighted = torch.sign(w, out=tmp).sub_(1.0)     # w >= 0: -1 where w == 0, else 0
            shifted = ws('adv.shifted', r.shape)
            high = torch.addcmul(r, unweighted, r_max.new_full((), big),
                                 out=shifted).amax(dim=1, keepdim=True)
            low = torch.addcmul(r, unweighted, r_max.new_full((), -big),
                                out=shifted).amin(dim=1, keepdim=True)
            flat = (high <= low) | empty
    centred = torch.sub(r, mean, out=ws('adv', r.shape))
    if prob.adv_scale == 'none':
        return centred.mul_((~flat).to(centred.dtype)), expected
    # as the reference: the squares are taken of centred / max|centred| (in [-1, 1]);
    # max_i |r_i - mean| = max(r_max - mean, mean - r_min) exactly (rounding is monotone)
    mag = torch.maximum(r_max - mean, mean - r_min)
    mag = torch.where(mag > 0, mag, torch.ones_like(mag))
    unit = centred.div_(mag)
    squares = torch.mul(unit, unit, out=tmp)
    if w is None:
        var = squares.sum(dim=1, keepdim=True) * (1.0 / c)
        if prob.adv_std == 'unbiased':
            var = var * (c / max(c - 1, torch.finfo(r.dtype).eps))
    else:
        var = squares.mul_(w).sum(dim=1, keepdim=True) / total
        if prob.adv_std == 'unbiased':
            if prob.weighting == 'sampled':
                n = torch.full_like(var, float(prob.group_size))
            else:  # 'pi_old': Kish's effective sample size 1 / sum w^2
                n = 1.0 / torch.mul(w, w, out=tmp).sum(dim=1, keepdim=True)
            var = var * n / (n - 1).clamp_min(torch.finfo(r.dtype).eps)
    # a flat group gets exactly 0: its scale factor is 0 (unit is finite)
    scale = torch.where(flat, torch.zeros_like(var), 1.0 / (var.sqrt() + prob.adv_eps / mag))
    return unit.mul_(scale), expected


def _first_argmax(logp: Tensor, top: Tensor, out: Tensor) -> Tensor:
    """(n, C, L) log-probabilities and their (n, 1, L) maximum -> (n, L): the index of the
    first maximum (``argmax``), as a float, from arithmetic and a max reduction (argmax along
    dim 1 of this layout is slow). ``out``: a scratch buffer of logp's shape."""
    c = logp.shape[1]
    at_max = torch.sub(logp, top, out=out).sign_().add_(1.0)      # 1 at the maxima, else 0
    # C - i at the maxima, 0 elsewhere: the largest value marks the first maximum
    rev = torch.arange(c, 0, -1, dtype=logp.dtype, device=logp.device).view(1, c, 1)
    return c - at_max.mul_(rev).amax(dim=1)


def _sampled_counts(prob: _Problem, n_valid: int,
                    generator: torch.Generator | None) -> Tensor:
    """(B, S, C) draw counts of each output, 0 for uncounted queries: ``group_size`` draws
    with replacement from pi_old of every valid query, in one ``torch.multinomial`` call over
    the valid queries in query order (as the reference), without a further host sync."""
    b, c, s = prob.z.shape
    src = prob.z if prob.old is None else prob.old
    device = src.device
    mask = torch.empty((b, s), dtype=torch.bool, device=device)
    for b0, b1, s0, s1 in _chunks(b, s, prob.chunk):
        valid = None if prob.valid is None else prob.valid[b0:b1, s0:s1]
        mask[b0:b1, s0:s1] = _valid_block(prob, prob.y[b0:b1, s0:s1], valid)[0]
    flat = mask.reshape(-1)
    # indices of the valid queries without nonzero() (which would synchronise again):
    # scatter each valid query's index to its rank among the valid ones
    rank = torch.where(flat, flat.cumsum(0) - 1, n_valid)
    idx = torch.empty(n_valid + 1, dtype=torch.long, device=device)
    idx.scatter_(0, rank, torch.arange(flat.numel(), device=device))
    idx = idx[:n_valid]
    del rank, flat
    rows = src.permute(0, 2, 1)[idx // s, idx % s]  # (n_valid, C), in query order
    # pi_old computed as the reference computes it (log_softmax of the (n, C) rows, exp)
    p = F.log_softmax(rows.to(prob.cdt), dim=-1).exp_()
    del rows
    draws = torch.multinomial(p, prob.group_size, replacement=True, generator=generator)
    del p
    count_dtype = torch.uint8 if prob.group_size < 256 else torch.int32
    counts = torch.zeros((n_valid, c), dtype=count_dtype, device=device)
    counts.scatter_add_(1, draws, torch.ones_like(draws, dtype=count_dtype))
    del draws
    full = torch.zeros((b * s, c), dtype=count_dtype, device=device)
    full.index_copy_(0, idx, counts)
    return full.view(b, s, c)


class _Accumulator:
    """Device-side sums over the chunks: loss, diagnostics and check flags."""

    # rows of ``stats``: loss, reward, |A|, clipped, kl, kl_old, entropy, correct
    ROWS = 8

    def __init__(self, device: torch.device, cdt: torch.dtype) -> None:
        self.stats = torch.zeros(self.ROWS, dtype=cdt, device=device)
        self.bad = torch.zeros((), dtype=torch.bool, device=device)
        # a 'pi_old' weight of exactly 0 was seen (see :func:`_advantages`)
        self.zero_weight = torch.zeros((), dtype=torch.bool, device=device)

    def flag(self, condition: Tensor) -> None:
        self.bad |= condition


def _chunk(prob: _Problem, acc: _Accumulator, ws: _Workspace, grad: Tensor, inv_n: Tensor,
           block: tuple[int, int, int, int], counts: Tensor | None) -> None:
    """Loss terms, diagnostics and the logits' gradient of one block of queries; ``grad`` is
    the (B, C, S) gradient being filled, ``inv_n`` the 0-dim ``1 / max(n_valid, 1)``.

    Per-query tensors are (n, L) (or (n, 1, L)), per-output ones (n, C, L), held in the
    workspace. Masks on per-output tensors are built by arithmetic (0/1 factors), not by
    comparisons or ``where``.
    """
    b0, b1, s0, s1 = block
    cdt = prob.cdt
    c = prob.num_classes
    y = prob.y[b0:b1, s0:s1]
    valid = None if prob.valid is None else prob.valid[b0:b1, s0:s1]
    mask, in_range = _valid_block(prob, y, valid)
    if not prob.validated:
        acc.flag(~in_range.all())
    ysafe = (y * mask).long()                            # uncounted queries read class 0
    m = mask.to(cdt)
    if prob.weight is None:
        u_loss = m                                       # u_q = 1 on counted queries
    else:
        u = prob.weight[b0:b1, s0:s1].to(cdt)
        u_loss = torch.where(mask, u, torch.zeros_like(u))
    kappa = (u_loss * -inv_n).unsqueeze(1)              # (n, 1, L): -u_q / n_valid

    logp, p, top = _softmax_pair(prob.z[b0:b1, :, s0:s1], ws, 'z')
    shape = logp.shape
    if prob.old is None:                 # pi_old = the current policy: ratio 1
        old_logp, p_old = logp, p
    else:
        old_logp, p_old, _ = _softmax_pair(prob.old[b0:b1, :, s0:s1], ws, 'old')
    tmp = ws('tmp', shape)

    # rewards, group weights, advantages
    if prob.reward_tensor is not None:
        r = ws('r', shape).copy_(prob.reward_tensor[b0:b1, :, s0:s1])
    else:
        r = ws('r', shape)
        for kernel in prob.kernels:
            kernel(r, p_old, ysafe, tmp)
    if prob.weighting == 'pi_old':
        w = p_old
    elif prob.weighting == 'sampled' and counts is not None:
        w = ws('w', shape).copy_(counts[b0:b1, s0:s1].permute(0, 2, 1))
        w.mul_(1.0 / prob.group_size)
    else:  # 'uniform' (or 'sampled' without a valid query: nothing is counted)
        w = None
    adv, expected = _advantages(prob, ws, acc, r, w)
    # sum_i p_old_i r_i (the diagnostic; 'pi_old' computed it for the advantages' mean)
    reward_q = None
    if prob.diagnostics:
        reward_q = (torch.mul(p_old, r, out=tmp).sum(dim=1) if expected is None
                    else expected.squeeze(1))

    # surrogate and g = kappa w d s / d log p (the closed form of the module doc); r is no
    # longer needed and holds g
    k = kappa * (1.0 / c) if w is None else torch.mul(w, kappa, out=ws('k', shape))
    clipped_count = None
    if prob.old is None:
        # ratio 1: nothing is clipped, the surrogate is A and d s / d log p = A
        surr = adv
        g = torch.mul(adv, k, out=r)
    else:
        log_ratio = torch.sub(logp, old_logp, out=ws('log_ratio', shape))
        ratio = torch.clamp(log_ratio, -LOG_RATIO_CLAMP, LOG_RATIO_CLAMP,
                            out=ws('ratio', shape))
        # 1 inside the log-ratio clamp (where it passes the gradient), 0 outside
        inside = log_ratio.sub_(ratio).sign_().abs_().neg_().add_(1.0)
        ratio.exp_()
        g = torch.mul(ratio, adv, out=r)               # r A, unclipped
        in_clip = torch.clamp(ratio, 1.0 - prob.eps_low, 1.0 + prob.eps_high,
                              out=ws('in_clip', shape))
        surr = torch.mul(in_clip, adv, out=ws('surr', shape))        # clip(r) A
        surr = torch.minimum(g, surr, out=surr)
        # the unclipped branch is active iff r A <= clip(r) A, i.e. (r - clip(r)) A <= 0
        active = _indicator_le0(in_clip.sub_(ratio).neg_().mul_(adv))
        if prob.surrogate == 'dual_clip':
            # the floor: c A where A < 0, the lowest float elsewhere (exact: no floor)
            no_floor = torch.sign(adv, out=ws('below', shape)).neg_().clamp_min_(0.0)
            no_floor.neg_().add_(1.0)                                        # [A >= 0]
            floor = torch.mul(adv, prob.dual_clip_c, out=ratio)  # ratio is no longer needed
            floor.add_(no_floor, alpha=-torch.finfo(cdt).max)
            # where s < c A (A < 0) the branch is below the floor: no gradient, s = c A
            below = torch.sub(floor, surr, out=no_floor).sign_().clamp_min_(0.0)
            active.sub_(below.mul_(active))
            surr = torch.maximum(surr, floor, out=surr)
        if prob.diagnostics:
            clipped_count = c - active.sum(dim=1)
        g.mul_(k).mul_(active.mul_(inside))
    per_query = (surr.sum(dim=1) * (1.0 / c) if w is None
                 else torch.mul(w, surr, out=tmp).sum(dim=1))      # sum_i w_i s_i, (n, L)

    kl = None
    if prob.ref is not None:
        ref_logp, _, _ = _softmax_pair(prob.ref[b0:b1, :, s0:s1], ws, 'ref')
        p_diff = torch.sub(logp, ref_logp, out=ref_logp).mul_(p)     # 0 where p == 0
        kl = p_diff.sum(dim=1)
        if prob.beta > 0:
            # d/d log p_i of sum_j p_j (log p_j - log ref_j) = p_i (log p_i - log ref_i) + p_i
            g.addcmul_(p_diff.add_(p), kappa, value=-prob.beta)
    # through the log-softmax (dz_k = g_k - p_k sum_i g_i), into the saved gradient
    g_sum = g.sum(dim=1, keepdim=True)
    torch.addcmul(g, p, g_sum, value=-1.0, out=grad[b0:b1, :, s0:s1])

    # loss terms and diagnostics, summed over the counted queries
    loss_q = -per_query if kl is None or prob.beta == 0 else prob.beta * kl - per_query
    acc.stats[0] += (loss_q * u_loss).sum()
    if not prob.diagnostics:
        # the loss sum still carries any non-finite input of a counted query to the check;
        # pi_ref (when given) through the KL, computed above
        if kl is not None:
            acc.stats[4] += (kl * m).sum()
        return
    zero = torch.zeros_like(m)
    rows = [
        reward_q,
        adv.abs_().sum(dim=1),
        zero if clipped_count is None else clipped_count,
        zero if kl is None else kl,
        zero if prob.old is None else torch.sub(logp, old_logp, out=tmp).mul_(p).sum(dim=1),
        torch.mul(p, logp, out=tmp).sum(dim=1).neg_(),
        (_first_argmax(logp, top, tmp) == ysafe).to(cdt),
    ]
    acc.stats[1:] += (torch.stack(rows) * m).sum(dim=(1, 2))


def _forward(prob: _Problem, generator: torch.Generator | None,
             out: dict) -> tuple[Tensor, Tensor]:
    """The chunk loop; returns ``(loss, grad (B, C, S))`` and fills ``out`` with
    ``n_valid`` (host int), ``delegate`` (a check failed) and ``diagnostics``."""
    b, c, s = prob.z.shape
    device = prob.z.device
    acc = _Accumulator(device, prob.cdt)
    # the number of counted queries first (a pass over the labels only): the gradient is
    # written already divided by it
    n_valid = torch.zeros((), dtype=torch.long, device=device)
    for b0, b1, s0, s1 in _chunks(b, s, max(prob.chunk, 1 << 20)):
        valid = None if prob.valid is None else prob.valid[b0:b1, s0:s1]
        n_valid += _valid_block(prob, prob.y[b0:b1, s0:s1], valid)[0].sum()
    inv_n = 1.0 / n_valid.clamp_min(1).to(prob.cdt)

    counts = None
    if prob.weighting == 'sampled':
        # host sync 1 of 2: the draws are sized by the number of valid queries, and their
        # source (pi_old) must be finite
        src = prob.z if prob.old is None else prob.old
        finite = torch.ones((), dtype=torch.bool, device=device)
        for b0, b1, s0, s1 in _chunks(b, s, prob.chunk):
            x = src[b0:b1, :, s0:s1]
            finite &= torch.isfinite(x.amax(dim=1)).all() & torch.isfinite(x.amin(dim=1)).all()
        n_host, finite_host = torch.stack([n_valid, finite.long()]).tolist()
        if not finite_host:
            raise _DelegateToReference
        if n_host > 0:
            counts = _sampled_counts(prob, n_host, generator)

    grad = torch.empty((b, c, s), dtype=prob.z.dtype, device=device)
    ws = _Workspace(prob.cdt, device)
    while True:
        for block in _chunks(b, s, prob.chunk):
            _chunk(prob, acc, ws, grad, inv_n, block, counts)
        # the call's host sync (the second with 'sampled'): n_valid and the checks. A
        # non-finite logit (current, pi_old or pi_ref), query weight or reward of a counted
        # query makes a sum of the statistics non-finite (NaN / inf propagate through the
        # chunk's arithmetic)
        bad = acc.bad | ~torch.isfinite(acc.stats).all()
        n_host, bad_host, zero_weight = torch.stack(
            [n_valid, bad.long(), acc.zero_weight.long()]).tolist()
        if not zero_weight or bad_host or prob.exact_flat:
            break
        # a 'pi_old' probability underflowed to 0: redo the call with the exact flat-group
        # test (one more pass and host sync, only for such inputs)
        prob.exact_flat = True
        acc = _Accumulator(device, prob.cdt)
    out['n_valid'], out['delegate'] = n_host, bool(bad_host)
    # Python scale factors: a tensor of them would be a host-to-device copy
    means = acc.stats * inv_n
    out['diagnostics'] = _diagnostics(
        [means[i + 1] * f for i, f in enumerate(_diagnostic_scales(c))], n_host,
        prob.diagnostics)
    return means[0], grad


def _diagnostic_scales(c: int) -> tuple[float, ...]:
    """Factors from the means of rows 1..7 of the statistics (:class:`_Accumulator`) to the
    reference's diagnostics, in DIAGNOSTIC_KEYS order."""
    return (1.0, 1.0 / c, 1.0 / c, 1.0, 1.0, 1.0, 100.0)


def _diagnostics(values: Sequence[Tensor], n_valid: int, wanted: bool) -> dict[str, Tensor]:
    """The returned diagnostics: ``values`` (DIAGNOSTIC_KEYS order) if wanted, and
    ``grpo_queries``."""
    out = dict(zip(DIAGNOSTIC_KEYS, values)) if wanted else {}
    out['grpo_queries'] = torch.tensor(float(n_valid))
    return out


def _forward_native(prob: _Problem, plan: native.KernelPlan, out: dict,
                    shape: torch.Size) -> tuple[Tensor, Tensor]:
    """:func:`_forward` by the compiled kernel (no host synchronisation: CPU tensors); the
    gradient has the logits' ``shape`` (and, classes-last, their memory layout)."""
    c = prob.z.shape[1]
    grad_rows, grad = plan.gradient(shape)
    n_valid, bad, sums = native.run(
        plan, grad_rows, ignore_index=prob.ignore_index, weighting=prob.weighting,
        surrogate=prob.surrogate, eps_low=prob.eps_low, eps_high=prob.eps_high,
        dual_clip_c=prob.dual_clip_c, beta=prob.beta, adv_std=prob.adv_std,
        adv_scale=prob.adv_scale, adv_eps=prob.adv_eps, diagnostics=prob.diagnostics)
    out['n_valid'] = n_valid
    out['delegate'] = bad or not all(map(math.isfinite, sums))
    inv_n = 1.0 / max(n_valid, 1)
    # the loss a tensor of its own (not a view: it may be added to in place, as mmseg's decode
    # heads sum losses of one name), the diagnostics views of one tensor
    loss = torch.tensor(sums[0] * inv_n, dtype=prob.cdt)
    values = torch.tensor([v * inv_n * f for v, f in zip(sums[1:], _diagnostic_scales(c))],
                          dtype=prob.cdt).unbind() if prob.diagnostics else ()
    out['diagnostics'] = _diagnostics(values, n_valid, prob.diagnostics)
    return loss, grad


class _FusedObjective(torch.autograd.Function):
    """loss = mean_{valid q} u_q (-surr_q + beta KL_q); the forward computes the gradient with
    respect to the logits (closed form, chunk by chunk) and the backward scales it."""

    @staticmethod
    def forward(ctx, logits: Tensor, prob: _Problem, generator: torch.Generator | None,
                out: dict, plan: native.KernelPlan | None) -> Tensor:
        if plan is not None:  # the kernel: no torch arithmetic that autocast could cast
            loss, grad = _forward_native(prob, plan, out, logits.shape)
        else:
            with torch.autocast(logits.device.type, enabled=False):
                loss, grad = _forward(prob, generator, out)
            grad = grad.view(logits.shape)
        ctx.save_for_backward(grad)
        return loss

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_loss: Tensor):
        # scaled in place: the saved gradient is not needed afterwards, and a second backward
        # through the same graph (retain_graph=True) fails autograd's version check on it
        # instead of reusing a scaled tensor. A CPU gradient of a loss backpropagated as is
        # (grad_loss 1, read without a device sync) is returned unscaled, its version
        # advanced all the same.
        grad, = ctx.saved_tensors
        if grad.device.type == 'cpu' and grad_loss.device.type == 'cpu' and float(
                grad_loss) == 1.0:
            increment_version(grad)
            return grad, None, None, None, None
        return grad.mul_(grad_loss.to(grad.dtype)), None, None, None, None
