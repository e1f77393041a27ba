"""Export the 2D detection labels of a nuScenes split as a COCO ground-truth file.

    python -m dataset.NuscenesDataset.export_coco --dataroot DIR --version VER --split SPLIT --out FILE.json

SPLIT is any key of the devkit's `create_splits_scenes()`. The labels are the training labels: the devkit's
re-projected 2D boxes with the label settings of config/data.json (labels.py), taken from (or added to) the
label cache. Other tools depend on these flags and on the file's format.
"""

import argparse
import json
import os

from dataset.NuscenesDataset.common import PROJECT_ROOT, project_path
from dataset.NuscenesDataset.labels import label_cache
from utils.errors import exit_on_user_error
from utils.experiment import setup_logging
from utils.io import atomic_write_json

APP_MODE = "2DObjDet"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dataroot", required=True, help="nuScenes folder (holds the version folder and samples/)")
    parser.add_argument("--version", required=True, help="nuScenes version, e.g. v1.0-mini or v1.0-trainval")
    parser.add_argument("--split", required=True, help="a key of create_splits_scenes(), e.g. mini_val or val")
    parser.add_argument("--out", required=True, help="COCO JSON file to write")
    parser.add_argument("--label_cache_dir", default=None,
                        help="the label cache folder (default: config/data.json's label_cache_dir)")
    return parser


@exit_on_user_error
def main(argv=None) -> None:
    setup_logging(None)
    args = build_parser().parse_args(argv)
    with open(PROJECT_ROOT / "config" / "data.json") as f:
        cfg = json.load(f)[APP_MODE]
    cache_dir = os.path.abspath(args.label_cache_dir) if args.label_cache_dir else project_path(cfg["label_cache_dir"])
    _, coco = label_cache(args.dataroot, args.version, args.split, cfg["labels"], cache_dir)
    atomic_write_json(args.out, coco)
    print(f"wrote {len(coco['images'])} images and {len(coco['annotations'])} boxes of {args.version} {args.split} "
          f"to {os.path.abspath(args.out)}")


if __name__ == "__main__":
    main()
