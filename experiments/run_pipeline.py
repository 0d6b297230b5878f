"""Runs the whole Llama 2-Chat pipeline; see experiments/configs/pipeline.py for launch commands.

  python -m experiments.run_pipeline --workdir=workdir
  python -m experiments.run_pipeline --config=experiments/configs/pipeline.py:quick --workdir=q
"""

from experiments import launch

if __name__ == "__main__":
  launch.main(stages=None)
