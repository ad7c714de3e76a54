"""Weighted k-NN monitor (Wu et al. 2018, InstDisc): top-1 of a k-NN classifier on frozen features.

A cheap, training-free signal of representation quality during pre-training: features of a
labelled memory bank (train images) vote for the class of each held-out image, weighted by
exp(cosine / t).
"""
import torch
import torch.nn as nn
import torch.nn.functional as F

from transfer.pretrain.precision import autocast


def backbone(resnet):
    """The torchvision ResNet without its fc head (shares the modules, copies nothing)."""
    return nn.Sequential(*list(resnet.children())[:-1], nn.Flatten(1))


@torch.no_grad()
def extract_features(model, loader, device, autocast_dtype=None):
    """L2-normalised features and labels of every image in ``loader`` (model in eval mode)."""
    was_training = model.training
    model.eval()
    feats, labels = [], []
    for images, target in loader:
        with autocast(device, autocast_dtype):
            f = model(images.to(device, non_blocking=True))
        feats.append(F.normalize(f.float(), dim=1))
        labels.append(target.to(device))
    model.train(was_training)
    return torch.cat(feats), torch.cat(labels)


@torch.no_grad()
def knn_predict(bank, bank_labels, queries, num_classes, k=200, t=0.07, chunk=1024):
    """Predicted class of each query: the class with the largest sum of exp(sim / t) over its k nearest bank
    features."""
    k = min(k, bank.shape[0])
    preds = []
    for q in queries.split(chunk):
        sim, idx = (q @ bank.T).topk(k, dim=1)
        votes = torch.zeros(q.shape[0], num_classes, device=q.device)
        votes.scatter_add_(1, bank_labels[idx], (sim / t).exp())
        preds.append(votes.argmax(1))
    return torch.cat(preds)


def knn_top1(model, bank_loader, query_loader, num_classes, device, k=200, t=0.07, autocast_dtype=None):
    """Top-1 accuracy (%) of the weighted k-NN classifier on ``query_loader``."""
    bank, bank_labels = extract_features(model, bank_loader, device, autocast_dtype)
    queries, labels = extract_features(model, query_loader, device, autocast_dtype)
    pred = knn_predict(bank, bank_labels, queries, num_classes, k=k, t=t)
    return 100.0 * (pred == labels).float().mean().item()
