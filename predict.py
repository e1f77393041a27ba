r"""Run a trained model on your own images:

    python predict.py --exp_id N --source PATH [--model_num K] [--save_images 1] [--score_threshold S]
                      [--batch_size B] [--num_cores W]

PATH: an image file; a folder of image files (searched recursively; JPEG, PNG or any format OpenCV reads, any size
and count; <experiment>/predict, predict.py's own outputs, left out when the folder holds it); or a .txt file of
nuScenes sample tokens, one per line, read through the configured dataset (all its cameras, drawn as one mosaic). A
PATH inside <experiment>/predict is an error. Each image is resized as the loader resizes it and the detections are
mapped back to its original pixels, exactly as test.py maps them.

Each run writes to a new folder, <experiment>/predict/<n>/ (n = 1, 2, ...; earlier runs' folders are left as they
are): predict.log and predictions.json, a list with an entry per image: "file", the solver's prediction (Yolo: "boxes"
[[x1, y1, x2, y2]] in original px, "classes", "scores", best first) and, for a sample, "sample_token" and "camera".
"file" is the path as Python holds it: in a file name that is not UTF-8 (Latin-1 bytes, say), each such byte is a
surrogate, JSON "\udce9" for 0xE9, which os.fsencode turns back into the name. With --save_images 1, also the drawn
images, under images/ there. A file that is not a readable image is skipped with a warning line naming it; the others
still run. B inputs (image files, or samples) go through the model in one forward pass, read by W worker processes
(default: the checkpoint's --batch_size and --num_cores).

Configuration as in test.py: the checkpoint's own (model, input size), then the flags and --cfg given here; sample
tokens are read from the dataset that --dataset_dir or config/data.json names. Default checkpoint: best.pt."""

import logging
import math
import os
import sys
from pathlib import Path

import cv2
import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset
from torchvision.transforms.v2.functional import resize
from torchvision.utils import make_grid
from tqdm import tqdm

import helper
from argumentparser import build_checkpoint_parser, flag, non_negative_int, unit_interval
from utils.errors import UserError, exit_on_user_error
from utils.experiment import select_device, setup_logging
from utils.io import atomic_write, atomic_write_json

logger = logging.getLogger("predict")


def build_predict_parser():
    parser = build_checkpoint_parser("Run a trained model on image files or dataset samples (DSTorch). Each run "
                                     "writes to a new folder <experiment>/predict/<n>/ (n = 1, 2, ...): "
                                     "predictions.json, predict.log and, with --save_images 1, images/.")
    parser.add_argument("--source", default=None,
                        help="an image file, a folder of images (<experiment>/predict, predict.py's own outputs, "
                             "left out), or a .txt file of sample tokens (required)")
    parser.add_argument("--model_num", type=non_negative_int, default=None,
                        help="use epoch_<model_num>.pt (default: best.pt)")
    parser.add_argument("--save_images", type=flag, default=0, help="1: also write the images with the detections")
    parser.add_argument("--score_threshold", type=unit_interval, default=None,
                        help="keep detections scoring above this (default: config.json test.visualization_score_"
                             "threshold)")
    return parser


def source_inputs(source: str, loader, run: dict, outputs: str) -> list:
    """The inputs of --source: a list of (sample token or None, [(camera or None, image path[, extras])]), extras
    being what the loader's sample_files gives of a camera beside its image (its intrinsics, say). `outputs`, the
    experiment's predict folder, is never read: predicting on earlier runs' drawings would feed predict.py its own
    output, and a folder that holds the experiment holds them."""
    if not os.path.exists(source):
        raise UserError(f"--source {source}: no such file or folder")
    real_source, real_outputs = os.path.realpath(source), os.path.realpath(outputs)
    if os.path.commonpath([real_source, real_outputs]) == real_outputs:
        raise UserError(f"--source {source}: it is in {outputs}, where predict.py writes its outputs; give images "
                        f"from elsewhere (copy them out first)")
    if os.path.isdir(source):
        left_out = None  # the outputs folder's parts below the source folder, where it holds them
        if os.path.commonpath([real_source, real_outputs]) == real_source:
            left_out = Path(os.path.relpath(real_outputs, real_source)).parts
            logger.info("not reading %s: predict.py's own outputs", outputs)
        files = []
        for path in Path(source).rglob("*"):  # lexically below the source: rglob follows no folder symlink
            parts = path.relative_to(source).parts
            if (path.is_file() and not any(part.startswith(".") for part in parts)
                    and (left_out is None or parts[:len(left_out)] != left_out)):
                files.append(str(path))
        files.sort()
        if not files:
            raise UserError(f"--source {source}: the folder holds no files; give an image, a folder of images or a "
                            f".txt file of sample tokens")
        return [(None, [(None, path)]) for path in files]
    if not source.endswith(".txt"):
        return [(None, [(None, source)])]
    try:
        with open(source) as token_file:
            lines = token_file.read().splitlines()
    except (OSError, UnicodeDecodeError) as error:
        raise UserError(f"--source {source}: cannot read it as a text file of sample tokens ({error})") from None
    tokens = list(dict.fromkeys(line.strip() for line in lines if line.strip() and not line.lstrip().startswith("#")))
    if not tokens:
        raise UserError(f"--source {source}: the token file lists no sample token (one per line)")
    if not hasattr(loader, "sample_files"):
        raise UserError(f"--source {source}: the {run['app_mode']} loader reads no sample tokens; give image files")
    found = loader.sample_files(run, tokens)
    version = run["data"][run["app_mode"]]["version"]
    for token in tokens:
        if token not in found:
            logger.warning("skipped sample token %s (listed in %s): not a sample of %s", token, source, version)
    if not found:
        raise UserError(f"--source {source}: none of its {len(tokens)} tokens is a sample of {version} in the "
                        f"checkpoint's dataset; give tokens of sample.json, or --dataset_dir")
    return [(token, cameras) for token, cameras in found.items()]


class SourceImages(Dataset):
    """The inputs of --source read as the dataset's loader reads its images: item i is (sample token or None,
    [(camera or None, path, (1, 3, H, W) uint8 at the model's input size, original (W, H), the loader's extras or
    None)] of the readable images, [one message per unreadable file]); the messages are logged by the main process,
    in input order."""

    def __init__(self, inputs: list, loader, run: dict):
        self.inputs, self.loader, self.run = inputs, loader, run

    def __len__(self) -> int:
        return len(self.inputs)

    def __getitem__(self, index: int) -> tuple:
        token, cameras = self.inputs[index]
        read, skipped = [], []
        for camera, path, *extras in cameras:
            try:
                read.append((camera, path, *self.loader.image_file(self.run, path), extras[0] if extras else None))
            except UserError as error:
                skipped.append(str(error))
        return token, read, skipped


def original_image(path: str) -> torch.Tensor:
    """The image file at `path` at its original size, (3, H, W) uint8 RGB, as the loaders read it (OpenCV: EXIF
    orientation applied, grey and alpha made RGB)."""
    # from its bytes, as read_image_file reads it: cv2.imread crashes (SIGSEGV) on a file name that is not UTF-8
    image = cv2.imdecode(np.fromfile(path, dtype=np.uint8), cv2.IMREAD_COLOR)
    if image is None:
        raise UserError(f"cannot draw on {path}: it changed since it was read (no longer an image file)")
    return torch.from_numpy(cv2.cvtColor(image, cv2.COLOR_BGR2RGB)).permute(2, 0, 1)


def save_drawing(solver, paths: list, predictions: list, out_path: str) -> None:
    """The images at `paths` with their predictions drawn, as one JPEG (a mosaic of 3 columns for several cameras,
    each at the first one's size)."""
    drawn = [solver.draw_prediction(original_image(path), prediction)
             for path, prediction in zip(paths, predictions, strict=True)]
    size = list(drawn[0].shape[1:])
    grid = drawn[0] if len(drawn) == 1 else make_grid(
        [image if list(image.shape[1:]) == size else resize(image, size) for image in drawn], nrow=3, padding=0)
    # OpenCV's encoder: torchvision's encode_jpeg is deprecated since torchvision 0.29
    encoded, data = cv2.imencode(".jpg", cv2.cvtColor(grid.permute(1, 2, 0).contiguous().numpy(), cv2.COLOR_RGB2BGR),
                                 [cv2.IMWRITE_JPEG_QUALITY, 90])
    if not encoded:
        raise UserError(f"cannot encode {out_path} as a JPEG file ({grid.shape[2]}x{grid.shape[1]} px)")
    os.makedirs(os.path.dirname(out_path), exist_ok=True)
    atomic_write(out_path, lambda tmp_path: Path(tmp_path).write_bytes(data.tobytes()))


def predicted_entries(readable: list, predictions: list, solver, args: dict, out_dir: str) -> list:
    """The predictions.json entries of a batch's readable inputs [(sample token or None, [(camera, path, ...)])],
    `predictions` holding one per image in that order; with --save_images 1, each input drawn (one file)."""
    images = [(token, camera, path) for token, read in readable for camera, path, *_ in read]
    # "file": the path as Python holds it; the bytes of a name that is not UTF-8 are surrogates (os.fsdecode's
    # surrogateescape), which json writes as "\udcXX" escapes and os.fsencode turns back into the name
    entries = [{"file": path, **({"sample_token": token, "camera": camera} if token else {}), **prediction}
               for (token, camera, path), prediction in zip(images, predictions, strict=True)]
    if args["save_images"]:
        start = 0
        for token, read in readable:
            paths = [path for _, path, *_ in read]
            drawing = token or (os.path.relpath(paths[0], args["source"]) if os.path.isdir(args["source"])
                                else os.path.basename(paths[0]))
            try:
                save_drawing(solver, paths, predictions[start:start + len(read)],
                             os.path.join(out_dir, "images", f"{drawing}.jpg"))
            except UserError as error:  # its predictions stand; only the drawing is missing
                logger.warning("%s", error)
            start += len(read)
    return entries


def new_run_folder(predict_dir: str) -> str:
    """A new folder for one run's outputs, predict_dir/<n>: n one above the highest number there (from 1), so that no
    run overwrites or mixes with an earlier one; os.mkdir fails on a folder that exists, so that of two runs started
    together each gets its own."""
    os.makedirs(predict_dir, exist_ok=True)
    number = 1 + max((int(name) for name in os.listdir(predict_dir) if name.isascii() and name.isdigit()), default=0)
    while True:
        try:
            os.mkdir(os.path.join(predict_dir, str(number)))
            return os.path.join(predict_dir, str(number))
        except FileExistsError:
            number += 1


@exit_on_user_error
def main(argv=None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    args, exp_dir, name, state, run = helper.chosen_checkpoint(build_predict_parser(), argv)
    if args["source"] is None:  # not argparse's required=True: helper.given_flags parses an empty command line
        raise UserError("--source is required: an image file, a folder of images, or a .txt file of sample tokens")
    checkpoint = os.path.join(exp_dir, name)
    loader = helper.loader_module(run).DatasetLoader
    solver_class = helper.solver_class(run["model_name"])
    if not hasattr(loader, "image_file") or not hasattr(solver_class, "predict"):
        raise UserError(f"--model_name {run['model_name']} with --app_mode {run['app_mode']} does not predict on "
                        f"image files (its loader needs image_file, its solver predict; see docs/task_reference.md)")
    token_source = args["source"].endswith(".txt") and not os.path.isdir(args["source"])
    if getattr(loader, "samples_only", False) and not token_source:
        raise UserError(f"--source {args['source']}: --app_mode {run['app_mode']} predicts on dataset samples only (a "
                        f"plain image has no camera intrinsics and pose); give a .txt file of sample tokens")
    if token_source:  # the samples are read from the dataset: the command's, not the checkpoint's
        helper.check_data_of(checkpoint, state, run, vars(build_predict_parser().parse_args(argv)))
    predict_dir = os.path.join(exp_dir, "predict")
    setup_logging(None)  # the console only: a --source that fails its checks leaves no run folder behind
    inputs = source_inputs(args["source"], loader, run, predict_dir)
    out_dir = new_run_folder(predict_dir)
    setup_logging(os.path.join(out_dir, "predict.log"))
    solver = helper.load_solver(run, device=select_device(args["gpu_num"]), steps_per_epoch=0,
                                class_names=helper.checkpoint_class_names(checkpoint, state, run))
    solver.load_weights(state)
    threshold = args["score_threshold"]
    threshold = run["config"]["test"]["visualization_score_threshold"] if threshold is None else threshold
    # --batch_size inputs per forward pass (an image file, or a sample with all its cameras), read by up to
    # --num_cores worker processes, none past one per batch after the first (a single image is read here); both
    # flags default to the checkpoint's
    reader = DataLoader(SourceImages(inputs, loader, run), batch_size=run["batch_size"], collate_fn=list,
                        num_workers=min(run["num_cores"], math.ceil(len(inputs) / run["batch_size"]) - 1))
    entries, bar = [], tqdm(total=len(inputs), desc="predict", unit="sample" if token_source else "image")
    for batch in reader:
        for _, _, skipped in batch:
            for message in skipped:
                # a file name that is not UTF-8 with its bytes escaped (\xe9): the log file takes UTF-8 text only
                message = message.encode(errors="surrogateescape").decode(errors="backslashreplace")
                logger.warning("skipped: %s", message)
        readable = [(token, read) for token, read, _ in batch if read]
        if readable:
            extras = [extra for _, read in readable for *_, extra in read]
            predictions = solver.predict(torch.cat([images for _, read in readable for _, _, images, _, _ in read]),
                                         [size for _, read in readable for _, _, _, size, _ in read], threshold,
                                         **({"extras": extras} if any(extra is not None for extra in extras) else {}))
            entries += predicted_entries(readable, predictions, solver, args, out_dir)
        bar.update(len(batch))
    bar.close()
    if not entries:
        raise UserError(f"--source {args['source']}: no readable image in it (see the warnings above)")
    atomic_write_json(os.path.join(out_dir, "predictions.json"), entries)
    logger.info("%d images with %s detections above %.2f: %s", len(entries),
                sum(len(entry.get("scores", ())) for entry in entries), threshold,
                os.path.join(out_dir, "predictions.json"))


if __name__ == "__main__":
    main()
