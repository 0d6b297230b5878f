"""Stage 3: the helpfulness and safety reward models, from the SFT checkpoint.

Earlier stages must have finished in the same work directory:

  python -m experiments.reward_models --config=experiments/configs/pipeline.py:quick --workdir=q
"""

from experiments import launch

if __name__ == "__main__":
  launch.main(stages=("reward_helpfulness", "reward_safety"))
