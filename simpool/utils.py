"""Distributed set-up, schedules, checkpoint I/O and logging for SimPool-SSL."""

from __future__ import annotations

import argparse
import datetime
import json
import logging
import math
import os
import random
import re
import sys
import tempfile
import time
import warnings
from collections import defaultdict, deque
from typing import IO, TYPE_CHECKING, Any

import numpy as np
import torch
import torch.distributed as dist

if TYPE_CHECKING:
    from collections.abc import Callable, Iterable, Iterator, Mapping

logger = logging.getLogger("simpool")


# ---------------------------------------------------------------- distributed
def launch_environment() -> tuple[int, int, int, int]:
    """(rank, world size, local rank, local world size) as torchrun or SLURM set them,
    (0, 1, 0, 1) for a plain run; readable before any process group exists."""
    env = os.environ
    if "RANK" in env and "WORLD_SIZE" in env:
        return (
            int(env["RANK"]),
            int(env["WORLD_SIZE"]),
            int(env.get("LOCAL_RANK", 0)),
            int(env.get("LOCAL_WORLD_SIZE", 1)),
        )
    if "SLURM_PROCID" in env and int(env.get("SLURM_NTASKS", "1")) > 1:
        return (
            int(env["SLURM_PROCID"]),
            int(env["SLURM_NTASKS"]),
            int(env.get("SLURM_LOCALID", 0)),
            int(env.get("SLURM_NTASKS_PER_NODE", "1").split("(")[0]),
        )
    return 0, 1, 0, 1


def add_launch_args(group: argparse._ActionsContainer) -> None:
    """The process-group flags every command takes: ``--backend`` (as iBOT's and AttMask's scripts
    spell it), ``--dist_url`` and the ``--local_rank`` that torch.distributed.launch passes."""
    group.add_argument(
        "--dist_url", default="env://", type=str, help="Process-group rendezvous URL (torchrun sets env://)."
    )
    group.add_argument(
        "--local_rank",
        "--local-rank",
        default=0,
        type=int,
        help="Set by torch.distributed.launch; ignored (LOCAL_RANK is read from the environment).",
    )
    group.add_argument(
        "--backend",
        default=None,
        choices=["nccl", "gloo"],
        help="Process-group backend; default nccl "
        "on GPUs, gloo on the CPU. gloo on GPUs is the usual way around NCCL errors.",
    )


def init_distributed_mode(args: argparse.Namespace) -> None:
    """Join the process group when launched by torchrun/SLURM, else run alone.

    Sets ``args.rank``, ``args.world_size``, ``args.gpu`` and ``args.device``; the
    backend is ``args.backend`` where given, else nccl on CUDA and gloo on CPU. CPU
    threads are split between the local processes so two ranks on one machine do not
    oversubscribe its cores. A second call in the same process keeps the group joined.
    """
    env = os.environ
    args.rank, args.world_size, args.gpu, local_world = launch_environment()
    if args.world_size > 1 and "RANK" not in env and args.dist_url == "env://" and "MASTER_ADDR" not in env:
        raise RunError(
            f"this is task {args.rank} of {args.world_size} SLURM tasks (SLURM_PROCID, SLURM_NTASKS) but "
            "MASTER_ADDR is not set: start the tasks with `srun ./launch ...`, which sets up the "
            "rendezvous, or export MASTER_ADDR and MASTER_PORT; for one process in a multi-task job, "
            "use `srun --ntasks 1 python ...`"
        )
    use_cuda = torch.cuda.is_available() and not getattr(args, "cpu", False)
    backend = getattr(args, "backend", None) or ("nccl" if use_cuda else "gloo")
    if backend == "nccl" and not use_cuda:
        raise RunError(
            "--backend nccl needs CUDA GPUs and this run is on the CPU; leave --backend out (gloo on "
            "the CPU) or pass --backend gloo"
        )
    if use_cuda:  # with one GPU bound per task (--gpus-per-task), a task sees only device 0
        args.gpu %= torch.cuda.device_count()
    args.device = torch.device("cuda", args.gpu) if use_cuda else torch.device("cpu")
    if use_cuda:
        torch.cuda.set_device(args.gpu)
    elif local_world > 1:
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // local_world))
    if args.world_size > 1 and not dist.is_initialized():  # joined once per process (one run per --checkpoint_key)
        timeout = datetime.timedelta(minutes=30)
        where = {"init_method": args.dist_url}
        attempt = env.get("TORCHELASTIC_RESTART_COUNT")
        if attempt is not None and args.dist_url == "env://" and env.get("TORCHELASTIC_USE_AGENT_STORE") == "True":
            # the workers share torchrun's store, which outlives restarts: without a key space per
            # attempt, a restarted rank can read a dead peer's address from the previous attempt
            # and fail or hang. (./launch --rdzv_endpoint gives each round a fresh store instead,
            # as the restart count can differ between nodes there.)
            store, _, _ = next(dist.rendezvous(args.dist_url, args.rank, args.world_size, timeout=timeout))
            where = {"store": dist.PrefixStore(f"attempt_{attempt}", store)}
        dist.init_process_group(backend=backend, world_size=args.world_size, rank=args.rank, timeout=timeout, **where)
        dist.barrier()
    setup_logging(args.rank)


# Exit code of a mistake the user can fix (argparse's code for a bad flag): it tells a user error
# from a crash (1, an uncaught exception), so ./launch does not restart a group that would only
# fail the same way again.
USER_ERROR_EXIT = 2


def run_command(fn: Callable[..., Any], *args: Any, interrupted: str = "interrupted") -> Any:
    """Run a command-line tool's ``fn(*args)``: a mistake the user can fix (a ``UserError``) prints
    one line ``error: ...`` and exits USER_ERROR_EXIT, never a traceback; Ctrl-C prints the line
    ``interrupted`` and exits 130 (the shell's code for SIGINT); the process group, if one was
    joined, is left either way."""
    try:
        return fn(*args)
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(USER_ERROR_EXIT)
    except KeyboardInterrupt:
        print(interrupted, file=sys.stderr)
        sys.exit(130)
    finally:
        if dist.is_available() and dist.is_initialized():
            dist.destroy_process_group()


def is_main_process() -> bool:
    return get_rank() == 0


def get_rank() -> int:
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def get_world_size() -> int:
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def all_reduce_sum(value: float, device: torch.device | str = "cpu") -> float:
    """Sum a python number over ranks."""
    t = torch.tensor(float(value), device=device, dtype=torch.float64)
    if get_world_size() > 1:
        dist.all_reduce(t)
    return t.item()


def fix_random_seeds(seed: int, rank: int = 0) -> None:
    torch.manual_seed(seed + rank)
    np.random.seed(seed + rank)
    random.seed(seed + rank)


# ---------------------------------------------------------------- schedules
def cosine_scheduler(
    base_value: float,
    final_value: float,
    epochs: int,
    niter_per_ep: int,
    warmup_epochs: float = 0,
    start_warmup_value: float = 0.0,
) -> np.ndarray:
    """Per-iteration values, as DINO's schedule: a linear warm-up from ``start_warmup_value`` to
    ``base_value`` over ``warmup_epochs`` (both ends included), then a cosine from ``base_value``
    towards ``final_value`` over the remaining n iterations, cos(pi * i / n), so that the last value
    stops one step short of ``final_value``. A warm-up longer than training is cut off."""
    warmup_iters = int(warmup_epochs * niter_per_ep)
    total = int(epochs * niter_per_ep)
    warmup = np.linspace(start_warmup_value, base_value, warmup_iters) if warmup_iters > 0 else np.array([])
    iters = np.arange(max(total - warmup_iters, 0))
    cosine = final_value + 0.5 * (base_value - final_value) * (1 + np.cos(np.pi * iters / max(len(iters), 1)))
    return np.concatenate((warmup, cosine))[:total]


def linear_warmup_constant(
    start_value: float, final_value: float, epochs: int, niter_per_ep: int, warmup_epochs: int, start_epoch: int = 0
) -> np.ndarray:
    """Per-iteration values of DINO's teacher-temperature schedule: one value per epoch, linear from
    ``start_value`` at epoch ``start_epoch`` to ``final_value`` at epoch ``start_epoch + warmup_epochs
    - 1``, ``start_value`` before and ``final_value`` after (iBOT delays its patch temperature's
    warm-up to the epoch masking starts); each epoch's value is held for its ``niter_per_ep`` iterations."""
    epochs, warmup_epochs, start_epoch = int(epochs), int(warmup_epochs), int(start_epoch)
    per_epoch = np.concatenate(
        (np.full(start_epoch, float(start_value)), np.linspace(start_value, final_value, warmup_epochs))
    )[:epochs]
    per_epoch = np.concatenate((per_epoch, np.full(epochs - len(per_epoch), float(final_value))))
    return np.repeat(per_epoch, int(niter_per_ep))


# ---------------------------------------------------------------- checkpoints
class UserError(Exception):
    """A mistake the user can fix (bad flags, data, checkpoint, ...): the command-line tools print its
    one-line message as ``error: ...`` and exit USER_ERROR_EXIT, never a traceback (``run_command``).
    Every tool's error class derives from it."""


class RunError(UserError, RuntimeError):
    """A user-facing failure (bad flags, unwritable folder, unreadable checkpoint); one-line message."""


class Diverged(UserError, RuntimeError):
    """Training stopped on a non-finite loss; the last checkpoint is intact."""


class CheckpointError(RunError):
    """A checkpoint that cannot be read or written; the message is one line."""


class _WriteErrorKeeper:
    """File wrapper for ``torch.save`` that remembers the OSError of a failed write:
    torch's zip writer swallows it (a full disk surfaces as a RuntimeError "unexpected
    pos"), and the user should read "No space left on device" instead."""

    def __init__(self, file: IO[bytes]) -> None:
        self.file, self.error = file, None

    def write(self, data: bytes) -> int:
        try:
            return self.file.write(data)
        except OSError as e:
            self.error = e
            raise

    def __getattr__(self, name: str) -> Any:  # flush, fileno, name, ... of the file itself
        return getattr(self.file, name)


def write_atomically(
    path: str, write: Callable[[IO], Any], mode: str = "wb", before_rename: Callable[[], Any] | None = None
) -> None:
    """``write(f)`` into a temp file beside ``path``, fsync, ``before_rename()``, rename over
    ``path``: a crash or a full disk mid-write leaves ``path`` as it was. On any error the
    temp file is removed and the error raised as is."""
    tmp = os.path.join(os.path.dirname(os.path.abspath(path)), f".{os.path.basename(path)}.tmp{os.getpid()}")
    try:
        with open(tmp, mode) as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        if before_rename is not None:
            before_rename()
        os.replace(tmp, path)
    except BaseException:  # cleanup only: re-raised
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


def save_checkpoint(state: Any, path: str, keep: int = 1) -> None:
    """Write ``state`` to ``path`` atomically (``write_atomically``). With ``keep`` > 1 the
    previous files are kept as ``path.1`` ... ``path.{keep-1}`` (newest first), rotated only
    once the new file is safely on disk. A failed write is a one-line CheckpointError."""
    writer = None

    def write(f: IO[bytes]) -> None:
        nonlocal writer
        writer = _WriteErrorKeeper(f)
        torch.save(state, writer)

    def rotate() -> None:
        for i in range(keep - 1, 0, -1):
            older = path if i == 1 else f"{path}.{i - 1}"
            if os.path.exists(older):
                os.replace(older, f"{path}.{i}")

    try:
        write_atomically(path, write, before_rename=rotate)
    except BaseException as e:
        # torch.save reports a failed write only as "unexpected pos": the writer kept the OSError
        error = writer.error if writer is not None and writer.error is not None else e
        if isinstance(error, OSError):
            kept = "the previous checkpoint is kept" if os.path.exists(path) else "no checkpoint was written"
            raise CheckpointError(f"could not write {path} ({error.strerror or error}); {kept}") from None
        raise


def load_latest_checkpoint(
    path: str, keep: int = 1, map_location: str | torch.device = "cpu"
) -> tuple[Any, str | None]:
    """The newest readable of ``path``, ``path.1`` ... ``path.{keep-1}`` (and any older
    ``path.N`` still on disk) as (state, file), or (None, None) when there is none.
    An unreadable file is reported in one line and the previous one is tried; when
    every one of them is unreadable, a one-line CheckpointError names them all
    (starting from scratch over a run's checkpoints must be the user's decision)."""
    candidates, i = [path], 1
    while i < keep or os.path.exists(f"{path}.{i}"):
        candidates.append(f"{path}.{i}")
        i += 1
    unreadable = []
    for candidate in candidates:
        if not os.path.exists(candidate):
            continue
        try:
            state = load_checkpoint(candidate, map_location)
        except CheckpointError as e:
            unreadable.append((candidate, e))
            continue
        for _, e in unreadable:
            logger.warning(f"warning: {e}; falling back to the previous checkpoint")
        return state, candidate
    if unreadable:
        names = ", ".join(os.path.basename(c) for c, _ in unreadable)
        raise CheckpointError(
            f"no readable checkpoint in {os.path.dirname(os.path.abspath(path))}: "
            f"{names} {'is' if len(unreadable) == 1 else 'are all'} unreadable "
            f"({getattr(unreadable[0][1], 'reason', unreadable[0][1])}); move "
            f"{'it' if len(unreadable) == 1 else 'them'} away to start from scratch, "
            "or use a new --output_dir"
        ) from None
    return None, None


def load_from_path(output_dir: str, load_from: str | None, own_checkpoint: str) -> str | None:
    """iBOT's --load_from as a path: the checkpoint a run starts from while it has none of its
    own (``own_checkpoint``, in ``output_dir``). Relative paths are joined to ``output_dir``, as
    iBOT does. None when not given, or when it names ``own_checkpoint`` itself (iBOT's usual
    ``--load_from checkpoint.pth``: the run's own resume point)."""
    if not load_from:
        return None
    path = os.path.join(output_dir, load_from)
    return None if os.path.abspath(path) == os.path.abspath(own_checkpoint) else path


STALE_TEMPORARY = re.compile(r"^\.checkpoint(\d+)?\.pth\.tmp\d+$")  # save_checkpoint's temporary names


def remove_stale_temporaries(folder: str) -> list[str]:
    """Delete the temporary files that a checkpoint write killed before its rename left in
    ``folder`` (``.checkpoint.pth.tmp<pid>``, ``.checkpoint0010.pth.tmp<pid>``), logging each.
    Only call it while no writer of this run is alive (at start, on the main process).
    Returns the paths removed."""
    removed = []
    try:
        names = sorted(os.listdir(folder))
    except OSError:
        return removed
    for name in names:
        full = os.path.join(folder, name)
        if not STALE_TEMPORARY.match(name) or not os.path.isfile(full) or os.path.islink(full):
            continue
        try:
            size = os.path.getsize(full)
            os.remove(full)
        except FileNotFoundError:
            continue
        except OSError as e:
            logger.warning(f"warning: could not remove the stale temporary file {full} ({e.strerror or e})")
            continue
        logger.info(f"Removed {full} ({size} bytes), left by a checkpoint write that was interrupted.")
        removed.append(full)
    return removed


def ensure_writable_dir(path: str) -> None:
    """Create ``path`` if needed and check that files can be written there."""
    try:
        os.makedirs(path, exist_ok=True)
        # a unique name (O_EXCL): ranks on other nodes may share this folder and this pid
        fd, probe = tempfile.mkstemp(dir=path, prefix=".write_test")
        with os.fdopen(fd, "wb") as f:
            f.write(b"ok")
        os.remove(probe)
    except OSError as e:
        raise RunError(f"cannot write to output folder {path} ({e.strerror or e})") from None


def load_checkpoint(path: str, map_location: str | torch.device = "cpu") -> Any:
    """``torch.load(weights_only=True)`` with one-line errors for non-checkpoints."""
    try:
        with warnings.catch_warnings():  # torch's note on plain pickles: the error below says it in one line
            warnings.filterwarnings("ignore", message="Detected pickle protocol", category=UserWarning)
            return torch.load(path, map_location=map_location, weights_only=True)
    except FileNotFoundError:
        raise CheckpointError(f"{path}: no such file") from None
    except Exception as e:  # truncated zip, random bytes, pickled code: all unreadable
        lines = [line.strip() for line in str(e).splitlines() if line.strip()] or [type(e).__name__]
        reason = next((line for line in lines if "Unsupported global" in line), lines[0])
        if reason.startswith("Weights only load failed"):
            reason = "not a PyTorch checkpoint of tensors and plain data"
        start = _first_bytes(path)  # None for a folder or an unreadable file: torch's reason says it
        if start is not None and not start.startswith((b"PK\x03\x04", b"\x80")):  # not torch's zip, no pickle
            reason = "not a PyTorch checkpoint file"
        elif start is not None and start.startswith(b"PK") and "Unsupported global" not in reason:
            reason = f"truncated or damaged: {reason.split('. ')[0]}"
        error = CheckpointError(f"{path} is not a readable checkpoint ({reason[:200]})")
        error.reason = reason[:200]
        raise error from None


def _first_bytes(path: str, n: int = 4) -> bytes | None:
    try:
        with open(path, "rb") as f:
            return f.read(n)
    except OSError:
        return None


def restore_modules(checkpoint: Mapping[str, Any], **modules: Any) -> None:
    """Load each named module/optimizer state from ``checkpoint`` strictly."""
    for name, module in modules.items():
        if module is None or name not in checkpoint or checkpoint[name] is None:
            continue
        module.load_state_dict(checkpoint[name])


# ---------------------------------------------------------------- logging
def setup_logging(rank: int = 0) -> None:
    logging.basicConfig(
        level=logging.INFO if rank == 0 else logging.WARNING, format="%(message)s", stream=sys.stdout, force=True
    )
    # faiss reports, at INFO, each CPU-specific library it tries and fails to load before the one it uses
    logging.getLogger("faiss").setLevel(logging.WARNING)


class SmoothedValue:
    """Track a series of values; report the median over a window and the global average."""

    def __init__(self, window_size: int = 20, fmt: str = "{median:.4f} ({global_avg:.4f})") -> None:
        self.deque = deque(maxlen=window_size)
        self.total, self.count, self.fmt = 0.0, 0, fmt

    def update(self, value: float, n: int = 1) -> None:
        self.deque.append(value)
        self.count += n
        self.total += value * n

    @property
    def median(self) -> float:
        return float(np.median(self.deque)) if self.deque else 0.0

    @property
    def global_avg(self) -> float:
        return self.total / max(self.count, 1)

    @property
    def value(self) -> float:
        return self.deque[-1] if self.deque else 0.0

    def __str__(self) -> str:
        return self.fmt.format(median=self.median, global_avg=self.global_avg, value=self.value)


class MetricLogger:
    """Collect per-iteration metrics and print progress lines with ETA."""

    def __init__(self, delimiter: str = "  ") -> None:
        self.meters = defaultdict(SmoothedValue)
        self.delimiter = delimiter

    def update(self, **kwargs: float | torch.Tensor) -> None:
        for k, v in kwargs.items():
            self.meters[k].update(float(v.item() if torch.is_tensor(v) else v))

    def averages(self) -> dict[str, float]:
        return {k: m.global_avg for k, m in self.meters.items()}

    def log_every(
        self, iterable: Iterable[Any], print_freq: int, header: str = "", start: int = 0, total: int | None = None
    ) -> Iterator[Any]:
        """Yield from ``iterable``; every ``print_freq`` items (and at the end) log
        progress, ETA from the mean iteration time, and the meters."""
        total = total if total is not None else len(iterable)
        width = len(str(total))
        iter_time = SmoothedValue(fmt="{global_avg:.3f}")
        t0 = end = time.time()
        i = start
        for obj in iterable:
            yield obj
            iter_time.update(time.time() - end)
            end = time.time()
            i += 1
            if i % print_freq == 0 or i == total:
                eta = datetime.timedelta(seconds=int(iter_time.global_avg * (total - i)))
                meters = self.delimiter.join(f"{k}: {m}" for k, m in self.meters.items())
                logger.info(f"{header} [{i:{width}d}/{total}]  eta: {eta}  {meters}  time/it: {iter_time}s")
        elapsed = datetime.timedelta(seconds=int(time.time() - t0))
        logger.info(f"{header} done in {elapsed} ({(time.time() - t0) / max(i - start, 1):.3f} s/it)")


def append_json_line(path: str, record: Any) -> None:
    try:
        with open(path, "a") as f:
            f.write(json.dumps(record) + "\n")
    except OSError as e:
        raise RunError(f"could not append to {path} ({e.strerror or e})") from None


def write_json(path: str, record: Any) -> None:
    """Write ``record`` to ``path`` as indented JSON, atomically (``write_atomically``); a
    failed write (a full disk) is a one-line RunError and leaves no partial file."""
    try:
        write_atomically(path, lambda f: json.dump(record, f, indent=2), mode="w")
    except OSError as e:
        raise RunError(f"could not write {path} ({e.strerror or e})") from None


class TensorboardScalars:
    """Scalars into a TensorBoard event file in ``folder``, written by the calling thread
    and flushed at least every ``flush_secs``. A failed write (a full disk) is a one-line
    RunError at once: tensorboardX's SummaryWriter writes from a thread that dies on the
    error, after which its ``add_scalar`` blocks forever on a full queue.

    Example:
        >>> import tempfile
        >>> tb = TensorboardScalars(tempfile.mkdtemp())
        >>> tb.add_scalar("train/loss", 0.5, step=10); tb.close()
    """

    def __init__(self, folder: str, flush_secs: float = 60) -> None:
        from tensorboardX.event_file_writer import EventsWriter

        self.folder, self.flush_secs = folder, flush_secs
        self._writer = self._io(lambda: EventsWriter(os.path.join(folder, "events")))
        self._flushed = time.time()

    def add_scalar(self, tag: str, value: float, step: int) -> None:
        from tensorboardX.proto.event_pb2 import Event
        from tensorboardX.summary import scalar

        event = Event(wall_time=time.time(), step=int(step), summary=scalar(tag, float(value)))
        self._io(lambda: self._writer.write_event(event))
        if time.time() - self._flushed > self.flush_secs:
            self.flush()

    def flush(self) -> None:
        self._io(self._writer.flush)
        self._flushed = time.time()

    def close(self) -> None:
        self._io(self._writer.close)

    def _io(self, write: Callable[[], Any]) -> Any:
        try:
            return write()
        except OSError as e:
            raise RunError(f"could not write TensorBoard events in {self.folder} ({e.strerror or e})") from None


def bool_flag(s: str | bool) -> bool:
    """argparse type for True/False flags as the official scripts spell them."""
    if str(s).lower() in {"true", "1", "yes", "on"}:
        return True
    if str(s).lower() in {"false", "0", "no", "off"}:
        return False
    raise argparse.ArgumentTypeError(f"expected True or False, got {s!r}")


def require_low_first(args: argparse.Namespace, *flags: str) -> None:
    """A one-line RunError when a (MIN, MAX) flag such as ``--crop_scale`` was given high end first
    (each end's own range is checked by its ``number`` type)."""
    for flag in flags:
        low, high = getattr(args, flag)
        if low > high:
            raise RunError(f"--{flag} takes the low end first (MIN MAX), got {low:g} {high:g}")


def subset_size(text: str | int) -> int:
    """argparse type of the --subset flags: -1 (every image) or a count >= 1."""
    value = int(text)
    if value != -1 and value < 1:
        raise argparse.ArgumentTypeError(f"expected -1 (all) or an integer >= 1, got {text}")
    return value


# --seed's range: numpy seeds each process with --seed + rank, which must stay below 2**32
MAX_SEED = 2**31 - 1


def number(
    kind: type[int] | type[float],
    low: float | None = None,
    high: float | None = None,
    above: float | None = None,
    below: float | None = None,
) -> Callable[[str], int | float]:
    """argparse type: an ``int`` or ``float`` with ``low <= x <= high`` and ``above < x < below``
    (each bound optional), so that a value out of range is argparse's one-line usage error
    instead of a traceback from deep inside the run.

    Example:
        >>> number(int, low=1)("8"), number(float, low=0, high=1)("0.5")
        (8, 0.5)
        >>> number(int, low=1)("0")
        Traceback (most recent call last):
        argparse.ArgumentTypeError: expected an integer >= 1, got 0
    """
    show = str if kind is int else "{:g}".format
    bounds = [
        f">= {show(low)}" if low is not None else "",
        f"> {show(above)}" if above is not None else "",
        f"<= {show(high)}" if high is not None else "",
        f"< {show(below)}" if below is not None else "",
    ]
    what = f"expected {'an integer' if kind is int else 'a number'} {' and '.join(b for b in bounds if b)}"

    def parse(text: str) -> int | float:
        value = kind(text)  # a ValueError here is argparse's "invalid int/float value"
        if value in (math.inf, -math.inf):  # no flag means "unbounded" by inf; it overflows schedules
            raise argparse.ArgumentTypeError(f"{what.replace('a number', 'a finite number')}, got {text}")
        if (
            (low is not None and value < low)
            or (high is not None and value > high)
            or (above is not None and value <= above)
            or (below is not None and value >= below)
            or value != value
        ):  # NaN
            raise argparse.ArgumentTypeError(f"{what}, got {text}")
        return value

    parse.__name__ = kind.__name__
    return parse


def log_epoch(record: Mapping[str, Any], log_path: str, writer: TensorboardScalars) -> None:
    """Rank 0: one JSON line of ``record`` in ``log_path`` and its numbers as TensorBoard ``epoch/*`` scalars."""
    if not is_main_process():
        return
    append_json_line(log_path, record)
    for k, v in record.items():
        if k != "epoch" and isinstance(v, (int, float)):
            writer.add_scalar(f"epoch/{k}", v, record["epoch"])
    writer.flush()
