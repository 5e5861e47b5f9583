"""configs/smollm2.py, the real pretrained model, for a few steps: imported from its GGUF
file, its chat template, Stage I and Stage II on a handful of problems, evaluated."""
import json
import os
import subprocess
import sys

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_smollm2_config_trains_a_few_steps(tmp_path):
  workdir = str(tmp_path / 'run')
  cmd = [sys.executable, '-m', 'score_jax.main', '--config=configs/smollm2.py',
         f'--workdir={workdir}', '--config.rl.num_prompts=2', '--config.rl.samples_per_prompt=2',
         '--config.phases.stage1.steps=1', '--config.phases.stage2.steps=1',
         '--config.eval.num_problems=4', '--config.eval.batch_size=4',
         '--config.eval.num_transcripts=4', '--config.rollout.max_len=16']
  env = dict(os.environ, PYTHONUNBUFFERED='1')
  env.pop('XLA_FLAGS', None)
  out = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=2400)
  assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
  assert '[init] gguf weights saved as' in out.stdout
  table = json.load(open(os.path.join(workdir, 'eval', 'table.json')))
  assert set(table) == {'base', 'stage1', 'stage2'} and table['base']['n'] == 4
  rows = [json.loads(line) for line in open(os.path.join(workdir, 'metrics.jsonl'))]
  assert [(r['phase'], r['step']) for r in rows] == [('stage1', 1), ('stage2', 1)]
  # The model answers in words and digits, through its own chat format.
  transcript = json.loads(open(os.path.join(workdir, 'eval', 'transcripts_base.jsonl')).readline())
  assert transcript['y1'].strip() and any(ch.isdigit() for ch in transcript['y1'])
