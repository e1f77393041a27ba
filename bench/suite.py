"""The time of the README's test command on a fresh clone of the project, the project's caches cold (no embedded
dataset, no label cache, no __pycache__; the machine's page cache and pip's as they are): `git clone` of the
project, a revision checked out (committed files only), then the command as .ci/run takes it from the clone's
README.md (its first line that starts with `pip install -r requirements-dev.txt && python -m pytest`), with
`--durations=25` and --pytest_args appended, in bash, with `python` and `pip` those of this interpreter.

    python -m bench.suite [--revisions HEAD[,REV...]] [--repeats 1] [--results_dir bench/results]
                          [--pytest_args ARGS ...]

Several revisions (e.g. a change and the commit before it) run interleaved, each repeat in turn, so that a drift of
the machine's speed hits them alike. Prints per run its wall time (pip's check included) and pytest's summary line,
then each revision's slowest durations of its last run; the command's own output goes to stderr as it runs.
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


def run_suite(revision: str, pytest_args: list, folder: str) -> dict:
    """Clone `revision` into `folder` and run the test command there, its output streamed to stderr. Returns the
    commit, command, seconds, pytest's summary line and the durations lines."""
    commit = clone(revision, folder)
    command = " ".join([readme_test_command(folder), "--durations=25", *map(shlex.quote, pytest_args)])
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
        raise SystemExit(f"bench.suite: the test command of {revision} failed (exit code {process.returncode}): "
                         f"{summaries[-1] if summaries else 'no pytest summary'}")
    return {"commit": commit[:7], "command": command, "seconds": seconds,
            "summary": summaries[-1] if summaries else "no summary line",
            "durations": [line for line in lines if DURATION.match(line)]}


def minutes(seconds: float) -> str:
    return f"{int(seconds // 60)}:{seconds % 60:04.1f}"


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--revisions", default="HEAD", help="commits to clone and test, comma-separated, in turn")
    parser.add_argument("--repeats", type=int, default=1, help="runs of each revision")
    add_results_dir(parser)
    parser.add_argument("--pytest_args", nargs=argparse.REMAINDER, default=[],
                        help="more pytest arguments, e.g. a test selection: tests/test_coco_eval.py -k pycocotools")
    options = parser.parse_args(argv)
    revisions = [revision for revision in options.revisions.split(",") if revision]
    if not revisions or options.repeats < 1:
        parser.error("give at least one revision and a positive --repeats")
    with recorded("suite", argv, options.results_dir):
        runs = []
        for repeat in range(options.repeats):
            for revision in revisions:
                with tempfile.TemporaryDirectory() as tmp:
                    runs.append({"revision": revision, "repeat": repeat + 1,
                                 **run_suite(revision, options.pytest_args, os.path.join(tmp, "clone"))})
        print(f"fresh clones (committed files only), run in turn; command: {runs[0]['command']}")
        print(f"{'revision':<12}{'commit':<9}{'run':>4}{'wall (min:s)':>14}  pytest")
        for run in runs:
            print(f"{run['revision']:<12}{run['commit']:<9}{run['repeat']:>4}{minutes(run['seconds']):>14}  "
                  f"{run['summary']}")
        for revision in revisions:
            last = [run for run in runs if run["revision"] == revision][-1]
            print(f"slowest durations of {revision} ({last['commit']}), run {last['repeat']}:")
            for line in last["durations"]:
                print(f"  {line}")


if __name__ == "__main__":
    main()
