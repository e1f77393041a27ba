"""How tests stop or kill a run at a chosen training step: the Solver's step sends a signal to its own process."""

import os


def load_solver_that_signals(load_solver, step: int, signal_number: int, before_step: bool = False):
    """A replacement for helper.load_solver: the Solvers it builds send `signal_number` to their own process at the
    `step`-th call of train() (1-based, counted over the process's life), before that step runs if `before_step`
    (a worker that dies mid-step), after it otherwise."""

    def load(*args, **kwargs):
        solver = load_solver(*args, **kwargs)
        train_step, calls = solver.train, {"n": 0}

        def train_and_signal(batch):
            calls["n"] += 1
            if before_step and calls["n"] == step:
                os.kill(os.getpid(), signal_number)
            losses = train_step(batch)
            if not before_step and calls["n"] == step:
                os.kill(os.getpid(), signal_number)
            return losses

        solver.train = train_and_signal
        return solver

    return load
