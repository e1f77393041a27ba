"""What every Solver shares: the training parts (optimizer, LR schedule, mixed precision, EMA, DDP wrapper and
their checkpointed states, utils.training.TrainingParts) and the methods train.py and test.py call that only
forward to them. A task's Solver (optimization/<model_name>_solver.py, class Solver) subclasses BaseSolver, builds
its model and loss and calls BaseSolver.__init__ with the model; it writes train, eval and visualize."""

import torch
from torch import nn

from utils.training import TrainingParts


class BaseSolver:
    """model: the task's network (moved to `device` here); args: the merged configuration dict; steps_per_epoch:
    optimizer steps per epoch (for the LR schedule; 0 in test.py: no schedule); world_size, rank: of
    torch.distributed."""

    app_modes = ()  # the --app_mode values whose batches the solver takes
    metric_names = ()  # scalar validation metrics, logged per epoch; the first selects best.pt
    lower_is_better = ()  # those of metric_names that are better when lower (an error, a loss); the rest: higher
    config_rules = {}  # checked before work starts, see helper.check_config

    def __init__(self, model: nn.Module, args: dict, device: torch.device, steps_per_epoch: int,
                 world_size: int = 1, rank: int = 0):
        self.args, self.device, self.rank = args, device, rank
        self.parts = TrainingParts(model.to(device), args, device, steps_per_epoch, world_size)
        self.model = self.parts.model  # the bare module (parts.trained_model: its DDP wrapper under --ddp 1)

    def mode_selection(self, is_train: bool) -> None:
        self.model.train(is_train)

    def improves(self, score: float, best: float) -> bool:
        """Whether `score` of metric_names[0] is better than `best` (train.py's best.pt)."""
        return score < best if self.metric_names[0] in self.lower_is_better else score > best

    def worst_score(self) -> float:
        """The best score before any evaluation: every score improves on it."""
        return float("inf") if self.metric_names[0] in self.lower_is_better else float("-inf")

    def read_nonfinite(self) -> None:
        self.parts.read_nonfinite()

    def learning_rate_step(self) -> None:
        self.parts.learning_rate_step()

    def learning_rate(self) -> float:
        return self.parts.learning_rate()

    def state_dict(self) -> dict:
        return self.parts.state_dict()

    def load_weights(self, state: dict) -> None:
        self.parts.load_weights(state)

    def load_state_dict(self, state: dict, schedule_step: int) -> str:
        return self.parts.load_state_dict(state, schedule_step)
