"""Tests of the shipped data: licenses beside every subset, size, and exact reproducibility."""

import os

import pytest

from llama2_jax.data import make_subsets
from llama2_jax.data.sources import asset_path

ASSETS = asset_path("")
DATA_FOLDERS = ("hh_rlhf", "oasst1", "self_instruct", "anthropic_red_team", "xstest",
                "truthfulqa")
UPSTREAM = os.path.join(os.path.dirname(__file__), "..", "..", "shared", "data")


@pytest.mark.parametrize("folder", DATA_FOLDERS)
def test_subset_has_license_and_attribution(folder):
  names = os.listdir(os.path.join(ASSETS, folder))
  assert "LICENSE" in names
  assert "ATTRIBUTION.md" in names


def test_shipped_assets_stay_small():
  total = sum(os.path.getsize(os.path.join(root, name))
              for root, _, files in os.walk(ASSETS) for name in files)
  assert total < 4_000_000, f"Shipped assets are {total} bytes; keep them to a few MB."


@pytest.mark.skipif(not os.path.isdir(UPSTREAM),
                    reason="the full upstream files are not at ../shared/data")
def test_subsets_rebuild_identically(tmp_path):
  make_subsets.make_subsets(UPSTREAM, str(tmp_path))
  for root, _, files in os.walk(tmp_path):
    for name in files:
      rebuilt = os.path.join(root, name)
      shipped = os.path.join(ASSETS, os.path.relpath(rebuilt, tmp_path))
      with open(rebuilt, "rb") as f, open(shipped, "rb") as g:
        assert f.read() == g.read(), f"{shipped} differs from its rebuild"
