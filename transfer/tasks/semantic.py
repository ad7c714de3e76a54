"""Semantic segmentation tasks of the MoCo paper (appendix; Table 6): FCN on a dilated ResNet-50.

The model, its data pipeline and the extra config keys are in transfer/d2/semseg.py; the solver
of each task (LR 0.01 Cityscapes / 0.003 VOC, x0.1 at 70% and 90%, weight decay 1e-4, batch 16,
crop 769 / 513, scale [0.5, 2.0]) is in its config file under configs/semseg/.
"""
from transfer.tasks import Task, register, standard_schedules

EXTEND = "transfer.d2.semseg:add_semseg_config"

register(Task(
    name="cityscapes_sem", config="configs/semseg/cityscapes.yaml",
    train=("cityscapes_fine_sem_seg_train",), test=("cityscapes_fine_sem_seg_val",),
    evaluator="cityscapes_sem_seg", metrics=("mIoU",),
    schedules=standard_schedules("configs/semseg/demo_cityscapes.yaml"),
    reference=("cityscapes_sem", "90k"), extend_config=EXTEND,
    description="FCN R50 dilated conv5, Cityscapes train_fine -> val, crop 769, 90k",
))
register(Task(
    name="voc_sem", config="configs/semseg/voc.yaml",
    train=("voc_2012_sem_seg_train_aug",), test=("voc_2012_sem_seg_val",),
    evaluator="sem_seg", metrics=("mIoU",),
    schedules=standard_schedules("configs/semseg/demo_voc.yaml"),
    reference=("voc_sem", "30k"), extend_config=EXTEND, fallback="voc_sem_train",
    description="FCN R50 dilated conv5, VOC12 train_aug (SBD-augmented) -> val, crop 513, 30k",
))
# What voc_sem runs when SegmentationClassAug is absent: not comparable with the paper's numbers.
register(Task(
    name="voc_sem_train", config="configs/semseg/voc.yaml",
    train=("voc_2012_sem_seg_train",), test=("voc_2012_sem_seg_val",),
    evaluator="sem_seg", metrics=("mIoU",),
    schedules=standard_schedules("configs/semseg/demo_voc.yaml"),
    extend_config=EXTEND,
    description="FCN R50 dilated conv5, VOC12 train (1,464 images, no SBD) -> val, crop 513, 30k",
))
