"""hosts.py on one process, and no hidden host<->device copies anywhere in a run.

The two-process behaviour is in multihost_test.py. Here, in a child with 8 CPU devices: the
helpers on a data x model mesh, and the whole pipeline (tokenizer, base, Stage I with
offline first attempts, Stage II, evaluation, checkpoints; sampling as a queue through
fewer cache rows than episodes) under
`jax.transfer_guard("disallow")`, as big_vision runs its loop: a NumPy array handed to a
jitted function or read back implicitly raises, so the only copies are the explicit ones
of hosts.py.
"""
import os
import sys

import mesh_helpers


def test_helpers_and_a_whole_run_without_hidden_transfers(tmp_path):
  mesh_helpers.run_child(__file__.replace('.pyc', '.py'), timeout=900)


def _child():
  import jax
  import numpy as np
  from score_jax import config_defaults, hosts, run, sharding

  mesh = mesh_helpers.mesh((4, 2))
  batch_sh, repl = sharding.batch_sharding(mesh), sharding.replicated(mesh)
  hosts.check_layout(batch_sh)
  assert hosts.share(12) == slice(0, 12) and hosts.local_share([1, 2, 3]) == [1, 2, 3]
  x = np.arange(8 * 3).reshape(8, 3)
  with jax.transfer_guard('disallow'):
    g = hosts.to_global(x, batch_sh)
    assert g.sharding == batch_sh and len(g.addressable_shards) == 8  # 2 copies of each row
    np.testing.assert_array_equal(hosts.local_rows(g), x)
    np.testing.assert_array_equal(hosts.local_rows(hosts.to_global(np.float32(2.5), repl)), 2.5)
    k = hosts.key(3, 5, 7)
    assert k.sharding.is_fully_replicated
  with jax.transfer_guard('allow'):  # The reference: jax.random itself, on the host's ints.
    want = jax.random.fold_in(jax.random.fold_in(jax.random.key(3), 5), 7)
    np.testing.assert_array_equal(jax.random.key_data(k), jax.random.key_data(want))
  assert hosts.allgather_texts(['a', 'é']) == ['a', 'é']
  assert hosts.sum_scalars({'n': 3, 'x': 1.5}) == {'n': 3, 'x': 1.5}

  config = config_defaults.get_config()
  for field, value in dict(embed_dim=32, hidden_dim=64, num_layers=1, num_heads=2,
                           num_kv_heads=1, head_dim=16).items():
    config.model[field] = value
  config.tokenizer.corpus_size = 300
  config.phases.base.update(steps=4, batch_size=16)
  config.phases.stage1.update(steps=2, offline_turn1=0.5)  # the reference's first attempts
  config.phases.stage2.steps = 2
  config.rl.update(num_prompts=4, samples_per_prompt=2)
  config.eval.update(num_problems=8, batch_size=8)
  config.rollout.slots = 4  # 8 episodes per call through 4 cache rows: the queue, sharded
  config.checkpoint.every = 2
  config.mesh.update(shape=(4, 2), axes=('data', 'model'))
  config_defaults.check(config, jax.device_count())
  workdir = sys.argv[1] if len(sys.argv) > 1 else '/tmp/hosts_test_run'
  with jax.transfer_guard('disallow'):
    results = run.train_and_evaluate(config, workdir)
  assert set(results) == {'base', 'stage1', 'stage2'}
  with jax.transfer_guard('disallow'):  # Resumed (all finished): restores and evaluates.
    run.evaluate_checkpoints(config, workdir)
  print(mesh_helpers.PASSED)


if __name__ == '__main__':
  import tempfile
  sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
  with tempfile.TemporaryDirectory() as d:
    sys.argv.append(os.path.join(d, 'run'))
    _child()
