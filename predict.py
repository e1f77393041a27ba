"""Run a trained model on your own images:

    python predict.py --exp_id N --source PATH [--model_num K] [--save_images 1] [--score_threshold S]
                      [--batch_size B] [--num_cores W]

PATH: an image file; a folder of image files (searched recursively; JPEG, PNG or any format OpenCV reads, any size
and count); or a .txt file of nuScenes sample tokens, one per line, read through the configured dataset (all its
cameras, drawn as one mosaic). Each image is resized as the loader resizes it and the detections are mapped back to
its original pixels, exactly as test.py maps them.

Writes <experiment>/predict/predictions.json: a list with an entry per image: "file", the solver's prediction (Yolo:
"boxes" [[x1, y1, x2, y2]] in original px, "classes", "scores", best first) and, for a sample, "sample_token" and
"camera". With --save_images 1, also the drawn images, under predict/images/. A file that is not a readable image is
skipped with a warning line naming it; the others still run. B inputs (image files, or samples) go through the
model in one forward pass, read by W worker processes (default: the checkpoint's --batch_size and --num_cores).

Configuration as in test.py: the checkpoint's own (model, input size, dataset), then the flags and --cfg given here.
Default checkpoint: best.pt."""

import logging
import math
import os
import sys
from pathlib import Path

import cv2
import torch
from torch.utils.data import DataLoader, Dataset
from torchvision.io import encode_jpeg
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
    parser = build_checkpoint_parser("Run a trained model on image files or dataset samples (DSTorch).")
    parser.add_argument("--source", default=None,
                        help="an image file, a folder of images, or a .txt file of sample tokens (required)")
    parser.add_argument("--model_num", type=non_negative_int, default=None,
                        help="use epoch_<model_num>.pt (default: best.pt)")
    parser.add_argument("--save_images", type=flag, default=0, help="1: also write the images with the detections")
    parser.add_argument("--score_threshold", type=unit_interval, default=None,
                        help="keep detections scoring above this (default: config.json test.visualization_score_"
                             "threshold)")
    return parser


def source_inputs(source: str, loader, run: dict) -> list:
    """The inputs of --source: a list of (sample token or None, [(camera or None, image path)])."""
    if not os.path.exists(source):
        raise UserError(f"--source {source}: no such file or folder")
    if os.path.isdir(source):
        files = sorted(str(path) for path in Path(source).rglob("*")
                       if path.is_file() and not any(part.startswith(".") for part in path.relative_to(source).parts))
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
    [(camera or None, path, (1, 3, H, W) uint8 at the model's input size, original (W, H))] of the readable images,
    [one message per unreadable file]); the messages are logged by the main process, in input order."""

    def __init__(self, inputs: list, loader, run: dict):
        self.inputs, self.loader, self.run = inputs, loader, run

    def __len__(self) -> int:
        return len(self.inputs)

    def __getitem__(self, index: int) -> tuple:
        token, cameras = self.inputs[index]
        read, skipped = [], []
        for camera, path in cameras:
            try:
                read.append((camera, path, *self.loader.image_file(self.run, path)))
            except UserError as error:
                skipped.append(str(error))
        return token, read, skipped


def original_image(path: str) -> torch.Tensor:
    """The image file at `path` at its original size, (3, H, W) uint8 RGB, as the loaders read it (OpenCV: EXIF
    orientation applied, grey and alpha made RGB)."""
    image = cv2.imread(path, cv2.IMREAD_COLOR)
    return torch.from_numpy(cv2.cvtColor(image, cv2.COLOR_BGR2RGB)).permute(2, 0, 1)


def save_drawing(solver, paths: list, predictions: list, out_path: str) -> None:
    """The images at `paths` with their predictions drawn, as one JPEG (a mosaic of 3 columns for several cameras,
    each at the first one's size)."""
    drawn = [solver.draw_prediction(original_image(path), prediction)
             for path, prediction in zip(paths, predictions, strict=True)]
    size = list(drawn[0].shape[1:])
    grid = drawn[0] if len(drawn) == 1 else make_grid(
        [image if list(image.shape[1:]) == size else resize(image, size) for image in drawn], nrow=3, padding=0)
    data = encode_jpeg(grid, quality=90).numpy().tobytes()
    os.makedirs(os.path.dirname(out_path), exist_ok=True)
    atomic_write(out_path, lambda tmp_path: Path(tmp_path).write_bytes(data))


def predicted_entries(readable: list, predictions: list, solver, args: dict, out_dir: str) -> list:
    """The predictions.json entries of a batch's readable inputs [(sample token or None, [(camera, path, ...)])],
    `predictions` holding one per image in that order; with --save_images 1, each input drawn (one file)."""
    images = [(token, camera, path) for token, read in readable for camera, path, *_ in read]
    entries = [{"file": path, **({"sample_token": token, "camera": camera} if token else {}), **prediction}
               for (token, camera, path), prediction in zip(images, predictions, strict=True)]
    if args["save_images"]:
        start = 0
        for token, read in readable:
            paths = [path for _, path, *_ in read]
            drawing = token or (os.path.relpath(paths[0], args["source"]) if os.path.isdir(args["source"])
                                else os.path.basename(paths[0]))
            save_drawing(solver, paths, predictions[start:start + len(read)],
                         os.path.join(out_dir, "images", f"{drawing}.jpg"))
            start += len(read)
    return entries


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
    out_dir = os.path.join(exp_dir, "predict")
    os.makedirs(out_dir, exist_ok=True)
    setup_logging(os.path.join(out_dir, "predict.log"))
    inputs = source_inputs(args["source"], loader, run)
    token_source = args["source"].endswith(".txt") and not os.path.isdir(args["source"])
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
                logger.warning("skipped: %s", message)
        readable = [(token, read) for token, read, _ in batch if read]
        if readable:
            predictions = solver.predict(torch.cat([images for _, read in readable for _, _, images, _ in read]),
                                         [size for _, read in readable for *_, size in read], threshold)
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
