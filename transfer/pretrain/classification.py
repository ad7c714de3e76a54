"""Top-k accuracy of a classifier over a labelled loader: what supervised pre-training and linear
evaluation report."""
import torch

from transfer.pretrain.precision import autocast


def accuracy(logits, target, topk=(1, 5)):
    """Number of correct predictions within the top k, for each k."""
    top = logits.topk(max(topk), dim=1).indices
    hits = top == target[:, None]
    return [hits[:, :k].any(1).sum().item() for k in topk]


@torch.no_grad()
def evaluate(model, loader, device, amp_dtype=None):
    """{"top1", "top5"} (%) of a classifier over ``loader``."""
    model.eval()
    correct1 = correct5 = total = 0
    for images, target in loader:
        target = target.to(device)
        with autocast(device, amp_dtype):
            logits = model(images.to(device, non_blocking=True))
        c1, c5 = accuracy(logits.float(), target, (1, min(5, logits.shape[1])))
        correct1, correct5, total = correct1 + c1, correct5 + c5, total + len(target)
    return {"top1": 100.0 * correct1 / total, "top5": 100.0 * correct5 / total}
