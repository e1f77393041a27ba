"""train.py, except that on torchrun's first attempt the process of rank SIGNAL_RANK sends itself the signal
SIGNAL_NAME (e.g. KILL, TERM) at its SIGNAL_STEP-th training step, before that step runs if SIGNAL_BEFORE_STEP=1
(environment variables): the failing or signalled worker of tests/test_distributed.py."""

import os
import signal
import sys

import helper
import train
from tests.signal_at_step import load_solver_that_signals

if os.environ["SIGNAL_RANK"] == os.environ.get("RANK") and os.environ.get("TORCHELASTIC_RESTART_COUNT") == "0":
    helper.load_solver = load_solver_that_signals(helper.load_solver, int(os.environ["SIGNAL_STEP"]),
                                                  signal.Signals[f"SIG{os.environ['SIGNAL_NAME']}"],
                                                  before_step=os.environ.get("SIGNAL_BEFORE_STEP") == "1")

if __name__ == "__main__":
    train.main(sys.argv[1:])
