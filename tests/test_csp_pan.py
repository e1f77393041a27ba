"""The "csp_pan" Yolo architecture and its task-aligned loss: shapes, the distribution decoding, the assignment on
hand-made cases, finite losses and gradients on awkward batches, the solver's choice, and that it learns."""

import pytest
import torch
from torchvision.ops import box_iou

import train
from dataset.NuscenesDataset.collate_2d import padded_targets
from models.Yolo.aligned_loss import AlignedDetectionLoss
from models.Yolo.csp_pan import REG_MAX, CspPanYolo, decode_distribution
from models.Yolo.loss import NO_BOX
from models.Yolo.yolo import STRIDES
from tests.conftest import NORMALIZE, config, grid_points, tiny_flags

ARCHITECTURE = {"architecture": "csp_pan", "backbone": "csp", "widths": [8, 16, 16, 32, 32], "depths": [1, 1, 1, 1]}


def small_model(width=96, height=64):
    torch.manual_seed(0)
    return CspPanYolo({**config("model"), **ARCHITECTURE}, (width, height), num_classes=10, normalize=NORMALIZE)


def loss_fn(**changes):
    return AlignedDetectionLoss({**config("loss")["aligned"], **changes})


def test_forward_shapes_fold_cameras():
    outputs = small_model()(torch.randn(2, 3, 3, 64, 96))  # 2 samples x 3 cameras
    points = sum((64 // s) * (96 // s) for s in STRIDES)
    assert outputs["class_logits"].shape == (6, points, 10)
    assert outputs["distance_logits"].shape == (6, points, 4, REG_MAX)
    assert outputs["boxes"].shape == (6, points, 4) and outputs["points"].shape == (points, 2)


def test_frozen_batchnorm_normalizes_by_fixed_statistics():
    """freeze_batchnorm: no BatchNorm2d left, and a training-mode forward equals an evaluation-mode one."""
    torch.manual_seed(0)
    model = CspPanYolo({**config("model"), **ARCHITECTURE, "freeze_batchnorm": True}, (96, 64), num_classes=10,
                       normalize=NORMALIZE)
    assert not any(isinstance(module, torch.nn.BatchNorm2d) for module in model.modules())
    images = torch.randn(1, 2, 3, 64, 96)
    trained = model.train()(images)["class_logits"]
    assert torch.equal(trained, model.eval()(images)["class_logits"])


def test_resnet_backbone_plugs_in():
    model = CspPanYolo({**config("model"), "architecture": "csp_pan", "backbone": "resnet18"}, (96, 64), 10, NORMALIZE)
    assert model(torch.randn(1, 1, 3, 64, 96))["boxes"].shape == (1, 126, 4)


def test_distribution_decoding_round_trip():
    """A distribution with all its mass split between the two bins around a distance decodes to that distance."""
    points, strides = torch.tensor([[20.0, 20.0], [40.0, 24.0]]), torch.tensor([8.0, 16.0])
    sides = torch.tensor([[1.25, 0.5, 3.0, 14.75], [0.0, 2.5, 7.2, 1.0]])  # (P, 4) in strides
    left = sides.floor().long()
    logits = torch.full((2, 4, REG_MAX), -1e4)
    logits.scatter_(2, left[..., None], torch.log(left + 1 - sides)[..., None].clamp(min=-1e4))
    logits.scatter_(2, (left + 1)[..., None], torch.log(sides - left)[..., None].clamp(min=-1e4))
    boxes = decode_distribution(logits, points, strides)
    expected = torch.cat([points - sides[:, :2] * strides[:, None], points + sides[:, 2:] * strides[:, None]], 1)
    assert torch.allclose(boxes, expected, atol=1e-3)


def assign(gt_boxes, predicted=None, width=96, height=64, labels=None, probabilities=None, **changes):
    """Assignment of the boxes of one image (by the loss with `changes` to its config); predicted boxes default to a
    24 px square around each point, class probabilities to 0.5."""
    points, strides = grid_points(width, height)
    if predicted is None:
        predicted = torch.cat([points - 12, points + 12], dim=1)
    if probabilities is None:
        probabilities = torch.full((len(points), 10), 0.5)
    gt = torch.tensor(gt_boxes, dtype=torch.float32).reshape(1, -1, 4)
    gt_labels = torch.tensor(labels or [0] * gt.shape[1]).reshape(1, -1)
    assigned, target = loss_fn(**changes).assign(probabilities[None], predicted[None], points, strides, gt, gt_labels,
                                                 torch.ones(gt.shape[:2], dtype=torch.bool))
    return assigned[0], target[0], points


def test_assignment_without_boxes():
    points, strides = grid_points(96, 64)
    assigned, target = loss_fn().assign(torch.rand(3, len(points), 10), torch.rand(3, len(points), 4), points,
                                        strides, torch.zeros(3, 0, 4), torch.zeros(3, 0, dtype=torch.long),
                                        torch.zeros(3, 0, dtype=torch.bool))
    assert (assigned == NO_BOX).all() and (target == 0).all()


def test_assignment_takes_the_best_aligned_points():
    """Of the points inside the box, the topk of highest p^alpha x IoU^beta (p: the probability of the box's class);
    targets t scaled so that the best-aligned point's is the best IoU of the box's points; 0 elsewhere."""
    box, label = [20.0, 12.0, 52.0, 44.0], 3
    points, _ = grid_points(96, 64)
    probabilities = torch.rand(len(points), 10, generator=torch.Generator().manual_seed(0))
    assigned, target, _ = assign([box], labels=[label], probabilities=probabilities)
    chosen = assigned == 0
    predicted = torch.cat([points - 12, points + 12], dim=1)
    iou = box_iou(torch.tensor([box]), predicted)[0]
    inside = (points[:, 0] > 20) & (points[:, 0] < 52) & (points[:, 1] > 12) & (points[:, 1] < 44)
    cfg = config("loss")["aligned"]
    alignment = torch.where(inside, probabilities[:, label] ** cfg["alpha"] * iou ** cfg["beta"], 0.0)
    assert chosen.sum() == cfg["topk"] and torch.equal(chosen, torch.zeros_like(chosen).index_fill(
        0, alignment.topk(cfg["topk"]).indices, True))
    expected = alignment / alignment[chosen].max() * iou[chosen].max()
    assert torch.allclose(target[chosen], expected[chosen]) and (target[~chosen] == 0).all()


def test_ablations_nearest_assignment_and_binary_targets():
    """"assignment": "nearest" takes the topk candidates nearest the box's centre whatever the predictions;
    "iou_aware": false makes the class targets 1 at the positive points."""
    box = [20.0, 12.0, 52.0, 44.0]
    points, _ = grid_points(96, 64)
    probabilities = torch.rand(len(points), 10, generator=torch.Generator().manual_seed(0))
    assigned, target, _ = assign([box], probabilities=probabilities, assignment="nearest", iou_aware=False)
    chosen = assigned == 0
    inside = (points[:, 0] > 20) & (points[:, 0] < 52) & (points[:, 1] > 12) & (points[:, 1] < 44)
    distance = (points - torch.tensor([36.0, 28.0])).abs().max(dim=1).values
    assert chosen.sum() == config("loss")["aligned"]["topk"] and inside[chosen].all()
    assert distance[chosen].max() <= distance[inside & ~chosen].min()
    assert (target[chosen] == 1).all() and (target[~chosen] == 0).all()


def test_assignment_gives_a_box_smaller_than_a_stride_its_points():
    """No point lies inside the box: the centre prior gives it the points whose predicted boxes overlap it."""
    assigned, target, points = assign([[9.0, 9.0, 11.0, 11.0]])  # between the stride-8 points
    assert (assigned == 0).sum() == 10 and (target[assigned == 0] > 0).all()
    assert ((points[assigned == 0] - 10).abs().max(dim=1).values <= 12).all()  # their 24 px boxes cover it


def test_assignment_splits_overlapping_boxes():
    """Two overlapping boxes both get points, and a point predicts one box: the one its predicted box overlaps most."""
    boxes = [[30.0, 10.0, 54.0, 40.0], [38.0, 14.0, 62.0, 44.0]]
    assigned, _, points = assign(boxes, labels=[1, 2])
    assert (assigned == 0).any() and (assigned == 1).any()
    predicted = torch.cat([points - 12, points + 12], dim=1)
    iou = box_iou(torch.tensor(boxes), predicted)  # (2, P)
    for box in (0, 1):
        taken = assigned == box
        assert (iou[box, taken] >= iou[1 - box, taken]).all()


def test_assignment_of_a_box_at_a_level_boundary_and_the_image_edge():
    """A 64 px box (the old assignment's boundary between the stride-8 and stride-16 levels) in the image's corner:
    with predicted boxes of 3 strides, the levels compete and the box takes the points whose boxes fit it best."""
    points, strides = grid_points(128, 96)
    predicted = torch.cat([points - 1.5 * strides[:, None], points + 1.5 * strides[:, None]], dim=1)
    box = [0.0, 0.0, 64.0, 64.0]
    assigned, _, _ = assign([box], predicted=predicted, width=128, height=96)
    chosen = assigned == 0
    assert chosen.sum() == 10 and 16.0 in strides[chosen].tolist()
    iou = box_iou(torch.tensor([box]), predicted)[0]
    assert iou[chosen].min() >= iou[~chosen].max() - 1e-6


@pytest.mark.parametrize("case", ["no_boxes_in_batch", "some_images_empty", "border_boxes", "tiny_boxes"])
def test_losses_and_gradients_are_finite(case):
    model = small_model()
    boxes = {"no_boxes_in_batch": [], "some_images_empty": [[10, 10, 40, 50], [0, 0, 96, 64]],
             "border_boxes": [[0, 0, 20, 64], [80, 40, 96, 64]], "tiny_boxes": [[3, 3, 3.5, 3.2], [90, 60, 91, 61]]}
    images = {"no_boxes_in_batch": [], "some_images_empty": [0, 4], "border_boxes": [1, 1], "tiny_boxes": [2, 5]}
    targets = padded_targets(torch.tensor(boxes[case], dtype=torch.float32).reshape(-1, 4),
                             torch.arange(len(boxes[case])) % 10, torch.tensor(images[case]).long(), num_images=6)
    losses = loss_fn()(model(torch.randn(2, 3, 3, 64, 96)), targets)
    assert set(losses) == {"box_loss", "dfl_loss", "cls_loss", "total_loss", "num_positives"}
    assert all(torch.isfinite(value).all() for value in losses.values())
    losses["total_loss"].backward()
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)
    if case == "no_boxes_in_batch":
        assert losses["box_loss"] == 0 and losses["dfl_loss"] == 0 and losses["num_positives"] == 0
    else:
        assert losses["num_positives"] >= len(boxes[case])


def test_overfits_a_few_boxes():
    """On one fixed batch of hand-made boxes, a small csp_pan model recovers every box with IoU >= 0.7 and its
    class as the best-scoring detection near it."""
    model = small_model(128, 96)
    images = torch.randn(1, 2, 3, 96, 128)
    boxes = torch.tensor([[10.0, 10, 60, 50], [70, 30, 120, 90], [40, 60, 52, 74], [20, 20, 70, 80]])
    labels, box_image_index = torch.tensor([1, 3, 5, 7]), torch.tensor([0, 0, 0, 1])
    targets = padded_targets(boxes, labels, box_image_index, num_images=2)
    steps = 250
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.0)
    scheduler = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=3e-3, total_steps=steps, pct_start=0.1)
    for _ in range(steps):
        losses = loss_fn()(model(images), targets)
        optimizer.zero_grad()
        losses["total_loss"].backward()
        optimizer.step()
        scheduler.step()
    model.eval()
    detections = model.predict(images)
    for box, label, image in zip(boxes, labels, box_image_index, strict=True):
        mine = detections["image_index"] == image
        iou = box_iou(box[None], detections["boxes"][mine])[0]
        near = iou >= 0.7
        assert near.any(), (box, iou.max())
        best = detections["scores"][mine][near].argmax()
        assert detections["labels"][mine][near][best] == label


def test_train_py_trains_and_evaluates_the_csp_pan_architecture(embedded_dir, tmp_path):
    """The solver builds the architecture and loss that config/model.json names; one epoch through train.py."""
    flags = tiny_flags(embedded_dir, tmp_path, "exp", "--num_epochs", "1", "--cfg", "model.Yolo.architecture=csp_pan",
                       "--cfg", "model.Yolo.backbone=csp", "--cfg", "model.Yolo.widths=[8, 16, 16, 32, 32]")
    train.main(flags)
    checkpoint = torch.load(tmp_path / "exp" / "last.pt", weights_only=True)
    assert any(key.startswith("heads.") for key in checkpoint["model"])
    assert (tmp_path / "exp" / "metrics.json").is_file()
