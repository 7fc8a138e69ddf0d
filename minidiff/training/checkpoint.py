"""Training checkpoints that lose nothing: everything a run needs to go on as if it had never stopped.

One file, OUT/checkpoint.pt, written with torch.save and read with torch.load(weights_only=True) (tensors,
numbers, strings, lists and dicts only: loading a checkpoint never runs code). It holds

    format, version     what the file is
    run                 the run's fingerprint (mode, model, data, optimiser settings, seed): --resume refuses
                        a checkpoint whose fingerprint differs, and says which settings
    step                optimizer steps taken
    model               {name: tensor} of the trained parameters
    ema                 {name: tensor} of their moving average (None without EMA)
    optimizer           AdamW's state_dict (moments and step counts)
    lr_schedule         the schedule's settings (the learning rate is a function of step)
    rng                 torch's global CPU (and CUDA) generator states
    data                the sample stream: its generator state, the current epoch's order and position

Writing is atomic: the bytes go to a temporary file in the same folder, are flushed and fsynced, and the file
is renamed over the old checkpoint, so a crash at any moment leaves either the old checkpoint or the new one.
"""

from __future__ import annotations

import os
import secrets
from pathlib import Path

import torch

FORMAT, VERSION = "minidiff-training-checkpoint", 1


class CheckpointError(ValueError):
    """A checkpoint that cannot be resumed: unreadable, or made by a different run configuration."""


def save_checkpoint(state: dict, path: str | os.PathLike) -> None:
    """Write `state` to `path` atomically (temporary file + fsync + rename, then fsync the folder)."""
    path = Path(path)
    temp = path.with_name(f".{path.name}.{secrets.token_hex(4)}.tmp")
    try:
        with open(temp, "xb") as file:
            torch.save({"format": FORMAT, "version": VERSION, **state}, file)
            file.flush()
            os.fsync(file.fileno())
        os.replace(temp, path)
    except BaseException:
        temp.unlink(missing_ok=True)
        raise
    folder = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(folder)  # make the rename itself durable
    finally:
        os.close(folder)


def remove_partial_checkpoints(folder: Path) -> None:
    """Delete temporary files left by a write that was killed before its rename (they were never used)."""
    for temp in folder.glob(".checkpoint.pt.*.tmp"):
        temp.unlink(missing_ok=True)


def load_checkpoint(path: str | os.PathLike) -> dict:
    """Read a checkpoint written by save_checkpoint, with a CheckpointError if it is not one."""
    path = Path(path)
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise CheckpointError(f"no checkpoint at {path}: start the run without --resume") from None
    except Exception as e:  # torch raises many kinds for a damaged file
        raise CheckpointError(f"{path} is not a readable checkpoint ({type(e).__name__}: {e})") from None
    if not isinstance(state, dict) or state.get("format") != FORMAT:
        raise CheckpointError(f"{path} is not a minidiff training checkpoint")
    if state.get("version") != VERSION:
        raise CheckpointError(f"{path} is a version {state.get('version')} checkpoint; this minidiff reads {VERSION}")
    return state


def check_same_run(saved: dict, current: dict, path: Path) -> None:
    """A CheckpointError naming every setting in which the checkpoint's run differs from this one."""
    keys = sorted(set(saved) | set(current))
    changed = [f"{k}: {saved.get(k)!r} -> {current.get(k)!r}" for k in keys if saved.get(k) != current.get(k)]
    if changed:
        raise CheckpointError(f"{path} was made by a different run configuration ({'; '.join(changed)}): resume "
                              "with the same settings, or start a new run in another --output-dir")


def rng_state() -> dict:
    """The global generators' states (used by dropout and by anything drawing without a generator)."""
    cuda = torch.cuda.get_rng_state_all() if torch.cuda.is_available() else []
    return {"torch": torch.get_rng_state(), "cuda": cuda}


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    if state["cuda"]:
        torch.cuda.set_rng_state_all(state["cuda"])
