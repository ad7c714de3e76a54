"""The demo's synthetic scenes: classes drawn as distinct (shape, colour) pairs on a textured background.

``render_scene`` places one object per label at a random position and scale, without overlaps, and
returns the image and each object's mask (and, for "person" stick figures facing the camera, the
17 COCO keypoints at their joints); ``cityscapes_stuff`` lays out a street (sky, buildings, road).
What the objects are written as (boxes, polygons, label images in each dataset's format) is
transfer/datasets/demo.py's.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import cv2
import numpy as np
from PIL import Image, ImageDraw

# What each class looks like: (shape, RGB colour, width / height).
COLOURS = {
    "white": (235, 235, 235), "black": (25, 25, 25), "red": (210, 30, 30), "green": (30, 170, 60),
    "blue": (40, 80, 220), "yellow": (235, 210, 30), "orange": (240, 130, 20),
    "purple": (140, 50, 180), "cyan": (40, 200, 220), "magenta": (230, 60, 170),
    "brown": (130, 80, 40),
}
VOC_LOOKS = {
    "aeroplane": ("cross", "white", 1.0), "bicycle": ("diamond", "cyan", 1.0),
    "bird": ("triangle", "yellow", 1.0), "boat": ("trapezoid", "brown", 1.6),
    "bottle": ("square", "green", 0.4), "bus": ("square", "orange", 2.0),
    "car": ("square", "red", 2.0), "cat": ("circle", "orange", 1.0),
    "chair": ("square", "brown", 1.0), "cow": ("hexagon", "black", 1.0),
    "diningtable": ("square", "brown", 2.0), "dog": ("circle", "brown", 1.0),
    "horse": ("arrow", "brown", 1.0), "motorbike": ("diamond", "purple", 1.0),
    "person": ("figure", "blue", 0.55), "pottedplant": ("star", "green", 1.0),
    "sheep": ("circle", "white", 1.0), "sofa": ("trapezoid", "magenta", 1.6),
    "train": ("square", "blue", 2.0), "tvmonitor": ("square", "black", 1.0),
}
# The COCO classes present in the demo (the json still lists all 80).
COCO_LOOKS = {
    "person": ("figure", "blue", 0.55), "car": ("square", "red", 2.0),
    "kite": ("diamond", "cyan", 1.0), "clock": ("circle", "white", 1.0),
    "stop sign": ("octagon", "red", 1.0), "bottle": ("square", "green", 0.4),
    "tie": ("triangle", "purple", 1.0), "book": ("square", "yellow", 1.0),
}
IMAGENET_LOOKS = {
    f"{colour}_{shape}": (shape, colour, aspect)
    for shape, colour, aspect in [
        ("circle", "red", 1.0), ("square", "green", 1.0), ("triangle", "blue", 1.0),
        ("diamond", "yellow", 1.0), ("hexagon", "magenta", 1.0), ("star", "orange", 1.0),
        ("cross", "cyan", 1.0), ("octagon", "purple", 1.0), ("square", "white", 0.4),
        ("arrow", "black", 1.0),
    ]
}
# Cityscapes: real label names (ids come from cityscapesscripts' label table).
CITYSCAPES_THINGS = {
    "person": ("figure", (220, 20, 60), 0.45), "rider": ("figure", (255, 200, 0), 0.45),
    "car": ("square", (0, 0, 142), 2.0), "bicycle": ("diamond", (0, 160, 160), 1.4),
}


def _regular(n, phase=0.0, radius=1.0):
    angles = [phase + 2 * math.pi * k / n for k in range(n)]
    return [(radius * math.sin(a), -radius * math.cos(a)) for a in angles]


def _star(points=5, inner=0.45):
    outer, inner_pts = _regular(points), _regular(points, math.pi / points, inner)
    return [p for pair in zip(outer, inner_pts) for p in pair]


# Outlines in a unit box [-1, 1]^2 (y down).
SHAPES = {
    "circle": _regular(32),
    "square": [(-1, -1), (1, -1), (1, 1), (-1, 1)],
    "triangle": [(0, -1), (1, 1), (-1, 1)],
    "diamond": [(0, -1), (1, 0), (0, 1), (-1, 0)],
    "hexagon": _regular(6),
    "octagon": _regular(8, math.pi / 8),
    "star": _star(),
    "cross": [(-0.35, -1), (0.35, -1), (0.35, -0.35), (1, -0.35), (1, 0.35), (0.35, 0.35),
              (0.35, 1), (-0.35, 1), (-0.35, 0.35), (-1, 0.35), (-1, -0.35), (-0.35, -0.35)],
    "trapezoid": [(-0.55, -1), (0.55, -1), (1, 1), (-1, 1)],
    "arrow": [(-1, -0.3), (0.2, -0.3), (0.2, -0.9), (1, 0), (0.2, 0.9), (0.2, 0.3), (-1, 0.3)],
}

# COCO's 17 person keypoints, as fractions of the figure's height, relative to the top centre.
# The figure faces the camera, so the person's left side is on the image's right (+x).
KEYPOINT_NAMES = (
    "nose", "left_eye", "right_eye", "left_ear", "right_ear", "left_shoulder", "right_shoulder",
    "left_elbow", "right_elbow", "left_wrist", "right_wrist", "left_hip", "right_hip",
    "left_knee", "right_knee", "left_ankle", "right_ankle",
)
_FIGURE_JOINTS = {
    "nose": (0.0, 0.10), "left_eye": (0.035, 0.08), "right_eye": (-0.035, 0.08),
    "left_ear": (0.075, 0.10), "right_ear": (-0.075, 0.10),
    "left_shoulder": (0.14, 0.25), "right_shoulder": (-0.14, 0.25),
    "left_elbow": (0.20, 0.41), "right_elbow": (-0.20, 0.41),
    "left_wrist": (0.23, 0.56), "right_wrist": (-0.23, 0.56),
    "left_hip": (0.08, 0.55), "right_hip": (-0.08, 0.55),
    "left_knee": (0.10, 0.75), "right_knee": (-0.10, 0.75),
    "left_ankle": (0.11, 0.96), "right_ankle": (-0.11, 0.96),
}
_LIMBS = [("left_shoulder", "left_elbow"), ("left_elbow", "left_wrist"),
          ("right_shoulder", "right_elbow"), ("right_elbow", "right_wrist"),
          ("left_hip", "left_knee"), ("left_knee", "left_ankle"),
          ("right_hip", "right_knee"), ("right_knee", "right_ankle")]
_MOVABLE = {"left_elbow", "right_elbow", "left_wrist", "right_wrist", "left_knee", "right_knee",
            "left_ankle", "right_ankle"}


# ---------------------------------------------------------------------------------------------
@dataclass
class DrawnObject:
    label: str
    mask: np.ndarray  # bool, H x W
    keypoints: list | None = None  # 17 x (x, y) pixel indices, for figures

    def box_xyxy(self):
        ys, xs = np.nonzero(self.mask)
        return int(xs.min()), int(ys.min()), int(xs.max()), int(ys.max())

    def polygons(self, min_points=3):
        """Outer contours of the mask as [[x0, y0, x1, y1, ...], ...] (COCO / Cityscapes polygons)."""
        contours, _ = cv2.findContours(self.mask.astype(np.uint8), cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_SIMPLE)
        return [c.reshape(-1).tolist() for c in contours if len(c) >= min_points]


def background(rng, width, height):
    """A muted, low-saturation texture: base grey + tint, a smooth gradient, blotches and grain."""
    base = rng.uniform(85, 165) + rng.uniform(-18, 18, size=3)
    yy, xx = np.mgrid[0:height, 0:width].astype(np.float32)
    angle = rng.uniform(0, 2 * math.pi)
    ramp = (np.cos(angle) * xx / width + np.sin(angle) * yy / height)[..., None] * rng.uniform(-35, 35)
    blotches = rng.normal(0, 14, size=(6, 6, 3)).astype(np.float32)
    blotches = cv2.resize(blotches, (width, height), interpolation=cv2.INTER_CUBIC)
    grain = rng.normal(0, 6, size=(height, width, 3))
    return base + ramp + blotches + grain


def _paint(canvas, mask, colour, rng):
    """Fill ``mask`` with ``colour``, with a per-object brightness shift and some grain."""
    shift = rng.uniform(-18, 18)
    grain = rng.normal(0, 8, size=(int(mask.sum()), 3))
    canvas[mask] = np.asarray(colour, dtype=np.float64) + shift + grain


def to_uint8(canvas):
    return np.clip(canvas, 0, 255).astype(np.uint8)


def _polygon_mask(points, width, height):
    img = Image.new("L", (width, height), 0)
    ImageDraw.Draw(img).polygon([tuple(p) for p in points], fill=1)
    return np.asarray(img, dtype=bool)


def _draw_shape(shape, cx, cy, h, aspect, angle, width, height):
    w = h * aspect
    unit = np.asarray(SHAPES[shape], dtype=np.float64) * [w / 2, h / 2]
    c, s = math.cos(angle), math.sin(angle)
    points = unit @ np.array([[c, s], [-s, c]]) + [cx, cy]
    return _polygon_mask(points.tolist(), width, height)


def _draw_figure(cx, cy, h, rng, width, height):
    """A stick figure facing the camera; returns its mask and its 17 keypoints (pixel indices)."""
    top = cy - h / 2
    joints = {}
    for name, (dx, dy) in _FIGURE_JOINTS.items():
        jitter = rng.normal(0, 0.035, size=2) if name in _MOVABLE else (0.0, 0.0)
        joints[name] = (cx + (dx + jitter[0]) * h, top + (dy + jitter[1]) * h)
    img = Image.new("L", (width, height), 0)
    draw = ImageDraw.Draw(img)
    r = 0.085 * h
    hx, hy = joints["nose"]
    draw.ellipse([hx - r, hy - r, hx + r, hy + r], fill=1)
    neck = 0.03 * h
    draw.polygon([(hx - neck, hy), (hx + neck, hy), joints["left_shoulder"], joints["right_shoulder"]], fill=1)
    draw.polygon([joints["left_shoulder"], joints["right_shoulder"], joints["right_hip"], joints["left_hip"]], fill=1)
    limb = max(2, int(round(0.06 * h)))
    for a, b in _LIMBS:
        draw.line([joints[a], joints[b]], fill=1, width=limb)
        for p in (joints[a], joints[b]):  # round joints
            draw.ellipse([p[0] - limb / 2, p[1] - limb / 2, p[0] + limb / 2, p[1] + limb / 2], fill=1)
    keypoints = [(int(round(joints[n][0])), int(round(joints[n][1]))) for n in KEYPOINT_NAMES]
    keypoints = [(min(max(x, 0), width - 1), min(max(y, 0), height - 1)) for x, y in keypoints]
    return np.asarray(img, dtype=bool), keypoints


def render_scene(rng, width, height, labels, looks, size_range=(0.3, 0.6), region=None, canvas=None):
    """Place one object per label (no overlaps) on a background; returns (uint8 image, objects).

    ``region`` (x0, y0, x1, y1) restricts object centres; ``canvas`` replaces the plain background.
    """
    if canvas is None:
        canvas = background(rng, width, height)
    x0, y0, x1, y1 = region or (0, 0, width, height)
    occupied = np.zeros((height, width), dtype=bool)
    objects = []
    for label in labels:
        shape, colour, aspect = looks[label]
        colour = COLOURS.get(colour, colour)
        for _ in range(40):  # rejection sampling: keep objects apart and inside the image
            # size_range is the object's longer side, as a fraction of the image's shorter side
            h = rng.uniform(*size_range) * min(width, height) / max(aspect, 1.0)
            angle = 0.0 if shape in ("circle", "figure") else rng.uniform(-0.35, 0.35)
            c, s = abs(math.cos(angle)), abs(math.sin(angle))
            half_w, half_h = 0.5 * (h * aspect * c + h * s), 0.5 * (h * aspect * s + h * c)
            if shape == "figure":  # limbs may swing a little outside the nominal box
                half_w += 0.05 * h
            lo_x, hi_x = max(x0, half_w + 1), min(x1, width - half_w - 1)
            lo_y, hi_y = max(y0, half_h + 1), min(y1, height - half_h - 1)
            if lo_x >= hi_x or lo_y >= hi_y:
                continue
            cx, cy = rng.uniform(lo_x, hi_x), rng.uniform(lo_y, hi_y)
            if shape == "figure":
                mask, keypoints = _draw_figure(cx, cy, h, rng, width, height)
            else:
                mask, keypoints = _draw_shape(shape, cx, cy, h, aspect, angle, width, height), None
            grown = cv2.dilate(mask.astype(np.uint8), np.ones((5, 5), np.uint8)).astype(bool)
            if mask.sum() < 30 or (grown & occupied).any():
                continue
            occupied |= grown
            _paint(canvas, mask, colour, rng)
            objects.append(DrawnObject(label, mask, keypoints))
            break
    return to_uint8(canvas), objects


class Cycle:
    """Hands out class names round-robin (shuffled per round) so every class appears in every split."""

    def __init__(self, names, rng):
        self.names, self.rng, self.queue = list(names), rng, []

    def take(self, n):
        out = []
        while len(out) < n:
            if not self.queue:
                self.queue = list(self.rng.permutation(self.names))
            out.append(self.queue.pop())
        return out


def cityscapes_stuff(rng, width, height):
    """Background polygons in drawing order (later ones cover earlier ones), Cityscapes label names."""
    horizon = int(height * rng.uniform(0.4, 0.55))
    stuff = [("sky", [(0, 0), (width - 1, 0), (width - 1, horizon), (0, horizon)])]
    x = 0
    while x < width - 1:  # a skyline of buildings and trees
        w = int(rng.integers(width // 8, width // 3))
        top = int(rng.integers(height // 12, horizon - 4))
        label = "building" if rng.random() < 0.7 else "vegetation"
        stuff.append((label, [(x, top), (min(x + w, width - 1), top), (min(x + w, width - 1), horizon), (x, horizon)]))
        x += w
    stuff.append(("road", [(0, horizon), (width - 1, horizon), (width - 1, height - 1), (0, height - 1)]))
    walk = int(rng.integers(height // 16, height // 8))
    stuff.append(("sidewalk", [(0, horizon), (width - 1, horizon), (width - 1, horizon + walk), (0, horizon + walk)]))
    return horizon, stuff

