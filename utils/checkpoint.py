"""Checkpoint files: plain Python values and tensors only, so that torch.load(path, weights_only=True) reads
them; written atomically; random number generator states included so that a resumed run repeats exactly."""

import pickle
import random
import zipfile

import numpy as np
import torch

from utils.errors import UserError
from utils.io import atomic_write


def rng_state() -> dict:
    """The states of Python's, NumPy's and torch's (CPU and current GPU) generators, as tensors and plain values.
    Only the current GPU's: under DDP each process owns one GPU, and touching the others would open a CUDA context
    on each of them."""
    name, keys, position, has_gauss, cached_gaussian = np.random.get_state()
    keys = torch.from_numpy(keys.astype(np.int64))  # (624,) uint32 values; gather_object fails on uint32 tensors
    return {"python": random.getstate(), "numpy": [name, keys, position, has_gauss, cached_gaussian],
            "torch": torch.get_rng_state(), "cuda": torch.cuda.get_rng_state() if torch.cuda.is_available() else None}


def set_rng_state(state: dict) -> None:
    version, internal, gauss_next = state["python"]
    random.setstate((version, tuple(internal), gauss_next))
    name, keys, position, has_gauss, cached_gaussian = state["numpy"]
    np.random.set_state((name, keys.numpy().astype(np.uint32), position, has_gauss, cached_gaussian))
    torch.set_rng_state(state["torch"])
    if state["cuda"] is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


def save_checkpoint(path: str, state: dict) -> None:
    """Write `state` to `path` atomically; a failed write (a full disk) is one line and leaves `path` as it was
    (atomic_write says so of an OSError; torch.save's writer raises RuntimeError on a full disk)."""
    try:
        atomic_write(path, lambda tmp_path: torch.save(state, tmp_path))
    except RuntimeError as error:
        raise UserError(f"cannot write checkpoint {path} ({str(error).splitlines()[0][:200]}): check the free space "
                        f"and permissions there; the previous file is unchanged") from None


def check_model_name(state: dict, model_name: str, what: str = "the checkpoint") -> None:
    """A checkpoint of another model is one line, before its weights are read into this one."""
    if state["config"]["model_name"] != model_name:
        raise UserError(f"{what} is from model {state['config']['model_name']}, not {model_name}: resume it with "
                        f"--model_name {state['config']['model_name']} (test.py reads the model from it)")


def load_checkpoint(path: str, map_location="cpu") -> dict:
    """Read a checkpoint with weights_only=True; a missing, truncated or foreign file is one clear line."""
    try:
        state = torch.load(path, map_location=map_location, weights_only=True)
    except FileNotFoundError:
        raise UserError(f"checkpoint {path} not found") from None
    except (RuntimeError, EOFError, pickle.UnpicklingError, zipfile.BadZipFile, OSError) as error:
        reason = str(error).splitlines()[0][:200]
        raise UserError(f"checkpoint {path} is corrupt or not a DSTorch checkpoint ({reason}): delete it or "
                        f"resume from another one (--start_epoch)") from None
    if not (isinstance(state, dict) and "model" in state and "epoch" in state and isinstance(state.get("config"), dict)
            and "model_name" in state["config"]):
        raise UserError(f"checkpoint {path} is not a DSTorch checkpoint (no model, epoch and configuration): use a "
                        f"file that train.py wrote")
    return state
