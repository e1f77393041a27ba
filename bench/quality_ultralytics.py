"""The YOLOv8n contender of bench/quality.py, run by the Python of .cache/venv-ultralytics (Ultralytics needs
numpy 2): train yolov8n.yaml from scratch for a wall-clock budget, then detect on the test images.

    python bench/quality_ultralytics.py SPEC.json

SPEC.json (written by bench/quality.py): data (Ultralytics dataset file), budget_s, imgsz, batch, project,
test_images {path: COCO image id}, conf, max_det, out. Writes `out`: {"epochs": N, "detections": [COCO results
in original pixels, category_id = class index + 1]}.
"""

import json
import sys
from pathlib import Path

from ultralytics import YOLO


def main(spec_path: str) -> None:
    spec = json.loads(Path(spec_path).read_text())
    model = YOLO("yolov8n.yaml")
    # time= (hours) overrides epochs: Ultralytics fits its schedule to the time after the first epoch
    model.train(data=spec["data"], epochs=1000, time=spec["budget_s"] / 3600, imgsz=spec["imgsz"],
                batch=spec["batch"], device="cpu", workers=1, pretrained=False, plots=False, amp=False, val=False,
                project=spec["project"], name="yolov8n", exist_ok=True, seed=0, verbose=False)
    trained = YOLO(str(Path(model.trainer.save_dir) / "weights" / "last.pt"))
    detections = []
    for path, image_id in spec["test_images"].items():
        result = trained.predict(path, imgsz=spec["imgsz"], conf=spec["conf"], max_det=spec["max_det"],
                                 device="cpu", verbose=False)[0]
        for (x1, y1, x2, y2), score, label in zip(result.boxes.xyxy.tolist(), result.boxes.conf.tolist(),
                                                  result.boxes.cls.tolist(), strict=True):
            detections.append({"image_id": image_id, "category_id": int(label) + 1,
                               "bbox": [x1, y1, x2 - x1, y2 - y1], "score": score})
    Path(spec["out"]).write_text(json.dumps({"epochs": model.trainer.epoch + 1, "detections": detections}))


if __name__ == "__main__":
    main(sys.argv[1])
