"""The paper's comparison: the STaR / Pair-SFT datasets, inference-time scaling by hand,
and the whole `python -m score_jax.experiments` command on a tiny config."""
import json
import os
import subprocess
import sys

import numpy as np

from score_jax import episodes
from score_jax import evaluate
from score_jax import sft_data
from score_jax.tasks.base import Problem

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _scored(rewards_BxT, texts=None):
  """A scored Batch with given rewards (tokens are irrelevant to the filters)."""
  r = np.asarray(rewards_BxT, np.float32)
  B, T = r.shape
  texts = texts or [[f'y{t + 1}-{b}' for b in range(B)] for t in range(T)]
  zeros = np.zeros((T, B, 1), np.int32)
  return episodes.Batch(problems=[Problem(str(b), f'p{b}', '0') for b in range(B)],
                        prompt_BxP=np.zeros((B, 1), np.int32),
                        prompt_valid_BxP=np.ones((B, 1), bool), tokens_TxBxL=zeros,
                        valid_TxBxL=zeros.astype(bool), truncated_TxB=np.zeros((T, B), bool),
                        onpolicy_BxT=np.ones((B, T), bool), rewards_BxT=r, texts=texts)


def test_star_keeps_only_corrections_and_trains_the_last_attempt():
  # wrong->right, right->right, right->wrong, wrong->wrong
  rows = sft_data.star_rows(_scored([[0, 1], [1, 1], [1, 0], [0, 0]]), 'star')
  assert [(p.id, a, m) for p, a, m in rows] == [('0', ['y1-0', 'y2-0'], [False, True])]
  rows = sft_data.star_rows(_scored([[0, 1], [1, 1], [1, 0], [0, 0]]), 'star_right')
  assert [(p.id, m) for p, _, m in rows] == [('0', [False, True]), ('1', [True, True])]


def test_pair_sft_pairs_each_wrong_attempt_with_a_right_one_of_its_problem():
  # Two groups of k=3 single attempts: [wrong, right, wrong] and [wrong, wrong, wrong].
  batch = _scored([[0], [1], [0], [0], [0], [0]])
  batch.problems = [batch.problems[0]] * 3 + [batch.problems[3]] * 3
  rows = sft_data.pair_rows(batch, 3, np.random.default_rng(0))
  assert [(p.id, a, m) for p, a, m in rows] == [
      ('0', ['y1-0', 'y1-1'], [False, True]), ('0', ['y1-2', 'y1-1'], [False, True])]


def test_rows_with_an_attempt_cut_off_at_max_len_are_dropped():
  rows = [(None, ['a b', 'c d e'], [False, True]), (None, ['a b c d', 'e'], [False, True]),
          (None, ['a', 'b c d'], [False, True])]
  kept = sft_data.finished_rows(rows, str.split, max_len=4)  # 4 tokens: no room for the end
  assert kept == [rows[0], rows[2]]


class _Task:
  def answer_key(self, text):
    return text.split(':')[1] or None


class _Episodes:
  """Per problem, fixed attempts: two-attempt episodes a_i -> b_i and single attempts c_i."""
  task = _Task()

  def __init__(self, table):
    self.table = table  # problem id -> (two-attempt [(y1, y2)], single [y1])
    self.seen = {}

  def sample(self, params, problems, rng, sample_params, turns):
    rows = []
    for p in problems:
      i = self.seen.get((p.id, turns), 0)
      self.seen[(p.id, turns)] = i + 1
      pairs, singles = self.table[p.id]
      rows.append(list(pairs[i]) if turns == 2 else [singles[i]])
    texts = [[row[t] for row in rows] for t in range(turns)]
    # Attempt texts are 'right:answer' or 'wrong:answer'.
    r = [[float(row[t].startswith('right')) for t in range(turns)] for row in rows]
    b = _scored(r, texts)
    b.problems = list(problems)
    return b

  def score(self, batch):
    return batch


def test_inference_scaling_by_hand():
  """K=1: parallel votes over 2 first attempts, sequential over 1 correction; K=2: 4 vs 2."""
  table = {
      # first attempts mostly wrong '5', corrections right '7'
      'a': ([('wrong:5', 'right:7'), ('wrong:5', 'right:7')], ['wrong:5', 'right:7']),
      # first attempts right, a correction breaks one
      'b': ([('right:3', 'right:3'), ('right:3', 'wrong:4')], ['wrong:9', 'wrong:4']),
  }
  problems = [Problem('a', 'a', '7'), Problem('b', 'b', '3')]
  out = evaluate.inference_scaling(_Episodes(table), None, problems, max_k=2, batch_size=2)
  # K=1. a: parallel {wrong:5 (a-pair-1), wrong:5 (single-1)} -> 0; sequential right:7 -> 1.
  #      b: parallel {right:3, wrong:9} tie -> first (right:3) -> 1; sequential right:3 -> 1.
  # K=2. a: parallel 5,5,5,7 -> 5 -> 0; sequential 7,7 -> 1.
  #      b: parallel 3,3,9,4 -> 3 -> 1; sequential 3,4 tie -> first (3) -> 1.
  assert out['k'] == [1, 2]
  assert out['parallel'] == [0.5, 0.5] and out['sequential'] == [1.0, 1.0]


def test_experiments_command_runs_every_method_on_a_tiny_config(tmp_path):
  workdir = str(tmp_path / 'paper')
  tiny = [
      '--config.model.embed_dim=32', '--config.model.hidden_dim=64', '--config.model.num_layers=1',
      '--config.model.num_heads=2', '--config.model.num_kv_heads=1', '--config.model.head_dim=16',
      '--config.tokenizer.corpus_size=300', '--config.phases.base.steps=30',
      '--config.phases.base.batch_size=16', '--config.rl.num_prompts=4',
      '--config.rl.samples_per_prompt=2', '--config.phases.stage1.steps=2',
      '--config.phases.stage2.steps=2', '--config.eval.num_problems=16',
      '--config.eval.batch_size=8', '--config.eval.num_transcripts=2',
      '--config.checkpoint.every=2', '--config.log_every=100', '--scaling_k=2',
      '--scaling_problems=4', '--seeds=0', '--config.phases.star.batch_size=8',
      '--config.phases.pair_sft.batch_size=8', '--config.phases.stage2_star.batch_size=8']
  cmd = [sys.executable, '-m', 'score_jax.experiments', '--config=configs/demo.py',
         f'--workdir={workdir}', *tiny]
  env = dict(os.environ, PYTHONUNBUFFERED='1')
  env.pop('XLA_FLAGS', None)
  out = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=1800)
  assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
  paper = json.load(open(os.path.join(workdir, 'paper.json')))
  from score_jax import experiments
  assert set(paper['results']['0']) == set(experiments.METHODS)
  for m, r in paper['results']['0'].items():
    assert {'acc_t1', 'acc_t2', 'delta', 'correct_given_wrong', 'edit_ratio_hist'} <= set(r), m
  for m in ('self_refine', 'score', 'multi_turn_rl', 'single_turn_rl'):
    s = paper['results']['0'][m]['scaling']
    assert s['k'] == [1, 2] and len(s['parallel']) == len(s['sequential']) == 2
  # One base and one Stage I per seed, shared by the methods that start from them.
  assert 'stage1' in os.listdir(os.path.join(workdir, 'seed0'))
  assert out.stdout.count('[base] step') == 1
  assert out.stdout.count('[stage1] step') == 1  # trained once: its last step's line
  text = open(os.path.join(workdir, 'paper.md')).read()
  assert "Table 2" in text and "Table 4" in text
  for png in ('paper_methods.png', 'paper_edit.png', 'paper_scaling.png'):
    assert os.path.getsize(os.path.join(workdir, png)) > 1000
  # --report reads the same results back from the workdir (here: every method finished).
  from score_jax import config_defaults
  found = experiments.finished_results(config_defaults.get_config(), workdir, [0],
                                       experiments.METHODS)
  assert json.loads(json.dumps(found))['0'] == paper['results']['0']
  # Resumable: a second run trains nothing and gives the same tables.
  again = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=1800)
  assert again.returncode == 0 and '[base] step' not in again.stdout
  assert json.load(open(os.path.join(workdir, 'paper.json')))['summary'] == paper['summary']
