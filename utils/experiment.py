"""The experiment around a training run: its folder, device, logging, evaluation files and stop signals."""

import logging
import os
import re
import signal
import socket
import sys
from contextlib import contextmanager

import torch

from utils.errors import UserError
from utils.io import TEMPORARY_PREFIX, atomic_write_json, lock_file, remove_stale_temporaries

logger = logging.getLogger(__name__)


def experiment_path(args: dict, project_root) -> str:
    """--save_dir, or saved_models/<dataset_type>_<model_name>_model<exp_id> in the project, as an absolute path."""
    return os.path.abspath(args["save_dir"] or os.path.join(
        project_root, "saved_models", f"{args['dataset_type']}_{args['model_name']}_model{args['exp_id']}"))


def checkpoint_names(folder: str) -> list:
    """The checkpoint files in `folder`: its *.pt files but the temporary ones of writes that were interrupted."""
    return sorted(name for name in os.listdir(folder) if name.endswith(".pt") and not name.startswith(TEMPORARY_PREFIX))


def holder_of(folder: str) -> str | None:
    """The run that holds the experiment folder (its description, "the run of process P on H"), or None: probes its
    lock without keeping it, so that a second run says so before it reads or refuses anything there. Not for the
    process that holds it (a POSIX lock is the process's: closing this descriptor would release it)."""
    path = os.path.join(folder, LOCK_NAME)
    try:
        fd = os.open(path, os.O_RDWR)
    except OSError:  # no lock file: no run has held the folder
        return None
    try:
        if lock_file(fd, path, wait=False, remedy=LOCK_REMEDY):
            return None
        with open(path) as f:
            return f.read().strip() or "another run"
    finally:
        os.close(fd)


LOCK_NAME = ".lock"  # in an experiment folder: held by the run that writes there
LOCK_REMEDY = "choose a --save_dir on a local disk"


def in_use(folder: str, holder: str) -> UserError:
    return UserError(f"experiment folder {folder} is in use by {holder}: wait for that run to end, or train into "
                     f"another --exp_id (or --save_dir)")


@contextmanager
def experiment_folder(args: dict, project_root, fresh: bool, hold: bool):
    """The experiment folder (experiment_path), created if missing, for the block. A fresh run refuses a folder that
    holds checkpoints, so that nothing there is overwritten. With `hold` (the process that writes, rank 0), the
    folder is this run's for the block: another run in it is one line naming this one's process and host (a lock
    in <folder>/.lock that dies with the process, utils.io.lock_file), and the temporary files of writes that were
    interrupted are removed."""
    folder = experiment_path(args, project_root)
    if fresh and os.path.isdir(folder) and checkpoint_names(folder):
        raise UserError(f"experiment folder {folder} already holds checkpoints: resume it with --load_pretrained 1, "
                        f"or start a new one with another --exp_id (or --save_dir)")
    try:
        os.makedirs(folder, exist_ok=True)
    except OSError as error:
        raise UserError(f"cannot create the experiment folder {folder} ({error.strerror}): choose a writable "
                        f"--save_dir") from None
    if not os.access(folder, os.W_OK):
        raise UserError(f"experiment folder {folder} is not writable: choose another --save_dir or fix its "
                        f"permissions")
    if not hold:
        yield folder
        return
    path = os.path.join(folder, LOCK_NAME)
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        if not lock_file(fd, path, wait=False, remedy=LOCK_REMEDY):  # taken since holder_of looked
            with open(path) as f:
                raise in_use(folder, f.read().strip() or "another run")
        os.ftruncate(fd, 0)
        os.write(fd, f"the run of process {os.getpid()} on {socket.gethostname()}".encode())
        remove_stale_temporaries(folder)
        yield folder
    finally:
        os.close(fd)  # releases the lock


# The project's loggers: one per top-level module or package (each file logs to logging.getLogger(__name__)).
PROJECT_LOGGERS = ("train", "test", "predict", "export", "helper", "dataset", "models", "optimization", "utils",
                   "bench")


def setup_logging(log_path: str | None, main_process: bool = True) -> None:
    """Log INFO and above of the project's loggers to the console and, if given, to `log_path` (appended); only
    the main process logs below ERROR. The root logger, and so the logging of a program that imports DSTorch or
    of the libraries (faster-coco-eval logs its tables at INFO), is left alone; records still propagate to it, for
    a program that collects them there."""
    handlers = [logging.StreamHandler(sys.stdout)]
    if log_path is not None:
        handlers.append(logging.FileHandler(log_path))
    formatter = logging.Formatter("%(asctime)s %(message)s", datefmt="%H:%M:%S")
    for handler in handlers:
        handler.setFormatter(formatter)
    for name in PROJECT_LOGGERS:
        project_logger = logging.getLogger(name)
        for old in project_logger.handlers[:]:  # from an earlier run in this process (tests call main() often)
            project_logger.removeHandler(old)
            old.close()
        for handler in handlers:
            project_logger.addHandler(handler)
        project_logger.setLevel(logging.INFO if main_process else logging.ERROR)


def select_device(gpu_num: int) -> torch.device:
    """CUDA device `gpu_num`, set up for training speed (cuDNN's autotuner for fixed input shapes, TF32 matrix
    products), or the CPU, with a warning that says why CUDA is unusable and what to do."""
    if not torch.cuda.is_available():
        logger.warning("running on the CPU (--gpu_num %d ignored): %s", gpu_num, why_no_cuda())
        return torch.device("cpu")
    if gpu_num >= torch.cuda.device_count():
        raise UserError(f"--gpu_num {gpu_num}: this machine has {torch.cuda.device_count()} GPU(s), numbered from 0")
    torch.cuda.set_device(gpu_num)
    torch.backends.cudnn.benchmark = True
    torch.backends.cuda.matmul.allow_tf32 = True
    torch.backends.cudnn.allow_tf32 = True
    return torch.device("cuda", gpu_num)


def why_no_cuda() -> str:
    """Why torch.cuda.is_available() is False, and what fixes it."""
    if torch.version.cuda is None:
        return (f"this torch ({torch.__version__}) is a CPU build; for a GPU, install a CUDA build of torch "
                f"(pip install torch --index-url https://download.pytorch.org/whl/cu<version>)")
    try:
        torch.cuda.init()
    except (RuntimeError, AssertionError) as error:  # e.g. the driver is older than this build's CUDA
        reason = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        return (f"torch {torch.__version__} is built for CUDA {torch.version.cuda} but cannot use it ({reason}); "
                f"update the NVIDIA driver or install a torch built for the CUDA the driver supports (nvidia-smi "
                f"shows it)")
    return (f"torch {torch.__version__} is built for CUDA {torch.version.cuda} but sees no GPU (check "
            f"CUDA_VISIBLE_DEVICES and nvidia-smi)")


def write_evaluation(folder: str, metrics: dict, outputs: dict) -> None:
    """metrics.json and the solver's other files of one evaluation (outputs: {file name: JSON value, or a function
    that returns it}), atomically; metrics.json last, so that its presence means the evaluation's files are
    complete."""
    os.makedirs(folder, exist_ok=True)
    for name, value in outputs.items():
        atomic_write_json(os.path.join(folder, name), value() if callable(value) else value)
    atomic_write_json(os.path.join(folder, "metrics.json"), metrics)


def numbered_checkpoints(folder: str) -> list:
    """(epoch, file name) of the epoch_<k>.pt files in `folder`, oldest first."""
    found = [(int(m.group(1)), name) for name in os.listdir(folder) if (m := re.fullmatch(r"epoch_(\d+)\.pt", name))]
    return sorted(found)


def prune_checkpoints(folder: str, keep: int) -> None:
    """Delete the numbered checkpoints beyond the `keep` written last. By write time, not by epoch: a run resumed
    from an older epoch writes epoch_<k>.pt files that are newer than higher-numbered ones of the run it branched
    from, and keeps them."""
    written = sorted(numbered_checkpoints(folder), key=lambda found: os.path.getmtime(os.path.join(folder, found[1])))
    for _, name in written[:-keep]:
        os.remove(os.path.join(folder, name))


class StopRequest:
    """While active (a `with` block), SIGINT (Ctrl-C) and SIGTERM set `requested` instead of killing the process,
    so that the training loop can finish its step and save; a second Ctrl-C aborts at once."""

    SIGNALS = (signal.SIGINT, signal.SIGTERM)

    def __init__(self):
        self.requested, self.signal_number, self.signal_name = False, 0, ""
        self.previous = {}

    def __enter__(self) -> "StopRequest":
        self.previous = {number: signal.signal(number, self.handle) for number in self.SIGNALS}
        return self

    def __exit__(self, *exc_info) -> None:
        for number, handler in self.previous.items():
            signal.signal(number, handler)

    def handle(self, number, frame) -> None:
        if self.requested and number == signal.SIGINT:
            raise KeyboardInterrupt
        self.requested, self.signal_number, self.signal_name = True, number, signal.Signals(number).name
        logger.warning("%s received: stopping after this step (Ctrl-C again aborts without saving)", self.signal_name)
