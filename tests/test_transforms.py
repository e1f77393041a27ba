"""The loader's training augmentation: after it, every box still frames what it framed."""

import torch
from torchvision import tv_tensors

from dataset.NuscenesDataset.loader_2d_obj_det import Augmentation, augment_array, augment_image

HEIGHT, WIDTH = 96, 160
# x1, y1, x2, y2 in px; the last one touches the border
BOXES = [(10, 12, 40, 50), (60, 30, 100, 70), (120, 5, 155, 35), (0, 70, 30, 96)]
AUGMENTATION = {"hflip_prob": 0.5, "brightness": 0.3, "contrast": 0.3, "saturation": 0.3, "hue": 0.02,
                "scale": [0.8, 1.2], "translate": 0.1, "min_box_size": 2.0}


def scene():
    """A black image with a bright filled rectangle per box: a box frames its object iff it frames bright pixels."""
    image = torch.zeros(3, HEIGHT, WIDTH, dtype=torch.uint8)
    for i, (x1, y1, x2, y2) in enumerate(BOXES):
        image[:, y1:y2, x1:x2] = torch.tensor([200, 160 + 20 * i, 120]).view(3, 1, 1)
    return {"image": tv_tensors.Image(image),
            "boxes": tv_tensors.BoundingBoxes(torch.tensor(BOXES, dtype=torch.float32), format="XYXY",
                                              canvas_size=(HEIGHT, WIDTH)),
            "labels": torch.arange(len(BOXES))}


def assert_boxes_frame_the_objects(sample):
    bright = sample["image"].float().amax(dim=0) > 50  # (H, W): object pixels
    covered = torch.zeros_like(bright)
    assert len(sample["boxes"]) == len(sample["labels"])
    for x1, y1, x2, y2 in sample["boxes"].round().int().tolist():
        assert 0 <= x1 < x2 <= WIDTH and 0 <= y1 < y2 <= HEIGHT
        inside = bright[y1:y2, x1:x2]
        assert inside.float().mean() > 0.9  # the box holds its object ...
        # ... and its object does not extend past the box (a one-pixel ring, for resampling)
        ring = bright[max(y1 - 2, 0):y2 + 2, max(x1 - 2, 0):x2 + 2].sum() - bright[y1:y2, x1:x2].sum()
        assert ring <= 2 * ((x2 - x1) + (y2 - y1)) * 0.6
        covered[y1:y2, x1:x2] = True
    assert (bright & ~covered).sum() <= 0.02 * bright.sum() + 4  # no object lost its box


def test_full_pipeline_keeps_boxes_on_their_objects():
    """The loader's augmentation: parameters drawn once, applied to the boxes and to the image separately (as the
    workers and the device do with data.json "decode": "device")."""
    augmentation = Augmentation(AUGMENTATION)
    for seed in range(20):
        torch.manual_seed(seed)
        sample = scene()
        params = augmentation.draw(sample["boxes"])
        boxes, labels = augmentation.boxes(sample["boxes"], sample["labels"], params)
        assert_boxes_frame_the_objects({"image": augment_image(sample["image"].as_subclass(torch.Tensor), params),
                                        "boxes": boxes, "labels": labels})


def test_flip_mirrors_boxes():
    augmentation = Augmentation({**AUGMENTATION, "hflip_prob": 1.0, "scale": [1.0, 1.0], "translate": 0.0})
    sample = scene()
    params = augmentation.draw(sample["boxes"])
    boxes, _ = augmentation.boxes(sample["boxes"], sample["labels"], params)
    assert boxes[0].tolist() == [WIDTH - 40, 12, WIDTH - 10, 50]


def test_boxes_pushed_out_of_the_image_are_dropped_with_their_labels():
    augmentation = Augmentation({**AUGMENTATION, "translate": 0.5})
    torch.manual_seed(0)
    kept = []
    for _ in range(30):
        sample = scene()
        boxes, labels = augmentation.boxes(sample["boxes"], sample["labels"], augmentation.draw(sample["boxes"]))
        assert len(boxes) == len(labels) and set(labels.tolist()) <= set(range(len(BOXES)))
        kept.append(len(labels))
    assert min(kept) < len(BOXES)


def test_workers_opencv_augmentation_matches_torchvision_kernels():
    """The workers' augment_array (OpenCV) and the device path's augment_image (transforms.v2) give the same
    image within two grey levels (a kernel may round one level differently, and a later one double it), for any
    drawn parameters, but where the affine's source pixel is within rounding of a half pixel: there the nearest
    pixels of the two may be neighbours, far apart on this high-frequency texture (up to 1 % of the pixels, for
    a scale near 7/6)."""
    augmentation = Augmentation(AUGMENTATION)
    rows, columns = torch.meshgrid(torch.arange(HEIGHT), torch.arange(WIDTH), indexing="ij")
    textured = torch.stack([rows * 255 // HEIGHT, columns * 255 // WIDTH, (rows * columns) % 256]).to(torch.uint8)
    image = torch.maximum(scene()["image"].as_subclass(torch.Tensor), textured)  # every hue, edges, flat areas
    for seed in range(40):
        torch.manual_seed(seed)
        params = augmentation.draw(scene()["boxes"])
        expected = augment_image(image, params).int()
        got = torch.from_numpy(augment_array(image.permute(1, 2, 0).contiguous().numpy(), params)).permute(2, 0, 1)
        difference = (got.int() - expected).abs()
        assert difference.float().mean() < 0.5 and (difference > 2).float().mean() < 0.02, (seed, params)
