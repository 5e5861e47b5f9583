"""The embedded CPU demo: SCoRe end to end on a model it makes itself, in minutes.

    pip install -e . && python -m score_jax.main --config=configs/demo.py --workdir=runs/demo

No download: the run generates addition problems with a written check (see
score_jax/tasks/arithmetic.py), trains a SentencePiece tokenizer and a small base model
whose second attempt is an independent retry (so it does not self-correct), then runs
SCoRe Stage I and Stage II and prints the self-correction table for base / Stage I /
Stage II (also runs/demo/eval/table.json and table.png). Every field and its meaning is in
score_jax/config_defaults.py, whose defaults are this demo's values; any field can be
overridden, e.g. --config.phases.stage2.steps=50 --config.eval.num_problems=200.
Three attempts instead of two: --config.recipe=score3.
"""
from score_jax import config_defaults


def get_config():
  return config_defaults.get_config()
