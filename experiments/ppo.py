"""Stage 5: PPO against the frozen rejection-sampling policy, in every RLHF round.

Earlier stages must have finished in the same work directory:

  python -m experiments.ppo --config=experiments/configs/pipeline.py:quick --workdir=q
"""

from experiments import launch

if __name__ == "__main__":
  launch.main(stages=("ppo",))
