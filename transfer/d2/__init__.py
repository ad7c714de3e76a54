"""Our detectron2 extensions: config loading (zoo:// bases), the MoCo C4 head, a sync-free RPN,
evaluators, trainer, launch. Importing the package registers the head and the RPN with detectron2
(configs name them)."""
from transfer import d2compat  # noqa: F401  (before any detectron2 import)
from transfer.d2 import roi_heads  # noqa: F401  (registers Res5ROIHeadsExtraNorm)
from transfer.d2 import rpn  # noqa: F401  (registers SyncFreeRPN)
