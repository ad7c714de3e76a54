"""MoCo's two-crop augmentation, applied per sample but batched, on the accelerator.

The CPU path (``augment.moco_augmentation``) runs PIL in DataLoader workers; on a fast GPU that, not
the GPU, caps the training speed (README, Performance). Here the same torchvision pipeline is read
(``GPUAugment.from_transform``) and re-applied to a whole batch of decoded images on the device:

    uint8 images -> random resized crop (roi_align, both crops of an image in one call)
      -> colour jitter (its four operations in a random order per sample) -> random grayscale
      -> Gaussian blur (random sigma per sample) -> horizontal flip -> normalise

Every random parameter is drawn on the CPU from the distribution torchvision (or the MoCo blur)
draws it from, independently per crop, so the two paths differ only in pixel arithmetic (float
instead of PIL's uint8 rounding, roi_align's area sampling instead of PIL's resampling filter).
The pixel work is a handful of batched kernels; on CPU tensors the same code runs (and is tested).
"""
import math

import torch
import torch.nn.functional as F
import torchvision  # noqa: F401  (registers torch.ops.torchvision.roi_align)

# ITU-R 601-2 luma, as PIL's convert("L") and torchvision's rgb_to_grayscale.
_LUMA = (0.2989, 0.587, 0.114)


def _uniform(n, low, high, generator):
    return torch.rand(n, generator=generator, dtype=torch.float64) * (high - low) + low


def _bernoulli(n, p, generator):
    return torch.rand(n, generator=generator) < p


def _apply_to(x, mask, fn, *per_sample):
    """x[mask] = fn(x[mask], *per-sample values[mask]) in place, for a CPU bool mask over the batch.

    Gathering the chosen samples (rather than blending everything with a mask) keeps each
    operation's cost proportional to the samples it changes.
    """
    idx = mask.nonzero().flatten()
    if len(idx) == 0:
        return x
    idx = idx.to(x.device, non_blocking=True)
    chosen = x.index_select(0, idx)
    return x.index_copy_(0, idx, fn(chosen, *(_per_sample(v[mask], chosen) for v in per_sample)))


def _grayscale(x):
    r, g, b = x.unbind(1)
    return (_LUMA[0] * r + _LUMA[1] * g + _LUMA[2] * b).unsqueeze(1)


def _per_sample(values, x):
    """A (n,) CPU float tensor as (n, 1, 1, 1) on x's device and dtype, to broadcast over images."""
    return values.to(device=x.device, dtype=x.dtype, non_blocking=True).view(-1, 1, 1, 1)


class RandomResizedCrop:
    """torchvision.transforms.RandomResizedCrop: (top, left, h, w) drawn as ``get_params`` does, then
    the box resized to ``size`` x ``size`` by roi_align with adaptive sampling (several bilinear
    samples per output pixel when shrinking: an area filter, so large crops do not alias)."""

    def __init__(self, size, scale=(0.08, 1.0), ratio=(3 / 4, 4 / 3)):
        self.size, self.scale, self.ratio = size, tuple(scale), tuple(ratio)

    def sample(self, heights, widths, generator, attempts=10):
        """(n, 4) int64 boxes (top, left, height, width) for images of the given sizes.

        All ``attempts`` candidates of torchvision's loop are drawn at once; the first that fits is
        kept, else torchvision's central fallback crop: the same distribution as its loop.
        """
        n = len(heights)
        H, W = heights.double()[:, None], widths.double()[:, None]
        area = H * W * (torch.rand(n, attempts, generator=generator, dtype=torch.float64)
                        * (self.scale[1] - self.scale[0]) + self.scale[0])
        lo, hi = math.log(self.ratio[0]), math.log(self.ratio[1])
        aspect = torch.exp(torch.rand(n, attempts, generator=generator, dtype=torch.float64) * (hi - lo) + lo)
        w = torch.round(torch.sqrt(area * aspect))
        h = torch.round(torch.sqrt(area / aspect))
        fits = (w > 0) & (w <= W) & (h > 0) & (h <= H)
        first = fits.to(torch.uint8).argmax(1, keepdim=True)
        w, h = w.gather(1, first).flatten(), h.gather(1, first).flatten()
        H, W = H.flatten(), W.flatten()

        # Central fallback crop, with the aspect ratio clamped to the allowed range.
        in_ratio = W / H
        narrow, wide = in_ratio < min(self.ratio), in_ratio > max(self.ratio)
        fb_w = torch.where(narrow, W, torch.where(wide, torch.round(H * max(self.ratio)), W))
        fb_h = torch.where(narrow, torch.round(W / min(self.ratio)), H)
        found = fits.any(1)
        w, h = torch.where(found, w, fb_w), torch.where(found, h, fb_h)

        # randint(0, H - h + 1) for the found crops; centred for the fallback.
        top = torch.floor(torch.rand(n, generator=generator, dtype=torch.float64) * (H - h + 1))
        left = torch.floor(torch.rand(n, generator=generator, dtype=torch.float64) * (W - w + 1))
        top = torch.where(found, top, torch.div(H - h, 2, rounding_mode="floor"))
        left = torch.where(found, left, torch.div(W - w, 2, rounding_mode="floor"))
        return torch.stack([top, left, h, w], 1).long()

    def apply(self, images, boxes, views, dtype=torch.float32):
        """Crops of ``images`` (list of uint8 (3, H, W)): box ``v * len(images) + i`` is view v of image i.

        Returns ``dtype`` (views * n, 3, size, size) in [0, 1], view-major.
        """
        n, size = len(images), self.size
        device = images[0].device
        # One uint8 -> float conversion for the whole batch: concatenate, convert, view back.
        # (roi_align sums many samples per pixel when shrinking: float32, not half, for that.)
        flat = torch.cat([im.reshape(-1) for im in images]).float()
        # roi_align boxes: (batch index, x1, y1, x2, y2) in continuous pixel coordinates; with
        # aligned=True a box [0, w) covers pixels 0..w-1 exactly, as a crop does. Rows image-major.
        top, left, h, w = boxes.view(views, n, 4).transpose(0, 1).reshape(-1, 4).double().unbind(1)
        rois = torch.stack([torch.zeros_like(top), left, top, left + w, top + h], 1)
        rois = rois.to(device=device, dtype=torch.float32, non_blocking=True)
        crops, start = [], 0
        for i, im in enumerate(images):
            c, h, w = im.shape
            image = flat[start:start + c * h * w].view(1, c, h, w).expand(1, 3, h, w)
            start += c * h * w
            # The registered op, not the torchvision.ops wrapper: its per-call box conversion
            # costs more host time than the kernel on a 256-image batch.
            crops.append(torch.ops.torchvision.roi_align(image, rois[i * views:(i + 1) * views], 1.0, size, size, -1,
                                                         True))
        # (n, views, 3, s, s) -> view-major (views * n, 3, s, s), scaled to [0, 1].
        out = torch.stack(crops, 1).view(views * n, 3, size, size)
        return out.to(dtype).mul_(1.0 / 255.0)


class ColorJitter:
    """torchvision.transforms.ColorJitter with its four operations in a fresh random order per
    sample, applied to each sample with probability ``p`` (RandomApply). Factor ranges are
    torchvision's (min, max) tuples, or None for an operation that is off."""

    def __init__(self, brightness, contrast, saturation, hue, p=1.0):
        self.ranges = (brightness, contrast, saturation, hue)
        self.p = p

    def sample(self, n, generator):
        applied = _bernoulli(n, self.p, generator)
        order = torch.argsort(torch.rand(n, 4, generator=generator), dim=1)  # uniform permutations
        factors = torch.stack([
            _uniform(n, *r, generator) if r is not None else torch.full((n,), math.nan, dtype=torch.float64)
            for r in self.ranges
        ], 1)
        return {"applied": applied, "order": order, "factors": factors}

    @staticmethod
    def brightness(x, f):
        return (x * f).clamp_(0, 1)

    @staticmethod
    def contrast(x, f):
        mean = _grayscale(x).mean(dim=(1, 2, 3), keepdim=True)
        return (f * x + (1 - f) * mean).clamp_(0, 1)

    @staticmethod
    def saturation(x, f):
        return (f * x + (1 - f) * _grayscale(x)).clamp_(0, 1)

    @staticmethod
    def hue(x, f):
        """Rotate the hue by f (in turns): RGB -> HSV, shift H, HSV -> RGB."""
        maxc, _ = x.max(1, keepdim=True)
        minc, _ = x.min(1, keepdim=True)
        chroma = maxc - minc
        gray = chroma == 0
        safe = torch.where(gray, torch.ones_like(chroma), chroma)
        r, g, b = x.split(1, 1)
        # Hue sector of the largest channel (ties resolved r, then g, then b, as torchvision).
        h = torch.where(maxc == r, (g - b) / safe,
                        torch.where(maxc == g, 2.0 + (b - r) / safe, 4.0 + (r - g) / safe))
        h = torch.where(gray, torch.zeros_like(h), h)
        h = torch.remainder(h / 6.0 + f, 1.0)
        s = torch.where(gray, torch.zeros_like(chroma), chroma / torch.where(maxc == 0, torch.ones_like(maxc), maxc))
        # HSV -> RGB: channel n (n = 5, 3, 1 for r, g, b) is v - v*s*clamp(min(k, 4 - k), 0, 1),
        # k = (n + 6h) mod 6.
        n = torch.tensor([5.0, 3.0, 1.0], device=x.device, dtype=x.dtype).view(1, 3, 1, 1)
        k = torch.remainder(n + 6.0 * h, 6.0)
        return maxc - maxc * s * torch.minimum(k, 4.0 - k).clamp_(0, 1)

    def apply(self, x, params):
        ops = (self.brightness, self.contrast, self.saturation, self.hue)
        applied, order, factors = params["applied"], params["order"], params["factors"]
        for position in range(4):
            for op_index, op in enumerate(ops):
                if self.ranges[op_index] is None:
                    continue
                _apply_to(x, applied & (order[:, position] == op_index), op, factors[:, op_index])
        return x


class RandomGrayscale:
    """torchvision.transforms.RandomGrayscale: with probability p, luma copied to all three channels."""

    def __init__(self, p=0.1):
        self.p = p

    def sample(self, n, generator):
        return {"applied": _bernoulli(n, self.p, generator)}

    def apply(self, x, params):
        return _apply_to(x, params["applied"], lambda y: _grayscale(y).expand(-1, 3, -1, -1))


class GaussianBlur:
    """Gaussian blur with sigma ~ U(sigma_min, sigma_max) per sample, applied with probability p.

    A separable kernel of ``kernel_size`` taps (default: +-3 sigma_max) with reflect padding, as
    torchvision's gaussian_blur; every selected sample gets its own kernel in one grouped conv.
    """

    def __init__(self, sigma=(0.1, 2.0), p=1.0, kernel_size=None):
        self.sigma, self.p = tuple(sigma), p
        self.kernel_size = kernel_size or 2 * math.ceil(3 * self.sigma[1]) + 1

    def sample(self, n, generator):
        return {"applied": _bernoulli(n, self.p, generator), "sigma": _uniform(n, *self.sigma, generator)}

    def kernels(self, sigma):
        """(n, kernel_size) normalised 1-D Gaussian kernels (float32) for a tensor of n sigmas."""
        half = (self.kernel_size - 1) / 2
        t = torch.linspace(-half, half, self.kernel_size, device=sigma.device, dtype=torch.float32)
        pdf = torch.exp(-0.5 * (t / sigma.float().view(-1, 1)) ** 2)
        return pdf / pdf.sum(1, keepdim=True)

    def blur(self, x, sigma):
        """x (n, c, h, w) blurred with sigma (n values, any shape) per sample."""
        n, c, h, w = x.shape
        k = self.kernels(sigma).to(x.dtype).repeat_interleave(c, 0)  # (n*c, taps)
        pad = self.kernel_size // 2
        y = F.pad(x.reshape(1, n * c, h, w), (pad, pad, pad, pad), mode="reflect")
        y = F.conv2d(y, k[:, None, None, :], groups=n * c)
        y = F.conv2d(y, k[:, None, :, None], groups=n * c)
        return y.view(n, c, h, w)

    def apply(self, x, params):
        return _apply_to(x, params["applied"], self.blur, params["sigma"])


class RandomHorizontalFlip:
    def __init__(self, p=0.5):
        self.p = p

    def sample(self, n, generator):
        return {"applied": _bernoulli(n, self.p, generator)}

    def apply(self, x, params):
        return _apply_to(x, params["applied"], lambda y: y.flip(-1))


class Normalize:
    """(x - mean) / std per channel; the last operation, so it also writes the output tensor
    (float32, in the memory format the model wants) in the same pass."""

    def __init__(self, mean, std):
        self.mean, self.std = tuple(mean), tuple(std)

    def sample(self, n, generator):
        return {}

    def apply(self, x, params, memory_format=torch.contiguous_format):
        scale = 1.0 / torch.tensor(self.std, device=x.device).view(1, -1, 1, 1)
        shift = -torch.tensor(self.mean, device=x.device).view(1, -1, 1, 1) * scale
        out = torch.empty(x.shape, device=x.device, memory_format=memory_format)
        return torch.addcmul(shift, x, scale, out=out)


def _translate(t):
    """The batched operation equivalent to one torchvision (v1 or v2) transform; None for the
    conversions (ToTensor, PILToTensor, ...) the batched path does implicitly."""
    name = type(t).__name__
    if name == "RandomResizedCrop":
        size = t.size if isinstance(t.size, int) else t.size[0]
        if not isinstance(t.size, int) and t.size[0] != t.size[1]:
            raise ValueError(f"RandomResizedCrop to a non-square size {t.size} is not supported")
        return RandomResizedCrop(size, t.scale, t.ratio)
    if name == "ColorJitter":
        return ColorJitter(t.brightness, t.contrast, t.saturation, t.hue)
    if name == "RandomGrayscale":
        return RandomGrayscale(t.p)
    if name == "RandomHorizontalFlip":
        return RandomHorizontalFlip(t.p)
    if name == "Normalize":
        return Normalize(t.mean, t.std)
    if name == "GaussianBlur":  # torchvision's (kernel_size, sigma) or MoCo's PIL blur (sigma only)
        ks = getattr(t, "kernel_size", None)
        return GaussianBlur(t.sigma, kernel_size=ks[0] if isinstance(ks, (tuple, list)) else ks)
    if name == "RandomApply":
        if len(t.transforms) != 1:
            raise ValueError("RandomApply of several transforms is not supported on the GPU backend")
        op = _translate(t.transforms[0])
        if not hasattr(op, "p"):
            raise ValueError(f"RandomApply([{type(t.transforms[0]).__name__}]) is not supported")
        op.p = op.p * t.p
        return op
    if name in ("ToTensor", "PILToTensor", "ToImage", "ToDtype", "ConvertImageDtype"):
        return None
    raise ValueError(f"no batched equivalent of {name} for the GPU augmentation backend")


class GPUAugment:
    """Two (or more) independently augmented views of each image of a batch, on the images' device.

    ``ops`` starts with a RandomResizedCrop; the others act on the float crop batch in order.
    Without Normalize the output is in [0, 1].
    """

    def __init__(self, ops):
        if not ops or not isinstance(ops[0], RandomResizedCrop):
            raise ValueError("the batched augmentation must start with RandomResizedCrop")
        self.crop, self.ops = ops[0], list(ops[1:])

    @classmethod
    def from_transform(cls, transform):
        """The batched equivalent of a torchvision Compose (e.g. ``augment.moco_augmentation``)."""
        ops = [_translate(t) for t in getattr(transform, "transforms", [transform])]
        return cls([op for op in ops if op is not None])

    def sample(self, heights, widths, views, generator):
        """Every random parameter of a batch (CPU tensors), one draw per crop, view-major."""
        n = len(heights) * views
        boxes = self.crop.sample(heights.repeat(views), widths.repeat(views), generator)
        return boxes, [op.sample(n, generator) for op in self.ops]

    def __call__(self, images, views=2, generator=None, memory_format=torch.contiguous_format, dtype=None):
        """images: list of uint8 (3, H, W) tensors (any sizes, one device). Returns ``views``
        float32 tensors (n, 3, size, size) in ``memory_format``, the crops of view v of every image.

        dtype: the working precision between crop and output; default float16 on CUDA (half the
        memory traffic; 11-bit mantissa against 8-bit pixels), float32 elsewhere.
        """
        device = images[0].device
        dtype = dtype or (torch.float16 if device.type == "cuda" else torch.float32)
        heights = torch.tensor([im.shape[-2] for im in images])
        widths = torch.tensor([im.shape[-1] for im in images])
        boxes, params = self.sample(heights, widths, views, generator)
        x = self.crop.apply(images, boxes, views, dtype)
        for op, p in zip(self.ops, params):
            x = op.apply(x, p, memory_format) if isinstance(op, Normalize) else op.apply(x, p)
        if x.dtype != torch.float32 or not x.is_contiguous(memory_format=memory_format):
            x = x.to(dtype=torch.float32, memory_format=memory_format)
        return x.chunk(views)
