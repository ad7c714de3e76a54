"""torchvision's ImageFolder for real folders, where a few files do not decode.

A copy of ImageNet or a user's own photos can hold truncated downloads or files that are not
images at all; one of them must not kill a run hours in. ``ImageFolder`` here replaces an image
that cannot be decoded by the next one of the folder (in ImageFolder's sorted order) that can. The
data a step sees therefore stays a function of (seed, step): a resumed run sees the same. Each
replaced file is appended once to a skipped-images list (one path per line; several DataLoader
workers and processes may append to it), which the training loop counts; past
``MAX_SKIPPED_FRACTION`` of the dataset the run stops with one line (``check_skipped``).
``scan`` decodes every file up front (``--check-data``).
"""
from __future__ import annotations

import os
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from PIL import Image
from torchvision import datasets

from transfer.errors import UserError

SKIPPED = "skipped_images.txt"
MAX_SKIPPED_FRACTION = 0.01
# What a broken file raises while it is decoded (PIL's UnidentifiedImageError is an OSError;
# truncated JPEGs raise OSError, some corrupt headers SyntaxError or ValueError).
DECODE_ERRORS = (OSError, SyntaxError, ValueError)


class ImageFolder(datasets.ImageFolder):
    """``torchvision.datasets.ImageFolder`` that replaces undecodable images (see the module).

    ``skipped``: the skipped-images list to append to (None: only the warning line).
    """

    def __init__(self, root, transform=None, loader=datasets.folder.default_loader, skipped=None):
        try:
            super().__init__(root, transform=transform, loader=loader)
        except FileNotFoundError as e:  # no class folder, or a class folder without images
            raise UserError(f"{root}: {str(e).split('. Supported extensions')[0].rstrip('.')} "
                            f"(an ImageFolder root holds <class>/<image> files)") from None
        self.skipped = Path(skipped) if skipped else None

    def __getitem__(self, index):
        for offset in range(len(self.samples)):
            path, target = self.samples[(index + offset) % len(self.samples)]
            try:
                sample = self.loader(path)
            except DECODE_ERRORS as e:
                self._skip(path, e)
                continue
            if self.transform is not None:
                sample = self.transform(sample)
            return sample, target
        raise UserError(f"{self.root}: none of its {len(self.samples)} images can be decoded")

    def _skip(self, path: str, error: Exception) -> None:
        if self.skipped is not None:
            if path in read_skipped(self.skipped):
                return  # warned about in an earlier epoch (or by another worker)
            self.skipped.parent.mkdir(parents=True, exist_ok=True)
            with open(self.skipped, "a") as f:  # one short line per write: appends do not interleave
                f.write(path + "\n")
        print(f"warning: {path}: cannot be decoded ({type(error).__name__}: {error}); "
              "the next image of the folder is used in its place", file=sys.stderr, flush=True)


def read_skipped(path) -> list[str]:
    """The distinct paths of a skipped-images list, in the order they were first written."""
    try:
        return list(dict.fromkeys(Path(path).read_text().splitlines()))
    except FileNotFoundError:
        return []


def check_skipped(path, num_images: int) -> int:
    """How many images were skipped so far; UserError past MAX_SKIPPED_FRACTION of ``num_images``
    (one bad file never stops a run, however small its dataset)."""
    skipped = read_skipped(path)
    if len(skipped) > max(1, MAX_SKIPPED_FRACTION * num_images):
        raise UserError(f"{len(skipped)} of {num_images} images cannot be decoded (more than "
                        f"{MAX_SKIPPED_FRACTION:.0%}), e.g. {', '.join(skipped[:3])}; all are listed in {path}")
    return len(skipped)


def _decodes(path: str) -> Exception | None:
    try:
        with Image.open(path) as image:
            image.convert("RGB")
    except DECODE_ERRORS as e:
        return e
    return None


def scan(root, skipped) -> int:
    """Decode every image under ``root`` now; write the ones that fail to the list ``skipped``,
    print one line, and stop past MAX_SKIPPED_FRACTION. Returns the number of bad files."""
    folder = ImageFolder(root)
    paths = [path for path, _ in folder.samples]
    with ThreadPoolExecutor(max_workers=min(16, os.cpu_count() or 1)) as pool:  # PIL decodes without the GIL
        errors = list(pool.map(_decodes, paths))
    bad = [path for path, error in zip(paths, errors) if error is not None]
    Path(skipped).parent.mkdir(parents=True, exist_ok=True)
    known = read_skipped(skipped)
    with open(skipped, "a") as f:
        f.writelines(path + "\n" for path in bad if path not in known)
    print(f"--check-data {root}: {len(paths)} images, {len(bad)} cannot be decoded"
          + (f" (listed in {skipped})" if bad else ""), flush=True)
    check_skipped(skipped, len(paths))
    return len(bad)
