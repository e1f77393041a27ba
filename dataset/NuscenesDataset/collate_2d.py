"""Batching of multi-camera detection samples."""

import torch


def padded_targets(boxes: torch.Tensor, labels: torch.Tensor, box_image_index: torch.Tensor, num_images: int) -> dict:
    """Boxes (T, 4) and labels (T,) listed image after image, box_image_index (T,) -> target_boxes (I, M, 4) and
    target_labels (I, M), zero-padded to M, the most boxes of any image, and target_valid (I, M): the losses' fixed
    shapes, made here on the host so that the training step needs no box count from the device."""
    counts = torch.bincount(box_image_index, minlength=num_images)
    slot = torch.arange(len(boxes)) - (torch.cumsum(counts, 0) - counts)[box_image_index]  # (T,) within its image
    max_boxes = int(counts.max()) if len(boxes) else 0
    target_boxes = boxes.new_zeros(num_images, max_boxes, 4)
    target_labels = labels.new_zeros(num_images, max_boxes)
    target_valid = torch.zeros(num_images, max_boxes, dtype=torch.bool)
    target_boxes[box_image_index, slot] = boxes
    target_labels[box_image_index, slot] = labels
    target_valid[box_image_index, slot] = True
    return {"target_boxes": target_boxes, "target_labels": target_labels, "target_valid": target_valid}


def collate_detection(items: list) -> dict:
    """Batch items of a multi-camera detection dataset (see dataset/NuscenesDataset/loader_2d_obj_det.py).

    In: B dicts with images (N_cam, 3, H, W), boxes (M_b, 4), labels (M_b,), counts (N_cam,), image_ids (N_cam,),
    orig_sizes (N_cam, 2).
    Out: images (B, N_cam, 3, H, W) (items with jpegs, jpeg_paths and augmentation instead: those, as flat lists
    over the I = B * N_cam images); boxes (T, 4) and labels (T,), all boxes of the batch; box_image_index (T,),
    the index of each box's image among the I = B * N_cam images with the cameras folded into the batch
    (b * N_cam + camera); the same boxes padded per image (padded_targets: target_boxes (I, M, 4), target_labels
    (I, M), target_valid (I, M)); counts (B, N_cam); image_ids (B, N_cam); orig_sizes (B, N_cam, 2).
    """
    counts = torch.stack([item["counts"] for item in items])
    boxes = torch.cat([item["boxes"] for item in items]).reshape(-1, 4)
    labels = torch.cat([item["labels"] for item in items])
    box_image_index = torch.repeat_interleave(torch.arange(counts.numel()), counts.flatten())
    if "jpegs" in items[0]:  # decode "device": the files and augmentation parameters, flat over the I images
        pixels = {key: [value for item in items for value in item[key]]
                  for key in ("jpegs", "jpeg_paths", "augmentation")}
    else:
        pixels = {"images": torch.stack([item["images"] for item in items])}
    return {
        **pixels,
        "boxes": boxes,
        "labels": labels,
        "box_image_index": box_image_index,
        **padded_targets(boxes, labels, box_image_index, counts.numel()),
        "counts": counts,
        "image_ids": torch.stack([item["image_ids"] for item in items]),
        "orig_sizes": torch.stack([item["orig_sizes"] for item in items]),
    }
