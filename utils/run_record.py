"""What a training run records for people to read, written by its main process: TensorBoard scalars (per logging
step and per epoch) and the run's configuration and hyperparameters, results.csv (a row per epoch) and curves.png.
results.csv and curves.png are derived from the checkpointed history, so a resumed run rewrites them whole; in
TensorBoard, a resumed run purges the events after its checkpoint's step (flushed at every checkpoint): no row or
point lost or doubled."""

import json
import os

from torch.utils.tensorboard import SummaryWriter

from utils.io import write_csv
from utils.plots import plot_curves


class TrainingRecord:
    """exp_dir: the experiment folder; metric_names: the solver's validation metrics (the others of a history row
    are training values: epoch, lr, samples, loss terms, time_s, img_per_s); args: the run's configuration;
    resumed_step: the global step of the checkpoint a resumed run starts from (None: a fresh run)."""

    def __init__(self, exp_dir: str, metric_names: tuple, args: dict, resumed_step: int | None = None):
        self.exp_dir, self.metric_names = exp_dir, metric_names
        # purge_step: TensorBoard drops the events of the interrupted run after the checkpoint (steps, and epochs
        # logged at step = epoch, which are never ahead of the step)
        self.writer = SummaryWriter(os.path.join(exp_dir, "tensorboard"),
                                    purge_step=None if resumed_step is None else resumed_step + 1)
        # TensorBoard renders text as markdown: four leading spaces make the JSON a code block
        self.writer.add_text("config", "\n".join("    " + line for line in json.dumps(args, indent=2).splitlines()),
                             global_step=resumed_step or 0)

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
        self.writer.flush()

    def __enter__(self) -> "TrainingRecord":
        return self

    def __exit__(self, *exception) -> None:
        """However the run ends (a stop by signal, an error), the event file and its writer thread are closed."""
        self.writer.close()

    def flush(self) -> None:
        """Write the events so far (train.py calls it with every checkpoint, which a resume then purges after)."""
        self.writer.flush()

    def close(self, hyperparameters: dict, best_score: float) -> None:
        """The run's flags beside its best validation score, in TensorBoard's HPARAMS tab (add_hparams takes
        numbers and strings: a list, such as the --cfg overrides, as its text)."""
        values = {key: value if isinstance(value, (int, float, str)) else str(value)
                  for key, value in hyperparameters.items()}
        self.writer.add_hparams(values, {f"hparam/best_{self.metric_names[0]}": best_score}, run_name="hparams")
        self.writer.close()
