"""Crash-safe checkpoints for `examples/train_diffit.py`: a thin layer over `accelerator.save_state`, plus the hooks
that store the model (and its EMA) as diffusers folders inside each checkpoint."""

import json
import logging
import os
import re
import shutil
import signal
from pathlib import Path

import torch
from diffusers.training_utils import EMAModel
from safetensors.torch import load_file


logger = logging.getLogger(__name__)
PREEMPTED_EXIT_STATUS = 128 + signal.SIGTERM  # 143, what a shell reports for a process ended by SIGTERM


def register_diffusers_hooks(accelerator, ema: EMAModel | None = None, ema_device: str | None = None) -> None:
    """`save_state` writes the (single) prepared model as `model/` and the EMA as `model_ema/` with
    `save_pretrained`; `load_state` reads them back (the EMA onto `ema_device`, default the accelerator's)."""

    def save_hook(models, weights, checkpoint_dir):
        if accelerator.is_main_process:
            accelerator.unwrap_model(models[0]).save_pretrained(os.path.join(checkpoint_dir, "model"))
            if ema is not None:
                ema.save_pretrained(os.path.join(checkpoint_dir, "model_ema"))
        weights.clear()  # accelerate's own copy of the weights is not needed

    def load_hook(models, checkpoint_dir):
        target = accelerator.unwrap_model(models.pop())
        if getattr(target, "peft_config", None):  # LoRA layers: `from_pretrained` would drop them; load them as saved
            state = load_file(os.path.join(checkpoint_dir, "model", "diffusion_pytorch_model.safetensors"))
        else:
            state = type(target).from_pretrained(checkpoint_dir, subfolder="model").state_dict()
        target.load_state_dict(state)
        if ema is not None:
            ema.load_state_dict(
                EMAModel.from_pretrained(os.path.join(checkpoint_dir, "model_ema"), type(target)).state_dict()
            )
            ema.to(ema_device or accelerator.device)

    accelerator.register_save_state_pre_hook(save_hook)
    accelerator.register_load_state_pre_hook(load_hook)


def _fsync_dir(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_tree(path: Path) -> None:
    """Flush every file and folder under `path` to disk (page-cache data would survive a kill, not a power cut)."""
    for file in sorted(p for p in path.rglob("*") if p.is_file()):
        with open(file, "rb") as f:
            os.fsync(f.fileno())
    for directory in [path, *(p for p in path.rglob("*") if p.is_dir())]:
        _fsync_dir(directory)


class CheckpointManager:
    """`checkpoint-<step>` folders in `output_dir`, written so that a crash at any moment leaves only complete ones.

    `accelerator.save_state` / `load_state` do the saving and loading (models through the hooks of
    `register_diffusers_hooks`, optimizer, lr scheduler, dataloader and RNG states). This class adds what accelerate
    lacks: `save(step)` writes into `.tmp-checkpoint-<step>` (every process writes its own RNG file there, so
    `output_dir` must be on a filesystem all processes share), flushes it to disk, writes the
    `checkpoint_complete.json` marker, and only then renames the folder to `checkpoint-<step>` (atomic on POSIX).
    A failed write (a full disk: `OSError` ENOSPC) removes the `.tmp` folder and raises an `OSError` that says so;
    the complete checkpoints are untouched. `latest()` considers only folders with the marker. Old checkpoints beyond `total_limit` are removed after the
    new one is complete, renamed to `.trash-*` first so that a half-deleted folder is never picked; `remove_partial()`
    clears the leftovers of a killed run. (accelerate's own `automatic_checkpoint_naming` + `total_limit`, in 1.15,
    deletes old checkpoints before writing the new one and resumes from the newest folder whether or not it was
    written completely, so a kill while saving can lose the run.)
    """

    MARKER = "checkpoint_complete.json"
    _NAME = re.compile(r"^checkpoint-(\d+)$")

    def __init__(self, output_dir: str | os.PathLike, accelerator, total_limit: int | None = None):
        if total_limit is not None and total_limit < 1:
            raise ValueError(f"`total_limit` must be None or >= 1, got {total_limit}.")
        self.output_dir = Path(output_dir)
        self.accelerator = accelerator
        self.total_limit = total_limit

    def complete(self) -> list[tuple[int, Path]]:
        """Complete checkpoints as (step, path), oldest first."""
        if not self.output_dir.is_dir():
            return []
        found = []
        for path in self.output_dir.iterdir():
            match = self._NAME.match(path.name)
            if match and (path / self.MARKER).is_file():
                found.append((int(match.group(1)), path))
        return sorted(found)

    def latest(self) -> Path | None:
        found = self.complete()
        return found[-1][1] if found else None

    def resolve(self, resume_from_checkpoint: str) -> Path | None:
        """ "latest" -> the newest complete checkpoint (None when there is none yet); a path -> that checkpoint,
        which must be complete."""
        if resume_from_checkpoint == "latest":
            return self.latest()
        path = Path(resume_from_checkpoint)
        if not (path / self.MARKER).is_file():
            raise ValueError(
                f"`resume_from_checkpoint` {resume_from_checkpoint!r} is not a complete checkpoint folder "
                f"(no {self.MARKER}); pass 'latest' or a checkpoint-<step> folder written by this script."
            )
        return path

    @staticmethod
    def step_of(path: Path) -> int:
        return json.loads((Path(path) / CheckpointManager.MARKER).read_text())["step"]

    def remove_partial(self) -> None:
        """Delete `.tmp-*` / `.trash-*` leftovers of a killed run (main process), then sync all processes."""
        if self.accelerator.is_main_process and self.output_dir.is_dir():
            for path in self.output_dir.iterdir():
                if path.name.startswith((".tmp-checkpoint-", ".trash-checkpoint-")):
                    shutil.rmtree(path)
        self.accelerator.wait_for_everyone()

    def save(self, step: int) -> Path:
        tmp = self.output_dir / f".tmp-checkpoint-{step}"
        final = self.output_dir / f"checkpoint-{step}"
        if self.accelerator.is_main_process and tmp.exists():
            shutil.rmtree(tmp)
        self.accelerator.wait_for_everyone()
        try:
            self.accelerator.save_state(str(tmp))
            self.accelerator.wait_for_everyone()
            if self.accelerator.is_main_process:
                (tmp / self.MARKER).write_text(json.dumps({"step": step}))
                _fsync_tree(tmp)
        except OSError as e:  # e.g. ENOSPC: a full disk
            shutil.rmtree(tmp, ignore_errors=True)
            raise OSError(
                e.errno,
                f"Saving checkpoint {final} failed ({e}); the previous checkpoints are intact and {tmp} was "
                "removed. Free space, then continue with --resume_from_checkpoint latest.",
            ) from e
        if self.accelerator.is_main_process:
            if final.exists():  # re-saving a step (resumed from an older checkpoint): swap, never merge
                trash = self.output_dir / f".trash-checkpoint-{step}"
                os.replace(final, trash)
                os.replace(tmp, final)
                shutil.rmtree(trash)
            else:
                os.replace(tmp, final)
            _fsync_dir(self.output_dir)
            self._prune()
            logger.info(f"Saved checkpoint {final}")
        self.accelerator.wait_for_everyone()
        return final

    def _prune(self) -> None:
        if self.total_limit is None:
            return
        found = self.complete()
        for _, path in found[: max(0, len(found) - self.total_limit)]:
            trash = path.with_name(".trash-" + path.name)
            os.replace(path, trash)
            shutil.rmtree(trash)
            logger.info(f"Removed old checkpoint {path}")


class SigtermFlag:
    """Inside `with`, SIGTERM (what Slurm and Kubernetes send a while before they kill a job) no longer ends the
    process: it is noted, and the training loop asks `received_anywhere()` after each optimizer step, then saves a
    checkpoint and stops. All processes agree on the answer, so they stop at the same step. The previous handler is
    back on leaving the block."""

    def __init__(self, accelerator):
        self.accelerator = accelerator
        self.received = False
        self._previous = None

    def __enter__(self) -> "SigtermFlag":
        self._previous = signal.signal(signal.SIGTERM, self._note)
        return self

    def __exit__(self, *exc_info) -> None:
        signal.signal(signal.SIGTERM, self._previous)

    def _note(self, signum, frame) -> None:
        self.received = True

    def received_anywhere(self) -> bool:
        """Whether any process has received SIGTERM (a collective call with several processes)."""
        if self.accelerator.num_processes == 1:
            return self.received
        flag = torch.tensor([float(self.received)], device=self.accelerator.device)
        return self.accelerator.reduce(flag, reduction="sum").item() > 0
