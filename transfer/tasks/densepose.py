"""COCO DensePose (MoCo paper Table 6, its 7th task): DensePose R-CNN R50-FPN, s1x, optional.

It needs detectron2's DensePose project, which is not on PyPI: transfer/d2/densepose.py says how
to install it, and without it the task stops with that one line. It is not in ``all`` (nor in the
demo): name it, ``--tasks coco_densepose``. Headline metrics: DensePose AP under the GPS measure
(the paper's AP^dp and AP^dp_75) and box AP.
"""
from transfer.tasks import DEMO, Task, register, standard_schedules

register(Task(
    name="coco_densepose", config="configs/densepose/densepose_R_50_FPN_s1x.yaml",
    train=("densepose_coco_2014_train", "densepose_coco_2014_valminusminival"),
    test=("densepose_coco_2014_minival",), evaluator="densepose",
    metrics=("APdp", "APdp50", "APdp75", "APbb"),
    schedules=standard_schedules(DEMO["FPN"]),
    reference=("coco_densepose", "s1x"), extend_config="transfer.d2.densepose:add_config",
    requires="transfer.d2.densepose:require",
    description="DensePose R-CNN R50-FPN, COCO DensePose train2014 + valminusminival -> minival, s1x",
))
