"""Our detectron2 extensions: config loading (zoo:// bases), the MoCo C4 head, evaluators, trainer,
launch. Importing the package registers the head with detectron2 (configs name it)."""
from transfer import d2compat  # noqa: F401  (before any detectron2 import)
from transfer.d2 import roi_heads  # noqa: F401  (registers Res5ROIHeadsExtraNorm)
