"""Batching of multi-camera detection samples."""

import torch


def collate_detection(items: list) -> dict:
    """Batch items of a multi-camera detection dataset (see dataset/NuscenesDataset/loader_2d_obj_det.py).

    In: B dicts with images (N_cam, 3, H, W), boxes (M_b, 4), labels (M_b,), counts (N_cam,), image_ids (N_cam,),
    orig_sizes (N_cam, 2).
    Out: images (B, N_cam, 3, H, W); boxes (T, 4) and labels (T,), all boxes of the batch; box_image_index (T,),
    the index of each box's image among the B * N_cam images with the cameras folded into the batch
    (b * N_cam + camera); counts (B, N_cam); image_ids (B, N_cam); orig_sizes (B, N_cam, 2).
    """
    counts = torch.stack([item["counts"] for item in items])
    return {
        "images": torch.stack([item["images"] for item in items]),
        "boxes": torch.cat([item["boxes"] for item in items]).reshape(-1, 4),
        "labels": torch.cat([item["labels"] for item in items]),
        "box_image_index": torch.repeat_interleave(torch.arange(counts.numel()), counts.flatten()),
        "counts": counts,
        "image_ids": torch.stack([item["image_ids"] for item in items]),
        "orig_sizes": torch.stack([item["orig_sizes"] for item in items]),
    }
