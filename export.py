"""Export a trained model for deployment:

    python export.py --exp_id N --format onnx [--model_num K] [--dynamic_batch 1]

Writes <experiment>/export/<checkpoint name>.onnx (default checkpoint: best.pt) with the EMA weights, through
torch.export (torch.onnx.export(dynamo=True)). Its input "images" is (I, 3, H, W) uint8 RGB at the model's input
size (data.json "image"; the normalization is inside); I is the number of cameras of the configuration, or any
number with --dynamic_batch 1. Its outputs are the solver's (Yolo: "boxes" (I, P, 4) x1 y1 x2 y2 in input px and
"scores" (I, P, C), before the score threshold and NMS: see the docstring of Yolo_solver.Solver.export_module for
the post-processing, which the file's metadata states with the class names). Then, when onnxruntime is installed,
the file is run on the CPU against the PyTorch model on the same images: their largest differences (a parity check
that fails beyond the solver's tolerance) and both latencies are logged.

Configuration as in test.py: the checkpoint's own, then the flags and --cfg given here."""

import json
import logging
import os
import statistics
import sys
import time
from pathlib import Path

import torch

import helper
from argumentparser import build_checkpoint_parser, flag, non_negative_int
from utils.errors import UserError, exit_on_user_error
from utils.experiment import setup_logging
from utils.io import atomic_write

LATENCY_REPEATS = 20  # timed runs of each model after 3 warm-up runs; the median is logged
logger = logging.getLogger("export")


def build_export_parser():
    parser = build_checkpoint_parser("Export a trained model (DSTorch).")
    parser.add_argument("--format", choices=("onnx",), default="onnx", help="file format")
    parser.add_argument("--model_num", type=non_negative_int, default=None,
                        help="export epoch_<model_num>.pt (default: best.pt)")
    parser.add_argument("--dynamic_batch", type=flag, default=0,
                        help="1: any number of images per call (default: the configuration's cameras)")
    return parser


def export_onnx(module: torch.nn.Module, images: torch.Tensor, output_names: list, metadata: dict,
                dynamic_batch: bool, path: str) -> None:
    """Export `module` (images -> a tuple of output tensors) to ONNX at `path`, with `metadata` as the file's
    metadata_props (JSON values)."""
    try:
        import onnxscript  # noqa: F401  (torch.onnx's dynamo exporter needs it; imported here for a clear error)
    except ImportError:
        raise UserError("export to ONNX needs the onnx and onnxscript packages: pip install -r "
                        "requirements-dev.txt") from None
    dynamic_shapes = {"images": {0: torch.export.Dim("images", min=1, max=4096)}} if dynamic_batch else None
    program = torch.onnx.export(module, (images,), input_names=["images"], output_names=output_names,
                                dynamic_shapes=dynamic_shapes, dynamo=True, verbose=False)
    proto = program.model_proto
    for key, value in metadata.items():
        entry = proto.metadata_props.add()
        entry.key, entry.value = key, json.dumps(value)
    Path(path).write_bytes(proto.SerializeToString())


def median_latency_ms(run, images) -> float:
    for _ in range(3):
        run(images)
    times = []
    for _ in range(LATENCY_REPEATS):
        start = time.perf_counter()
        run(images)
        times.append(time.perf_counter() - start)
    return 1000 * statistics.median(times)


def check_with_onnxruntime(path: str, module: torch.nn.Module, images: torch.Tensor, output_names: list,
                           tolerances: dict) -> None:
    """Run the exported file with ONNX Runtime on the CPU and the PyTorch module on the same images: log the
    largest absolute difference of each output and both latencies; fail when a difference exceeds its tolerance."""
    try:
        import onnxruntime
    except ImportError:
        logger.warning("onnxruntime is not installed: the exported file was not checked (pip install -r "
                       "requirements-dev.txt)")
        return
    session = onnxruntime.InferenceSession(path, providers=["CPUExecutionProvider"])
    with torch.no_grad():
        expected = [output.numpy() for output in module(images)]
    got = session.run(output_names, {"images": images.numpy()})
    for name, ours, theirs in zip(output_names, expected, got, strict=True):
        difference = float(abs(ours - theirs).max()) if ours.size else 0.0
        logger.info("parity on %d images: %s differs by at most %.2g (tolerance %.0e)", len(images), name,
                    difference, tolerances[name])
        if ours.shape != theirs.shape or difference > tolerances[name]:
            raise UserError(f"{path}: ONNX Runtime's {name} differs from PyTorch's by {difference:.3g} (shape "
                            f"{theirs.shape} vs {ours.shape}); please report it with your torch and onnxruntime "
                            f"versions")
    with torch.no_grad():
        torch_ms = median_latency_ms(module, images)
    onnx_ms = median_latency_ms(lambda batch: session.run(output_names, {"images": batch.numpy()}), images)
    logger.info("latency on this CPU (%d threads), %d images of %dx%d: PyTorch %.1f ms, ONNX Runtime %.1f ms "
                "(median of %d)", torch.get_num_threads(), len(images), images.shape[-1], images.shape[-2],
                torch_ms, onnx_ms, LATENCY_REPEATS)


@exit_on_user_error
def main(argv=None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    args, exp_dir, name, state, run = helper.chosen_checkpoint(build_export_parser(), argv)
    checkpoint = os.path.join(exp_dir, name)
    if not hasattr(helper.solver_class(run["model_name"]), "export_module"):
        raise UserError(f"--model_name {run['model_name']}: its solver has no export_module, so it cannot be "
                        f"exported yet (see docs/task_reference.md)")
    out_dir = os.path.join(exp_dir, "export")
    os.makedirs(out_dir, exist_ok=True)
    setup_logging(os.path.join(out_dir, "export.log"))
    solver = helper.load_solver(run, device=torch.device("cpu"), steps_per_epoch=0,
                                class_names=helper.checkpoint_class_names(checkpoint, state, run))
    solver.load_weights(state)
    module, example, output_names, metadata, tolerances = solver.export_module()
    if args["dynamic_batch"] and len(example) == 1:  # torch.export takes a dimension of size 1 for a constant
        example = torch.cat([example, example])
    path = os.path.join(out_dir, f"{Path(name).stem}.{args['format']}")

    def export_and_check(tmp_path: str) -> None:  # a file that fails the check never replaces the last good one
        export_onnx(module, example, output_names, {**metadata, "checkpoint": name, "epoch": state["epoch"]},
                    bool(args["dynamic_batch"]), tmp_path)
        # with --dynamic_batch 1, checked on one image more than it was traced with
        check_with_onnxruntime(tmp_path, module, torch.cat([example, example[:1]]) if args["dynamic_batch"]
                               else example, output_names, tolerances)

    atomic_write(path, export_and_check)
    logger.info("exported %s (epoch %d) to %s", name, state["epoch"], path)


if __name__ == "__main__":
    main()
