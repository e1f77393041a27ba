"""train.py, except that (environment variables) the process of rank SIGNAL_RANK sends itself the signal SIGNAL_NAME
(e.g. KILL, TERM) at its n-th training step, n the entry of SIGNAL_STEPS (comma-separated) for torchrun's attempt
(the first, then each restart; no signal past the list), before that step runs if SIGNAL_BEFORE_STEP=1: the
failing or signalled worker of tests/test_distributed.py; and with SLOW_LABELS_S, the label cache takes that many
seconds longer per scene to build."""

import os
import signal
import sys
import time

import helper
import train
from dataset.NuscenesDataset import labels
from tests.signal_at_step import load_solver_that_signals

if "SLOW_LABELS_S" in os.environ:
    real_scene_labels = labels.scene_labels

    def slow_scene_labels(*args):
        time.sleep(float(os.environ["SLOW_LABELS_S"]))
        return real_scene_labels(*args)

    labels.scene_labels = slow_scene_labels

attempt = int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0"))
signal_steps = [int(step) for step in os.environ.get("SIGNAL_STEPS", "").split(",") if step]
if os.environ.get("SIGNAL_RANK") == os.environ.get("RANK") and attempt < len(signal_steps):
    helper.load_solver = load_solver_that_signals(helper.load_solver, signal_steps[attempt],
                                                  signal.Signals[f"SIG{os.environ['SIGNAL_NAME']}"],
                                                  before_step=os.environ.get("SIGNAL_BEFORE_STEP") == "1")

if __name__ == "__main__":
    train.main(sys.argv[1:])
