"""The time of the README's test command on a fresh clone of the project, the project's caches cold (no embedded
dataset, no label cache, no __pycache__; the machine's page cache and pip's as they are): `git clone` of the
project, --revision checked out (committed files only), then the command as .ci/run takes it from the clone's
README.md (its first line that starts with `pip install -r requirements-dev.txt && python -m pytest`), with
`--durations=25` and --pytest_args appended, in bash, with `python` and `pip` those of this interpreter.

    python -m bench.suite [--revision HEAD] [--results_dir bench/results] [--pytest_args ARGS ...]

Prints the command, its wall time (pip's check included), pytest's summary line and the 25 slowest durations; the
command's own output goes to stderr as it runs.
"""

import argparse
import os
import re
import shlex
import subprocess
import sys
import tempfile
import time

from bench.results import PROJECT_ROOT, add_results_dir, recorded

README_TEST_COMMAND = re.compile(r"^pip install -r requirements-dev.txt && python -m pytest")
SUMMARY = re.compile(r"^=+ (.+ in [\d.]+s.*?) =+$")  # "==== 251 passed, 2 warnings in 190.21s (0:03:10) ===="
DURATION = re.compile(r"^\d+\.\d+s (setup|call|teardown) ")  # "10.30s call     tests/test_bench.py::test_..."


def clone(revision: str, folder: str) -> str:
    """Clone the project into `folder` with `revision` checked out; returns its full hash."""
    commit = subprocess.run(["git", "rev-parse", "--verify", f"{revision}^{{commit}}"], cwd=PROJECT_ROOT,
                            capture_output=True, text=True)
    if commit.returncode != 0:
        raise SystemExit(f"bench.suite: --revision {revision}: not a commit of {PROJECT_ROOT}")
    subprocess.run(["git", "clone", "-q", str(PROJECT_ROOT), folder], check=True)
    subprocess.run(["git", "checkout", "-q", "--detach", commit.stdout.strip()], cwd=folder, check=True)
    return commit.stdout.strip()


def readme_test_command(folder: str) -> str:
    """The first line of folder/README.md that .ci/run runs as the test command."""
    with open(os.path.join(folder, "README.md")) as f:
        for line in f:
            if README_TEST_COMMAND.match(line):
                return line.strip()
    raise SystemExit(f"bench.suite: README.md has no line matching {README_TEST_COMMAND.pattern}")


def run_suite(options, folder: str) -> None:
    """Clone, run the test command with its output streamed to stderr, then print the time, summary and
    durations."""
    commit = clone(options.revision, folder)
    command = " ".join([readme_test_command(folder), "--durations=25", *map(shlex.quote, options.pytest_args)])
    # the clone's own modules, not those of a PYTHONPATH; python and pip of the interpreter running the benchmark
    env = {key: value for key, value in os.environ.items() if key != "PYTHONPATH"}
    env["PATH"] = os.pathsep.join([os.path.dirname(sys.executable), env.get("PATH", "")])
    start, lines = time.perf_counter(), []
    with subprocess.Popen(["bash", "-c", command], cwd=folder, env=env, stdout=subprocess.PIPE,
                          stderr=subprocess.STDOUT, text=True) as process:
        for line in process.stdout:
            sys.stderr.write(line)
            lines.append(line.rstrip("\n"))
    seconds = time.perf_counter() - start
    summaries = [match.group(1) for match in map(SUMMARY.match, lines) if match]
    if process.returncode != 0:
        raise SystemExit(f"bench.suite: the test command failed (exit code {process.returncode}): "
                         f"{summaries[-1] if summaries else 'no pytest summary'}")
    print(f"fresh clone of {commit[:7]} (committed files only)")
    print(f"command: {command}")
    print(f"wall time: {int(seconds // 60)}:{seconds % 60:04.1f} (min:s)")
    print(f"pytest: {summaries[-1] if summaries else 'no summary line'}")
    print("slowest durations:")
    for line in lines:
        if DURATION.match(line):
            print(f"  {line}")


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--revision", default="HEAD", help="the commit to clone and test")
    add_results_dir(parser)
    parser.add_argument("--pytest_args", nargs=argparse.REMAINDER, default=[],
                        help="more pytest arguments, e.g. a test selection: tests/test_coco_eval.py -k pycocotools")
    options = parser.parse_args(argv)
    with recorded("suite", argv, options.results_dir), tempfile.TemporaryDirectory() as tmp:
        run_suite(options, os.path.join(tmp, "clone"))


if __name__ == "__main__":
    main()
