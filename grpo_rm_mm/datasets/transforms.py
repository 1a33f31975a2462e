"""Registered data transforms."""
from __future__ import annotations

import numpy as np
from mmcv.transforms import BaseTransform
from mmpretrain.registry import TRANSFORMS


@TRANSFORMS.register_module()
class GrayToRGB(BaseTransform):
    """Repeat a grayscale image (H, W) or (H, W, 1) into 3 identical channels (H, W, 3), so
    grayscale data sets (MNIST, Fashion-MNIST) feed backbones pretrained on RGB. Images that
    already have 3 channels pass unchanged.

    Required keys: ``img``. Modified keys: ``img``, ``img_shape``.
    """

    def transform(self, results: dict) -> dict:
        img = results['img']
        if img.ndim == 3 and img.shape[2] == 3:
            return results
        if img.ndim == 3 and img.shape[2] == 1:
            img = img[..., 0]
        if img.ndim != 2:
            raise ValueError(f'GrayToRGB expects an (H, W), (H, W, 1) or (H, W, 3) image, '
                             f'got shape {img.shape}')
        results['img'] = np.repeat(img[..., None], 3, axis=2)
        results['img_shape'] = results['img'].shape[:2]
        return results
