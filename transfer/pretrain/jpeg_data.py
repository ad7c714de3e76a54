"""The data path of the GPU augmentation backend (``--aug-backend gpu``): JPEG bytes off the disk,
decoded and augmented on the device.

DataLoader workers only read files (cheap: no decode, no PIL), so a handful keep up with any GPU.
A background thread takes each batch of bytes, decodes it with nvJPEG
(``torchvision.io.decode_jpeg(device="cuda")``; the H100 has hardware JPEG decoders) and runs
``GPUAugment`` on a side CUDA stream, a couple of batches ahead of the training step, which waits
for it with a CUDA event. On a CPU device the same code decodes and augments on the CPU.

Batches are ``(im_q, im_k, view_ids)``, the same as ``augment.TwoCropDataset`` gives the CPU backend,
so the training loop does not care which backend fed it. Each batch's random parameters come from
a generator seeded by (seed, its first view id): a resumed run sees the same crops again.
"""
import io
import queue
import threading
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torchvision.io import ImageReadMode, decode_jpeg, encode_jpeg

from transfer.image_folder import ImageFolder
from transfer.pretrain.augment import view_seed
from transfer.pretrain.gpu_augment import GPUAugment


def read_jpeg(path):
    """The file's bytes as a uint8 tensor, if nvJPEG's batched decoder takes them (baseline JPEG,
    RGB or grayscale); anything else (PNG, CMYK, progressive; ImageNet has a few) is re-encoded
    here, in the worker, as a baseline RGB JPEG of quality 95."""
    data = Path(path).read_bytes()
    with Image.open(io.BytesIO(data)) as im:  # parses the header only
        if im.format == "JPEG" and im.mode in ("RGB", "L") and not im.info.get("progressive"):
            return torch.frombuffer(bytearray(data), dtype=torch.uint8)
        pixels = torch.from_numpy(np.array(im.convert("RGB"))).permute(2, 0, 1).contiguous()
    return encode_jpeg(pixels, quality=95)


class JpegFolder(torch.utils.data.Dataset):
    """ImageFolder whose items are ``(jpeg_bytes, view_id)``; view ids index images modulo their
    number, as ``augment.TwoCropDataset`` (so ``augment.ViewSampler`` drives both backends).

    decode=True decodes in the worker instead (libjpeg-turbo, uint8 (3, H, W)): for devices
    without a JPEG decoder, or to compare the two.
    """

    def __init__(self, root, decode=False, skipped=None):
        self.images = ImageFolder(root, loader=read_jpeg, skipped=skipped)
        self.decode = decode

    def __len__(self):
        return len(self.images)

    def __getitem__(self, view_id):
        data, _ = self.images[view_id % len(self.images)]
        if self.decode:
            data = decode_jpeg(data, mode=ImageReadMode.RGB)
        return data, view_id


def collate(batch):
    """(images, byte counts, view ids). JPEG bytes travel as ONE flat tensor per batch: a single
    shared-memory hand-over from the worker (and a single pinned copy) instead of one per image.
    Decoded images (decode=True) stay a list, counts None."""
    images, view_ids = [item[0] for item in batch], torch.tensor([item[1] for item in batch])
    if images[0].dim() == 1:
        return torch.cat(images), torch.tensor([len(im) for im in images]), view_ids
    return images, None, view_ids


_END = object()


class GPUTwoCropLoader:
    """Iterates ``(im_q, im_k, view_ids)`` with both crops already on ``device``.

    dataset: a JpegFolder; augment: a GPUAugment (``GPUAugment.from_transform(moco_augmentation())``);
    sampler: yields view ids (e.g. ``augment.ViewSampler``); prefetch: batches prepared ahead.
    """

    def __init__(self, dataset, augment, batch_size, sampler=None, workers=4, device="cuda", seed=0,
                 prefetch=2, channels_last=False):
        self.device = torch.device(device)
        if self.device.type == "cuda" and self.device.index is None:
            self.device = torch.device("cuda", torch.cuda.current_device())
        self.augment, self.seed, self.prefetch = augment, seed, prefetch
        self.channels_last = channels_last
        self.sampler = sampler
        self.loader = torch.utils.data.DataLoader(
            dataset, batch_size=batch_size, sampler=sampler, num_workers=workers, collate_fn=collate,
            pin_memory=self.device.type == "cuda", drop_last=True, persistent_workers=workers > 0,
            prefetch_factor=4 if workers > 0 else None,
        )

    def __len__(self):
        return len(self.loader)

    def transform(self, images, sizes, view_ids):
        """One batch (as ``collate`` makes it): decode (if bytes) on the device, then two augmented views."""
        if sizes is not None:
            images = decode_jpeg(list(images.split(sizes.tolist())), mode=ImageReadMode.RGB, device=self.device)
        else:
            images = [im.to(self.device, non_blocking=True) for im in images]
        generator = torch.Generator().manual_seed(view_seed(self.seed, int(view_ids[0])))
        layout = torch.channels_last if self.channels_last else torch.contiguous_format
        im_q, im_k = self.augment(images, views=2, generator=generator, memory_format=layout)
        return im_q, im_k, view_ids

    def __iter__(self):
        if self.device.type != "cuda":  # nothing to overlap with: work inline
            for batch in self.loader:
                yield self.transform(*batch)
            return
        yield from self._prefetched()

    def _produce(self, out, stop, stream):
        try:
            torch.cuda.set_device(self.device)
            with torch.cuda.stream(stream):
                for batch in self.loader:
                    if stop.is_set():
                        break
                    batch = self.transform(*batch)
                    ready = torch.cuda.Event()
                    ready.record(stream)
                    out.put((batch, ready))
        except BaseException as e:  # re-raised in the consumer
            out.put(e)
        out.put(_END)

    def _prefetched(self):
        out, stop = queue.Queue(maxsize=self.prefetch), threading.Event()
        stream = torch.cuda.Stream(self.device)
        thread = threading.Thread(target=self._produce, args=(out, stop, stream), daemon=True)
        thread.start()
        try:
            while (item := out.get()) is not _END:
                if isinstance(item, BaseException):
                    raise item
                (im_q, im_k, view_ids), ready = item
                current = torch.cuda.current_stream(self.device)
                current.wait_event(ready)
                # Made on the side stream, used on this one: keep the allocator from reusing them early.
                im_q.record_stream(current)
                im_k.record_stream(current)
                yield im_q, im_k, view_ids
        finally:
            stop.set()
            while thread.is_alive():  # unblock a producer waiting on a full queue
                try:
                    out.get(timeout=0.1)
                except queue.Empty:
                    pass
            thread.join()


def build_loader(root, transform, batch_size, sampler=None, workers=4, device="cuda", seed=0,
                 decode_on_device=True, channels_last=False):
    """The gpu backend's loader for an ImageFolder ``root`` and a torchvision ``transform`` (the CPU
    backend's per-image pipeline, e.g. ``augment.moco_augmentation(224, aug_plus=True)``)."""
    dataset = JpegFolder(root, decode=not decode_on_device)
    return GPUTwoCropLoader(dataset, GPUAugment.from_transform(transform), batch_size, sampler=sampler,
                            workers=workers, device=device, seed=seed, channels_last=channels_last)
