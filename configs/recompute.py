r"""The testbed for the paper's comparison: the demo's task, with slips that must be recomputed.

    python -m score_jax.experiments --config=configs/recompute.py --workdir=runs/paper_recompute

Everything is the embedded demo's (configs/demo.py: model, base training, Stage I / II
budgets and learning rates), except one task setting, `task.slip_check='consistent'`:
when the simulated student slips on a two-carry sum, its written check drops the carries
too, so the attempt agrees with itself and the right sum is written nowhere:

  Add 37+67.
  Answer 94. Check 7+7=14, 3+6=9 so 94.        <- the carry out of 14 is missing at 3+6

Why (the paper's mechanism, decided before any comparison). On the demo's task the slipped
attempt's own check ends with the right total (`... 3+6+1=10 so 104`), so correcting is
copying a number already written: every method that trains the second attempt learns it,
and the comparison cannot show whether a method learns to correct or only to answer
better first. Here correcting is a skill the base never shows: see that a column of 10 or
more is followed by one without `+1`, and recompute the sum. The shortcut the paper says
multi-turn RL collapses to -- improve the first attempt (stop slipping), then copy it --
is still there and still rewarded, so the two optima compete. What the comparison then
measures is which methods learn the corrector, and what that is worth in final accuracy.
"""
from score_jax import config_defaults


def get_config():
  c = config_defaults.get_config()
  c.task.slip_check = "consistent"
  return c
