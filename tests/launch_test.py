"""launch/ scripts in DRY_RUN mode: the commands they would run on a TPU VM / GPU box."""
import os
import subprocess

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _dry(script, *args, **env):
  out = subprocess.run(['bash', os.path.join(REPO, 'launch', script), *args], cwd=REPO,
                       env=dict(os.environ, DRY_RUN='1', **env), capture_output=True, text=True,
                       timeout=60)
  return out.returncode, out.stdout + out.stderr


def test_tpu_vm_create_and_run_on_every_host():
  rc, out = _dry('tpu_vm.sh', 'create', TPU_NAME='t1', ZONE='us-central2-b', ACCELERATOR='v4-8')
  assert rc == 0
  assert ('gcloud compute tpus tpu-vm create t1 --zone=us-central2-b --accelerator-type=v4-8'
          in out)
  rc, out = _dry('tpu_vm.sh', 'run', 'configs/math.py', 'runs/math', '--config.seed=1',
                 TPU_NAME='t1', ZONE='z')
  assert rc == 0 and '--worker=all' in out
  assert 'score_jax.main\\ --config=configs/math.py\\ --workdir=runs/math\\ --config.seed=1' in out
  assert 'distributed' not in out  # v4-8 is one host
  rc, out = _dry('tpu_vm.sh', 'run', 'configs/math.py', 'runs/math', TPU_NAME='t1', ZONE='z',
                 ACCELERATOR='v5litepod-16')
  assert rc == 0 and '--distributed' in out  # two hosts find each other


def test_tpu_vm_needs_its_settings():
  rc, out = _dry('tpu_vm.sh', 'create', ZONE='z')
  assert rc != 0 and 'TPU_NAME' in out


def test_gpu_script_installs_cuda_jax_and_runs():
  rc, out = _dry('gpu.sh', 'configs/mbpp.py', 'runs/mbpp', '--config.seed=2')
  assert rc == 0
  if not os.path.isdir(os.path.join(REPO, '.venv-gpu')):
    assert "jax\\[cuda12\\]" in out
  assert 'score_jax.main --config=configs/mbpp.py --workdir=runs/mbpp --config.seed=2' in out
