"""Resuming main_dino.py: what a checkpoint records (args, every rank's RNG streams), and the
checks that make a resume from the wrong file or with other model flags a one-line error."""

from __future__ import annotations

import logging
import os
import random
from typing import TYPE_CHECKING, Any

import torch
import torch.distributed as dist

from simpool import backbones, utils
from simpool.checkpoints import TRAINING_KEYS, is_training_checkpoint

if TYPE_CHECKING:
    import argparse
    from collections.abc import Mapping, Sequence

__all__ = [
    "serializable_args",
    "rng_state",
    "restore_rng",
    "check_resumable",
    "check_compatible",
    "MODEL_FLAGS",
    "resume_training",
    "TrainingCheckpoint",
]

logger = logging.getLogger("simpool")


def serializable_args(args: argparse.Namespace) -> dict[str, Any]:
    return {
        k: (list(v) if isinstance(v, tuple) else v)
        for k, v in vars(args).items()
        if isinstance(v, (int, float, str, bool, list, tuple, type(None)))
    }


PYTHON_RNG_BYTES = 625 * 8  # random.getstate()[1]: 625 int64 words


def rng_state(device: torch.device) -> list[torch.Tensor]:
    """This rank's torch CPU, Python and (on CUDA) GPU generator states as one uint8 tensor,
    gathered from all ranks so that a resume continues every rank's random stream where it
    stopped (masks draw on the CPU; on CUDA the photometric augmentation and drop-path draw on
    the GPU)."""
    parts = [torch.get_rng_state(), torch.tensor(random.getstate()[1], dtype=torch.int64).view(torch.uint8)]
    if device.type == "cuda":
        parts.append(torch.cuda.get_rng_state(device))
    state = torch.cat(parts)
    if utils.get_world_size() > 1:
        states = [torch.empty_like(state) for _ in range(utils.get_world_size())]
        dist.all_gather_object(states, state)
        return states
    return [state]


def restore_rng(states: Sequence[torch.Tensor] | None, rank: int, device: torch.device) -> None:
    if not states or rank >= len(states):
        return  # a run resumed with more ranks: new ranks keep their fresh seeds
    n_torch = torch.get_rng_state().numel()
    state = states[rank]
    torch.set_rng_state(state[:n_torch].clone())
    python = state[n_torch : n_torch + PYTHON_RNG_BYTES].clone()
    random.setstate((3, tuple(python.view(torch.int64).tolist()), None))
    gpu = state[n_torch + PYTHON_RNG_BYTES :]
    if device.type == "cuda" and gpu.numel():  # absent in a checkpoint written on CPU
        torch.cuda.set_rng_state(gpu.clone(), device)


def check_resumable(ckpt: object, path: str, advice: str | None = None) -> None:
    """A resume from a file that is not a training checkpoint (say, a backbone exported over
    it) is a one-line error, not a KeyError or a run that goes on with fresh weights."""
    advice = advice or "move it away or use another --output_dir"
    if not isinstance(ckpt, dict):
        raise utils.RunError(f"{path} holds a {type(ckpt).__name__}, not a checkpoint of main_dino.py; {advice}")
    if not is_training_checkpoint(ckpt):
        missing = [k for k in TRAINING_KEYS if k not in ckpt]
        what = "an exported backbone" if "format" in ckpt else f"not a checkpoint of main_dino.py (no {missing[0]!r})"
        raise utils.RunError(f"{path} is {what}, so there is nothing to resume; {advice}")


def check_compatible(saved: Mapping[str, Any], args: argparse.Namespace, path: str) -> None:
    """A resume whose model differs from the checkpoint's is a one-line error."""
    saved = dict(saved)
    if "mode" in saved:  # an official-mode model has no SimPool knobs, whatever its args recorded
        saved["gamma"], saved["use_beta"] = backbones.pooling_knobs(
            saved["mode"], saved.get("gamma"), saved.get("use_beta")
        )
    for key in MODEL_FLAGS:
        if key in saved and saved[key] != getattr(args, key):
            raise utils.RunError(
                f"{path} was trained with --{key} {saved[key]} but this run asks for "
                f"--{key} {getattr(args, key)}; use another --output_dir or the same flags"
            )


# what the saved weights and optimizer state fit (and the model they belong to)
MODEL_FLAGS = (
    "arch",
    "patch_size",
    "out_dim",
    "mode",
    "patch_out_dim",
    "shared_head",
    "shared_head_teacher",
    "gamma",
    "use_beta",
    "use_bn_in_head",
    "norm_in_head",
    "head_norm_shared",
    "act_in_head",
    "norm_last_layer",
    "head_hidden_dim",
    "head_bottleneck_dim",
    "optimizer",
)


def resume_training(args: argparse.Namespace, ckpt_path: str, device: torch.device, **modules: Any) -> tuple[int, int]:
    """Load the newest readable checkpoint of this run (else --load_from's, while the run has none of
    its own) into ``modules`` (student, teacher, optimizer, scaler, losses) and every rank's RNG;
    returns the (epoch, step) to go on from, (0, 0) for a new run."""
    if utils.is_main_process():  # no writer of this run is alive yet: a temp file here is a killed write's
        utils.remove_stale_temporaries(args.output_dir)
    ckpt, ckpt_file = utils.load_latest_checkpoint(ckpt_path, args.keep_checkpoints)
    start_file = utils.load_from_path(args.output_dir, args.load_from, ckpt_path)
    if ckpt is None and start_file:  # iBOT's start point: only while this run has no checkpoint of its own
        ckpt, ckpt_file = utils.load_checkpoint(start_file), start_file
    elif start_file:
        logger.info(f"--load_from {args.load_from} not used: {args.output_dir} has a checkpoint of its own.")
    if ckpt is None:
        return 0, 0
    check_resumable(
        ckpt, ckpt_file, "pass --load_from a checkpoint.pth of main_dino.py" if ckpt_file == start_file else None
    )
    check_compatible(ckpt.get("args", {}), args, ckpt_file)
    try:
        utils.restore_modules(ckpt, **modules)
    except RuntimeError as e:  # a flag the check above does not list, e.g. a crop size that sizes pos_embed
        mismatch = next(
            (line.strip() for line in str(e).splitlines() if "size mismatch" in line), str(e).splitlines()[0]
        )
        raise utils.RunError(
            f"{ckpt_file} does not fit the model these flags build ({mismatch}); use the "
            "flags it was trained with (its 'args' entry) or another --output_dir"
        ) from None
    restore_rng(ckpt.get("rng"), args.rank, device)
    logger.info(
        f"Resumed from {ckpt_file} at epoch {ckpt['epoch']}, step {ckpt.get('epoch_step', 0)} "
        f"(iteration {ckpt['iteration']})."
    )
    return ckpt["epoch"], ckpt.get("epoch_step", 0)


class TrainingCheckpoint:
    """Writes ``checkpoint.pth`` in --output_dir (atomically, keeping --keep_checkpoints older ones),
    plus ``checkpoint{epoch:04}.pth`` every --saveckp_freq epochs: the ``modules``' states, the
    position in the run (epoch, step in it, iteration, sampler position), every rank's RNG
    streams and the args. Every rank calls ``save`` (the RNG gather is collective); rank 0 writes."""

    def __init__(self, args: argparse.Namespace, path: str, niter: int, device: torch.device, **modules: Any) -> None:
        self.args, self.path, self.niter, self.device, self.modules = args, path, niter, device, modules

    def save(self, epoch: int, epoch_step: int) -> None:
        """Checkpoint after ``epoch_step`` steps of ``epoch`` (the end of an epoch is step 0 of the next)."""
        args = self.args
        if epoch_step == self.niter:
            epoch, epoch_step = epoch + 1, 0
        state = {name: m.state_dict() if m is not None else None for name, m in self.modules.items()}
        state.update(
            epoch=epoch,
            epoch_step=epoch_step,
            iteration=epoch * self.niter + epoch_step,
            sampler_position=epoch_step * args.batch_size_per_gpu,
            args=serializable_args(args),
            rng=rng_state(self.device),
        )
        if utils.is_main_process():
            utils.save_checkpoint(state, self.path, keep=args.keep_checkpoints)
            if epoch_step == 0 and args.saveckp_freq and epoch % args.saveckp_freq == 0:
                utils.save_checkpoint(state, os.path.join(args.output_dir, f"checkpoint{epoch:04}.pth"))
