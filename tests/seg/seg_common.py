"""Independent expectations for the segmentation tests (numpy, from method.md and the VOC files).

Nothing here calls the project's loss code: the expected GRPO-RM gradients are derived from the
formulas of method.md, and the metrics are recomputed from the PNG files on disk.
"""
from __future__ import annotations

import re
from pathlib import Path

import numpy as np
from conftest import REPO
from PIL import Image

SEG_CONFIGS = REPO / 'tests' / 'seg' / 'configs'
TINY_CFG = SEG_CONFIGS / 'grpo_rm_voc_tiny.py'
# 5 classes in the data (0 = background): learnable in a few dozen CPU iterations
DATA_CLASSES = 5


def last_metric(log: str, name: str) -> float:
    values = re.findall(rf'{re.escape(name)}: ([0-9.]+)', log)
    assert values, f'no {name} in the output:\n{log[-3000:]}'
    return float(values[-1])


def grpo_logit_grad(logits: np.ndarray, labels: np.ndarray, ignore_index: int = 255,
                    eps: float = 1e-6, weighting: str | None = None) -> np.ndarray:
    """d loss / d logits of the GRPO-RM loss with its default rewards at ratio 1 (method.md
    sections 2-4, 6), for the 'uniform' or 'pi_old' group weighting (None: GRPORMLoss's
    default).

    logits (Q, C) (one row per pixel), labels (Q,). Rewards r = accuracy + uniformity with
    p = softmax(logits); weights w = 1/C or p; A = (r - mean_w r) / (std_w r + eps) per row
    (population std under w); the loss is the mean over valid rows of -sum_i w_i ratio_i A_i,
    so row q gets -w_q A_q / n_valid and ignored rows get 0.
    """
    if weighting is None:
        from grpo_rm_mm.models.losses import GRPORMLoss
        weighting = GRPORMLoss().group_weighting
    q, c = logits.shape
    valid = labels != ignore_index
    grad = np.zeros_like(logits, dtype=np.float64)
    z = logits[valid].astype(np.float64)
    y = labels[valid].astype(np.int64)
    p = np.exp(z - z.max(1, keepdims=True))
    p /= p.sum(1, keepdims=True)
    onehot = np.eye(c)[y]
    p_y = p[np.arange(len(y)), y][:, None]
    r_uni = -(p / (1 - p_y) - 1.0 / (c - 1)) * (1 - onehot)
    r = onehot + r_uni
    w = {'uniform': np.full_like(p, 1.0 / c), 'pi_old': p}[weighting]
    mean = (w * r).sum(1, keepdims=True)
    std = np.sqrt((w * (r - mean) ** 2).sum(1, keepdims=True))
    adv = (r - mean) / (std + eps)
    grad[valid] = -w * adv / valid.sum()
    return grad


def read_masks(voc_root: str | Path, split: str, folder: str = 'SegmentationClass'
               ) -> tuple[list[str], list[np.ndarray]]:
    root = Path(voc_root)
    names = (root / 'ImageSets' / 'Segmentation' / f'{split}.txt').read_text().split()
    return names, [np.array(Image.open(root / folder / f'{n}.png')) for n in names]


def background_only_miou(voc_root: str | Path, split: str = 'val') -> float:
    """mIoU (%) of a model that predicts background everywhere, as IoUMetric computes it:
    background IoU = background pixels / labelled pixels, 0 for every other class present,
    classes absent from both prediction and labels left out (nan)."""
    _, masks = read_masks(voc_root, split)
    labelled = np.concatenate([m[m != 255] for m in masks])
    present = np.unique(labelled)
    return 100.0 * float((labelled == 0).mean()) / len(present)


def miou_from_pngs(pred_dir: str | Path, voc_root: str | Path, split: str = 'val',
                   num_classes: int = 21) -> tuple[float, float]:
    """(aAcc, mIoU) in % recomputed from the predicted PNGs and the ground-truth masks."""
    names, masks = read_masks(voc_root, split)
    inter = np.zeros(num_classes)
    union = np.zeros(num_classes)
    correct = total = 0
    for name, gt in zip(names, masks):
        pred = np.array(Image.open(Path(pred_dir) / f'{name}.png'))
        assert pred.shape == gt.shape, f'{name}: prediction {pred.shape} vs mask {gt.shape}'
        valid = gt != 255
        p, g = pred[valid].astype(int), gt[valid].astype(int)
        correct += int((p == g).sum())
        total += int(valid.sum())
        for k in range(num_classes):
            inter[k] += np.sum((p == k) & (g == k))
            union[k] += np.sum((p == k) | (g == k))
    with np.errstate(invalid='ignore', divide='ignore'):
        iou = inter / union
    return 100.0 * correct / total, 100.0 * float(np.nanmean(iou))
