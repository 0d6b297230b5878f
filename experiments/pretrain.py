"""Stage 1: pretrains the small base model on the shipped text.

Earlier stages must have finished in the same work directory:

  python -m experiments.pretrain --config=experiments/configs/pipeline.py:quick --workdir=q
"""

from experiments import launch

if __name__ == "__main__":
  launch.main(stages=("pretrain",))
