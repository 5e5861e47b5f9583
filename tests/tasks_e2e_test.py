"""The real configs on real task formats, end to end, through the real verifiers.

`configs/math.py` (Gemma 2 architecture, chat format, FSDP rules, bfloat16 activations and
reference, remat, microbatches, chunked sampling) on a 4-device CPU mesh, with a tiny
random Gemma 2 made in Hugging Face transformers and imported from its safetensors, on the
MATH fixture; `configs/mbpp.py` (train on MBPP, evaluate on HumanEval, MBPP-R repair)
with a tiny random model on the MBPP fixture. Each runs `python -m score_jax.main` as a
user would: import, sampling, Stage I and Stage II loss steps, checkpoints, evaluation.
Rewards in the transcripts are recomputed here with the graders, independently of the
trainer's reward path.
"""
import json
import os
import subprocess
import sys

import numpy as np

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DATA = os.path.join(REPO, "tests", "data")
VOCAB = 320


def _run(args, devices=4, timeout=400):
  env = dict(os.environ, PYTHONUNBUFFERED="1", JAX_PLATFORMS="cpu",
             XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}")
  out = subprocess.run([sys.executable, "-m", "score_jax.main", *args], cwd=REPO, env=env,
                       capture_output=True, text=True, timeout=timeout)
  assert out.returncode == 0, out.stdout[-4000:] + out.stderr[-4000:]
  return out.stdout + out.stderr


def _read_jsonl(path):
  with open(path) as f:
    return [json.loads(line) for line in f if line.strip()]


def _common(workdir):
  return [
      f"--workdir={workdir}",
      "--config.rl.num_prompts=4", "--config.rl.samples_per_prompt=2",
      "--config.rl.microbatches=2", "--config.rollout.batch_size=4",
      "--config.phases.stage1.steps=2", "--config.phases.stage2.steps=2",
      "--config.checkpoint.every=1", "--config.eval.batch_size=4",
      "--config.eval.num_transcripts=4",
  ]


def _check_run(workdir, log):
  rows = _read_jsonl(os.path.join(workdir, "metrics.jsonl"))
  for phase in ("stage1", "stage2"):
    steps = [r for r in rows if r["phase"] == phase]
    assert [r["step"] for r in steps] == [1, 2]
    for r in steps:
      assert np.isfinite(r["loss"]) and np.isfinite(r["kl1"]) and np.isfinite(r["kl2"])
  table = json.load(open(os.path.join(workdir, "eval", "table.json")))
  assert set(table) == {"base", "stage1", "stage2"}
  for phase in ("stage1", "stage2"):
    assert os.path.isdir(os.path.join(workdir, phase))
  assert not os.path.exists(os.path.join(workdir, "base"))  # 0 steps: the initial weights
  return rows, table


def _tiny_hf_gemma2(directory, tokenizer):
  """A random Gemma 2 (window shorter than the prompts) saved as HF safetensors."""
  import torch
  import transformers
  config = transformers.Gemma2Config(
      vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
      num_attention_heads=2, num_key_value_heads=1, head_dim=32, sliding_window=16,
      query_pre_attn_scalar=32, attn_logit_softcapping=50.0, final_logit_softcapping=30.0,
      pad_token_id=tokenizer.pad_id, bos_token_id=tokenizer.bos_id,
      eos_token_id=tokenizer.eos_id, tie_word_embeddings=True)
  torch.manual_seed(0)
  transformers.Gemma2ForCausalLM(config).save_pretrained(directory)


def test_math_config_with_an_imported_tiny_gemma2(tmp_path):
  from score_jax.tasks import formats
  from score_jax.tasks.rewards import math_grader
  from score_jax.tasks.math import MathTask
  from score_jax.tokenizer import Tokenizer
  import ml_collections

  # What a user brings: a checkpoint directory with its tokenizer.model.
  task = MathTask(ml_collections.ConfigDict(dict(
      train_path=os.path.join(DATA, "math", "original", "train"),
      eval_path=os.path.join(DATA, "math", "math500_tiny.jsonl"), verifier_workers=2)))
  fmt = formats.get_prompt_format("gemma_chat")
  rng = np.random.default_rng(0)
  texts = [fmt.instruction_text(task)] + [fmt.prompt_text(task, p) for p in task.eval_problems(4)]
  texts += [fmt.prompt_text(task, p) for p in task.train_problems(rng, 50)]
  texts += list(task.corpus(rng, 50)) + ["Final Answer: The final answer is $0$. I hope it is correct."]
  hf_dir = tmp_path / "gemma-2-tiny"
  tok = Tokenizer.train(texts, VOCAB, hf_dir / "tokenizer.model",
                        user_defined_symbols=fmt.special_pieces)
  _tiny_hf_gemma2(str(hf_dir), tok)

  workdir = str(tmp_path / "run")
  model = dict(vocab_size=VOCAB, embed_dim=64, hidden_dim=128, num_layers=2, num_heads=2,
               num_kv_heads=1, head_dim=32, sliding_window_size=16, query_pre_attn_scalar=32)
  args = ["--config=configs/math.py", *_common(workdir),
          f"--config.init.checkpoint={hf_dir}", f"--config.tokenizer.path={hf_dir}/tokenizer.model",
          f"--config.task.train_path={DATA}/math/original/train",
          f"--config.task.eval_path={DATA}/math/math500_tiny.jsonl",
          "--config.rollout.max_prompt_len=256", "--config.rollout.max_len=12",
          "--config.rl.logprob_chunk=64",
          "--config.eval.num_problems=4"] + [f"--config.model.{k}={v}" for k, v in model.items()]
  log = _run(args)
  rows, table = _check_run(workdir, log)
  assert "[init] hf weights saved as" in log  # the imported weights became our checkpoint
  assert "mesh" in log or "devices" in log
  assert all({"verifier_timeouts", "verifier_errors", "math_hedged", "math_unevaluated"} <= set(r)
             for r in rows if r["phase"] in ("stage1", "stage2"))
  # The reward path is the real grader: recompute every transcript's rewards here.
  answers = {p.id: p.answer for p in task.eval_problems(4)}
  transcripts = _read_jsonl(os.path.join(workdir, "eval", "transcripts_stage2.jsonl"))
  assert len(transcripts) == 4
  for t in transcripts:
    assert t["r1"] == math_grader.grade(t["y1"], answers[t["id"]])
    assert t["r2"] == math_grader.grade(t["y2"], answers[t["id"]])

  # A mismatched model config is refused with the field named, before any work.
  bad = _run_expect_fail(args + ["--config.model.sliding_window_size=8",
                                 f"--workdir={tmp_path / 'bad'}"])
  assert "config.model.sliding_window_size=8 but the checkpoint has 16" in bad

  # Evaluation restores the trained checkpoints (no training).
  log = _run(["--config=configs/math.py", *args[1:], "--config.mode=eval",
              f"--config.eval.checkpoint={workdir}/stage2"])
  again = json.load(open(os.path.join(workdir, "eval", "stage2.json")))
  assert again["acc_t1"] == table["stage2"]["acc_t1"]


def _run_expect_fail(args, devices=4):
  env = dict(os.environ, JAX_PLATFORMS="cpu",
             XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}")
  out = subprocess.run([sys.executable, "-m", "score_jax.main", *args], cwd=REPO, env=env,
                       capture_output=True, text=True, timeout=300)
  assert out.returncode != 0
  return out.stdout + out.stderr


def test_mbpp_config_trains_on_mbpp_evaluates_humaneval_and_repairs(tmp_path):
  workdir = str(tmp_path / "run")
  args = ["--config=configs/mbpp.py", *_common(workdir),
          "--config.init.source=random", "--config.tokenizer.path=",
          f"--config.tokenizer.vocab_size={VOCAB}", "--config.tokenizer.corpus_size=200",
          f"--config.task.train_path={DATA}/mbpp_tiny.jsonl",
          f"--config.eval.repair_path={DATA}/mbpp_r_tiny.jsonl",
          "--config.rollout.max_prompt_len=1024", "--config.rollout.max_len=12",
          "--config.rl.logprob_chunk=128",
          "--config.eval.num_problems=4",
          f"--config.model.vocab_size={VOCAB}", "--config.model.embed_dim=32",
          "--config.model.hidden_dim=64", "--config.model.num_layers=2",
          "--config.model.num_heads=2", "--config.model.num_kv_heads=1",
          "--config.model.head_dim=16", "--config.model.sliding_window_size=64"]
  log = _run(args)
  rows, table = _check_run(workdir, log)
  # The reward path's counters are logged at every RL step.
  counters = {"hack_nonbuiltin", "hack_patched", "hack_audit_blocked", "sandbox_timeouts",
              "sandbox_crashes", "sandbox_errors", "sandbox_output_floods"}
  rl_rows = [r for r in rows if r["phase"] in ("stage1", "stage2")]
  assert len(rl_rows) == 4 and all(counters <= set(r) for r in rl_rows), rl_rows[0].keys()
  assert all(r[k] >= 0 for r in rl_rows for k in counters)
  # MBPP-R: the given first attempts are graded by the sandbox (2 of 3 are wrong in the
  # fixture), and the model's corrections are scored and written out.
  from score_jax.tasks import code
  mbpp = code.MBPPTask(ml_collections_config(path=f"{DATA}/mbpp_tiny.jsonl"))
  given = code.MBPPRepair(mbpp, f"{DATA}/mbpp_r_tiny.jsonl").first_attempt_rewards()
  for phase in ("base", "stage1", "stage2"):
    assert table[phase]["repair_n"] == len(given)
    assert table[phase]["repair_given_acc"] == float(given.mean())
  repairs = _read_jsonl(os.path.join(workdir, "eval", "transcripts_repair_stage2.jsonl"))
  assert len(repairs) == len(given)
  assert "MBPP-R" in log
  # HumanEval problems were the evaluation set.
  transcripts = _read_jsonl(os.path.join(workdir, "eval", "transcripts_stage2.jsonl"))
  assert [t["id"] for t in transcripts] == [f"HumanEval/{i}" for i in range(4)]


def ml_collections_config(**kw):
  import ml_collections
  return ml_collections.ConfigDict(kw)
