"""Stage 4: rejection sampling (best of K) and fine-tuning on the best, in every RLHF round.

Earlier stages must have finished in the same work directory:

  python -m experiments.rejection_sampling --config=experiments/configs/pipeline.py:quick --workdir=q
"""

from experiments import launch

if __name__ == "__main__":
  launch.main(stages=("rejection_sampling",))
