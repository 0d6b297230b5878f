"""Deterministic train/validation/test assignment by group (prompt), independent of file order.

A record's split depends only on the split seed and its group key: u = the first 8 bytes of
sha256(f"{seed}:{group}") read as a fraction in [0, 1); u < test_fraction is "test", u below
test_fraction + validation_fraction is "validation", the rest "train". Records that share a
group (the same prompt) therefore always share a split, across files and datasets, and adding
records never moves existing ones.
"""

from __future__ import annotations

import hashlib

SPLITS = ("train", "validation", "test")


def split_fraction(group: str, seed: int) -> float:
  """Maps a group to a pseudo-random number in [0, 1) fixed by the seed."""
  digest = hashlib.sha256(f"{seed}:{group}".encode("utf-8")).digest()
  return int.from_bytes(digest[:8], "big") / 2.0**64


def assign_split(group: str, *, seed: int, validation_fraction: float,
                 test_fraction: float) -> str:
  """Returns "train", "validation" or "test" for a group."""
  u = split_fraction(group, seed)
  if u < test_fraction:
    return "test"
  if u < test_fraction + validation_fraction:
    return "validation"
  return "train"
