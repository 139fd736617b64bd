"""Jigsaw: Noroozi & Favaro 2016, "Unsupervised Learning of Visual Representations by
Solving Jigsaw Puzzles" (ECCV).

The view is cut into a 3x3 grid of cells; a tile is a random window inside each cell
(paper: 64 of 75 px, so tiles are separated by random gaps and jittered), and each tile
is standardised by its own mean and standard deviation so that tiles cannot be matched
by their low-level statistics. The tiles are shown in the order of one of P fixed
permutations, each tile goes through the shared backbone (siamese, shared weights) and a
per-tile layer (the paper's fc6), and an MLP on the concatenation (fc7, fc8) classifies
which of the P permutations was applied.

The permutation set is chosen greedily for a large minimum Hamming distance: starting
from a random permutation (from `permutation_seed`), each next one is the permutation
of the 9! whose minimum Hamming distance to those already chosen is largest (ties: the
first in lexicographic order). The paper's Algorithm 1, as we read it, scores
candidates by their distance to the chosen set summed; the max-min rule is ours. The set
is a buffer, so a checkpoint carries it.

Adaptations, stated: the tile grid is cut from the augmented view (the paper crops
225 px from a 256-px image); tiles smaller than `min_tile` px are resized up to it (a
no-op at paper scale); the per-tile standardisation is over all pixels and channels of
the tile; the heads use BatchNorm (`methods.base.mlp`).
"""

from __future__ import annotations

import functools
import itertools
from typing import cast

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

import gin
from harness import dist
from methods.base import Batch, DataInfo, Encoder, Method, cross_entropy, mlp
from methods.tiles import jigsaw_tiles, jitter_crop


@functools.lru_cache(maxsize=4)
def _all_permutations(n: int) -> np.ndarray:
    """Every permutation of ``range(n)`` in lexicographic order, ``[n!, n]`` uint8."""
    return np.array(list(itertools.permutations(range(n))), dtype=np.uint8)


@functools.lru_cache(maxsize=8)
def _hamming_permutations(num: int, n: int, seed: int) -> np.ndarray:
    perms = _all_permutations(n)  # [n!, n]
    if not 1 <= num <= len(perms):
        raise ValueError(f"jigsaw.Jigsaw.num_permutations = {num}: choose 1 to {len(perms)} ({n} tiles)")
    cols = np.ascontiguousarray(perms.T)  # [n, n!]
    min_dist = np.full(len(perms), n + 1, dtype=np.uint8)  # distance to the nearest chosen permutation
    dist = np.empty(len(perms), dtype=np.uint8)
    j = int(np.random.default_rng(seed).integers(len(perms)))
    chosen = []
    for _ in range(num):
        chosen.append(j)
        dist[:] = 0
        for k in range(n):
            dist += cols[k] != perms[j, k]
        np.minimum(min_dist, dist, out=min_dist)  # chosen ones are at 0, never picked again
        j = int(min_dist.argmax())
    return perms[chosen].astype(np.int64)


def hamming_permutations(num: int, n: int = 9, seed: int = 0) -> torch.Tensor:
    """``num`` permutations of ``n`` tiles chosen greedily for the largest minimum Hamming
    distance to the ones chosen before. ``[num, n]`` int64, deterministic in `seed`."""
    return torch.from_numpy(_hamming_permutations(num, n, seed).copy())


def normalize_tiles(tiles: torch.Tensor, eps: float = 1e-5) -> torch.Tensor:
    """Each tile standardised by its own mean and std over its pixels and channels.

    tiles: ``[..., C, t, t]`` -> same shape, each tile zero-mean, unit variance.
    """
    mean = tiles.mean((-3, -2, -1), keepdim=True)
    std = tiles.var((-3, -2, -1), keepdim=True, unbiased=False).add(eps).sqrt()
    return (tiles - mean) / std


def permute_tiles(tiles: torch.Tensor, perms: torch.Tensor) -> torch.Tensor:
    """``out[b, k] = tiles[b, perms[b, k]]``: position k shows cell perms[b, k].

    tiles: ``[B, K, C, t, t]``; perms: ``[B, K]`` int64.
    """
    return tiles[torch.arange(len(tiles), device=tiles.device)[:, None], perms]


@gin.configurable(module="jigsaw")
class Jigsaw(Method):
    """The context-free network: shared backbone per tile, permutation classification.

    Args:
        backbone: the shared timm encoder.
        data: the pretraining data's facts (`DataInfo`): unused.
        num_permutations: P, the size of the permutation set (paper: 1000).
        grid: tiles per side (paper: 3).
        tile_frac: tile side as a fraction of its cell (paper: 64 / 75).
        tile_dim: width of the per-tile layer (fc6).
        hidden_dim: width of the layer on the concatenated tiles (fc7).
        min_tile: tiles smaller than this are resized up to it (0: never).
        permutation_seed: seeds the first permutation of the greedy selection.
    """

    permutations: torch.Tensor

    data_parallel = (
        True  # per-image permutation classification; permutations drawn for the global batch (harness/dist.py)
    )

    def __init__(
        self,
        backbone: nn.Module,
        data: DataInfo,
        *,
        num_permutations: int = 1000,
        grid: int = 3,
        tile_frac: float = 64 / 75,
        tile_dim: int = 512,
        hidden_dim: int = 4096,
        min_tile: int = 0,
        permutation_seed: int = 0,
    ):
        super().__init__(backbone)
        n = grid * grid
        self.grid, self.tile_frac, self.min_tile = grid, tile_frac, min_tile
        self.register_buffer("permutations", hamming_permutations(num_permutations, n, permutation_seed))  # [P, n]
        self.tile_fc = nn.Sequential(nn.Linear(cast(Encoder, backbone).num_features, tile_dim), nn.ReLU(inplace=True))
        self.classifier = mlp([n * tile_dim, hidden_dim, num_permutations])

    def draw(self, b: int, device: torch.device) -> torch.Tensor:
        """Which permutation each image gets: ``[B]`` int64 (global RNG)."""
        return dist.randint(0, len(self.permutations), (b,), device=device)

    def puzzle(self, x: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
        """The tiles of x in the order of permutation `index`, jittered and standardised.

        x: ``[B, C, S, S]``, index: ``[B]`` -> ``[B, n, C, s, s]``.
        """
        cells = jigsaw_tiles(x, self.grid)  # [B, n, C, t, t]
        tiles = permute_tiles(cells, self.permutations[index])
        tiles = jitter_crop(tiles, max(1, int(cells.shape[-1] * self.tile_frac)))  # [B, n, C, s, s]
        return normalize_tiles(tiles)

    def loss(self, batch: Batch) -> dict[str, torch.Tensor]:
        x = batch.views[0]  # [B, C, S, S]
        index = self.draw(len(x), x.device)  # [B]
        tiles = self.puzzle(x, index)
        b, n, c, s, _ = tiles.shape
        flat = tiles.reshape(b * n, c, s, s)  # [nB, C, s, s]
        if s < self.min_tile:
            flat = F.interpolate(flat, size=(self.min_tile, self.min_tile), mode="bilinear", align_corners=False)
        per_tile = self.tile_fc(self.backbone(flat))  # [nB, tile_dim]
        logits = self.classifier(per_tile.reshape(b, -1))  # [B, P]
        return {"loss": cross_entropy(logits, index), "acc": (logits.argmax(1) == index).float().mean()}
