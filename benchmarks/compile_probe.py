"""Probe: the GRPO-RM objective written as one pure function and compiled with
``torch.compile`` (inductor), against ``F.cross_entropy``, forward + gradient.

Covers one case only, the default first update: ``pi_old`` weighting at ratio 1 with the
accuracy + uniformity rewards (no KL, no query weights), so it is a feasibility probe for a
compiled kernel, not a replacement of :func:`grpo_rm_mm.core.fused.grpo_rm_loss_fused`. It
prints the compile time and the median times of the compiled function, the same function
eager, and cross-entropy (forward + backward), with their ratio.

    .venv/bin/python benchmarks/compile_probe.py [--reps 30]
"""
from __future__ import annotations

import argparse
import math
import time

import common as c
import torch
import torch.nn.functional as F

SHAPES = [(1024, 10), (1024, 1000), (8, 21, 112, 112), (4, 21, 448, 448)]


def objective(z: torch.Tensor, y: torch.Tensor, valid: torch.Tensor, inv_n: torch.Tensor,
              c: int, eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(B, C, S) logits, (B, S) labels (in [0, C)), (B, S) 0/1 validity -> (the gradient
    (B, C, S), five summed statistics). pi_old weights at ratio 1: ``dz = -w A / n`` through
    the log-softmax, A the pi_old-weighted z-scores of acc + uniformity rewards."""
    zf = z.float()
    logp = torch.log_softmax(zf, dim=1)
    p = logp.exp()
    onehot = F.one_hot(y, c).permute(0, 2, 1).to(zf.dtype)
    wrong = p * (1 - onehot)
    mass = wrong.sum(1, keepdim=True)
    r = onehot + ((mass > 0).to(zf.dtype) / (c - 1) - wrong / mass.clamp_min(1e-38)) * (1 - onehot)
    mean = (p * r).sum(1, keepdim=True)
    cen = r - mean
    mag = torch.maximum(r.amax(1, keepdim=True) - mean, mean - r.amin(1, keepdim=True))
    mag = torch.where(mag > 0, mag, torch.ones_like(mag))
    unit = cen / mag
    var = (unit * unit * p).sum(1, keepdim=True)
    flat = r.amax(1, keepdim=True) <= r.amin(1, keepdim=True)
    adv = unit * torch.where(flat, torch.zeros_like(var), 1.0 / (var.sqrt() + eps / mag))
    g = -p * (valid * inv_n).unsqueeze(1) * adv
    grad = g - p * g.sum(1, keepdim=True)
    stats = torch.stack([(-(p * adv).sum(1) * valid).sum(), (mean.squeeze(1) * valid).sum(),
                         (adv.abs().sum(1) * valid).sum(), (-(p * logp).sum(1) * valid).sum(),
                         ((logp.argmax(1) == y).to(zf.dtype) * valid).sum()])
    return grad.to(z.dtype), stats


def median_ms(fn, reps: int) -> float:
    fn()
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return sorted(times)[len(times) // 2] * 1e3


def measure(shape: tuple[int, ...], reps: int, compiled) -> str:
    """One shape: compile time, median times and the compiled / CE ratio, as a line."""
    b, k = shape[0], shape[1]
    gen = torch.Generator().manual_seed(0)
    z = torch.randn(shape, generator=gen) * 2
    y = torch.randint(0, k, (b, ) + shape[2:], generator=gen)
    args = (z.reshape(b, k, -1), y.reshape(b, -1),
            torch.ones(b, y[0].numel(), dtype=torch.float32), torch.tensor(1.0 / y.numel()),
            k, 1e-6)
    t0 = time.perf_counter()
    compiled(*args)
    compile_s = time.perf_counter() - t0

    def ce() -> None:
        zz = z.clone().requires_grad_()
        F.cross_entropy(zz, y).backward()

    res = {name: median_ms(lambda f=f: f(*args)[1].tolist(), reps)
           for name, f in (('compiled', compiled), ('eager', objective))}
    res['cross-entropy'] = median_ms(ce, reps)
    return (f'{shape}: compile {compile_s:.1f} s; median ms '
            + ', '.join(f'{n} {v:.2f}' for n, v in res.items())
            + f'; compiled / CE {res["compiled"] / res["cross-entropy"]:.2f}')


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    parser.add_argument('--reps', type=int, default=30)
    parser.add_argument('--threads', type=int, default=1)
    args = parser.parse_args()
    c.setup(args.threads)
    c.print_header('torch.compile probe of the GRPO-RM objective (pi_old, ratio 1) vs CE')
    compiled = torch.compile(objective, dynamic=False)
    for shape in SHAPES:
        reps = max(3, args.reps // 6) if math.prod(shape) > 4e6 else args.reps
        print(measure(shape, reps, compiled), flush=True)


if __name__ == '__main__':
    main()
