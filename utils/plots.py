"""Figures written by training and testing: loss and metric curves, precision-recall curves, detection mosaics.
Each file is written atomically."""

import torch
from matplotlib.figure import Figure  # without pyplot: no backend, no global figure state
from torchvision.transforms.v2.functional import to_pil_image
from torchvision.utils import draw_bounding_boxes, make_grid

from utils.io import atomic_write


def save_figure(figure: Figure, path: str) -> None:
    atomic_write(path, lambda tmp_path: figure.savefig(tmp_path, format="png", dpi=100, bbox_inches="tight"))


def plot_curves(history: list, metric_names: tuple, path: str) -> None:
    """history: one dict per epoch with 'epoch', the mean training loss terms ('*_loss') and, on evaluated
    epochs, the validation metrics `metric_names` (any scale, or None). Left: losses per epoch; right: metrics,
    on an axis scaled to their values."""
    figure = Figure(figsize=(11, 4))
    loss_axis, metric_axis = figure.subplots(1, 2)
    epochs = [row["epoch"] for row in history]
    for key in [key for key in history[-1] if key.endswith("_loss")]:
        loss_axis.plot(epochs, [row.get(key) for row in history], marker=".", label=key)
    loss_axis.set(xlabel="epoch", ylabel="training loss", yscale="log", title="losses")
    if loss_axis.lines:  # a solver may log no "_loss" terms
        loss_axis.legend()
    evaluated = [row for row in history if metric_names[0] in row]
    for key in metric_names:  # None: undefined (no ground truth of that kind), not drawn
        values = [float("nan") if row[key] is None else row[key] for row in evaluated]
        metric_axis.plot([row["epoch"] for row in evaluated], values, marker="o", label=key)
    metric_axis.set(xlabel="epoch", ylabel="validation metric", title="validation")
    metric_axis.legend()
    save_figure(figure, path)


def plot_precision_recall(recall, precision, class_name: str, path: str) -> None:
    """Precision-recall curve of one class (precision -1 = undefined, not drawn)."""
    figure = Figure(figsize=(5, 4))
    axis = figure.subplots()
    defined = precision > -1
    axis.plot(recall[defined], precision[defined])
    axis.set(xlabel="recall", ylabel="precision", xlim=(0, 1), ylim=(0, 1.02), title=class_name)
    save_figure(figure, path)


def save_detection_mosaic(images: torch.Tensor, ground_truth: list, predictions: list, class_names: list,
                          columns: int, path: str) -> None:
    """Tile images (N, 3, H, W) uint8 into a grid of `columns` columns, with the ground-truth boxes in green and
    the predicted boxes in red, labelled with class name (and score). ground_truth: N (boxes (K, 4), labels
    (K,)); predictions: N (boxes (D, 4), labels (D,), scores (D,)); boxes in the images' pixels."""
    drawn = []
    for image, (gt_boxes, gt_labels), (boxes, labels, scores) in zip(images, ground_truth, predictions, strict=True):
        if len(gt_boxes):
            image = draw_bounding_boxes(image, gt_boxes, [class_names[i] for i in gt_labels.tolist()], colors="lime")
        if len(boxes):
            names = [f"{class_names[i]} {s:.2f}" for i, s in zip(labels.tolist(), scores.tolist(), strict=True)]
            image = draw_bounding_boxes(image, boxes, names, colors="red")
        drawn.append(image)
    grid = make_grid(torch.stack(drawn), nrow=columns, padding=4, pad_value=255)
    atomic_write(path, lambda tmp_path: to_pil_image(grid).save(tmp_path, format="PNG"))
