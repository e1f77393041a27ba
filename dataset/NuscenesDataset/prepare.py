"""Build the label caches of every split of a nuScenes version up front, on all cores of this machine:

    python -m dataset.NuscenesDataset.prepare --dataroot DIR --version VER [--label_cache_dir DIR] [--workers N]

train.py builds a missing cache by itself (one process builds, the others wait on a file lock), so this is only
needed where one job should do it once: a cluster whose training job should not spend its GPU time on it, or
several nodes that share `label_cache_dir` (config/data.json; any path, e.g. on shared storage). The splits are
those of config/data.json's "splits" entry of the version; the label settings are data.json's.
"""

import argparse
import json
import time

from dataset.NuscenesDataset.common import PROJECT_ROOT, project_path
from dataset.NuscenesDataset.labels import label_arrays
from utils.errors import UserError, exit_on_user_error
from utils.experiment import setup_logging

APP_MODE = "2DObjDet"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], allow_abbrev=False)
    parser.add_argument("--dataroot", required=True, help="nuScenes folder (holds the version folder and samples/)")
    parser.add_argument("--version", required=True, help="nuScenes version, e.g. v1.0-mini or v1.0-trainval")
    parser.add_argument("--label_cache_dir", default=None,
                        help="where the caches go (default: data.json's label_cache_dir, relative to the project)")
    parser.add_argument("--workers", type=int, default=None, help="processes building the labels (default: all cores)")
    return parser


@exit_on_user_error
def main(argv=None) -> None:
    setup_logging(None)
    args = build_parser().parse_args(argv)
    with open(PROJECT_ROOT / "config" / "data.json") as f:
        cfg = json.load(f)[APP_MODE]
    if args.version not in cfg["splits"]:
        raise UserError(f"--version {args.version}: no entry in 'splits' of config/data.json (entries: "
                        f"{', '.join(cfg['splits'])})")
    if args.workers is not None and args.workers < 1:
        raise UserError(f"--workers {args.workers}: must be 1 or more")
    cache_dir = project_path(args.label_cache_dir or cfg["label_cache_dir"])
    for split in dict.fromkeys(cfg["splits"][args.version].values()):
        start = time.time()
        path, labels = label_arrays(args.dataroot, args.version, split, cfg["labels"], cache_dir, args.workers)
        print(f"{args.version} {split}: {len(labels['image_file'])} images, {len(labels['box_image'])} boxes in "
              f"{path} ({time.time() - start:.1f} s)")


if __name__ == "__main__":
    main()
