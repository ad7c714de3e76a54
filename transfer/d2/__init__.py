"""Our detectron2 extensions: config loading (zoo:// bases), the MoCo C4 head, a sync-free RPN,
evaluators, trainer, launch. Importing the package registers the head and the RPN with detectron2
(configs name them). detectron2's version quirks are patched before its first import by the
``transfer`` package itself (transfer/d2compat.py)."""
from transfer.d2 import (
    roi_heads,  # noqa: F401  (registers Res5ROIHeadsExtraNorm)
    rpn,  # noqa: F401  (registers SyncFreeRPN)
)
