"""The Triton backend of the fused objective: one kernel pass over the logits, on CUDA.

For a call whose queries are the columns of (B, C, S) views (:class:`..problem.Problem`), the
main kernel reads every input once (logits, pi_old and pi_ref logits, labels, the valid mask,
the query weights), computes in float32 what :mod:`.torch_chunked` computes in chunks of torch
operations (the formulas of that module's docstring and of :func:`..objective.grpo_rm_loss`)
and writes the closed-form gradient once, in the logits' dtype and memory layout:

* **Tiles.** A program owns a tile of ``BLOCK_C x BLOCK_Q`` outputs: every class of
  ``BLOCK_Q`` queries (``BLOCK_C`` the next power of two >= C, ``BLOCK_Q`` so that a tile holds
  about :data:`TILE_ELEMENTS`). Every reduction over a group (softmax, rewards' mass, the
  advantages' mean / extremes / variance, the surrogate, the KL, the gradient's
  ``sum_i g_i``) is a reduction along the tile's class axis, in registers: the inputs are read
  from memory once and the gradient written once.
* **Layouts.** Each tensor is passed as a base pointer and its (B, C, S) (or (B, S)) strides;
  Triton specialises an integer argument equal to 1, so the loads are contiguous along
  whichever axis is (the pixels of (B, C, H, W) logits, the classes of (N, C) or
  channels-last logits). A program covers a block of the pixels of one image; where every
  tensor's image stride is S times its pixel stride ((N, C) logits, channels-last logits), the
  queries are merged into one axis of B S, so blocks span images.
* **Normalised in the backward.** The main kernel writes the gradient of the loss *times the
  number of counted queries* (not known until every tile is counted); the backward's one
  scaling kernel multiplies by ``grad_loss / n_valid`` in float32 (``Solution.grad_scale``),
  where the shared backward's in-place product would be anyway. A half-precision gradient
  is thus never stored divided by a million counted pixels (float16 underflow) before an AMP
  loss scale multiplies it. Stored, |g_k| is at most about ``2 u_q max|A| max_i w_i ratio_i``:
  with 'pi_old' weighting ``w_i ratio_i = p_i <= 1``; with 'uniform' weighting and float16
  logits a ratio above about ``65504 C / (2 u max|A|)`` (a log ratio of 10 and more) would
  overflow to inf.
* **Few programs, sums without atomics.** The main kernel runs at most
  :data:`MAX_PROGRAMS` programs, each looping over every programs-th tile and adding its
  tiles' sums of the eight :data:`..problem.STAT_ROWS`, two check counts (a non-finite input
  of a counted query, a counted label outside [0, C)) and the counted queries in float64;
  it writes them as its row of a (programs, 11) buffer. One finishing program reduces the
  rows in a fixed order (deterministic) and writes the loss, the seven diagnostics (on the
  device) and two float64 numbers for the host: ``n_valid`` and the checks' flag, the call's
  only host read.
* **Registers.** A thread keeps about ten live float32 values (and their pointers) per tile
  element it owns, so its registers grow with its elements and, past a couple of hundred
  registers, spill; fewer registers also let several programs share a multiprocessor, so
  that one's loads overlap another's arithmetic. A program therefore has about
  :data:`ELEMENTS_PER_THREAD` elements per thread (:data:`TILE_ELEMENTS` per tile, eight
  warps).

Launches per call: the main kernel, the finishing kernel, the backward's scaling kernel
(and the host read's copy of 16 bytes), at any size. Per logit element, float32 with pi_old
logits, the call reads 8 bytes and writes 4 (plus 4 read per pi_ref logit and some 2 x 8 / C
for the labels); the backward reads and writes the gradient once more (8).

What the interpreter cannot show: int32 overflow of offsets (every offset here is int64,
formed from int64 program and lane indices, so tensors beyond 2^31 elements are addressed
correctly), and register pressure: a tile keeps about ten live float32 arrays of its size, so
at C near :data:`MAX_CLASSES` (one query per program) the compiled kernel spills registers.
"""
from __future__ import annotations

import math
import os
import warnings
from collections.abc import Callable
from typing import NamedTuple

import torch
from torch import Tensor
from torch.autograd.graph import increment_version

from ..dispatch import Backend
from ..objective import LOG_RATIO_CLAMP
from ..problem import NUM_STATS, Problem, Solution, diagnostic_scales, diagnostics_from_values
from ..rewards import fused_reward_terms

try:
    import triton
    import triton.language as tl
except ImportError:  # no triton: the backend is unavailable
    triton = None
    tl = None

__all__ = ['AVAILABLE', 'MAX_CLASSES', 'TILE_ELEMENTS', 'Launched', 'TritonBackend', 'launch',
           'scale_gradient']

AVAILABLE = triton is not None
#: the largest C a tile holds (one query per program at that size)
MAX_CLASSES = 4096
#: outputs (classes x queries) per tile of the main kernel, and per thread of its programs
TILE_ELEMENTS = 1024
ELEMENTS_PER_THREAD = 4
#: programs of the main kernel at most (each loops over its share of the tiles), so that the
#: finishing kernel reduces few rows
MAX_PROGRAMS = 4096
#: the columns of a program's row of sums: the STAT_ROWS, non-finite count, bad-label count,
#: counted queries
NUM_COLUMNS = NUM_STATS + 3
#: rows of partial sums the finishing kernel reduces per step; columns it loads (>= NUM_COLUMNS)
FINISH_ROWS = 256
_FINISH_COLUMNS = 16
#: gradient elements per program of the backward's scaling kernel
SCALE_BLOCK = 1024
LOGIT_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
WEIGHTINGS = ('uniform', 'pi_old')
SURROGATES = ('clip', 'dual_clip')
_FLOAT32_EPS = float(torch.finfo(torch.float32).eps)
_FLOAT32_TINY = float(torch.finfo(torch.float32).tiny)


def _interpret() -> bool:
    """Whether Triton runs kernels in its interpreter (on CPU tensors)."""
    return os.environ.get('TRITON_INTERPRET', '0') == '1'


# ----------------------------------------------------------------------------- kernels
def _objective_kernel_fn(
        z_ptr, old_ptr, ref_ptr, y_ptr, valid_ptr, w_ptr, grad_ptr, part_ptr,
        C, S, n_sblk, n_tiles,
        z_sb, z_sc, z_ss, o_sb, o_sc, o_ss, r_sb, r_sc, r_ss, g_sb, g_sc, g_ss,
        y_sb, y_ss, v_sb, v_ss, w_sb, w_ss,
        ignore_index, eps_low, eps_high, dual_c, beta, adv_eps, r_acc, r_uni, r_conf,
        HAS_OLD: tl.constexpr, HAS_REF: tl.constexpr, HAS_VALID: tl.constexpr,
        HAS_WEIGHT: tl.constexpr, HAS_IGNORE: tl.constexpr, PI_OLD: tl.constexpr,
        DUAL: tl.constexpr, KL_GRAD: tl.constexpr, UNBIASED: tl.constexpr,
        SCALE_NONE: tl.constexpr, DENSE_REWARD: tl.constexpr, CHECK_LABELS: tl.constexpr,
        DIAG: tl.constexpr, LR_CLAMP: tl.constexpr, EPS: tl.constexpr, TINY: tl.constexpr,
        NCOL: tl.constexpr, NSUM: tl.constexpr, BLOCK_C: tl.constexpr,
        BLOCK_Q: tl.constexpr):
    """Program ``pid`` takes the tiles ``pid, pid + programs, ...`` of the ``n_tiles``: each the
    classes x ``BLOCK_Q`` queries (pixels ``s`` of image ``b``). Writes each tile's gradient
    times the number of counted queries (the backward divides by it) and row ``pid`` of
    ``part_ptr`` (float64): the sums over its tiles' counted queries of the STAT_ROWS, of its
    counted queries with a non-finite input, of its counted labels outside [0, C) and its
    counted queries. Tensors are (B, C, S) / (B, S) through their strides; absent ones are not
    read."""
    pid = tl.program_id(0).to(tl.int64)
    col = tl.arange(0, NSUM)
    acc = tl.zeros((NSUM, ), tl.float64)
    cls = tl.arange(0, BLOCK_C)
    cm = cls < C
    cm2 = cm[:, None]
    c64 = cls.to(tl.int64)[:, None]
    ninf = float('-inf')
    pinf = float('inf')
    for tile in range(pid, n_tiles, tl.num_programs(0)):
        b = tile // n_sblk
        s = (tile % n_sblk) * BLOCK_Q + tl.arange(0, BLOCK_Q).to(tl.int64)
        qm = s < S
        m2 = cm2 & qm[None, :]
        s2 = s[None, :]

        # the queries: counted (valid, not ignored, a class in [0, C)) and their weights u
        y = tl.load(y_ptr + b * y_sb + s * y_ss, mask=qm, other=0).to(tl.int64)
        counted = qm
        if HAS_VALID:
            counted = counted & (tl.load(valid_ptr + b * v_sb + s * v_ss, mask=qm, other=0) != 0)
        if HAS_IGNORE:
            counted = counted & (y != ignore_index)
        bad_label = counted & ((y < 0) | (y >= C))
        if CHECK_LABELS:
            counted = counted & ~bad_label
        else:
            bad_label = qm & (y != y)                       # validated labels: no check
        if HAS_WEIGHT:
            u = tl.load(w_ptr + b * w_sb + s * w_ss, mask=qm, other=0.0).to(tl.float32)
        else:
            u = tl.full((BLOCK_Q, ), 1.0, tl.float32)
        u = tl.where(counted, u, 0.0)
        kappa = -u[None, :]                    # n_valid d loss / d (the query's objective)

        # log-softmax of the logits (and of pi_old's, pi_ref's); chk: x * 0 is NaN for a NaN or
        # infinite x
        x = tl.load(z_ptr + b * z_sb + c64 * z_sc + s2 * z_ss, mask=m2, other=0.0).to(tl.float32)
        chk = tl.sum(tl.where(cm2, x * 0.0, 0.0), axis=0) + u * 0.0
        d = x - tl.max(tl.where(cm2, x, ninf), axis=0)[None, :]
        e = tl.where(cm2, tl.exp(d), 0.0)
        total = tl.sum(e, axis=0)[None, :]
        logp = d - tl.log(total)
        p = e / total
        if HAS_OLD:
            xo = tl.load(old_ptr + b * o_sb + c64 * o_sc + s2 * o_ss, mask=m2,
                         other=0.0).to(tl.float32)
            chk += tl.sum(tl.where(cm2, xo * 0.0, 0.0), axis=0)
            do = xo - tl.max(tl.where(cm2, xo, ninf), axis=0)[None, :]
            eo = tl.where(cm2, tl.exp(do), 0.0)
            total_o = tl.sum(eo, axis=0)[None, :]
            logp_o = do - tl.log(total_o)
            p_o = eo / total_o
        else:                                               # pi_old = the current policy
            logp_o = logp
            p_o = p

        # rewards from pi_old: r_acc at the label; elsewhere r_uni (base - p_i / mass) - r_conf p_i
        # (mass: pi_old's wrong-class mass, divided by rather than multiplied by its reciprocal,
        # so that p_i / mass is 1 exactly where it should be, as at C = 2)
        is_y = c64 == y[None, :]
        r = tl.where(is_y, r_acc, 0.0)
        if DENSE_REWARD:
            mass = tl.sum(tl.where(is_y, 0.0, p_o), axis=0)[None, :]
            base = tl.where(mass > 0, 1.0 / (C - 1).to(tl.float32), 0.0)
            dense = r_uni * (base - p_o / tl.maximum(mass, TINY)) - r_conf * p_o
            r = tl.where(is_y, r, dense)
        r = tl.where(cm2, r, 0.0)
        r_max = tl.max(tl.where(cm2, r, ninf), axis=0)[None, :]
        r_min = tl.min(tl.where(cm2, r, pinf), axis=0)[None, :]

        # advantages under the group weights (flat groups exactly 0); 'pi_old': the flat test is
        # over the outputs with weight only (an underflowed pi_old probability has none)
        if PI_OLD:
            w_total = tl.sum(p_o, axis=0)[None, :]
            empty = w_total <= 0
            w_total = tl.where(empty, 1.0, w_total)
            expected = tl.sum(p_o * r, axis=0)               # sum_i p_old_i r_i
            mean = expected[None, :] / w_total
            high = tl.max(tl.where(p_o > 0, r, ninf), axis=0)[None, :]
            low = tl.min(tl.where(p_o > 0, r, pinf), axis=0)[None, :]
            flat = (high <= low) | empty
        else:
            mean = tl.sum(r, axis=0)[None, :] * (1.0 / C.to(tl.float32))
            flat = r_max <= r_min
        centred = r - mean
        if SCALE_NONE:
            adv = tl.where(flat, 0.0, centred)
        else:
            # as the reference: the squares are taken of centred / max|centred| (in [-1, 1])
            mag = tl.maximum(r_max - mean, mean - r_min)
            mag = tl.where(mag > 0, mag, 1.0)
            unit = tl.where(cm2, centred / mag, 0.0)
            if PI_OLD:
                var = tl.sum(p_o * unit * unit, axis=0)[None, :] / w_total
                if UNBIASED:                                 # Kish's effective sample size
                    ess = 1.0 / tl.sum(p_o * p_o, axis=0)[None, :]
                    var = var * ess / tl.maximum(ess - 1.0, EPS)
            else:
                var = tl.sum(unit * unit, axis=0)[None, :] * (1.0 / C.to(tl.float32))
                if UNBIASED:
                    var = var * (C.to(tl.float32) / (C - 1).to(tl.float32))
            scale = tl.where(flat, 0.0, 1.0 / (tl.sqrt(var) + adv_eps / mag))
            adv = unit * scale
        adv = tl.where(cm2, adv, 0.0)

        # the surrogate s_i and g_i = kappa w_i d s_i / d log p_i (the torch backend's closed form)
        if PI_OLD:
            wt = p_o
        else:
            wt = 1.0 / C.to(tl.float32)
        if HAS_OLD:
            log_ratio = logp - logp_o
            clamped = tl.minimum(tl.maximum(log_ratio, -LR_CLAMP), LR_CLAMP)
            ratio = tl.exp(clamped)
            unclipped = ratio * adv
            clipped = tl.minimum(tl.maximum(ratio, 1.0 - eps_low), 1.0 + eps_high) * adv
            surr = tl.minimum(unclipped, clipped)
            active = unclipped <= clipped
            if DUAL:
                floor = dual_c * adv
                negative = adv < 0
                active = active & ~(negative & (surr < floor))
                surr = tl.where(negative, tl.maximum(surr, floor), surr)
            # the log ratio passes the gradient only inside its clamp
            g = tl.where(active & (clamped == log_ratio) & cm2, kappa * wt * unclipped, 0.0)
        else:                                   # ratio 1: nothing is clipped, s = A
            surr = adv
            g = tl.where(cm2, kappa * wt * adv, 0.0)
        per_query = tl.sum(tl.where(cm2, wt * surr, 0.0), axis=0)

        kl = tl.zeros((BLOCK_Q, ), tl.float32)
        if HAS_REF:
            xr = tl.load(ref_ptr + b * r_sb + c64 * r_sc + s2 * r_ss, mask=m2,
                         other=0.0).to(tl.float32)
            chk += tl.sum(tl.where(cm2, xr * 0.0, 0.0), axis=0)
            dr = xr - tl.max(tl.where(cm2, xr, ninf), axis=0)[None, :]
            logp_r = dr - tl.log(tl.sum(tl.where(cm2, tl.exp(dr), 0.0), axis=0))[None, :]
            p_diff = tl.where(cm2, p * (logp - logp_r), 0.0)
            kl = tl.sum(p_diff, axis=0)
            if KL_GRAD:
                # d/d log p_i of sum_j p_j (log p_j - log ref_j) = p_i (log p_i - log ref_i) + p_i
                g = g - (beta * kappa) * (p_diff + p)

        # through the log-softmax: dz_k = g_k - p_k sum_i g_i; 0 for the uncounted queries
        dz = g - p * tl.sum(g, axis=0)[None, :]
        dz = tl.where(counted[None, :], dz, 0.0)
        tl.store(grad_ptr + b * g_sb + c64 * g_sc + s2 * g_ss,
                 dz.to(grad_ptr.dtype.element_ty), mask=m2)

        # this tile's sums over its counted queries (column j: the module doc's row layout),
        # added to the program's in float64
        loss_q = -per_query
        if KL_GRAD:
            loss_q = loss_q + beta * kl
        sums = tl.where(col == 0, tl.sum(tl.where(counted, loss_q * u, 0.0), axis=0), 0.0)
        sums += tl.where(col == 4, tl.sum(tl.where(counted, kl, 0.0), axis=0), 0.0)
        sums += tl.where(col == 8, tl.sum((qm & (chk != 0.0)).to(tl.float32), axis=0), 0.0)
        sums += tl.where(col == 9, tl.sum(bad_label.to(tl.float32), axis=0), 0.0)
        sums += tl.where(col == 10, tl.sum(counted.to(tl.float32), axis=0), 0.0)
        if DIAG:
            if PI_OLD:
                reward_q = expected
            else:
                reward_q = tl.sum(p_o * r, axis=0)
            adv_abs = tl.sum(tl.abs(adv), axis=0)
            entropy = -tl.sum(tl.where(cm2, p * logp, 0.0), axis=0)
            # the first maximum of log p (argmax's choice)
            lp = tl.where(cm2, logp, ninf)
            top = tl.max(lp, axis=0)[None, :]
            first = tl.min(tl.where(lp == top, cls[:, None], BLOCK_C), axis=0)
            correct = (first.to(tl.int64) == y).to(tl.float32)
            sums += tl.where(col == 1, tl.sum(tl.where(counted, reward_q, 0.0), axis=0), 0.0)
            sums += tl.where(col == 2, tl.sum(tl.where(counted, adv_abs, 0.0), axis=0), 0.0)
            sums += tl.where(col == 6, tl.sum(tl.where(counted, entropy, 0.0), axis=0), 0.0)
            sums += tl.where(col == 7, tl.sum(tl.where(counted, correct, 0.0), axis=0), 0.0)
            if HAS_OLD:
                n_clipped = tl.sum((cm2 & ~active).to(tl.float32), axis=0)
                kl_old = tl.sum(tl.where(cm2, p * (logp - logp_o), 0.0), axis=0)
                sums += tl.where(col == 3, tl.sum(tl.where(counted, n_clipped, 0.0), axis=0),
                                 0.0)
                sums += tl.where(col == 5, tl.sum(tl.where(counted, kl_old, 0.0), axis=0), 0.0)
        acc += sums.to(tl.float64)
    tl.store(part_ptr + pid * NCOL + col, acc, mask=col < NCOL)


def _finish_kernel_fn(part_ptr, loss_ptr, diag_ptr, host_ptr, rows, sc1, sc2, sc3, sc4, sc5,
                      sc6, sc7, NCOL: tl.constexpr, BLOCK_R: tl.constexpr,
                      BLOCK_K: tl.constexpr):
    """One program: the (rows, NCOL) float64 partial sums of the main kernel reduced in a fixed
    order (blocks of ``BLOCK_R`` rows: deterministic). Writes the loss (column 0's mean) to
    ``loss_ptr``, the 7 diagnostics (columns 1..7's means times
    ``sc1..sc7``) to ``diag_ptr`` and, for the host, ``host_ptr[0]`` the counted queries and
    ``host_ptr[1]`` 1.0 if a check failed (a counted query's non-finite input or label outside
    [0, C), or a non-finite sum), else 0.0."""
    r = tl.arange(0, BLOCK_R).to(tl.int64)
    k = tl.arange(0, BLOCK_K)
    km = k < NCOL
    acc = tl.zeros((BLOCK_K, ), tl.float64)
    for start in range(0, rows, BLOCK_R):
        rr = start + r
        tile = tl.load(part_ptr + rr[:, None] * NCOL + k[None, :],
                       mask=(rr < rows)[:, None] & km[None, :], other=0.0)
        acc += tl.sum(tile, axis=0)
    n = tl.sum(tl.where(k == NCOL - 1, acc, 0.0), axis=0)
    inv = 1.0 / tl.maximum(n, 1.0)
    means = acc * inv
    scale = tl.where(k == 1, sc1, tl.where(k == 2, sc2, tl.where(k == 3, sc3, tl.where(
        k == 4, sc4, tl.where(k == 5, sc5, tl.where(k == 6, sc6, sc7))))))
    tl.store(loss_ptr, tl.sum(tl.where(k == 0, means, 0.0), axis=0).to(tl.float32))
    tl.store(diag_ptr + (k - 1), (means * scale).to(tl.float32), mask=(k >= 1) & (k < NCOL - 3))
    stats = k < NCOL - 3
    finite = (acc == acc) & (tl.abs(acc) < float('inf'))
    non_finite = tl.sum((stats & ~finite).to(tl.int32), axis=0)
    failed = tl.sum(tl.where((k >= NCOL - 3) & (k < NCOL - 1), acc, 0.0), axis=0)
    tl.store(host_ptr, n)
    tl.store(host_ptr + 1, ((non_finite > 0) | (failed > 0)).to(tl.float64))


def _scale_kernel_fn(g_ptr, grad_loss_ptr, factor, numel, BLOCK: tl.constexpr):
    """``g *= grad_loss[0] * factor`` over ``numel`` elements of a dense buffer, in float32
    (an AMP loss scale of 2^16 is formed in float32 before the product is rounded to a
    half-precision gradient)."""
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK).to(tl.int64)
    mask = offs < numel
    scale = tl.load(grad_loss_ptr).to(tl.float32) * factor
    g = tl.load(g_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    tl.store(g_ptr + offs, (g * scale).to(g_ptr.dtype.element_ty), mask=mask)


#: (main, finish, scale kernel) by interpreter mode: Triton decides at decoration time whether
#: a kernel is interpreted, so the kernels are decorated on first use, in the current mode
_KERNELS: dict[bool, tuple[Callable, Callable, Callable]] = {}


def _kernels() -> tuple[Callable, Callable, Callable]:
    mode = _interpret()
    if mode not in _KERNELS:
        _KERNELS[mode] = (triton.jit(_objective_kernel_fn), triton.jit(_finish_kernel_fn),
                          triton.jit(_scale_kernel_fn))
    return _KERNELS[mode]


# ----------------------------------------------------------------------------- launcher
def _merge_queries(b: int, s: int, outputs: list[Tensor | None],
                   per_query: list[Tensor | None]) -> tuple[int, int, list, list]:
    """``(B', S', output strides, per-query strides)``: each (B, C, S) tensor's (b, c, s)
    strides and each (B, S) tensor's (b, s) strides, with the queries merged into one axis
    (B' = 1, S' = B S) where every tensor allows it (its image stride is S times its pixel
    stride, or S == 1). Absent tensors get zero strides."""
    out = [(0, 0, 0) if x is None else tuple(x.stride()) for x in outputs]
    per = [(0, 0) if x is None else tuple(x.stride()) for x in per_query]
    if b == 1:
        return b, s, out, per
    if s == 1:
        return 1, b, [(0, sc, sb) for sb, sc, _ in out], [(0, sb) for sb, _ in per]
    if all(sb == s * ss for sb, _, ss in out) and all(sb == s * ss for sb, ss in per):
        return 1, b * s, [(0, sc, ss) for _, sc, ss in out], [(0, ss) for _, ss in per]
    return b, s, out, per


def _gradient(problem: Problem) -> tuple[Tensor, Tensor]:
    """An uninitialised gradient in the logits' dtype and layout: ``(its (B, C, S) view,
    itself of the logits' shape)``; channels-last logits get a channels-last gradient."""
    z = problem.z
    b, c, s = z.shape
    if s > 1 and z.transpose(1, 2).is_contiguous():
        rows = torch.empty((b, s, c), dtype=z.dtype, device=z.device)
        return rows.transpose(1, 2), rows.view(b, *problem.shape[2:], c).movedim(-1, 1)
    grad = torch.empty((b, c, s), dtype=z.dtype, device=z.device)
    return grad, grad.view(problem.shape)


def _block_q(c_block: int, queries: int, block_q: int | None) -> int:
    """Queries per tile: ``block_q`` (a power of two) if given, else about
    :data:`TILE_ELEMENTS` / ``c_block``; never more than the queries' next power of two."""
    if block_q is None:
        block_q = max(1, TILE_ELEMENTS // c_block)
    return max(1, min(triton.next_power_of_2(block_q), triton.next_power_of_2(queries)))


class Launched(NamedTuple):
    """What :func:`launch` leaves on the device: ``grad`` (the logits' shape and dtype, d loss /
    d logits times ``n_valid``), ``loss`` (0-dim float32), ``diagnostics`` ((7,) float32, the
    order of :data:`..objective.DIAGNOSTIC_KEYS`) and ``host`` ((2,) float64: the counted
    queries, and 1.0 where a data check failed)."""

    grad: Tensor
    loss: Tensor
    diagnostics: Tensor
    host: Tensor


def launch(problem: Problem, rewards: tuple[float, float, float], *,
           block_q: int | None = None, max_programs: int = MAX_PROGRAMS) -> Launched:
    """Run the main and the finishing kernel on ``problem`` (two launches, no host read).
    ``rewards``: the coefficients of accuracy, uniformity, confidence penalty; ``block_q``:
    queries per tile (default: sized by C); ``max_programs``: the main kernel's programs at
    most (each takes every ``programs``-th tile)."""
    objective_kernel, finish_kernel, _ = _kernels()
    z = problem.z
    b, c, s = z.shape
    device = z.device
    grad3, grad = _gradient(problem)
    valid = None if problem.valid is None else problem.valid.view(torch.uint8)
    bq, sq, (zs, os_, rs, gs), (ys, vs, ws) = _merge_queries(
        b, s, [z, problem.old, problem.ref, grad3], [problem.y, valid, problem.weight])
    has_ignore = problem.ignore_index is not None
    check = not problem.validated

    block_c = triton.next_power_of_2(c)
    block = _block_q(block_c, sq, block_q)
    n_sblk = triton.cdiv(sq, block)
    n_tiles = bq * n_sblk
    programs = min(n_tiles, max_programs)
    part = torch.empty((programs, NUM_COLUMNS), dtype=torch.float64, device=device)
    r_acc, r_uni, r_conf = rewards
    if programs:
        # an absent input's pointer is never read: a one-element stand-in
        absent = z.new_empty(1)
        objective_kernel[(programs, )](
            z, absent if problem.old is None else problem.old,
            absent if problem.ref is None else problem.ref, problem.y,
            absent if valid is None else valid,
            absent if problem.weight is None else problem.weight, grad3, part,
            c, sq, n_sblk, n_tiles, *zs, *os_, *rs, *gs, *ys, *vs, *ws,
            int(problem.ignore_index) if has_ignore else 0, float(problem.eps_low),
            float(problem.eps_high), float(problem.dual_clip_c), float(problem.beta),
            float(problem.adv_eps), float(r_acc), float(r_uni), float(r_conf),
            HAS_OLD=problem.old is not None, HAS_REF=problem.ref is not None,
            HAS_VALID=valid is not None, HAS_WEIGHT=problem.weight is not None,
            HAS_IGNORE=has_ignore, PI_OLD=problem.weighting == 'pi_old',
            DUAL=problem.surrogate == 'dual_clip',
            KL_GRAD=problem.ref is not None and problem.beta > 0,
            UNBIASED=problem.adv_std == 'unbiased', SCALE_NONE=problem.adv_scale == 'none',
            DENSE_REWARD=r_uni != 0 or r_conf != 0, CHECK_LABELS=check,
            DIAG=bool(problem.diagnostics), LR_CLAMP=float(LOG_RATIO_CLAMP), EPS=_FLOAT32_EPS,
            TINY=_FLOAT32_TINY, NCOL=NUM_COLUMNS, NSUM=_FINISH_COLUMNS, BLOCK_C=block_c,
            BLOCK_Q=block, num_warps=_num_warps(block_c * block))

    loss = torch.empty((), dtype=torch.float32, device=device)
    diagnostics = torch.empty(NUM_STATS - 1, dtype=torch.float32, device=device)
    host = torch.empty(2, dtype=torch.float64, device=device)
    finish_kernel[(1, )](part, loss, diagnostics, host, programs,
                         *diagnostic_scales(c), NCOL=NUM_COLUMNS,
                         BLOCK_R=_finish_rows(programs), BLOCK_K=_FINISH_COLUMNS,
                         num_warps=8)
    return Launched(grad, loss, diagnostics, host)


def _num_warps(tile: int) -> int:
    """Warps of a main-kernel program: about :data:`ELEMENTS_PER_THREAD` of its ``tile``
    elements per thread (module doc: registers), 1 to 16 warps."""
    return max(1, min(16, tile // (32 * ELEMENTS_PER_THREAD)))


def _finish_rows(rows: int) -> int:
    """Rows per step of the finishing kernel: :data:`FINISH_ROWS`; under the interpreter
    (per-step cost) a few steps over any number of rows, at least two when there are two."""
    if not _interpret():
        return FINISH_ROWS
    return max(1, triton.next_power_of_2(triton.cdiv(max(rows, 1), 2)))


def scale_gradient(grad: Tensor, grad_loss: Tensor, factor: float) -> Tensor:
    """``grad *= grad_loss * factor`` in place, one launch (``grad`` dense: as :func:`launch`
    allocates it, any layout)."""
    _, _, scale_kernel = _kernels()
    numel = grad.numel()
    if numel:
        block = SCALE_BLOCK if not _interpret() else max(
            SCALE_BLOCK, triton.next_power_of_2(triton.cdiv(numel, 4)))
        scale_kernel[(triton.cdiv(numel, block), )](grad, grad_loss, float(factor), numel,
                                                    BLOCK=block)
    return grad


# ----------------------------------------------------------------------------- self-check
#: device ('cuda:N') -> None (the self-check passed) or the reason it failed
_SELF_CHECKS: dict[str, str | None] = {}


def _check_problem(logits: Tensor, labels: Tensor, old: Tensor, rewards: object) -> Problem:
    """The self-check's :class:`Problem`: 'pi_old' weighting, clip 0.2, std advantages."""
    b, c = logits.shape[0], logits.shape[1]
    return Problem(
        z=logits.detach().reshape(b, c, -1), y=labels.reshape(b, -1),
        old=old.reshape(b, c, -1), ref=None, rewards=rewards, reward_tensor=None, valid=None,
        weight=None, shape=logits.shape, ignore_index=None, cdt=torch.float32, beta=0.0,
        eps_low=0.2, eps_high=0.2, dual_clip_c=3.0, weighting='pi_old', surrogate='clip',
        adv_std='population', adv_eps=1e-6, adv_scale='std', group_size=8, generator=None,
        validated=False, diagnostics=True, logits=logits)


def _self_check(device: torch.device) -> str | None:
    """Compare the backend with :func:`..objective.grpo_rm_loss` (autograd) on small random
    problems ((64, 21) and (2, 21, 8, 8) logits, pi_old logits, 'pi_old' weighting, clip,
    accuracy + uniformity rewards) on ``device``: None if loss and gradient agree to float32
    tolerance, else the mismatch (or the error raised)."""
    from ..objective import grpo_rm_loss
    from ..rewards import accuracy_reward, uniformity_reward

    rewards = [accuracy_reward, uniformity_reward]
    gen = torch.Generator().manual_seed(0)
    try:
        for shape in ((64, 21), (2, 21, 8, 8)):
            c = shape[1]
            logits = torch.randn(shape, generator=gen).to(device)
            old = (logits.cpu() + 0.3 * torch.randn(shape, generator=gen)).to(device)
            label_shape = (shape[0], ) + shape[2:]
            labels = torch.randint(0, c, label_shape, generator=gen).to(device)
            out = launch(_check_problem(logits, labels, old, rewards),
                         fused_reward_terms(rewards))
            flat = logits.movedim(1, -1).reshape(-1, c).requires_grad_(True)
            loss, _ = grpo_rm_loss(flat, labels.reshape(-1), rewards,
                                   old_logits=old.movedim(1, -1).reshape(-1, c),
                                   group_weighting='pi_old')
            ref_grad, = torch.autograd.grad(loss, flat)
            ref_grad = ref_grad.reshape(shape[0], *shape[2:], c).movedim(-1, 1)
            n, failed = out.host.tolist()
            got, want = float(out.loss), float(loss.detach())
            if n != labels.numel() or failed or not math.isclose(got, want, rel_tol=1e-4,
                                                                 abs_tol=1e-6):
                return (f'loss {got!r} != {want!r} (n_valid {n}, check flag {failed}) for '
                        f'logits of shape {shape}')
            one = torch.ones((), device=device)
            grad = scale_gradient(out.grad, one, 1.0 / n)
            err = float((grad.float() - ref_grad).abs().max())
            tol = 1e-6 + 1e-4 * float(ref_grad.abs().max())
            if not err <= tol:
                return f'gradient off by {err:.3g} (tolerance {tol:.3g}) for logits of {shape}'
    except Exception as exc:  # any failure of the kernels on this device disables them
        return f'{type(exc).__name__}: {exc}'
    return None


def _device_check(device: torch.device) -> str | None:
    """The cached self-check of ``device`` (run on its first call; a failure warns once)."""
    if device.type == 'cuda' and device.index is None:
        device = torch.device('cuda', torch.cuda.current_device())
    key = str(device)
    if key not in _SELF_CHECKS:
        mismatch = _self_check(device)
        reason = None if mismatch is None else (
            f'the Triton self-check failed on {key}: {mismatch}')
        _SELF_CHECKS[key] = reason
        if reason is not None:
            warnings.warn(f'{reason}; the fused GRPO-RM objective uses its other backends on '
                          f'that device', RuntimeWarning, stacklevel=3)
    return _SELF_CHECKS[key]


# ----------------------------------------------------------------------------- backend
class TritonBackend(Backend):
    """The Triton kernels (module doc): CUDA tensors (CPU ones under ``TRITON_INTERPRET=1``)."""

    name = 'triton'
    auto_devices = ('cuda', )

    def supports(self, problem: Problem) -> str | None:
        if not AVAILABLE:
            return 'triton is not installed'
        inputs = [x for x in (problem.z, problem.y, problem.old, problem.ref, problem.valid,
                              problem.weight) if x is not None]
        device = problem.device
        if device.type != 'cuda' and not (device.type == 'cpu' and _interpret()):
            return (f'it runs CUDA tensors (CPU tensors only under TRITON_INTERPRET=1), got '
                    f'{device.type} tensors')
        if any(x.device != device for x in inputs):
            return 'its inputs must all be on the logits\' device'
        if problem.z.dtype == torch.float64:
            return 'float64 logits run on the torch path'
        if problem.z.dtype not in LOGIT_DTYPES:
            return f'it needs float32, bfloat16 or float16 logits, got {problem.z.dtype}'
        if problem.weighting not in WEIGHTINGS or problem.surrogate not in SURROGATES:
            return (f'it has group_weighting in {WEIGHTINGS} and surrogate in {SURROGATES}, '
                    f'not {problem.weighting!r} / {problem.surrogate!r}')
        if problem.num_classes > MAX_CLASSES:
            return f'it handles C <= {MAX_CLASSES} classes, got C={problem.num_classes}'
        y = problem.y
        if y.is_floating_point() or y.is_complex() or y.dtype == torch.bool:
            return f'it needs integer labels, got {y.dtype}'
        if any(x is not None and not x.is_floating_point()
               for x in (problem.old, problem.ref, problem.weight)):
            return 'it needs floating-point pi_old / pi_ref logits and query weights'
        if problem.reward_tensor is not None:
            return 'a reward tensor runs on the torch path'
        if self._rewards(problem) is None:
            return ('it computes the rewards of grpo_rm_mm.core.rewards (and their registered '
                    'classes) only')
        if device.type == 'cuda':
            return _device_check(device)
        return None

    @staticmethod
    def _rewards(problem: Problem) -> tuple[float, float, float] | None:
        """The rewards' coefficients (accuracy, uniformity, confidence penalty), found once per
        call (kept in ``problem.prepared``)."""
        if 'triton' not in problem.prepared:
            problem.prepared['triton'] = fused_reward_terms(problem.rewards)
        return problem.prepared['triton']

    def solve(self, problem: Problem, *, block_q: int | None = None,
              max_programs: int = MAX_PROGRAMS) -> Solution:
        """The call's solution: the kernels, then one host read (n_valid and the checks).
        ``block_q``, ``max_programs``: as :func:`launch`."""
        terms = self._rewards(problem)
        if terms is None:
            raise ValueError('the triton backend cannot run this call: '
                             f'{self.supports(problem)}')
        out = launch(problem, terms, block_q=block_q, max_programs=max_programs)
        # the call's one host read; a failed check (a counted query's non-finite input or
        # label outside [0, C), a non-finite sum) hands the call to the reference
        n_host, failed = out.host.tolist()
        n_host = int(n_host)
        return Solution(loss=out.loss, grad=out.grad, n_valid=n_host, delegate=bool(failed),
                        diagnostics=diagnostics_from_values(out.diagnostics, n_host,
                                                            problem.diagnostics),
                        grad_scale=1.0 / max(n_host, 1))

    def backward(self, grad: Tensor, grad_loss: Tensor, grad_scale: float) -> Tensor:
        """One scaling kernel, in place (the version advanced, as an in-place operator
        would: a second backward through the graph fails autograd's check)."""
        scale_gradient(grad, grad_loss, grad_scale)
        increment_version(grad)
        return grad


BACKEND = TritonBackend()
