"""Run a script with SIGKILL hooks, for the resume test (tests/test_training.py):

python tests/kill_and_resume.py examples/train_diffit.py ARGS...

DIFFIT_TEST_KILL=write:N  the N-th file written into a `.tmp-checkpoint-*` folder gets half its bytes, then the
                          process SIGKILLs itself (a crash in the middle of writing a checkpoint);
DIFFIT_TEST_KILL=time:S   SIGKILL S seconds after training starts;
DIFFIT_TEST_SLOW_SAVE=S   sleep S seconds before each checkpoint file, so random kills often hit a save.
"""

import io
import os
import runpy
import signal
import sys
import threading
import time

import safetensors.torch
import torch

from diffusers_diffit.checkpointing import CheckpointManager


MODE = os.environ.get("DIFFIT_TEST_KILL", "")
SLOW = float(os.environ.get("DIFFIT_TEST_SLOW_SAVE", "0"))
writes = 0


def die():
    os.kill(os.getpid(), signal.SIGKILL)


def hooked(original, to_bytes):
    """`original(obj, path, ...)`, except for checkpoint files: slowed down, and the N-th one cut short."""

    def save(obj, path, *args, **kwargs):
        global writes
        if ".tmp-checkpoint-" not in str(path):
            return original(obj, path, *args, **kwargs)
        time.sleep(SLOW)
        writes += 1
        if MODE == f"write:{writes}":
            data = to_bytes(obj, *args, **kwargs)
            with open(path, "wb") as f:
                f.write(data[: len(data) // 2])
            die()
        return original(obj, path, *args, **kwargs)

    return save


def torch_bytes(obj, *args, **kwargs) -> bytes:
    buffer = io.BytesIO()
    torch_save(obj, buffer)
    return buffer.getvalue()


def start_clock_then(remove_partial):
    """The timer starts where training starts: when the run clears the leftovers of the last one."""

    def wrapped(self):
        threading.Timer(float(MODE[5:]), die).start()
        return remove_partial(self)

    return wrapped


torch_save = torch.save
torch.save = hooked(torch.save, torch_bytes)
safetensors.torch.save_file = hooked(
    safetensors.torch.save_file, lambda tensors, metadata=None: safetensors.torch.save(tensors, metadata=metadata)
)
if MODE.startswith("time:"):
    CheckpointManager.remove_partial = start_clock_then(CheckpointManager.remove_partial)

if __name__ == "__main__":
    sys.argv = sys.argv[1:]
    runpy.run_path(sys.argv[0], run_name="__main__")
