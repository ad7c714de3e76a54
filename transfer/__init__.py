"""moco-transfer: MoCo pre-training, checkpoint conversion and detectron2 transfer benchmarks."""
from pathlib import Path

from transfer import d2compat

# detectron2's version quirks, patched before the first import of detectron2 (or lvis, cityscapesscripts)
# in this process, whichever module makes it; nothing is imported here.
d2compat.install()

REPO = Path(__file__).resolve().parent.parent  # the repository root: configs/, results/, datasets/, tools/
