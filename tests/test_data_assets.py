"""Tests of the shipped data: licenses beside every subset, size, and exact reproducibility."""

import os

import pytest

from llama2_jax.data import make_subsets
from llama2_jax.data.sources import asset_path
from tests.test_tokenizer import LLAMA2_TOKENIZER

ASSETS = asset_path("")
DATA_FOLDERS = ("hh_rlhf", "oasst1", "self_instruct", "anthropic_red_team", "xstest",
                "truthfulqa")
UPSTREAM = os.path.join(os.path.dirname(__file__), "..", "..", "shared", "data")


@pytest.mark.parametrize("folder", DATA_FOLDERS)
def test_subset_has_license_and_attribution(folder):
  names = os.listdir(os.path.join(ASSETS, folder))
  assert "LICENSE" in names
  assert "ATTRIBUTION.md" in names


def test_every_asset_folder_is_documented():
  folders = sorted(name for name in os.listdir(ASSETS)
                   if os.path.isdir(os.path.join(ASSETS, name)))
  assert folders == sorted(DATA_FOLDERS + ("tokenizer",)), (
      "A new folder in llama2_jax/assets needs a LICENSE and an ATTRIBUTION.md; add it to "
      "DATA_FOLDERS.")
  with open(os.path.join(ASSETS, "README.md"), encoding="utf-8") as f:
    readme = f.read()
  for folder in folders:
    assert f"| {folder}/ |" in readme, f"llama2_jax/assets/README.md has no row for {folder}/"


def test_tokenizer_names_its_training_data():
  # The shipped tokenizer is trained on the text of these subsets, so its README must name them.
  with open(os.path.join(ASSETS, "tokenizer", "README.md"), encoding="utf-8") as f:
    readme = f.read()
  assert "llama2_jax.data.train_tokenizer" in readme
  assert "licenses and attribution" in readme


@pytest.mark.skipif(not os.path.exists(LLAMA2_TOKENIZER),
                    reason="Meta's Llama 2 tokenizer is not at ../shared/data/llama2_tokenizer")
def test_meta_tokenizer_not_shipped():
  with open(LLAMA2_TOKENIZER, "rb") as f:
    meta = f.read()
  repository = os.path.dirname(os.path.dirname(os.path.normpath(ASSETS)))
  for root, dirs, files in os.walk(repository):
    dirs[:] = [d for d in dirs if not d.startswith(".")]  # .git, .venv
    for name in files:
      path = os.path.join(root, name)
      if os.path.getsize(path) == len(meta):
        with open(path, "rb") as f:
          assert f.read() != meta, f"{path} is a copy of Meta's Llama 2 tokenizer; remove it."


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
