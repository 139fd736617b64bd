"""DeepCluster: Caron, Bojanowski, Joulin & Douze 2018, "Deep Clustering for Unsupervised
Learning of Visual Features" (ECCV). Headline: AlexNet (Sobel input), 500 epochs on ImageNet,
linear probe on conv4 39.8 % top-1 (Table 1); ResNet-50 numbers only came later (DeepCluster-v2).

Alternate: k-means on PCA-reduced (256-d), whitened, L2-normalised features of the whole data
set gives pseudo-labels; a freshly initialised linear classifier on the backbone learns them
for one epoch, sampling the clusters uniformly; repeat.

How the seam (batches only, no data set) is bridged, stated plainly:
  * ``bank`` ``[num_images, D]`` holds each image's features from its last visit, taken on the
    un-augmented view (``views[-1]``, like the paper's centre crop; BatchNorm in train mode,
    no grad), written in ``after_step``. Re-clustering happens in ``after_step`` once per epoch
    (``num_images // batch`` steps), or more often so that a run has at least
    `min_clusterings` of them (the embedded run is half an epoch long). It clusters only the
    rows written since the previous clustering (``fresh``): at one clustering per epoch that
    is every image, as in the paper; when more frequent, it keeps features of older networks
    out (with them, late assignments piled into a few clusters: 8 of 100 per batch).
  * Warm-up: until the first clustering the loss is zero (the paper clusters before it
    trains); those steps only fill the bank.
  * ``labels`` ``[num_images]`` are the last clustering's (-1: not clustered then). An image
    without one is assigned, when seen, to the nearest centroid (``centroids``, ``pca_mean``,
    ``pca_proj`` buffers) of its current features: the k-means assignment step, applied late.
    At less than one epoch this is how every image after the warm-up is labelled.
  * Uniform sampling over pseudo-labels is replaced by its per-batch equivalent: each sample's
    loss is weighted by ``N / (K_alive * n_cluster)`` (same expected gradient).
  * Empty clusters: a random non-empty cluster (chance proportional to size) is split, its
    centroid perturbed both ways and its members reassigned to the nearer (paper, Sec. 3.3).
  * The classifier is re-initialised (N(0, 0.01), bias 0) after each clustering; its momentum
    buffer, owned by the trainer's optimizer, is not reset (the paper makes a new optimizer).
  * k-means is scikit-learn's (k-means++ init, 20 Lloyd iterations, one thread so resumes are
    bit-exact; the paper used faiss with random init). Not reproduced: the Sobel input filter
    (the exported encoder must take raw images) and AlexNet's fc layers before the classifier.
  * K is clipped to ``num_images // 128`` (the paper's 1.28M images / 10k clusters).
"""

from __future__ import annotations

from typing import cast

import torch
import torch.nn.functional as F
from sklearn.cluster import KMeans
from threadpoolctl import threadpool_limits
from torch import nn

import gin
from harness import dist
from methods.base import Batch, DataInfo, Encoder, Method, fp32


@fp32
def uniform_cluster_loss(logits: torch.Tensor, labels: torch.Tensor, sizes: torch.Tensor) -> torch.Tensor:
    """Cross-entropy weighted as if clusters were sampled uniformly.

    Args:
        logits: ``[B, K]`` classifier outputs.
        labels: ``[B]`` pseudo-labels.
        sizes: ``[K]`` images per cluster (0: empty).
    Returns:
        ``mean_i w_i CE_i`` with ``w_i = sum(sizes) / (#non-empty * sizes[label_i])``.
    """
    w = sizes.sum() / ((sizes > 0).sum() * sizes[labels]).to(logits.dtype)  # [B]
    return (w * F.cross_entropy(logits, labels, reduction="none")).mean()


def pca_whitening(x: torch.Tensor, dim: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean ``[D]`` and projection ``[D, dim]`` onto the top principal axes, scaled to unit variance.
    Axes with (near) zero variance are dropped (zero columns)."""
    x = x.double()
    mean = x.mean(0)
    cov = (x - mean).T @ (x - mean) / max(1, len(x) - 1)  # [D, D]
    evals, evecs = torch.linalg.eigh(cov)  # ascending
    evals, evecs = evals.flip(0)[:dim], evecs.flip(1)[:, :dim]
    keep = evals > 1e-6 * evals[0].clamp_min(1e-30)
    return mean.float(), (evecs * torch.where(keep, evals.clamp_min(1e-30).rsqrt(), 0.0)).float()


def fill_empty_clusters(x: torch.Tensor, labels: torch.Tensor, centroids: torch.Tensor) -> torch.Tensor:
    """Splits random non-empty clusters into the empty ones (in place on `centroids`).

    Args:
        x: ``[n, d]`` clustered points; labels: ``[n]``; centroids: ``[K, d]``.
    Returns:
        The new labels ``[n]``; a cluster stays empty only when no cluster has two members.
    """
    labels, k = labels.clone(), len(centroids)
    sizes = torch.bincount(labels, minlength=k)
    for empty in (sizes == 0).nonzero()[:, 0].tolist():
        if not (sizes > 1).any():
            break
        big = int(torch.multinomial((sizes - 1).clamp_min(0).float(), 1))
        eps = 1e-4 * torch.randn(centroids.shape[1])
        centroids[empty], centroids[big] = centroids[big] + eps, centroids[big] - eps
        members = (labels == big).nonzero()[:, 0]  # [m]
        to_new = (x[members] - centroids[empty]).square().sum(1) < (x[members] - centroids[big]).square().sum(1)
        if to_new.all() or not to_new.any():  # degenerate: move one random member
            to_new = torch.zeros_like(to_new)
            to_new[torch.randint(len(members), ())] = True
        labels[members[to_new]] = empty
        for c in (empty, big):
            centroids[c] = x[labels == c].mean(0)
        sizes = torch.bincount(labels, minlength=k)
    return labels


@gin.configurable(module="deepcluster")
class DeepCluster(Method):
    """DeepCluster with a feature bank and per-epoch k-means.

    Args:
        backbone: the shared timm encoder.
        data: the pretraining data's facts (`DataInfo`): ``num_images`` (the feature bank and the clipped K).
        num_clusters: K (paper: 10000 on ImageNet).
        pca_dim: PCA output size before whitening (paper: 256).
        min_clusterings: re-cluster more often than once per epoch if a run would
            otherwise have fewer clusterings than this.
        kmeans_iterations: Lloyd iterations (paper: 20, faiss).
    """

    bank: torch.Tensor
    fresh: torch.Tensor
    labels: torch.Tensor
    sizes: torch.Tensor
    centroids: torch.Tensor
    pca_mean: torch.Tensor
    pca_proj: torch.Tensor
    clusterings: torch.Tensor

    data_parallel = True  # the bank takes every rank's features: one k-means on every rank (harness/dist.py)

    def __init__(
        self,
        backbone: nn.Module,
        data: DataInfo,
        *,
        num_clusters: int = 10000,
        pca_dim: int = 256,
        min_clusterings: int = 8,
        kmeans_iterations: int = 20,
    ):
        super().__init__(backbone)
        num_images = data.num_images
        d, k = cast(Encoder, backbone).num_features, max(2, min(num_clusters, num_images // 128))
        self.classifier = nn.Linear(d, k)
        self._init_classifier()
        self.num_images, self.min_clusterings, self.kmeans_iterations = num_images, min_clusterings, kmeans_iterations
        self.register_buffer("bank", torch.zeros(num_images, d))
        self.register_buffer("fresh", torch.zeros(num_images, dtype=torch.bool))  # written since the last k-means
        self.register_buffer("labels", torch.full((num_images,), -1, dtype=torch.long))
        self.register_buffer("sizes", torch.zeros(k, dtype=torch.long))
        self.register_buffer("centroids", torch.zeros(k, min(pca_dim, d)))
        self.register_buffer("pca_mean", torch.zeros(d))
        self.register_buffer("pca_proj", torch.zeros(d, min(pca_dim, d)))
        self.register_buffer("clusterings", torch.zeros((), dtype=torch.long))
        self._stash: tuple[torch.Tensor, torch.Tensor, torch.Tensor | None] | None = None

    def _init_classifier(self) -> None:
        nn.init.normal_(self.classifier.weight, 0.0, 0.01)
        nn.init.zeros_(self.classifier.bias)

    def _project(self, f: torch.Tensor) -> torch.Tensor:
        return F.normalize((f - self.pca_mean) @ self.pca_proj, dim=1)  # [n, d]

    def _nearest(self, f: torch.Tensor) -> torch.Tensor:
        """Nearest non-empty centroid of features ``[n, D]`` -> ``[n]``."""
        c = self.centroids
        gap = torch.cdist(self._project(f), c).masked_fill(self.sizes[None] == 0, float("inf"))  # [n, K]
        return gap.argmin(1)

    def loss(self, batch: Batch) -> dict[str, torch.Tensor]:
        with torch.no_grad():
            f_clean = self.backbone(batch.views[-1])  # [B, D]
        if int(self.clusterings) == 0:  # warm-up: fill the bank before the first clustering
            self._stash = (batch.index, f_clean, None)
            zero = self.classifier.weight.sum() * 0.0
            return {"loss": zero, "acc": zero.detach()}
        labels = self.labels[batch.index]  # [B]
        new = labels < 0
        if new.any():
            labels = torch.where(new, self._nearest(f_clean), labels)
        logits = self.classifier(self.backbone(batch.views[0]))  # [B, K]
        self._stash = (batch.index, f_clean, labels)
        loss = uniform_cluster_loss(logits, labels, self.sizes)
        return {"loss": loss, "acc": (logits.argmax(1) == labels).float().mean().detach()}

    @torch.no_grad()
    def after_step(self, step: int, total: int) -> None:
        if self._stash is None:
            return
        index, f, labels = self._stash
        self._stash = None
        index, f = dist.gather_detached(index), dist.gather_detached(f)  # every rank's: one bank, one k-means
        labels = None if labels is None else dist.gather_detached(labels)
        self.bank[index], self.fresh[index] = f, True
        if labels is not None:
            self.labels[index] = labels
        period = max(1, min(self.num_images // len(index), total // self.min_clusterings))
        if (step + 1) % period == 0 and step + 1 < total:
            self.cluster()

    @torch.no_grad()
    def cluster(self) -> None:
        """k-means on the bank's fresh rows; new labels, centroids and a re-initialised classifier."""
        rows = self.fresh.nonzero()[:, 0]
        mean, proj = pca_whitening(self.bank[rows], self.pca_proj.shape[1])
        self.pca_mean.copy_(mean), self.pca_proj.copy_(proj)
        x = self._project(self.bank[rows]).cpu()  # [n, d]
        k = min(len(self.sizes), len(rows))
        seed = int(torch.randint(0, 2**31 - 1, ()))
        with threadpool_limits(limits=1):
            km = KMeans(k, n_init=1, max_iter=self.kmeans_iterations, random_state=seed).fit(x.numpy())
        centroids = torch.zeros(self.centroids.shape)
        centroids[:k] = torch.from_numpy(km.cluster_centers_).float()
        labels = fill_empty_clusters(x, torch.from_numpy(km.labels_).long(), centroids)
        self.centroids.copy_(centroids)
        self.labels.fill_(-1)
        self.labels[rows] = labels.to(self.labels.device)
        self.sizes.copy_(torch.bincount(labels, minlength=len(self.sizes)))
        self.fresh.fill_(False)
        self._init_classifier()
        self.clusterings += 1
