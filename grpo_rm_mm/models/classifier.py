"""mmpretrain image classifier for GRPO-RM post-training: frozen (or partly frozen) backbone,
trainable head, and the representations evaluated by kNN / SR."""
from __future__ import annotations

from collections.abc import Sequence

import torch
from mmpretrain.models import ImageClassifier
from mmpretrain.registry import MODELS
from mmpretrain.structures import DataSample

from .feature_cache import FeatureCache, fingerprint
from .freeze import FrozenBackboneMixin

REPRESENTATIONS = ('backbone', 'pre_logits')


@MODELS.register_module()
class GRPORMClassifier(FrozenBackboneMixin, ImageClassifier):
    """``ImageClassifier`` with a frozen backbone and representation outputs.

    Args:
        backbone, neck, head, pretrained, train_cfg, data_preprocessor, init_cfg: as in
            ``ImageClassifier`` (the backbone's ``init_cfg`` loads its published weights).
        freeze_backbone: freeze the backbone (default). Fully frozen, it runs in eval mode under
            ``torch.no_grad()``.
        trainable_backbone: parameter-name prefixes of the backbone left trainable when frozen,
            e.g. ``('layers.11.', 'ln1.')`` for the last block and final norm of a ViT.
        feature_cache: cache the frozen backbone (+ neck) output per distinct input image
            (:class:`~grpo_rm_mm.models.feature_cache.FeatureCache`): ``True``, or a dict with
            ``file`` (persist it across runs; only reused for identical frozen weights; with
            ``FeatureCacheHook``) and ``max_items``. Needs a fully frozen backbone.
        representations: which representations ``predict`` attaches to every data sample, as
            ``rep_<name>`` (D,) tensors, for the kNN / SR metrics: ``'backbone'`` (the head's
            input: backbone output after the neck, if any) and ``'pre_logits'`` (the head's
            hidden layer).
    """

    def __init__(self, backbone: dict, neck: dict | None = None, head: dict | None = None,
                 freeze_backbone: bool = True, trainable_backbone: Sequence[str] = (),
                 representations: Sequence[str] = REPRESENTATIONS,
                 feature_cache: bool | dict = False, **kwargs) -> None:
        super().__init__(backbone=backbone, neck=neck, head=head, **kwargs)
        bad = [r for r in representations if r not in REPRESENTATIONS]
        if bad:
            raise ValueError(f'representations {bad}: choose from {REPRESENTATIONS}')
        self.representations = tuple(representations)
        self.setup_frozen_backbone(freeze_backbone, trainable_backbone)
        self.feature_cache: FeatureCache | None = None
        self.feature_cache_file: str | None = None
        if feature_cache:
            if not self.backbone_fully_frozen:
                raise ValueError('feature_cache needs a fully frozen backbone '
                                 '(freeze_backbone=True, trainable_backbone=())')
            opts = dict(feature_cache) if isinstance(feature_cache, dict) else {}
            self.feature_cache_file = opts.pop('file', None)
            self.feature_cache = FeatureCache(**opts)
            self._cache_loaded = False

    def feature_cache_fingerprint(self) -> str:
        """Digest of the frozen backbone's and neck's weights and buffers."""
        items = list(self.backbone.state_dict().items())
        if self.with_neck:
            items += [(f'neck.{k}', v) for k, v in self.neck.state_dict().items()]
        return fingerprint(items)

    def load_feature_cache(self) -> bool:
        """Load ``feature_cache.file`` if it was written for these weights (once)."""
        if self.feature_cache is None or self.feature_cache_file is None or self._cache_loaded:
            return False
        self._cache_loaded = True
        return self.feature_cache.load(self.feature_cache_file, self.feature_cache_fingerprint())

    def save_feature_cache(self) -> bool:
        """Write the cache to ``feature_cache.file`` if it has new entries."""
        if self.feature_cache is None or self.feature_cache_file is None:
            return False
        if not self.feature_cache.dirty:
            return False
        self.feature_cache.save(self.feature_cache_file, self.feature_cache_fingerprint())
        return True

    def _backbone_neck(self, inputs: torch.Tensor):
        x = self.backbone(inputs)
        return self.neck(x) if self.with_neck else x

    def extract_feat(self, inputs: torch.Tensor, stage: str = 'neck'):
        """As ``ImageClassifier.extract_feat`` (stages ``backbone``, ``neck``, ``pre_logits``),
        with the backbone under :meth:`backbone_context`."""
        if stage not in ('backbone', 'neck', 'pre_logits'):
            raise ValueError(f"stage={stage!r}: use 'backbone', 'neck' or 'pre_logits'")
        if self.feature_cache is not None and stage != 'backbone':
            self.load_feature_cache()
            with torch.no_grad():
                x = self.feature_cache.features(inputs, self._backbone_neck)
            if stage == 'neck':
                return x
            return self.head.pre_logits(x)
        with self.backbone_context():
            x = self.backbone(inputs)
        if stage == 'backbone':
            return x
        if self.with_neck:
            x = self.neck(x)
        if stage == 'neck':
            return x
        if not (self.with_head and hasattr(self.head, 'pre_logits')):
            raise ValueError("stage='pre_logits' needs a head with a pre_logits method")
        return self.head.pre_logits(x)

    @staticmethod
    def _flat(feats) -> torch.Tensor:
        x = feats[-1] if isinstance(feats, (tuple, list)) else feats
        if x.ndim != 2:
            raise ValueError(f'the backbone representation must be (N, D), got {tuple(x.shape)};'
                             f" pool feature maps with neck=dict(type='GlobalAveragePooling')")
        return x

    def representations_of(self, feats, names: Sequence[str]) -> dict[str, torch.Tensor]:
        """``{name: (N, D)}`` from neck-stage ``feats``."""
        out = {}
        for name in names:
            if name == 'backbone':
                out[name] = self._flat(feats)
            elif name == 'pre_logits':
                out[name] = self.head.pre_logits(feats)
            else:
                raise ValueError(f'representation {name!r}: choose from {REPRESENTATIONS}')
        return out

    @torch.no_grad()
    def extract_representation(self, inputs: torch.Tensor,
                               name: str = 'pre_logits') -> torch.Tensor:
        """(N, 3, H, W) preprocessed images -> (N, D) representation ``name`` (``'backbone'``
        or ``'pre_logits'``, the post-trained head's hidden layer)."""
        return self.representations_of(self.extract_feat(inputs), (name, ))[name]

    def predict(self, inputs: torch.Tensor, data_samples: list[DataSample] | None = None,
                **kwargs) -> list[DataSample]:
        """Head predictions (``pred_score``, ``pred_label``) plus ``rep_<name>`` fields."""
        feats = self.extract_feat(inputs)
        preds = self.head.predict(feats, data_samples, **kwargs)
        for name, rep in self.representations_of(feats, self.representations).items():
            for sample, row in zip(preds, rep.detach()):
                sample.set_field(row, f'rep_{name}')
        return preds
