"""What a training run records for people to read, written by its main process: TensorBoard scalars (per logging
step and per epoch) and the run's configuration and hyperparameters, results.csv (a row per epoch) and curves.png.
Each file is derived from the checkpointed history, so a resumed run rewrites them whole: no row lost or doubled."""

import csv
import json
import os

from torch.utils.tensorboard import SummaryWriter

from utils.io import atomic_write
from utils.plots import plot_curves


def write_csv(path: str, rows: list) -> None:
    """Write dict rows as CSV atomically; the columns are every key of the rows, in the order they first appear
    (a row without a key leaves its cell empty, as does None)."""
    columns = list(dict.fromkeys(key for row in rows for key in row))

    def write(tmp_path: str) -> None:
        with open(tmp_path, "w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=columns)
            writer.writeheader()
            writer.writerows(rows)

    atomic_write(path, write)


class TrainingRecord:
    """exp_dir: the experiment folder; metric_names: the solver's validation metrics (the others of a history row
    are training values: epoch, lr, samples, loss terms, time_s, img_per_s); args: the run's configuration."""

    def __init__(self, exp_dir: str, metric_names: tuple, args: dict):
        self.exp_dir, self.metric_names = exp_dir, metric_names
        self.writer = SummaryWriter(os.path.join(exp_dir, "tensorboard"))
        # TensorBoard renders text as markdown: four leading spaces make the JSON a code block
        self.writer.add_text("config", "\n".join("    " + line for line in json.dumps(args, indent=2).splitlines()))

    def steps(self, global_step: int, loss_means: dict, learning_rate: float) -> None:
        """The loss terms averaged over the steps since the last logging step, and the learning rate."""
        for key, value in loss_means.items():
            self.writer.add_scalar(f"train_step/{key}", value, global_step)
        self.writer.add_scalar("train_step/lr", learning_rate, global_step)

    def epoch(self, history: list) -> None:
        """history: one dict per epoch (train.py's Progress.history); the last one is new."""
        row = history[-1]
        for key, value in row.items():
            if key not in ("epoch", "samples") and value is not None:
                self.writer.add_scalar(f"{'val' if key in self.metric_names else 'train'}/{key}", value, row["epoch"])
        write_csv(os.path.join(self.exp_dir, "results.csv"), history)
        plot_curves(history, self.metric_names, os.path.join(self.exp_dir, "curves.png"))

    def close(self, hyperparameters: dict, best_score: float) -> None:
        """The run's flags beside its best validation score, in TensorBoard's HPARAMS tab (numbers and strings
        only, as add_hparams takes them)."""
        kept = {key: value for key, value in hyperparameters.items() if isinstance(value, (int, float, str))}
        self.writer.add_hparams(kept, {f"hparam/best_{self.metric_names[0]}": best_score}, run_name="hparams")
        self.writer.close()
