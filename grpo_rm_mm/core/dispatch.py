"""The fused objective's backends: one registry, one selection. Plain torch.

A backend computes one call of the objective (a :class:`.problem.Problem`) and answers a
:class:`.problem.Solution`. The registered ones, in the order ``backend='auto'`` tries them:

============== ========================================================================
name           runs
============== ========================================================================
triton         CUDA tensors (:mod:`.backends.triton_cuda`; CPU tensors only under
               ``TRITON_INTERPRET=1``): three launches per call, one pass over the inputs
cpu_native     CPU float32 / float64 tensors (:mod:`.backends.cpu_native`, the compiled
               kernel built with the package)
torch_chunked  any device and dtype (:mod:`.backends.torch_chunked`): chunks of torch ops
reference      everything (:mod:`.backends.reference`: :func:`.objective.grpo_rm_loss`,
               autograd); 'auto' reaches it only for a weighting or surrogate that has no
               closed form
============== ========================================================================

Subclass contract (:class:`Backend`):

* ``name``: the registry key, what a config's ``backend=`` names.
* ``supports(problem) -> str | None``: None when the backend can run the call, else the reason
  it cannot (a sentence; it ends up in the error of an explicit ``backend=`` that cannot run).
  It must be cheap and must not read device memory back to the host (it may run a one-time
  self-check per device).
* ``solve(problem) -> Solution``: the loss, its closed-form gradient with respect to the
  logits (``closed_form = True``: the shared autograd Function of :mod:`.fused` saves it), the
  number of counted queries, whether a data check failed (``delegate``: the caller then calls
  the reference, which raises the error) and the diagnostics. The options are validated
  before; a backend checks nothing but the data.
* ``backward(grad, grad_loss, grad_scale) -> Tensor``: the gradient with respect to the
  logits of ``grad_loss * loss``, from the saved ``grad`` and the solution's ``grad_scale``
  (the default scales ``grad`` in place with torch operators; a backend may override it with
  its own kernel). It runs once per graph: ``grad`` is not needed afterwards.
* ``auto_devices``: the device types on which 'auto' may choose the backend (None: any);
  the Triton backend runs CPU tensors under its interpreter for tests, but 'auto' takes it on
  CUDA only.
* ``closed_form = False`` (the reference only): ``solve`` returns a loss differentiable by
  autograd and ``grad`` None.

Adding a backend is one module that defines a :class:`Backend` subclass and calls
:func:`register_backend` on an instance, plus its import in :mod:`.backends`.
"""
from __future__ import annotations

from torch import Tensor
from torch.autograd.graph import increment_version

from .problem import Problem, Solution

__all__ = ['BACKENDS', 'Backend', 'backend_names', 'register_backend', 'select']


class Backend:
    """One way to compute the objective (module doc: the subclass contract)."""

    name: str = ''
    closed_form: bool = True
    auto_devices: tuple[str, ...] | None = None

    def supports(self, problem: Problem) -> str | None:
        raise NotImplementedError

    def solve(self, problem: Problem) -> Solution:
        raise NotImplementedError

    def backward(self, grad: Tensor, grad_loss: Tensor, grad_scale: float) -> Tensor:
        """``grad * grad_scale * grad_loss``, in ``grad`` (in place: a second backward through
        the same graph fails autograd's version check on it instead of reusing a scaled
        tensor). A CPU gradient of a loss backpropagated as is (``grad_loss`` 1, read without
        a device sync) is returned unscaled, its version advanced all the same."""
        if grad_scale == 1.0 and grad.device.type == 'cpu' and (
                grad_loss.device.type == 'cpu' and float(grad_loss) == 1.0):
            increment_version(grad)
            return grad
        # not cast to a half-precision gradient's dtype: an AMP loss scale of 2^16 is inf in
        # float16; the product is formed in float32 all the same
        factor = grad_loss if grad_scale == 1.0 else grad_loss * grad_scale
        return grad.mul_(factor)

    def __repr__(self) -> str:
        return f'{type(self).__name__}(name={self.name!r})'


#: name -> backend, in the order 'auto' tries them (highest priority first)
BACKENDS: dict[str, Backend] = {}
_PRIORITY: dict[str, int] = {}


def register_backend(backend: Backend, priority: int) -> Backend:
    """Register ``backend`` under ``backend.name``; 'auto' tries higher ``priority`` first."""
    if not backend.name or backend.name == 'auto':
        raise ValueError(f'a backend needs a name other than "auto", got {backend.name!r}')
    if backend.name in BACKENDS:
        raise ValueError(f'a backend named {backend.name!r} is registered already')
    _PRIORITY[backend.name] = priority
    ordered = sorted([*BACKENDS.values(), backend], key=lambda b: -_PRIORITY[b.name])
    BACKENDS.clear()
    BACKENDS.update((b.name, b) for b in ordered)
    return backend


def backend_names() -> tuple[str, ...]:
    """The names ``backend=`` accepts: 'auto' and the registered backends."""
    return ('auto', *BACKENDS)


def select(problem: Problem, backend: str = 'auto') -> Backend:
    """The backend that runs ``problem``: the named one (ValueError with its reason when it
    cannot), or with 'auto' the first registered one that supports it."""
    if backend != 'auto':
        chosen = BACKENDS.get(backend)
        if chosen is None:
            raise ValueError(f'backend={backend!r} is unknown; use one of {backend_names()}')
        reason = chosen.supports(problem)
        if reason is not None:
            raise ValueError(f'backend={backend!r} cannot run this call: {reason}; use '
                             f"backend='auto'")
        return chosen
    for candidate in BACKENDS.values():
        devices = candidate.auto_devices
        if devices is not None and problem.device.type not in devices:
            continue
        if candidate.supports(problem) is None:
            return candidate
    raise ValueError('no registered backend runs this call')  # the reference runs every call
