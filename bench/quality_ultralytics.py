"""The YOLOv8n contender of bench/quality.py, run by the Python of .cache/venv-ultralytics (Ultralytics requires
opencv-python, which cannot share an environment with nuscenes-devkit's OpenCV and numpy): train yolov8n.yaml
from scratch for a wall-clock budget with the recipe an Ultralytics user would pick for minutes on a CPU, then
predict on a split through Ultralytics' own validator.

    python bench/quality_ultralytics.py SPEC.json

SPEC.json (written by bench/quality.py): data (Ultralytics dataset file with train, val and test), budget_s, imgsz,
batch, lr0, warmup_epochs, seed, threads (torch threads), split (val or test), conf, max_det, project, out.
Writes `out`: {detections: COCO results of the split in original pixels (category_id = class index + 1, image_id
from the file name), epochs, steps (optimizer steps), images (trained on), train_s (seconds in training epochs),
threads, ultralytics, torch (versions)}.
"""

import json
import sys
import time
from pathlib import Path

import torch
import ultralytics
from ultralytics import YOLO
from ultralytics.utils import torch_utils


def main(spec_path: str) -> None:
    spec = json.loads(Path(spec_path).read_text())
    # Ultralytics sets torch to min(8, cores - 1) threads when it selects the CPU: the same threads as the others
    torch_utils.NUM_THREADS = spec["threads"]
    counts = {"steps": 0, "images": 0, "train_s": 0.0, "threads": 0}

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
    # time= (hours) ends training on time and refits the schedule's epochs to it after each epoch; epochs=30 is the
    # first estimate. nbs = batch: an optimizer step per batch; mosaic off and smaller scale jitter for a short run;
    # cache='ram': images decoded once (Ultralytics loads in the main process on the CPU)
    model.train(data=spec["data"], epochs=30, time=spec["budget_s"] / 3600, imgsz=spec["imgsz"], batch=spec["batch"],
                nbs=spec["batch"], optimizer="AdamW", lr0=spec["lr0"], warmup_epochs=spec["warmup_epochs"],
                mosaic=0.0, scale=0.25, cache="ram", deterministic=False, seed=spec["seed"], device="cpu",
                pretrained=False, amp=False, plots=False, val=False, project=spec["project"], name="train",
                exist_ok=True, verbose=False)
    trained = YOLO(str(Path(model.trainer.save_dir) / "weights" / "last.pt"))
    # Ultralytics' validator: multi-label NMS at conf, boxes mapped back to the original images, COCO results
    detections = []
    trained.add_callback("on_val_end", lambda validator: detections.extend(validator.jdict))
    trained.val(data=spec["data"], split=spec["split"], imgsz=spec["imgsz"], batch=spec["batch"], conf=spec["conf"],
                max_det=spec["max_det"], save_json=True, plots=False, device="cpu", project=spec["project"],
                name="val", exist_ok=True, verbose=False)
    report = {"detections": [{key: d[key] for key in ("image_id", "category_id", "bbox", "score")} for d in detections],
              "epochs": model.trainer.epoch + 1, "ultralytics": ultralytics.__version__, "torch": torch.__version__,
              **{key: counts[key] for key in ("steps", "images", "train_s", "threads")}}
    Path(spec["out"]).write_text(json.dumps(report))


if __name__ == "__main__":
    main(sys.argv[1])
