"""Draw git_images/fig1.png, the architecture figure of the README, from the code itself (flags, config files,
helper functions, loader modules and the Solver's methods), so that it stays true to the code.

    python git_images/make_fig1.py
"""

import inspect
import json
import sys
from pathlib import Path

from matplotlib.figure import Figure
from matplotlib.patches import FancyBboxPatch

PROJECT_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(PROJECT_ROOT))

import helper  # noqa: E402
from argumentparser import build_parser  # noqa: E402
from optimization.base import BaseSolver  # noqa: E402
from optimization.Yolo_solver import Solver  # noqa: E402


def facts() -> dict:
    """What the figure shows, read from the code and the config files."""
    flags = [a.option_strings[0] for a in build_parser()._actions if a.option_strings and a.dest != "help"]
    config_files = sorted(p.name for p in (PROJECT_ROOT / "config").glob("*.json"))
    loaders = json.loads((PROJECT_ROOT / "config" / "config.json").read_text())["loaders"]
    loader_modules = sorted({module for per_mode in loaders.values() for module in per_mode.values()})
    own = [name for name, value in vars(Solver).items() if inspect.isfunction(value) and not name.startswith("_")]
    inherited = ["step", "autocast", "evaluated_model", "mode_selection", "learning_rate_step", "state_dict"]
    missing = [name for name in inherited if not inspect.isfunction(vars(BaseSolver).get(name))]
    if missing:
        raise SystemExit(f"make_fig1.py: BaseSolver has no {', '.join(missing)}: update the figure's list")
    solver_methods = ["app_modes", "metric_names"] + [f"{name}()" for name in own]
    return {"flags": flags, "config_files": config_files, "loader_modules": loader_modules,
            "helper_functions": [n for n in ("load_datasetloader", "load_solver") if hasattr(helper, n)],
            "solvers": [f"optimization/{name}_solver.py" for name in helper.available_solvers()],
            "solver_methods": solver_methods, "base_methods": inherited,
            "dataset_common": sorted({module.rsplit(".", 1)[0] + ".common" for module in loader_modules})}


def draw(path: Path) -> None:
    found = facts()
    figure = Figure(figsize=(7.6, 9.0), dpi=110)
    axis = figure.add_axes([0, 0, 1, 1])
    axis.set_xlim(0, 10)
    axis.set_ylim(0, 12.4)
    axis.axis("off")

    def box(x, y, w, h, title, lines, color="#dbe9f6"):
        axis.add_patch(FancyBboxPatch((x, y), w, h, boxstyle="round,pad=0.08", fc=color, ec="#2f4f6f", lw=1.4))
        axis.text(x + w / 2, y + h - 0.3, title, ha="center", va="top", fontsize=10.5, weight="bold",
                  family="monospace")
        for i, line in enumerate(lines):
            axis.text(x + w / 2, y + h - 0.75 - 0.33 * i, line, ha="center", va="top", fontsize=8, family="monospace")

    def arrow(x0, y0, x1, y1):
        axis.annotate("", xy=(x1, y1), xytext=(x0, y0), arrowprops={"arrowstyle": "-|>", "lw": 1.4, "color": "#2f4f6f"})

    box(0.3, 10.4, 4.2, 1.7, "argumentparser.py",
        [f"{len(found['flags'])} flags, e.g.", " ".join(found["flags"][:3]), "--cfg KEY=VALUE overrides"], "#fdf1d6")
    box(5.5, 10.4, 4.2, 1.7, "config/", [" ".join(found["config_files"][:2]), " ".join(found["config_files"][2:])],
        "#fdf1d6")
    box(2.4, 8.1, 5.2, 1.6, "train.py / test.py / predict.py / export.py",
        ["merge flags over JSON: one dict", "epoch loop, resume, evaluation, predict, export"],
        "#e3f2e1")
    arrow(2.4, 10.4, 4.0, 9.7)
    arrow(7.6, 10.4, 6.0, 9.7)
    box(0.3, 5.5, 4.2, 1.8, "helper.py", [f"{name}()" for name in found["helper_functions"]], "#e3f2e1")
    arrow(4.0, 8.1, 2.6, 7.3)
    packages = sorted({module.split(".")[1] for module in found["loader_modules"]})
    loader_lines = [f"{package}/" for package in packages] + [
        f"  {module.split('.')[-1]}.py" for module in found["loader_modules"]]
    common = [f"  {module.split('.')[-1]}.py: shared" for module in found["dataset_common"]
              if (PROJECT_ROOT / Path(*module.split("."))).with_suffix(".py").is_file()]
    box(0.3, 1.0, 4.2, 3.7, "(1) dataset/", loader_lines + common + ["DatasetLoader", "collate_fn"])
    base = found["base_methods"]
    methods = found["solver_methods"]
    solver_lines = found["solvers"] + ["class Solver(BaseSolver):"] + [
        "  " + ", ".join(methods[i:i + 3]) for i in range(0, len(methods), 3)] + [
        "base.py, BaseSolver:"] + [", ".join(f"{name}()" for name in base[i:i + 2]) for i in range(0, len(base), 2)]
    box(5.5, 1.9, 4.2, 5.4, "(2) optimization/", solver_lines)
    box(5.5, 0.2, 4.2, 1.3, "(3) models/ + utils/", ["models and losses; utils: config,", "checkpoints, DDP, metrics"])
    arrow(1.6, 5.5, 1.6, 4.7)
    arrow(4.5, 6.4, 5.5, 6.4)
    arrow(7.6, 1.9, 7.6, 1.5)
    arrow(4.5, 2.9, 5.5, 3.6)
    axis.text(4.95, 3.0, "batches", fontsize=8, rotation=30, ha="center")
    figure.savefig(path, facecolor="white")


if __name__ == "__main__":
    draw(PROJECT_ROOT / "git_images" / "fig1.png")
