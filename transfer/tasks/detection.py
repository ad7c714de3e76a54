"""Detection, instance segmentation and keypoint tasks of the MoCo paper (§4.2, Tables 2-6)."""
from dataclasses import replace

from transfer.tasks import DEMO, Task, register, standard_schedules

VOC_METRICS = ("AP", "AP50", "AP75")
COCO_METRICS = ("APbb", "APbb50", "APbb75", "APmk", "APmk50", "APmk75")
DEMO_LVIS = "configs/schedules/demo_lvis.yaml"
LVIS_METRICS = ("APmk", "APmk50", "APmk75", "APr", "APc", "APf", "APbb")

register(Task(
    name="voc07+12", config="configs/detection/pascal_voc_R_50_C4_24k.yaml",
    train=("voc_2007_trainval", "voc_2012_trainval"), test=("voc_2007_test",), evaluator="voc",
    metrics=VOC_METRICS, schedules=standard_schedules(DEMO["C4"]),
    reference=("voc_det", "24k"), description="Faster R-CNN R50-C4, VOC07+12 trainval -> VOC07 test, 24k",
))
register(Task(
    name="voc07", config="configs/detection/pascal_voc07_R_50_C4_9k.yaml",
    train=("voc_2007_trainval",), test=("voc_2007_test",), evaluator="voc",
    metrics=VOC_METRICS, schedules=standard_schedules(DEMO["C4"]),
    reference=("voc07_det", "9k"), description="Faster R-CNN R50-C4, VOC07 trainval -> VOC07 test, 9k",
))
for model, family in (("c4", "C4"), ("fpn", "FPN")):
    for length in ("1x", "2x"):
        register(Task(
            name=f"coco_{model}_{length}", config=f"configs/detection/coco_R_50_{family}_{length}.yaml",
            train=("coco_2017_train",), test=("coco_2017_val",), evaluator="coco",
            metrics=COCO_METRICS, schedules=standard_schedules(DEMO[family]),
            reference=(f"coco_det_{model}_{length}", length),
            description=f"Mask R-CNN R50-{family}, COCO train2017 -> val2017, {length}",
        ))
register(Task(
    name="coco_kp_2x", config="configs/detection/keypoint_rcnn_R_50_FPN_2x.yaml",
    train=("keypoints_coco_2017_train",), test=("keypoints_coco_2017_val",), evaluator="coco",
    metrics=("APkp", "APkp50", "APkp75", "APbb"),
    schedules=standard_schedules("configs/schedules/demo_keypoints.yaml"),
    reference=("coco_kp_fpn_2x", "2x"), description="Keypoint R-CNN R50-FPN, COCO person keypoints, 2x",
))
# The paper's LVIS numbers are on v0.5; today's data is v1, which has no published MoCo row.
# The paper's supervised LVIS baseline was best with frozen BN: that protocol is its own variant.
FROZEN_BN = {"MODEL.RESNETS.NORM": "FrozenBN", "MODEL.BACKBONE.FREEZE_AT": 2}
for length in ("1x", "2x"):
    for version, train, test, reference in (("v1", "lvis_v1_train", "lvis_v1_val", None),
                                            ("v0.5", "lvis_v0.5_train", "lvis_v0.5_val", ("lvis_inst", length))):
        name = f"lvis_{length}" if version == "v1" else f"lvis_v0.5_{length}"
        base = register(Task(
            name=name, config=f"configs/detection/lvis_{version}_R_50_FPN_{length}.yaml",
            train=(train,), test=(test,), evaluator="lvis", metrics=LVIS_METRICS,
            schedules=standard_schedules(DEMO_LVIS), reference=reference,
            fallback=f"lvis_v0.5_{length}" if version == "v1" else None,
            description=f"Mask R-CNN R50-FPN, LVIS {version} train -> val, {length}",
        ))
        register(replace(
            base, name=f"{name}_frozenbn", overrides=FROZEN_BN, protocol="frozen BN",
            fallback=f"lvis_v0.5_{length}_frozenbn" if version == "v1" else None,
            description=f"{base.description}; backbone BN frozen (FrozenBN, FREEZE_AT 2), FPN and heads as {name}",
        ))
register(Task(
    name="cityscapes_inst", config="configs/detection/cityscapes_R_50_FPN.yaml",
    train=("cityscapes_fine_instance_seg_train",), test=("cityscapes_fine_instance_seg_val",),
    evaluator="cityscapes_instance", metrics=("APmk", "APmk50"),
    schedules=standard_schedules("configs/schedules/demo_cityscapes.yaml"),
    reference=("cityscapes_inst", "standard"),
    description="Mask R-CNN R50-FPN, Cityscapes train_fine -> val, detectron2's schedule (24k at batch 8)",
))
