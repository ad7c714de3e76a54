"""Semantic segmentation on detectron2, as in the MoCo paper's appendix (Cityscapes, VOC).

The model is detectron2's ``SemanticSegmentor``: a ResNet whose conv5 (res5) is dilated by
``MODEL.RESNETS.RES5_DILATION: 2`` so the features have stride 16, followed by ``FCNHead`` below:
two 3x3 convolutions of 256 channels with dilation 6, each followed by BN and ReLU, then a 1x1
classifier whose logits are upsampled (bilinear) to the input resolution. Pixels labelled
``MODEL.SEM_SEG_HEAD.IGNORE_VALUE`` (255) are left out of the loss and of the evaluation.

Training data: the image is rescaled by a random factor in ``INPUT.SCALE_RANGE`` ([0.5, 2.0]),
randomly cropped to ``INPUT.CROP.SIZE`` (769 Cityscapes / 513 VOC) and flipped. A crop larger than
the rescaled image keeps the whole image; detectron2's batching then pads the image with zeros
(the mean pixel, after normalisation) and the labels with the ignore value.

``add_semseg_config(cfg)`` declares the extra config keys; ``SemSegMapper`` turns a dataset dict
into model input. Evaluation is detectron2's (SemSegEvaluator for VOC, CityscapesSemSegEvaluator
with the official Cityscapes script), see transfer/d2/evaluation.py.
"""
from __future__ import annotations

import copy

import fvcore.nn.weight_init as weight_init
import numpy as np
import torch
from detectron2.config import CfgNode, configurable
from detectron2.data import detection_utils as utils
from detectron2.data import transforms as T
from detectron2.layers import Conv2d, ShapeSpec, get_norm
from detectron2.modeling import SEM_SEG_HEADS_REGISTRY
from PIL import Image
from torch import nn
from torch.nn import functional as F


def add_semseg_config(cfg: CfgNode) -> CfgNode:
    """Declare the keys our semantic segmentation configs use beyond detectron2's defaults."""
    cfg.INPUT.SCALE_RANGE = (0.5, 2.0)  # random rescale factor of the whole image, before the crop
    # Largest share of a crop one class may cover (detectron2 retries the crop); >= 1.0: a plain
    # random crop, as in the paper.
    cfg.INPUT.CROP.SINGLE_CATEGORY_MAX_AREA = 1.0
    cfg.MODEL.SEM_SEG_HEAD.NUM_CONVS = 2
    cfg.MODEL.SEM_SEG_HEAD.DILATION = 6
    return cfg


@SEM_SEG_HEADS_REGISTRY.register()
class FCNHead(nn.Module):
    """FCN head of the MoCo paper: ``num_convs`` x (3x3 dilated conv + norm + ReLU), 1x1 classifier."""

    @configurable
    def __init__(
        self,
        input_shape: ShapeSpec,
        *,
        in_feature: str,
        num_classes: int,
        conv_dims: int = 256,
        num_convs: int = 2,
        dilation: int = 6,
        norm: str = "SyncBN",
        ignore_value: int = 255,
        loss_weight: float = 1.0,
    ):
        super().__init__()
        self.in_feature = in_feature
        self.stride = input_shape.stride
        self.ignore_value = ignore_value  # SemanticSegmentor pads the targets with it
        self.loss_weight = loss_weight
        convs = []
        channels = input_shape.channels
        for _ in range(num_convs):
            conv = Conv2d(
                channels,
                conv_dims,
                kernel_size=3,
                padding=dilation,  # keeps the spatial size
                dilation=dilation,
                bias=not norm,
                norm=get_norm(norm, conv_dims),
                activation=F.relu,
            )
            weight_init.c2_msra_fill(conv)
            convs.append(conv)
            channels = conv_dims
        self.convs = nn.Sequential(*convs)
        self.predictor = Conv2d(channels, num_classes, kernel_size=1)
        nn.init.normal_(self.predictor.weight, std=0.01)
        nn.init.constant_(self.predictor.bias, 0.0)

    @classmethod
    def from_config(cls, cfg, input_shape: dict[str, ShapeSpec]):
        head = cfg.MODEL.SEM_SEG_HEAD
        if len(head.IN_FEATURES) != 1:
            raise ValueError(f"FCNHead reads one feature map, got MODEL.SEM_SEG_HEAD.IN_FEATURES={head.IN_FEATURES}")
        in_feature = head.IN_FEATURES[0]
        return {
            "input_shape": input_shape[in_feature],
            "in_feature": in_feature,
            "num_classes": head.NUM_CLASSES,
            "conv_dims": head.CONVS_DIM,
            "num_convs": head.NUM_CONVS,
            "dilation": head.DILATION,
            "norm": head.NORM,
            "ignore_value": head.IGNORE_VALUE,
            "loss_weight": head.LOSS_WEIGHT,
        }

    def forward(self, features: dict[str, torch.Tensor], targets: torch.Tensor | None = None):
        """Return ``(logits at input resolution, {})`` in inference, ``(None, losses)`` in training.

        The features have ``ceil(H / stride)`` rows, so the upsampled logits cover at least the
        (padded) input; the surplus on the bottom / right is cropped, here for the loss and by
        detectron2's ``sem_seg_postprocess`` at inference.
        """
        logits = self.predictor(self.convs(features[self.in_feature]))
        logits = F.interpolate(logits, scale_factor=self.stride, mode="bilinear", align_corners=False)
        if not self.training:
            return logits, {}
        height, width = targets.shape[-2:]
        return None, self.losses(logits[:, :, :height, :width], targets)

    def losses(self, logits: torch.Tensor, targets: torch.Tensor) -> dict[str, torch.Tensor]:
        if not (targets != self.ignore_value).any():
            # A batch of ignored pixels only: a zero loss that still touches every parameter,
            # instead of cross-entropy's NaN mean over nothing.
            return {"loss_sem_seg": logits.sum() * 0.0}
        loss = F.cross_entropy(logits.float(), targets, ignore_index=self.ignore_value)
        return {"loss_sem_seg": loss * self.loss_weight}


class RandomScale(T.Augmentation):
    """Rescale the image by a factor drawn uniformly from [min_scale, max_scale]."""

    def __init__(self, min_scale: float, max_scale: float, interp=Image.BILINEAR):
        super().__init__()
        self.min_scale, self.max_scale, self.interp = min_scale, max_scale, interp

    def get_transform(self, image):
        height, width = image.shape[:2]
        scale = np.random.uniform(self.min_scale, self.max_scale)
        new_h, new_w = max(1, round(height * scale)), max(1, round(width * scale))
        # ResizeTransform resizes segmentation labels with nearest-neighbour interpolation.
        return T.ResizeTransform(height, width, new_h, new_w, self.interp)


def build_augmentation(cfg: CfgNode, is_train: bool) -> list[T.Augmentation]:
    """Training: scale [0.5, 2.0], crop, flip. Test: detectron2's shortest-edge resize (0 = none)."""
    if not is_train:
        return [T.ResizeShortestEdge(cfg.INPUT.MIN_SIZE_TEST, cfg.INPUT.MAX_SIZE_TEST, "choice")]
    augs = [RandomScale(*cfg.INPUT.SCALE_RANGE)]
    if cfg.INPUT.CROP.ENABLED:
        augs.append(
            T.RandomCrop_CategoryAreaConstraint(
                cfg.INPUT.CROP.TYPE,
                cfg.INPUT.CROP.SIZE,
                cfg.INPUT.CROP.SINGLE_CATEGORY_MAX_AREA,
                cfg.MODEL.SEM_SEG_HEAD.IGNORE_VALUE,
            )
        )
    if cfg.INPUT.RANDOM_FLIP != "none":
        flip = cfg.INPUT.RANDOM_FLIP
        augs.append(T.RandomFlip(horizontal=flip == "horizontal", vertical=flip == "vertical"))
    return augs


class SemSegMapper:
    """Dataset dict -> model input (``image``, and ``sem_seg`` labels when training).

    Unlike detectron2's DatasetMapper, which converts label images to grey levels ("L"), the
    labels are read as stored: VOC's SegmentationClass PNGs are palette images whose palette
    indices are the class ids (converted to "L" they would become the colours' luminance).
    """

    def __init__(self, cfg: CfgNode, is_train: bool):
        self.is_train = is_train
        self.image_format = cfg.INPUT.FORMAT
        self.augmentations = T.AugmentationList(build_augmentation(cfg, is_train))

    def __call__(self, dataset_dict: dict) -> dict:
        dataset_dict = copy.deepcopy(dataset_dict)
        image = utils.read_image(dataset_dict["file_name"], format=self.image_format)
        utils.check_image_size(dataset_dict, image)
        label_file = dataset_dict.pop("sem_seg_file_name", None)
        # At test time the evaluator reads the ground truth itself.
        labels = utils.read_image(label_file) if self.is_train else None
        aug_input = T.AugInput(image, sem_seg=labels)
        self.augmentations(aug_input)
        dataset_dict["image"] = torch.as_tensor(np.ascontiguousarray(aug_input.image.transpose(2, 0, 1)))
        if labels is not None:
            dataset_dict["sem_seg"] = torch.as_tensor(aug_input.sem_seg.astype("long"))
        return dataset_dict

