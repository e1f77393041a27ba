"""The YOLOv8n contender of bench/quality.py, run by the Python of .cache/venv-ultralytics (Ultralytics requires
opencv-python, which cannot share an environment with nuscenes-devkit's OpenCV and numpy): train yolov8n.yaml
from scratch with the recipe of SPEC.json, then predict on a split through Ultralytics' own validator, twice: at
rect (the validator's default: the image resized to 320 px wide, 320x180 for nuScenes, on a canvas padded by half a
stride, 352x224) and letterboxed into 320x320 squares (as it trains without rect).

    python bench/quality_ultralytics.py SPEC.json

SPEC.json (written by bench/quality.py): data (Ultralytics dataset file with train, val and test), epochs (equal
steps: a cosine schedule to lr0 x lrf over exactly those epochs) or budget_s (equal time: Ultralytics' time=), imgsz,
batch, lr0, lrf, warmup_epochs, mosaic (bool; closed for the last close_mosaic epochs), close_mosaic, rect (bool),
seed, threads (torch threads), split (val or test), conf, max_det, project, out.
Writes `out`: {detections, detections_letterboxed: COCO results of the split in original pixels (category_id =
class index + 1, image_id from the file name), nms_time_limit: {training (its own validations), detections,
detections_letterboxed}: how often Ultralytics' NMS ran out of time (and dropped detections), epochs, steps
(optimizer steps), ema_updates, images (trained on), train_s (seconds in training epochs), threads, ultralytics,
torch (versions)}.
"""

import json
import logging
import sys
import time
from pathlib import Path

import torch
import ultralytics
from ultralytics import YOLO
from ultralytics.utils import LOGGER, torch_utils


class NmsTimeLimits(logging.Handler):
    """Counts Ultralytics' "NMS time limit ... exceeded" warnings (utils/nms.py)."""

    def __init__(self):
        super().__init__(logging.WARNING)
        self.count = 0

    def emit(self, record):
        self.count += "NMS time limit" in record.getMessage()


def main(spec_path: str) -> None:
    spec = json.loads(Path(spec_path).read_text())
    # the same threads as the others: Ultralytics' select_device sets torch to torch_utils.NUM_THREADS, min(8,
    # cores - 1), for the CPU
    torch_utils.NUM_THREADS = spec["threads"]
    counts = {"steps": 0, "images": 0, "train_s": 0.0, "threads": 0}
    nms_time_limits = NmsTimeLimits()
    LOGGER.addHandler(nms_time_limits)

    def on_train_start(trainer):
        step = trainer.optimizer_step

        def counted_step():
            counts["steps"] += 1
            step()
        trainer.optimizer_step = counted_step

    def on_train_epoch_start(trainer):
        counts["since"] = time.monotonic()

    def on_train_batch_end(trainer):  # loading and training time, not the validation of the last epoch
        now = time.monotonic()
        counts["train_s"] += now - counts["since"]
        counts["since"] = now
        counts["images"] += trainer.batch_size
        counts["threads"] = torch.get_num_threads()

    model = YOLO("yolov8n.yaml")
    for event, callback in (("on_train_start", on_train_start), ("on_train_epoch_start", on_train_epoch_start),
                            ("on_train_batch_end", on_train_batch_end)):
        model.add_callback(event, callback)
    if spec.get("epochs"):  # equal steps: exactly these epochs, a cosine schedule down to lr0 x lrf
        length = {"epochs": spec["epochs"], "cos_lr": True}
    else:  # equal time: time= (hours) ends training on time and refits the schedule's epochs after each epoch
        length = {"epochs": 30, "time": spec["budget_s"] / 3600}
    # nbs = batch: an optimizer step per batch; momentum 0.9 and warmup_bias_lr 0: what Ultralytics'
    # optimizer="auto" sets for AdamW; cache='ram': images decoded once (Ultralytics loads in the main process on the
    # CPU)
    model.train(data=spec["data"], **length, imgsz=spec["imgsz"], batch=spec["batch"], nbs=spec["batch"],
                optimizer="AdamW", lr0=spec["lr0"], lrf=spec["lrf"], momentum=0.9, warmup_epochs=spec["warmup_epochs"],
                warmup_bias_lr=0.0, mosaic=1.0 if spec["mosaic"] else 0.0, close_mosaic=spec["close_mosaic"],
                rect=spec["rect"], scale=0.25, cache="ram", deterministic=False, seed=spec["seed"], device="cpu",
                pretrained=False, amp=False, plots=False, val=False, project=spec["project"], name="train",
                exist_ok=True, verbose=False)
    trained = YOLO(str(Path(model.trainer.save_dir) / "weights" / "last.pt"))  # holds the EMA weights
    report = {"epochs": model.trainer.epoch + 1, "ema_updates": int(model.trainer.ema.updates),
              "ultralytics": ultralytics.__version__, "torch": torch.__version__,
              "nms_time_limit": {"training": nms_time_limits.count},
              **{key: counts[key] for key in ("steps", "images", "train_s", "threads")}}
    # Ultralytics' validator: multi-label NMS at conf, boxes mapped back to the original images, COCO results
    for key, rect in (("detections", True), ("detections_letterboxed", False)):
        detections, nms_time_limits.count = [], 0
        trained.add_callback("on_val_end", lambda validator, found=detections: found.extend(validator.jdict))
        trained.val(data=spec["data"], split=spec["split"], imgsz=spec["imgsz"], batch=spec["batch"], rect=rect,
                    conf=spec["conf"], max_det=spec["max_det"], save_json=True, plots=False, device="cpu",
                    project=spec["project"], name=f"val_{key}", exist_ok=True, verbose=False)
        trained.callbacks["on_val_end"].pop()
        report[key] = [{name: d[name] for name in ("image_id", "category_id", "bbox", "score")} for d in detections]
        report["nms_time_limit"][key] = nms_time_limits.count
    Path(spec["out"]).write_text(json.dumps(report))


if __name__ == "__main__":
    main(sys.argv[1])
