"""Put torchvision's ImageNet weights of a backbone where `"pretrained_backbone": true` (config/model.json) reads
them, torch's hub cache:

    python -m models.fetch_weights --backbone resnet18

Training never downloads anything: without this file, "pretrained_backbone": true is a one-line error naming the
path, and from-scratch training ("pretrained_backbone": false) is the offline default. Offline, this command says
where to put the file by hand."""

import argparse
import os
import sys

import torch

from models.Yolo.yolo import BACKBONES, check_weights_hash, weights_path
from utils.errors import UserError, exit_on_user_error


@exit_on_user_error
def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--backbone", choices=sorted(BACKBONES), required=True, help="config/model.json 'backbone'")
    name = parser.parse_args(sys.argv[1:] if argv is None else argv).backbone
    weights, path = BACKBONES[name][1], weights_path(name)
    if os.path.isfile(path):
        check_weights_hash(path, name)
        print(f"{name}: ImageNet weights already at {path}")
        return
    try:
        # weights_only: torch.hub loads the file it saved (or, unchecked, one put under that name since the test
        # above), and loading must not run code in it
        torch.hub.load_state_dict_from_url(weights.url, progress=True, check_hash=True, weights_only=True)
    except (OSError, RuntimeError) as error:  # URLError is an OSError; a wrong hash is a RuntimeError
        raise UserError(f"cannot download {weights.url} ({type(error).__name__}: {error}): download it on a machine "
                        f"online and copy it to {path}") from None
    print(f"{name}: ImageNet weights saved to {path}; set \"pretrained_backbone\": true in config/model.json")


if __name__ == "__main__":
    main()
