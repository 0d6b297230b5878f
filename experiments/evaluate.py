"""Stage 6: evaluation of the policies and the report.

Earlier stages must have finished in the same work directory:

  python -m experiments.evaluate --config=experiments/configs/pipeline.py:quick --workdir=q
"""

from experiments import launch

if __name__ == "__main__":
  launch.main(stages=("eval",))
