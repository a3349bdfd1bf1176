"""Time `estimators.advantages` against a plain NumPy loop computing the same numbers.

    python benchmarks/advantages.py [--batch 256] [--length 16384] [--repeats 5]

Both sides compute float32 OPD+ token-level advantages with a discounted reward-to-go (the
reverse recursion over T) for a batch of ragged responses; the NumPy side loops over T in
Python with the batch vectorised, the natural way to write it without JAX. Prints the median
wall time of each (after compilation for JAX), their ratio, and the max abs difference.
"""

import argparse
import os
import time

import jax
import jax.numpy as jnp
import numpy as np

from opdplus_jax import divergences, estimators


def numpy_advantages(ls, lt, mask, divergence, discount):
    """OPD+ token-level advantages with a Python loop over time (vectorised over the batch)."""
    log_u = np.where(mask > 0, lt - ls, 0.0).astype(np.float32)
    f = np.asarray(divergence.f(log_u)) * mask  # the same generator, evaluated once
    w = np.asarray(divergence.opd_plus_advantage(log_u))
    out = np.empty_like(log_u)
    future = np.zeros(log_u.shape[0], np.float32)
    for t in range(log_u.shape[1] - 1, -1, -1):
        out[:, t] = (w[:, t] - future) * mask[:, t]
        future = discount * (f[:, t] + future)
    return out


def _median_time(fn, repeats):
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return float(np.median(times))


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--length", type=int, default=16384)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--divergence", default="jsd")
    parser.add_argument("--discount", type=float, default=0.99)
    args = parser.parse_args()

    rng = np.random.default_rng(0)
    shape = (args.batch, args.length)
    ls = np.log(rng.uniform(0.01, 1.0, shape)).astype(np.float32)
    lt = np.log(rng.uniform(0.01, 1.0, shape)).astype(np.float32)
    lengths = rng.integers(args.length // 2, args.length + 1, args.batch)
    mask = (np.arange(args.length)[None] < lengths[:, None]).astype(np.float32)
    d = divergences.get(args.divergence)

    fn = jax.jit(
        lambda ls, lt, m: estimators.advantages(
            ls, lt, m, divergence=d, discount=args.discount, level="token"
        )
    )
    args_dev = [jnp.asarray(a) for a in (ls, lt, mask)]
    start = time.perf_counter()
    got = fn(*args_dev).block_until_ready()
    compile_s = time.perf_counter() - start
    jax_s = _median_time(lambda: fn(*args_dev).block_until_ready(), args.repeats)
    want = numpy_advantages(ls, lt, mask, d, args.discount)
    numpy_s = _median_time(lambda: numpy_advantages(ls, lt, mask, d, args.discount), args.repeats)

    print(f"advantages: B={args.batch} T={args.length} {d} discount={args.discount} float32")
    print(f"  devices: {jax.devices()[0].platform} x{jax.device_count()}, cores {os.cpu_count()}")
    print(f"  jax (jit, after {compile_s:.2f}s compile): {jax_s * 1e3:9.1f} ms")
    print(f"  numpy loop over T:                {numpy_s * 1e3:9.1f} ms")
    print(f"  speed-up (numpy / jax): {numpy_s / jax_s:.2f}x")
    diff = float(np.abs(np.asarray(got) - want).max())
    print(f"  max |difference|: {diff:.2e} (max |advantage| {float(np.abs(want).max()):.1f})")


if __name__ == "__main__":
    main()
