"""Crash-safe checkpoints (diffusers_diffit/checkpointing.py): only complete ones are ever picked, the limit is kept
after the new one is complete, a full disk during a save loses nothing. The SIGKILL-and-resume test of the whole script is in test_training.py."""

import errno

import pytest
import torch
from accelerate import Accelerator

from diffusers_diffit.checkpointing import CheckpointManager
from tests.utils import reset_accelerate


def test_checkpoint_manager_is_crash_safe_and_keeps_the_limit(tmp_path):
    reset_accelerate()
    accelerator = Accelerator(cpu=True)
    model = torch.nn.Linear(2, 2)
    optimizer = torch.optim.AdamW(model.parameters())
    model, optimizer = accelerator.prepare(model, optimizer)
    manager = CheckpointManager(tmp_path, accelerator, total_limit=2)
    for step in (1, 2, 3):
        manager.save(step)
    assert [s for s, _ in manager.complete()] == [2, 3]
    assert manager.latest() == tmp_path / "checkpoint-3" and CheckpointManager.step_of(manager.latest()) == 3
    assert not list(tmp_path.glob(".tmp-*")) and not list(tmp_path.glob(".trash-*"))

    (tmp_path / "checkpoint-9").mkdir()  # a folder without the marker (e.g. copied half-way) is never picked
    (tmp_path / ".tmp-checkpoint-10").mkdir()  # what a kill during `save` leaves
    assert manager.latest() == tmp_path / "checkpoint-3"
    manager.remove_partial()
    assert not (tmp_path / ".tmp-checkpoint-10").exists() and (tmp_path / "checkpoint-9").exists()
    with pytest.raises(ValueError, match="not a complete checkpoint"):
        manager.resolve(str(tmp_path / "checkpoint-9"))
    assert manager.resolve("latest") == tmp_path / "checkpoint-3"
    assert CheckpointManager(tmp_path / "none", accelerator).resolve("latest") is None
    with pytest.raises(ValueError, match="total_limit"):
        CheckpointManager(tmp_path, accelerator, total_limit=0)
    reset_accelerate()


def test_a_full_disk_during_a_save_keeps_the_previous_checkpoint_and_clears_the_partial_one(tmp_path, monkeypatch):
    """ENOSPC injected into the writes of the second save (half a file is written first, as a full disk does)."""
    reset_accelerate()
    accelerator = Accelerator(cpu=True)
    model, optimizer = accelerator.prepare(
        torch.nn.Linear(2, 2), torch.optim.AdamW(torch.nn.Linear(2, 2).parameters())
    )
    manager = CheckpointManager(tmp_path, accelerator)
    manager.save(1)
    saved = {k: v.clone() for k, v in model.state_dict().items()}
    torch_save = torch.save

    def disk_full(obj, f, *args, **kwargs):
        if ".tmp-checkpoint-" in str(f):
            with open(f, "wb") as out:
                out.write(b"\0" * 10)
            raise OSError(errno.ENOSPC, "No space left on device")
        return torch_save(obj, f, *args, **kwargs)

    monkeypatch.setattr(torch, "save", disk_full)
    with torch.no_grad():
        model.weight.add_(1.0)
    with pytest.raises(OSError, match="checkpoint-2 failed .*No space left.*previous checkpoints are intact") as error:
        manager.save(2)
    assert error.value.errno == errno.ENOSPC
    monkeypatch.undo()
    assert not list(tmp_path.glob(".tmp-*")) and manager.latest() == tmp_path / "checkpoint-1"
    assert manager.resolve("latest") == tmp_path / "checkpoint-1"
    accelerator.load_state(str(manager.latest()))  # loadable, with the weights of step 1
    assert all(torch.equal(model.state_dict()[k], v) for k, v in saved.items())
    reset_accelerate()
