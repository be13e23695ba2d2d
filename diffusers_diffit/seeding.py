"""Seeds derived from keys: randomness that a resumed or re-sharded run draws exactly as an uninterrupted one would
(training steps, data augmentation, FID sampling)."""

import numpy as np


def derive_seed(*keys: int) -> int:
    """A 63-bit seed that depends only on the non-negative integer `keys`, e.g. (seed, global_step, micro_step,
    process_index): randomness drawn from it is the same in a resumed run as in an uninterrupted one. Neighbouring
    keys give independent streams (numpy's `SeedSequence` hashing)."""
    if any(k < 0 for k in keys):
        raise ValueError(f"`keys` must be non-negative integers, got {keys}.")
    return int(np.random.SeedSequence(list(keys)).generate_state(1, dtype=np.uint64)[0] >> np.uint64(1))
