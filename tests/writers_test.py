"""Metric writers: after a resume each step appears once, in metrics.jsonl and in TensorBoard.

TensorBoard is read back with its own `EventAccumulator` (the `tensorboard` package, a test
dependency), the reader that applies `purge_step`; the raw event records are read with
`tensorboard.backend.event_processing.event_file_loader`.
"""
import glob
import json
import os

from tensorboard.backend.event_processing import event_accumulator, event_file_loader

from score_jax import writers


def _write(workdir, phase, steps, resume_step=0, **kw):
  w = writers.MetricWriter(str(workdir), phase, total_steps=9, resume_step=resume_step, **kw)
  for step in steps:
    w.write(step, dict(loss=float(step), r1=0.5))
  w.close()


def _jsonl_steps(workdir, phase):
  rows = [json.loads(line) for line in open(os.path.join(workdir, 'metrics.jsonl'))]
  return [r['step'] for r in rows if r['phase'] == phase]


def _tb_steps(workdir, phase, tag='loss'):
  acc = event_accumulator.EventAccumulator(os.path.join(workdir, 'tb', phase))
  acc.Reload()
  return [(e.step, e.value) for e in acc.Scalars(tag)]


def test_resume_writes_each_step_once(tmp_path):
  _write(tmp_path, 'base', [1, 2])  # another phase, finished before
  _write(tmp_path, 'stage1', range(1, 8))  # killed after step 7; checkpoint at 5
  # The resumed run dies again before its first step: the purge alone must hide 6 and 7
  # (TensorBoard's out-of-order rule would hide them only once step 6 is rewritten).
  _write(tmp_path, 'stage1', [], resume_step=5)
  assert _jsonl_steps(tmp_path, 'stage1') == [1, 2, 3, 4, 5]
  assert [s for s, _ in _tb_steps(tmp_path, 'stage1')] == [1, 2, 3, 4, 5]
  _write(tmp_path, 'stage1', range(6, 10), resume_step=5)

  assert _jsonl_steps(tmp_path, 'stage1') == list(range(1, 10))
  assert _jsonl_steps(tmp_path, 'base') == [1, 2]  # other phases untouched
  assert _tb_steps(tmp_path, 'stage1') == [(s, float(s)) for s in range(1, 10)]
  assert [s for s, _ in _tb_steps(tmp_path, 'stage1', 'r1')] == list(range(1, 10))
  # Three event files, none truncated by the next (all opened within one second), and
  # the resumed ones start with TensorBoard's purge marker at step 6.
  files = sorted(glob.glob(str(tmp_path / 'tb' / 'stage1' / 'events.out.tfevents.*')))
  assert len(files) == 3, files
  first = [e.step for e in event_file_loader.EventFileLoader(files[0]).Load() if e.summary.value]
  assert first == [s for s in range(1, 8) for _ in range(2)]  # loss and r1 per step
  for f in files[1:]:
    starts = [e.step for e in event_file_loader.EventFileLoader(f).Load()
              if e.HasField('session_log') and e.session_log.status == e.session_log.START]
    assert starts == [6], f


def test_fresh_start_drops_rows_of_a_run_killed_before_its_first_checkpoint(tmp_path):
  _write(tmp_path, 'stage2', [1, 2, 3])
  _write(tmp_path, 'stage2', [1, 2])
  assert _jsonl_steps(tmp_path, 'stage2') == [1, 2]
  assert [s for s, _ in _tb_steps(tmp_path, 'stage2')] == [1, 2]


def test_a_torn_last_line_is_dropped_and_the_file_replaced_atomically(tmp_path):
  _write(tmp_path, 'stage1', [1, 2, 3])
  with open(tmp_path / 'metrics.jsonl', 'a') as f:
    f.write('{"phase": "stage1", "st')  # killed mid-write
  assert writers.drop_rows_after(str(tmp_path / 'metrics.jsonl'), 'stage1', 2) == 2
  assert _jsonl_steps(tmp_path, 'stage1') == [1, 2]
  assert sorted(os.listdir(tmp_path)) == ['metrics.jsonl', 'tb']  # no temporary left
  assert writers.drop_rows_after(str(tmp_path / 'nothing.jsonl'), 'stage1', 0) == 0


def test_only_the_writing_process_writes(tmp_path):
  _write(tmp_path, 'stage1', [1, 2], is_writer=False)
  assert os.listdir(tmp_path) == []
  # By default process 0 writes (this test runs as the only process).
  _write(tmp_path, 'stage1', [1])
  assert _jsonl_steps(tmp_path, 'stage1') == [1]


def test_relative_workdir_is_local_and_urls_are_not_mangled(monkeypatch, tmp_path):
  monkeypatch.chdir(tmp_path)
  _write('runs/demo', 'base', [1])
  assert _jsonl_steps(tmp_path / 'runs' / 'demo', 'base') == [1]
  # No GCS here: check that a gs:// workdir reaches the writers as the URL it is.
  opened = []

  class FakeSummaryWriter:
    def __init__(self, logdir, **kw):
      opened.append(logdir)

  class FakePath:
    def __init__(self, p):
      self.p = str(p)
    def __str__(self):
      return self.p
    def __truediv__(self, other):
      return FakePath(f'{self.p}/{other}')
    def mkdir(self, **kw):
      opened.append(self.p)
    def exists(self):
      return False
    def open(self, mode):
      opened.append(self.p)

  import tensorboardX
  monkeypatch.setattr(tensorboardX, 'SummaryWriter', FakeSummaryWriter)
  monkeypatch.setattr(writers.epath, 'Path', FakePath)
  writers.MetricWriter('gs://bucket/runs/math', 'stage1', 10, resume_step=0, is_writer=True)
  assert opened == ['gs://bucket/runs/math', 'gs://bucket/runs/math/metrics.jsonl',
                    'gs://bucket/runs/math/tb/stage1']


def test_binned_histograms_reach_tensorboard(tmp_path):
  w = writers.MetricWriter(str(tmp_path), 'stage1', total_steps=2, resume_step=0)
  w.write(1, dict(loss=1.0, edit_ratio_hist=[6, 0, 0, 2]))  # 6 copies, 2 far edits
  w.close()
  acc = event_accumulator.EventAccumulator(os.path.join(tmp_path, 'tb', 'stage1'))
  acc.Reload()
  (event,) = acc.Histograms('edit_ratio_hist')
  assert event.step == 1 and event.histogram_value.num == 8
  assert list(event.histogram_value.bucket) == [6, 0, 0, 2]
  assert 'edit_ratio_hist' not in json.loads(open(tmp_path / 'metrics.jsonl').readline())


def test_read_rows_gives_each_phase_its_rows(tmp_path):
  assert writers.read_rows(str(tmp_path)) == []  # nothing written yet
  _write(tmp_path, 'base', [1, 2])
  _write(tmp_path, 'stage1', [1])
  assert [(r['phase'], r['step']) for r in writers.read_rows(str(tmp_path))] == [
      ('base', 1), ('base', 2), ('stage1', 1)]
  assert [r['loss'] for r in writers.read_rows(str(tmp_path), 'base')] == [1.0, 2.0]
