"""One call of the fused GRPO-RM objective, as every backend sees it. Plain torch.

:class:`Problem` holds a call's inputs as (B, C, S) / (B, S) views of the caller's tensors
(detached; dense (B, C, *S) logits are read in place through them, queries in (b, s) order) and
its validated options. A backend (:mod:`.dispatch`) turns it into a :class:`Solution`: the
loss, its gradient with respect to the logits in closed form, the number of counted queries,
whether a data check failed, and the diagnostics.

Every backend accumulates the same eight sums over the counted queries (:data:`STAT_ROWS`),
from which :func:`diagnostics_from_sums` forms the reference's diagnostics:

==========  ==================================================================  ==========
row         per counted query q                                                 scale
==========  ==================================================================  ==========
loss        ``u_q (-sum_i w_i s_i + beta KL_q)`` (``beta KL_q`` when beta > 0)  --
reward      ``sum_i p_old_i r_i``                                               1
adv_abs     ``sum_i |A_i|``                                                     1 / C
clipped     outputs whose gradient a clip (or the dual clip's floor) removes    1 / C
kl          ``sum_i p_i (log p_i - log ref_i)`` (0 without pi_ref)              1
kl_old      ``sum_i p_i (log p_i - log p_old_i)`` (0 at ratio 1)                1
entropy     ``-sum_i p_i log p_i``                                              1
correct     ``[first argmax_i p_i == y_q]``                                     100
==========  ==================================================================  ==========

Each sum divided by the number of counted queries, times the scale, is the diagnostic of
:data:`.objective.DIAGNOSTIC_KEYS` in the same order (the loss row gives the loss).
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
from torch import Tensor

from .objective import DIAGNOSTIC_KEYS, RewardSpec

__all__ = ['NUM_STATS', 'STAT_ROWS', 'DelegateToReference', 'Problem', 'Solution',
           'diagnostic_scales', 'diagnostics_from_sums', 'diagnostics_from_values']

#: the rows of the sums every backend accumulates (module doc)
STAT_ROWS = ('loss', 'reward', 'adv_abs', 'clipped', 'kl', 'kl_old', 'entropy', 'correct')
NUM_STATS = len(STAT_ROWS)


class DelegateToReference(Exception):
    """Raised by a backend when a data check fails before it has a solution: the caller
    calls the reference, which raises the error (or, accepting the inputs, answers)."""


@dataclass
class Problem:
    """One call's inputs as (B, C, S) / (B, S) views (detached), and its options.

    ``shape`` is the logits' own shape ((N, C) or (B, C, *S)); the gradient of a
    :class:`Solution` has it. ``rewards`` is the caller's reward spec (callables or a tensor);
    ``reward_tensor`` its (B, C, S) view when it is a tensor.
    """

    z: Tensor                      # (B, C, S) logits
    y: Tensor                      # (B, S) labels
    old: Tensor | None             # (B, C, S) pi_old logits (None: ratio 1)
    ref: Tensor | None             # (B, C, S) pi_ref logits
    rewards: RewardSpec
    reward_tensor: Tensor | None   # (B, C, S) precomputed rewards
    valid: Tensor | None           # (B, S) bool
    weight: Tensor | None          # (B, S) query weights u_q
    shape: torch.Size
    ignore_index: int | None
    cdt: torch.dtype               # compute dtype: float64 for float64 logits, else float32
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
    generator: torch.Generator | None
    validated: bool                # labels checked by an earlier call: skip their check
    diagnostics: bool = True       # compute the diagnostics (else only the loss)
    chunk: int | None = None       # queries per chunk (torch path; None: its default)
    #: the caller's logits themselves (differentiable; the reference backend reads them)
    logits: Tensor | None = None
    #: what a backend prepared for this call while answering ``supports`` (by backend name),
    #: so that ``solve`` does not prepare it again
    prepared: dict = field(default_factory=dict)

    @property
    def num_classes(self) -> int:
        return self.z.shape[1]

    @property
    def device(self) -> torch.device:
        return self.z.device


@dataclass
class Solution:
    """A backend's answer: ``loss`` (0-dim, compute dtype), ``grad`` (the logits' shape and
    dtype: d loss / d logits is ``grad * grad_scale``), ``n_valid`` (counted queries),
    ``delegate`` (a data check failed: the reference must be called to raise its error) and
    ``diagnostics``.

    ``grad_scale`` lets a backend write the gradient before it knows the number of counted
    queries (``1 / n_valid``, applied by its :meth:`.dispatch.Backend.backward` together with
    the incoming gradient, in float32: no float16 gradient divided by a million underflows)."""

    loss: Tensor
    grad: Tensor
    n_valid: int
    delegate: bool
    diagnostics: dict[str, Tensor] = field(default_factory=dict)
    grad_scale: float = 1.0


def diagnostic_scales(num_classes: int) -> tuple[float, ...]:
    """Factors from the means of the sums' rows 1..7 to the diagnostics (module doc)."""
    return (1.0, 1.0 / num_classes, 1.0 / num_classes, 1.0, 1.0, 1.0, 100.0)


def diagnostics_from_sums(means: Tensor | Sequence[float], n_valid: int, num_classes: int,
                          wanted: bool, dtype: torch.dtype) -> dict[str, Tensor]:
    """The diagnostics of a call from the *means* (sums over counted queries divided by their
    number) of the :data:`STAT_ROWS` (a tensor of 8 or 8 host floats); with ``wanted`` False
    only ``grpo_queries``. Tensors of ``means`` stay on their device (no host read)."""
    values: Sequence[Tensor] = ()
    if wanted:
        scales = diagnostic_scales(num_classes)
        if torch.is_tensor(means):
            # Python scale factors: a tensor of them would be a host-to-device copy
            values = [means[i + 1] * f for i, f in enumerate(scales)]
        else:
            values = torch.tensor([means[i + 1] * f for i, f in enumerate(scales)],
                                  dtype=dtype).unbind()
    return diagnostics_from_values(values, n_valid, wanted)


def diagnostics_from_values(values: Tensor | Sequence[Tensor], n_valid: int,
                            wanted: bool) -> dict[str, Tensor]:
    """The diagnostics dict from the 7 values of :data:`.objective.DIAGNOSTIC_KEYS` (scaled
    already; a (7,) tensor gives views of it, no operator) and the number of counted queries;
    with ``wanted`` False only ``grpo_queries``."""
    out: dict[str, Tensor] = dict(zip(DIAGNOSTIC_KEYS, values)) if wanted else {}
    out['grpo_queries'] = torch.tensor(float(n_valid))
    return out
