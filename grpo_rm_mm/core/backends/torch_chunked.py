"""The torch backend of the fused objective: chunks of torch operations, any device.

This backend computes what :func:`..objective.grpo_rm_loss` (the straightforward reference,
kept as the test oracle) computes, for every registered group weighting ('uniform',
'pi_old', 'sampled') and surrogate ('clip', 'dual_clip'), at a fraction of its memory:

* **Chunks.** The queries are processed in chunks of ``chunk_size`` (by default
  :func:`default_chunk_size`, sized for the device). Dense predictions (B, C, *S) are read in
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
  keeps, and its backward scales it in place by ``grad_output``. A float16 gradient is written
  without the ``1 / n_valid`` (the backward applies it with ``grad_output``,
  ``Solution.grad_scale``): divided by a million counted pixels it would be below float16's
  normal range before an AMP loss scale multiplies it. Peak memory is that tensor,
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
  (:func:`..objective.check_call`).

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

import torch
import torch.nn.functional as F
from torch import Tensor

from ..dispatch import Backend
from ..objective import LOG_RATIO_CLAMP
from ..problem import NUM_STATS, DelegateToReference, Problem, Solution, diagnostics_from_sums

__all__ = ['CHUNK_ELEMENTS', 'LABEL_PASS_QUERIES', 'TorchChunkedBackend', 'default_chunk_size']

#: (smallest, largest) elements (queries x C) per chunk by device type; a chunk is a quarter
#: of the input (an eighth on CUDA) within those bounds. On the CPU the chunk's scratch buffers
#: (up to about a dozen of chunk size) stay below the (N, C) tensors of a large input and
#: within the caches' reach, and the operators' per-call overhead is small next to the
#: arithmetic. On CUDA each chunk costs some 135 kernel launches whatever its size, so chunks
#: are as large as the scratch memory allows: at most 2^25 elements, about 1.6 GB of float32
#: scratch, for a handful of chunks at the largest segmentation shapes.
CHUNK_ELEMENTS = {'cpu': (1 << 18, 1 << 20), 'cuda': (1 << 22, 1 << 25)}
#: queries per chunk of the first pass, which counts the labelled queries (labels only)
LABEL_PASS_QUERIES = 1 << 20
#: weightings and surrogates this backend has the closed form of
WEIGHTINGS = ('uniform', 'pi_old', 'sampled')
SURROGATES = ('clip', 'dual_clip')

#: ``kernel(out, probs, labels, tmp)``: writes / adds a reward into ``out`` (n, C, L) from
#: ``probs`` (n, C, L) and ``labels`` (n, L); ``tmp`` is a scratch buffer of ``out``'s shape
RewardKernel = Callable[[Tensor, Tensor, Tensor, Tensor], Tensor]


def default_chunk_size(numel: int, num_classes: int, device_type: str = 'cpu') -> int:
    """Queries per chunk for logits of ``numel`` elements and C = ``num_classes`` on a device
    of ``device_type``: a quarter of the elements on the CPU, an eighth elsewhere, clamped to
    :data:`CHUNK_ELEMENTS` of that device (CUDA's for any accelerator), over C."""
    low, high = CHUNK_ELEMENTS.get(device_type, CHUNK_ELEMENTS['cuda'])
    share = numel // 4 if device_type == 'cpu' else numel // 8
    return max(1, min(max(share, low), high) // max(num_classes, 1))


class TorchChunkedBackend(Backend):
    """Chunks of torch operations (module doc): every device and dtype, every weighting and
    surrogate with a closed form, every reward."""

    name = 'torch_chunked'

    def supports(self, problem: Problem) -> str | None:
        if problem.weighting not in WEIGHTINGS or problem.surrogate not in SURROGATES:
            return (f'it has the closed form of group_weighting in {WEIGHTINGS} and surrogate '
                    f'in {SURROGATES}, not {problem.weighting!r} / {problem.surrogate!r}')
        return None

    def solve(self, problem: Problem) -> Solution:
        chunk = problem.chunk or default_chunk_size(problem.z.numel(), problem.num_classes,
                                                    problem.device.type)
        kernels = [] if problem.reward_tensor is not None else _reward_kernels(problem.rewards)
        return _solve(_Call(problem, kernels, chunk))


class _Call:
    """A :class:`Problem` (its fields read through) with this backend's per-call state."""

    def __init__(self, problem: Problem, kernels: list[RewardKernel], chunk: int) -> None:
        self.problem = problem
        self.kernels = kernels
        self.chunk = chunk
        # 'pi_old': flat groups tested over the weighted outputs only (see _advantages)
        self.exact_flat = False

    def __getattr__(self, name: str):
        return getattr(self.problem, name)


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
            raise DelegateToReference  # the reference names the reward and the shapes
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


def _valid_block(prob: _Call, y: Tensor, valid: Tensor | None) -> tuple[Tensor, Tensor]:
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


def _advantages(prob: _Call, ws: _Workspace, acc: _Accumulator, r: Tensor,
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


def _sampled_counts(prob: _Call, n_valid: int,
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


    def __init__(self, device: torch.device, cdt: torch.dtype) -> None:
        self.stats = torch.zeros(NUM_STATS, dtype=cdt, device=device)
        self.bad = torch.zeros((), dtype=torch.bool, device=device)
        # a 'pi_old' weight of exactly 0 was seen (see :func:`_advantages`)
        self.zero_weight = torch.zeros((), dtype=torch.bool, device=device)

    def flag(self, condition: Tensor) -> None:
        self.bad |= condition


def _chunk(prob: _Call, acc: _Accumulator, ws: _Workspace, grad: Tensor, inv_n: Tensor,
           block: tuple[int, int, int, int], counts: Tensor | None) -> None:
    """Loss terms, diagnostics and the logits' gradient of one block of queries; ``grad`` is
    the (B, C, S) gradient being filled, ``inv_n`` the 0-dim ``1 / max(n_valid, 1)`` it is
    divided by (None: left to the backward).

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
    kappa = (-u_loss if inv_n is None else u_loss * -inv_n).unsqueeze(1)  # -u_q / n_valid

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


def _solve(prob: _Call) -> Solution:
    """The chunk loop (module doc): one host synchronisation (two with 'sampled', or when a
    'pi_old' probability underflows to 0)."""
    b, c, s = prob.z.shape
    device = prob.z.device
    acc = _Accumulator(device, prob.cdt)
    # the number of counted queries first (a pass over the labels only): the gradient is
    # written already divided by it
    n_valid = torch.zeros((), dtype=torch.long, device=device)
    for b0, b1, s0, s1 in _chunks(b, s, max(prob.chunk, LABEL_PASS_QUERIES)):
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
            raise DelegateToReference
        if n_host > 0:
            counts = _sampled_counts(prob, n_host, prob.generator)

    grad = torch.empty((b, c, s), dtype=prob.z.dtype, device=device)
    unscaled = prob.z.dtype == torch.float16
    ws = _Workspace(prob.cdt, device)
    while True:
        for block in _chunks(b, s, prob.chunk):
            _chunk(prob, acc, ws, grad, None if unscaled else inv_n, block, counts)
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
    means = acc.stats * inv_n
    return Solution(loss=means[0], grad=grad.view(prob.shape), n_valid=n_host,
                    delegate=bool(bad_host),
                    diagnostics=diagnostics_from_sums(means, n_host, c, prob.diagnostics,
                                                      prob.cdt),
                    grad_scale=1.0 / max(n_host, 1) if unscaled else 1.0)


BACKEND = TorchChunkedBackend()
