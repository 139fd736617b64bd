"""Tiles and patches cut from a batch on the training device, shared by the methods that
look at an image through a grid of cells: PIRL and Jigsaw (3x3 tiles, shuffled) and
Relative Location (a centre patch and one of its eight neighbours).

A grid cell is ``S // grid`` pixels; a tile or patch is a smaller window inside its cell,
so neighbouring windows are separated by a random gap (the papers' counter to matching
tiles by their edges).
"""

from __future__ import annotations

import torch

from harness import dist


def jigsaw_tiles(x: torch.Tensor, grid: int) -> torch.Tensor:
    """Cuts the central ``grid * (S // grid)`` square into non-overlapping cells, row-major.

    x: ``[B, C, S, S]`` -> ``[B, grid*grid, C, t, t]`` with ``t = S // grid``.
    """
    b, c, s, _ = x.shape
    t = s // grid
    o = (s - grid * t) // 2
    x = x[:, :, o : o + grid * t, o : o + grid * t].reshape(b, c, grid, t, grid, t)
    return x.permute(0, 2, 4, 1, 3, 5).reshape(b, grid * grid, c, t, t)


def shuffle_tiles(tiles: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """A random permutation per image: ``out[b, k] = tiles[b, perm[b, k]]``. Returns (out, perm)."""
    b, k = tiles.shape[:2]
    perm = dist.rand(b, k, device=tiles.device).argsort(1)  # [B, K]
    return tiles[torch.arange(b, device=tiles.device)[:, None], perm], perm


def jitter_crop(tiles: torch.Tensor, size: int, max_shift: int | None = None) -> torch.Tensor:
    """A random ``size``-px window inside each tile. ``[B, K, C, t, t]`` -> ``[B, K, C, size, size]``.

    Args:
        tiles: the cells.
        size: side of the window.
        max_shift: None: anywhere in the tile (uniform offset); else at most this many pixels
            from the centred window in each direction (clipped to the tile).
    """
    b, k, c, t, _ = tiles.shape
    dev = tiles.device
    if max_shift is None:
        oy, ox = dist.randint(0, t - size + 1, (2, b, k), dim=1, device=dev)  # [B, K] each
    else:
        shift = dist.randint(-max_shift, max_shift + 1, (2, b, k), dim=1, device=dev)
        oy, ox = ((t - size) // 2 + shift).clamp(0, t - size)
    ar = torch.arange(size, device=dev)
    rows = (oy[..., None] + ar)[:, :, :, None]  # [B, K, size, 1]
    cols = (ox[..., None] + ar)[:, :, None, :]  # [B, K, 1, size]
    bi, ki = torch.arange(b, device=dev)[:, None, None, None], torch.arange(k, device=dev)[None, :, None, None]
    return tiles.permute(0, 1, 3, 4, 2)[bi, ki, rows, cols].permute(0, 1, 4, 2, 3)
