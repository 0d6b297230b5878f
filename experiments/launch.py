"""The command-line entry shared by `run_pipeline` and the per-stage scripts.

Flags: `--config` (an ml_collections config file with an optional `:variant`, overridable field
by field as `--config.sft.learning_rate=1e-4`) and `--workdir`.
"""

import os
import re
from typing import Sequence

from absl import app, flags, logging
from ml_collections import config_flags

from llama2_jax.pipeline.loop import Preempted
from llama2_jax.pipeline.run import run_pipeline

_DEFAULT_CONFIG = os.path.join(os.path.dirname(__file__), "configs", "pipeline.py")
try:
  # config_flags applies the command line's overrides here, at definition time.
  _CONFIG = config_flags.DEFINE_config_file(
      "config", _DEFAULT_CONFIG, "Pipeline config file, optionally with :variant (tiny, quick, "
      "7b, 13b, 70b).", lock_config=True)
except (AttributeError, KeyError) as error:
  # ml_collections raises these for a key the locked config lacks, with a suggestion. Exit with
  # that one line instead of a traceback.
  _suggestion = re.search(r'Did you mean "[^"]*" instead of "[^"]*"\?', str(error))
  raise SystemExit(
      "error: invalid config override, the config has no such key. "
      + (_suggestion.group(0) if _suggestion else f"Unknown name: {str(error).strip(chr(34))}")
  ) from None
_WORKDIR = flags.DEFINE_string(
    "workdir", "workdir", "Directory of checkpoints, metrics and the report; rerunning with the "
    "same directory resumes.")


def main(stages: Sequence[str] | None) -> None:
  """Runs `stages` (None: the whole pipeline) with the flags of the command line."""

  def run(argv):
    if len(argv) > 1:
      raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
    if not flags.FLAGS["verbosity"].present:
      # Progress bars and one summary line per stage; --verbosity=0 shows the info logs and
      # --verbosity=-1 the warnings (such as each skipped over-long record).
      logging.set_verbosity(logging.ERROR)
    try:
      run_pipeline(_CONFIG.value, _WORKDIR.value, stages)
    except Preempted as preempted:
      print(preempted, flush=True)
      raise
    except (ValueError, RuntimeError, OSError) as error:
      # Invalid settings, data or checkpoints: their messages name the field, file or stage.
      # --verbosity=1 also logs the traceback.
      logging.debug("Traceback of the error below.", exc_info=True)
      raise SystemExit(f"error: {error}") from None

  app.run(run)
