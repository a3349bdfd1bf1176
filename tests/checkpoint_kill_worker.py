"""Subprocess for tests/test_checkpoint.py: saves step 1, then SIGKILLs itself while saving step 2.

Usage: python checkpoint_kill_worker.py DIRECTORY. A watcher thread kills the process as soon as
orbax has started writing step 2's temporary directory; step 2 holds ~200 MB of incompressible
data, so the write is far from finished when the kill lands. If the save ever completes first,
the worker prints COMPLETED and kills itself anyway, and the test checks step 2 instead.
"""

import os
import signal
import sys
import threading
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from opdplus_jax import checkpoint

BIG = 50_000_000  # float32 elements, 200 MB


def small_state(step: int):
    params = {"w": jnp.full((8, 4), step, jnp.float32), "n": jnp.arange(3, dtype=jnp.int32) + step}
    return params, {"count": jnp.asarray(step, jnp.int32)}, jax.random.key(step)


def big_params():
    return {"w": jnp.asarray(np.random.default_rng(2).random(BIG, dtype=np.float32))}


def _kill_when_writing(directory: Path) -> None:
    while True:
        for tmp in directory.glob("2.orbax-checkpoint-tmp*"):
            if any(p.is_file() for p in tmp.rglob("*")):
                os.kill(os.getpid(), signal.SIGKILL)
        time.sleep(0.002)


def main() -> None:
    directory = Path(sys.argv[1])
    mgr = checkpoint.CheckpointManager(directory, keep=3)
    params, opt_state, rng = small_state(1)
    mgr.save(1, params=params, opt_state=opt_state, rng=rng, data_state={"step": 1})
    mgr.wait()
    big = big_params()
    jax.block_until_ready(big)
    print("SAVING", flush=True)
    threading.Thread(target=_kill_when_writing, args=(directory,), daemon=True).start()
    mgr.save(2, params=big, opt_state={"count": jnp.asarray(2)}, rng=rng, data_state={"step": 2})
    mgr.wait()
    print("COMPLETED", flush=True)
    os.kill(os.getpid(), signal.SIGKILL)


if __name__ == "__main__":
    main()
