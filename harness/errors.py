"""Exceptions shared by methods and evaluations (neither imports the other for them)."""

from __future__ import annotations


class Unsupported(ValueError):
    """Raised when a method or an evaluation cannot run on what it is given: a method's
    constructor on the data (a colour-only method on grayscale images, an image-text method
    without captions), a protocol on the encoder (detection on a ViT). A method's refusal
    records the run as ``skipped`` with this message as the reason, and the leaderboard
    shows it instead of numbers; a protocol's skips only that protocol."""
