"""The fused objective's backends (:mod:`..dispatch`), registered in the order 'auto' tries
them. A backend whose requirements are missing (triton, the compiled CPU kernel) registers
all the same and answers ``supports`` with the reason."""
from ..dispatch import register_backend
from . import cpu_native, reference, torch_chunked, triton_cuda

register_backend(triton_cuda.BACKEND, priority=30)
register_backend(cpu_native.BACKEND, priority=20)
register_backend(torch_chunked.BACKEND, priority=10)
register_backend(reference.BACKEND, priority=0)

__all__ = ['cpu_native', 'reference', 'torch_chunked', 'triton_cuda']
