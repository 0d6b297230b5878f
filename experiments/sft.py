"""Stage 2: supervised fine-tuning of the base model on the dialogues.

Earlier stages must have finished in the same work directory:

  python -m experiments.sft --config=experiments/configs/pipeline.py:quick --workdir=q
"""

from experiments import launch

if __name__ == "__main__":
  launch.main(stages=("sft",))
