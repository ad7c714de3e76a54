"""What a pre-training run measures besides its loss: k-NN top-1, the dictionary's consistency, the
similarity matrix of one batch; and their figures.

Dictionary consistency: each stored key (a MoCo queue entry, a memory-bank row) against the same
crop re-encoded now by the encoder that made it, by the key's age. The raw cosine alone is fooled by
collapse (when every feature is alike, every re-encoding looks like its stored key), so the meter
is relative to the features' spread: the cosine MINUS the mean cosine of the re-encoded key with
the other images' stored keys (0: no better than another image's key), with the retrieval rate
(is the nearest stored key its own image's?) and the spread itself (the mean cosine between
different images' keys; 1: collapsed) beside it.

Monitors leave training as they found it: BatchNorm buffers are restored and random draws (MoCo's
key shuffle) come from a forked generator, so a monitored run trains exactly like an unmonitored one.
"""
import contextlib
from pathlib import Path

import torch
import torch.nn.functional as F

from transfer.image_folder import SKIPPED, ImageFolder
from transfer.pretrain.augment import eval_transform


@contextlib.contextmanager
def untouched(model, device):
    """Run the encoders in training mode (batch statistics, as training sees them) without leaving a
    trace: their buffers are restored and the random generators forked."""
    saved = [{name: b.clone() for name, b in encoder.named_buffers()} for encoder in model.children()]
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        try:
            yield
        finally:
            with torch.no_grad():
                for encoder, buffers in zip(model.children(), saved):
                    for name, b in encoder.named_buffers():
                        b.copy_(buffers[name])


# ----------------------------------------------------------------------------- k-NN


def knn_loaders(train_dir, val_dir, cfg, batch):
    """((bank loader, query loader), number of classes, a line saying how many images each uses):
    the whole train (bank) and val (queries) splits, or evenly spaced subsets of knn_max_images."""
    loaders, counts = [], []
    for root in (train_dir, val_dir):
        images = ImageFolder(root, eval_transform(cfg.image_size), skipped=Path(cfg.output) / SKIPPED)
        n = len(images) if cfg.knn_max_images is None else min(len(images), cfg.knn_max_images)
        subset = torch.utils.data.Subset(images, torch.linspace(0, len(images) - 1, n).round().long().tolist())
        loaders.append(torch.utils.data.DataLoader(subset, batch_size=batch, num_workers=cfg.workers,
                                                   generator=torch.Generator()))
        counts.append(f"{n} of {len(images)}" if n < len(images) else f"all {n}")
    line = f"k-NN monitor: {counts[0]} train images as the bank, {counts[1]} val images as queries"
    if cfg.knn_max_images is not None:
        line += f" (--knn-max-images {cfg.knn_max_images})"
    return tuple(loaders), len(ImageFolder(train_dir).classes), line


# ----------------------------------------------------------------------------- dictionary consistency


def consistency_scores(stored, reencoded, images):
    """Per key: ``cosine`` of stored and re-encoded key; ``margin``, that cosine minus the mean
    cosine of the re-encoded key with the stored keys of OTHER images; ``retrieved``, whether the
    stored key nearest to the re-encoded one is of its own image. And ``spread``: the mean cosine
    between different images' stored keys (1 when the features have collapsed)."""
    similarity = reencoded @ stored.T
    other = images[:, None] != images[None, :]
    cosine = similarity.diagonal()
    margin = cosine - (similarity * other).sum(1) / other.sum(1).clamp(min=1)
    retrieved = images[similarity.argmax(1)] == images
    spread = (stored @ stored.T)[other].mean() if other.any() else torch.tensor(float("nan"))
    return {"cosine": cosine, "margin": margin, "retrieved": retrieved}, spread.item()


# monitor.csv's consistency columns: the meter (mean margin), the raw cosine, the retrieval rate (%), the spread
SUMMARY = ("dict_consistency", "dict_cosine", "dict_retrieval", "feature_spread")


def summary(scores, spread):
    """The monitor row's consistency columns (means over the keys)."""
    means = (scores["margin"].mean().item(), scores["cosine"].mean().item(),
             100.0 * scores["retrieved"].float().mean().item(), spread)
    return dict(zip(SUMMARY, means))


@torch.no_grad()
def dictionary_consistency(model, dataset, local_batch, global_batch, device, max_keys=1024):
    """(ages (n,), per-key scores, spread) for about ``max_keys`` keys of the mechanism's dictionary,
    re-encoded in chunks of the per-process batch (BatchNorm sees batches like the ones that made
    the keys). With split BN the keys were made in randomly shuffled BN groups, so even the newest
    keys score a little below 1. End-to-end stores nothing: its keys are encoded now, consistency 1
    by construction (the margin and spread still say how distinct they are). None when nothing
    written by training is stored yet."""
    stored = model.stored_keys(max_keys, global_batch)
    if stored is None:  # end-to-end
        n = max(1, min(max_keys, len(dataset)) // local_batch) * local_batch
        ids = torch.arange(n)
        keys = _encode(model.encoder_q, [dataset.key_view(int(i)) for i in ids], local_batch, device)
        stored_keys, ages = keys, torch.zeros(n, dtype=torch.long)
    else:
        if len(stored.view_ids) == 0:
            return None
        ids, stored_keys, ages = stored.view_ids.cpu(), stored.keys.float(), stored.ages
        view = dataset.key_view if stored.crop == "key" else dataset.query_view
        keys = _encode(stored.encoder, [view(int(i)) for i in ids], local_batch, device)
    scores, spread = consistency_scores(stored_keys.to(device), keys, (ids % len(dataset)).to(device))
    return ages.cpu(), {k: v.cpu() for k, v in scores.items()}, spread


def _encode(encoder, images, chunk, device):
    images = torch.stack(images)
    return torch.cat([F.normalize(encoder(x.to(device)).float(), dim=1) for x in images.split(chunk)])


@torch.no_grad()
def batch_similarity(model, dataset, n, device):
    """cos(query i, positive key j) of one fixed batch (n images spread over the classes, first-epoch
    crops), as the mechanism makes them: positives on the diagonal. Runs on every process (MoCo's
    shuffle is collective)."""
    ids = torch.linspace(0, len(dataset) - 1, n).round().long()
    crops = [dataset[int(i)] for i in ids]
    im_q, im_k = (torch.stack([c[j] for c in crops]).to(device) for j in (0, 1))
    q = F.normalize(model.encoder_q(im_q).float(), dim=1)
    k = model.keys(im_k, ids.to(device))
    return (q @ k.float().T).cpu()


# ----------------------------------------------------------------------------- figures


def pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def age_curve(rows, column, max_points=10):
    """(ages, mean of ``column``) of a consistency table's rows; many distinct ages (a memory bank's)
    are grouped into ``max_points`` bins of as many keys each, shown at their mean age."""
    curve = rows.groupby("age_steps")[column].mean()
    if len(curve) > max_points:
        import pandas as pd

        grouped = rows.groupby(pd.qcut(rows["age_steps"], max_points, duplicates="drop"), observed=True)
        curve = grouped[column].mean()
        curve.index = grouped["age_steps"].mean().values
    return curve.index, curve.values


def consistency_fall(rows):
    """How much a dictionary's consistency falls with key age at one monitor (rows of one step of a
    consistency table): the mean margin of its newest quarter of keys minus that of its oldest
    quarter. Near 0 when old keys are as consistent as new ones; large when old keys have rotted
    (memory-bank rows written by the encoders of many steps ago). 0 when every key has the same age
    (end-to-end: its keys are encoded now)."""
    if rows["age_steps"].nunique() < 2:
        return 0.0
    margins = rows.sort_values("age_steps", kind="stable")["margin"].to_numpy()
    quarter = max(1, len(margins) // 4)
    return float(margins[:quarter].mean() - margins[-quarter:].mean())


def plot_consistency(csv_path, png_path, title="Dictionary consistency"):
    """A run's dictionary_consistency.csv: one curve per monitored epoch."""
    import pandas as pd

    table = pd.read_csv(csv_path)
    curves = {f"epoch {epoch}": rows for epoch, rows in table.groupby("epoch")}
    plot_consistency_curves({"": curves}, png_path, title)


def plot_consistency_curves(panels, png_path, title, colours=None):
    """Consistency against key age. For each (panel title, {label: rows of a consistency table}) a
    column of two panels, the margin above and the raw cosine below, one curve per label (in
    ``colours[label]`` when given)."""
    plt = pyplot()
    fig, axes = plt.subplots(2, len(panels), figsize=(6 * len(panels), 8), squeeze=False)
    for column, (name, curves) in enumerate(panels.items()):
        margin, cosine = axes[:, column]
        for label, rows in curves.items():
            for ax, value in ((margin, "margin"), (cosine, "cosine")):
                ages, values = age_curve(rows, value)
                ax.plot(ages, values, marker="o", label=label, color=(colours or {}).get(label))
        prefix = f"{name}: " if name else ""
        margin.set_title(prefix + "consistency relative to the spread")
        cosine.set_title(prefix + "raw cosine (fooled by collapse)")
        margin.set_ylabel("cos(stored, re-encoded) - mean cos(other images)")
        cosine.set_ylabel("cos(stored key, same crop re-encoded now)")
        cosine.set_xlabel("key age (training steps)")
    fig.suptitle(title)
    finish_figure(fig, axes.ravel(), png_path)


def finish_figure(fig, axes, path):
    """The common end of a monitor or ablation figure: grid, legends where there are curves, saved, closed."""
    for ax in axes:
        ax.grid(alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize="small")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    pyplot().close(fig)


def plot_similarity(matrix, png_path, title):
    """The one-batch similarity matrix as a heat map, coloured over its own range (nearly collapsed
    features would otherwise be one colour), with the mean positive and negative cosine."""
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(5.2, 4.6))
    image = ax.imshow(matrix.numpy(), cmap="viridis")
    fig.colorbar(image, ax=ax, label="cosine")
    ax.set_xlabel("positive key of image j")
    ax.set_ylabel("query of image i")
    diagonal = matrix.diagonal().mean().item()
    off = (matrix.sum() - matrix.diagonal().sum()).item() / max(1, matrix.numel() - len(matrix))
    ax.set_title(f"{title}\nmean cos: positives {diagonal:.3f}, other images {off:.3f}", fontsize="medium")
    fig.tight_layout()
    fig.savefig(png_path, dpi=120)
    plt.close(fig)
