"""MoCo v1 / v2 augmentations and the two-crop dataset.

Every random draw comes from torch's RNG, reseeded per view from (seed, epoch, image index): a
view is a pure function of its id, whatever the number of loader workers or processes. That makes
resume bit-exact and lets the dictionary-consistency monitor rebuild the exact crop behind a
stored key.
"""
import torch
import torchvision.transforms as T
from PIL import ImageFilter

from transfer.image_folder import ImageFolder

# ImageNet statistics in RGB order, as the official code and torchvision use.
MEAN = [0.485, 0.456, 0.406]
STD = [0.229, 0.224, 0.225]


class GaussianBlur:
    """PIL Gaussian blur with sigma ~ U(sigma_min, sigma_max) (MoCo v2 / SimCLR), drawn from torch's RNG."""

    def __init__(self, sigma=(0.1, 2.0)):
        self.sigma = sigma

    def __call__(self, img):
        lo, hi = self.sigma
        sigma = lo + (hi - lo) * torch.rand(()).item()
        return img.filter(ImageFilter.GaussianBlur(radius=sigma))


def moco_augmentation(image_size=224, aug_plus=False, to_tensor=True):
    """The official augmentation: v1 (aug_plus False) or v2 (aug_plus True: stronger jitter, blur).

    to_tensor False stops before ToTensor/Normalize (PIL output), for tests and inspection.
    """
    if aug_plus:  # MoCo v2, as SimCLR
        ops = [
            T.RandomResizedCrop(image_size, scale=(0.2, 1.0)),
            T.RandomApply([T.ColorJitter(0.4, 0.4, 0.4, 0.1)], p=0.8),
            T.RandomGrayscale(p=0.2),
            T.RandomApply([GaussianBlur((0.1, 2.0))], p=0.5),
            T.RandomHorizontalFlip(),
        ]
    else:  # MoCo v1, as InstDisc
        ops = [
            T.RandomResizedCrop(image_size, scale=(0.2, 1.0)),
            T.RandomGrayscale(p=0.2),
            T.ColorJitter(0.4, 0.4, 0.4, 0.4),
            T.RandomHorizontalFlip(),
        ]
    if to_tensor:
        ops += [T.ToTensor(), T.Normalize(MEAN, STD)]
    return T.Compose(ops)


def eval_transform(image_size=224):
    """Resize to 256/224 of the crop, centre crop: the standard ImageNet evaluation view."""
    return T.Compose([
        T.Resize(round(image_size * 256 / 224)),
        T.CenterCrop(image_size),
        T.ToTensor(),
        T.Normalize(MEAN, STD),
    ])


def classification_transform(image_size=224):
    """Random resized crop + flip: the supervised / linear-classification training view."""
    return T.Compose([
        T.RandomResizedCrop(image_size),
        T.RandomHorizontalFlip(),
        T.ToTensor(),
        T.Normalize(MEAN, STD),
    ])


def view_seed(seed, view_id):
    """A 63-bit seed per (run seed, view id); distinct views get unrelated streams."""
    return (seed * 0x9E3779B97F4A7C15 + view_id * 0xBF58476D1CE4E5B9 + 1) % (2**63 - 1)


class TwoCropDataset(torch.utils.data.Dataset):
    """ImageFolder that returns (im_q, im_k, view_id) for view ids epoch * len(images) + index.

    ``skipped``: where undecodable images are listed (``transfer.image_folder``)."""

    def __init__(self, root, transform, seed=0, skipped=None):
        self.images = ImageFolder(root, skipped=skipped)
        self.transform = transform
        self.seed = seed

    def __len__(self):
        return len(self.images)

    def __getitem__(self, view_id):
        img, _ = self.images[view_id % len(self.images)]
        with torch.random.fork_rng(devices=[]):  # the CPU generator only; CUDA's (the key shuffle's) untouched
            torch.default_generator.manual_seed(view_seed(self.seed, view_id))
            q = self.transform(img)
            k = self.transform(img)
        return q, k, view_id

    def query_view(self, view_id):
        """The exact query crop (the first crop) the view id produced in training."""
        return self[view_id][0]

    def key_view(self, view_id):
        """The exact key crop (the second crop) the view id produced in training."""
        return self[view_id][1]


class ViewSampler(torch.utils.data.Sampler):
    """The view ids of a whole run, from ``start_step`` on: each epoch a seeded permutation of the
    images, cut into full global batches; each rank takes its contiguous slice of every batch."""

    def __init__(self, num_images, global_batch, rank, world_size, seed, epochs, start_step=0):
        self.n, self.global_batch, self.rank, self.world = num_images, global_batch, rank, world_size
        self.seed, self.epochs, self.start_step = seed, epochs, start_step
        self.steps_per_epoch = num_images // global_batch
        self.local_batch = global_batch // world_size

    def __len__(self):
        return (self.epochs * self.steps_per_epoch - self.start_step) * self.local_batch

    def __iter__(self):
        first_epoch, first_step = divmod(self.start_step, self.steps_per_epoch)
        for epoch in range(first_epoch, self.epochs):
            perm = torch.randperm(self.n, generator=torch.Generator().manual_seed(self.seed * 100003 + epoch))
            for i in range(first_step if epoch == first_epoch else 0, self.steps_per_epoch):
                start = i * self.global_batch + self.rank * self.local_batch
                yield from (epoch * self.n + perm[start:start + self.local_batch]).tolist()
