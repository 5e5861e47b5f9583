"""Chat templates: our rendering and the PromptFormat cut from it give, for whole 2- and
3-turn SCoRe conversations, exactly the tokens of transformers' `apply_chat_template`.

Templates: SmolLM2-135M-Instruct's own (from its GGUF file), and a Qwen2.5-style and a
Llama-3-style one (written here after the published templates) on tokenizer directories
built here, so tokenizer.json loading is covered too.
"""
import json
import os

import jinja2
import pytest
import tokenizers
import transformers

from score_jax import chat_template
from score_jax import tokenizer as tokenizer_lib
from score_jax.tasks import arithmetic

from gguf_test import smollm2_path

QWEN_STYLE = (
    "{%- if messages[0]['role'] == 'system' %}"
    "{{- '<|im_start|>system\\n' + messages[0]['content'] + '<|im_end|>\\n' }}"
    "{%- else %}"
    "{{- '<|im_start|>system\\nYou are Qwen, created by Alibaba Cloud. You are a helpful "
    "assistant.<|im_end|>\\n' }}"
    "{%- endif %}\n"
    "{%- for message in messages %}\n"
    "    {%- if (message.role == 'user') or (message.role == 'system' and not loop.first) or "
    "(message.role == 'assistant') %}\n"
    "        {{- '<|im_start|>' + message.role + '\\n' + message.content + '<|im_end|>' + '\\n' }}\n"
    "    {%- endif %}\n"
    "{%- endfor %}\n"
    "{%- if add_generation_prompt %}\n"
    "    {{- '<|im_start|>assistant\\n' }}\n"
    "{%- endif %}\n")
LLAMA3_STYLE = (
    "{% set loop_messages = messages %}{% for message in loop_messages %}"
    "{% set content = '<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n'"
    "+ message['content'] | trim + '<|eot_id|>' %}"
    "{% if loop.index0 == 0 %}{% set content = bos_token + content %}{% endif %}"
    "{{ content }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}"
    "{% endif %}")

PROMPT = 'Add 37+67.'
ANSWERS = ['The sum of 37 and 67 is 194.', '37 + 67 = 104.', 'Answer 104.']
INSTRUCTIONS = [arithmetic.CORRECTION_INSTRUCTION, 'Check it once more.']


@pytest.fixture(scope='module')
def smollm2_dir(tmp_path_factory):
  """SmolLM2's tokenizer (from the GGUF) saved as tokenizer.json, the base of the others."""
  path = tmp_path_factory.mktemp('smollm2')
  tokenizer_lib.load_tokenizer(smollm2_path()).save(path)
  return path


def _styled(base, path, template, added, config, pre=None):
  """`base`'s tokenizer.json with `added` special tokens, the pre-tokenizer of GGUF's `pre`
  and a tokenizer_config.json."""
  tk = tokenizers.Tokenizer.from_file(str(base / 'tokenizer.json'))
  if pre:
    tk.pre_tokenizer = tokenizer_lib.gguf_pre_tokenizer(pre)
  tk.add_special_tokens([tokenizers.AddedToken(t, special=True, normalized=False)
                         for t in added])
  os.makedirs(path, exist_ok=True)
  tk.save(str(path / 'tokenizer.json'))
  with open(path / 'tokenizer_config.json', 'w') as f:
    json.dump(dict(config, chat_template=template, tokenizer_class='PreTrainedTokenizerFast'), f)
  return path


def _cases(smollm2_dir, tmp_path):
  return {
      'smollm2': smollm2_dir,
      'qwen_style': _styled(smollm2_dir, tmp_path / 'qwen', QWEN_STYLE, [], dict(
          eos_token='<|im_end|>', pad_token='<|endoftext|>', bos_token=None)),
      # Llama 3's own split regex: it keeps the "\n\n" of the generation prompt one
      # pre-token whether an answer follows or not (SmolLM2's splits "\n\nThe" into
      # "\n", "\n", "The" but a final "\n\n" whole, so whole-conversation and
      # turn-by-turn tokens would differ there).
      'llama3_style': _styled(smollm2_dir, tmp_path / 'llama3', LLAMA3_STYLE, [
          '<|begin_of_text|>', '<|start_header_id|>', '<|end_header_id|>', '<|eot_id|>'], dict(
              bos_token='<|begin_of_text|>', eos_token='<|eot_id|>', add_bos_token=True),
          pre='llama-bpe'),
  }


def our_conversation(tok, fmt, turns):
  """(context before each answer, whole conversation) in tokens, built as SCoRe does:
  [BOS] turn1(prompt), answer + stop, turn2(instruction), answer + stop, ..."""
  ids = ([tok.bos_id] if tok.bos_id is not None else []) + tok.encode(
      fmt.turn1.format(prompt=PROMPT))
  stop = tok.piece_id(fmt.stop_pieces[0])
  contexts = []
  for t in range(turns):
    if t:
      ids += tok.encode(fmt.turn2.format(instruction=INSTRUCTIONS[t - 1]))
    contexts.append(list(ids))
    ids += tok.encode(ANSWERS[t]) + [stop]
  return contexts, ids


@pytest.mark.parametrize('name', ['smollm2', 'qwen_style', 'llama3_style'])
@pytest.mark.parametrize('turns', [2, 3])
def test_conversation_tokens_equal_apply_chat_template(smollm2_dir, tmp_path, name, turns):
  path = _cases(smollm2_dir, tmp_path)[name]
  tok = tokenizer_lib.load_tokenizer(path)
  hf = transformers.AutoTokenizer.from_pretrained(str(path))
  fmt = chat_template.prompt_format(tok)
  contexts, ids = our_conversation(tok, fmt, turns)
  messages = chat_template.conversation(PROMPT, ANSWERS[:turns], INSTRUCTIONS[:turns - 1])
  apply = lambda m, gen: hf.apply_chat_template(m, add_generation_prompt=gen, tokenize=True,
                                                return_dict=False)
  for t, context in enumerate(contexts):
    assert context == apply(messages[:2 * t + 1], True), (name, t)
  full = apply(messages, False)
  assert full[:len(ids)] == ids
  assert hf.decode(full[len(ids):]).strip() == ''  # at most the template's final newline
  if name == 'llama3_style':  # The template writes BOS, so the tokenizer adds none.
    assert tok.bos_id is None and ids[0] == tok.piece_id('<|begin_of_text|>')
    assert fmt.stop_pieces == ('<|eot_id|>',)
  else:
    assert fmt.stop_pieces == ('<|im_end|>',)


def test_smollm2_format_is_its_chatml():
  tok = tokenizer_lib.load_tokenizer(smollm2_path())
  fmt = chat_template.prompt_format(tok)
  assert fmt.turn1 == ('<|im_start|>system\nYou are a helpful AI assistant named SmolLM, '
                       'trained by Hugging Face<|im_end|>\n<|im_start|>user\n{prompt}<|im_end|>'
                       '\n<|im_start|>assistant\n')
  assert fmt.turn2 == '\n<|im_start|>user\n{instruction}<|im_end|>\n<|im_start|>assistant\n'
  assert tok.bos_id is None and tok.eos_id == tok.piece_id('<|im_end|>') == 2


class _Tok:
  special_tokens = {'eos_token': '</s>'}
  chat_template = None

  def added_special_pieces(self):
    return ['</s>', '<turn>']


def test_templates_that_cannot_give_a_fixed_format_are_refused():
  numbered = ("{% for m in messages %}<turn>{{ loop.index }} {{ m['content'] }}</s>{% endfor %}"
              "{% if add_generation_prompt %}<turn>{{ messages | length + 1 }} {% endif %}")
  with pytest.raises(chat_template.ChatTemplateError, match='inconsistently'):
    chat_template.prompt_format(_Tok(), numbered)
  no_stop = "{% for m in messages %}{{ m['content'] }}\n{% endfor %}"
  with pytest.raises(chat_template.ChatTemplateError, match='special token to stop on'):
    chat_template.prompt_format(_Tok(), no_stop)
  with pytest.raises(chat_template.ChatTemplateError, match='no chat template'):
    chat_template.prompt_format(_Tok())


def test_render_has_transformers_globals():
  template = ("{% if messages[0]['role'] == 'system' %}{{ raise_exception('no system role') }}"
              "{% endif %}{{ messages | tojson }}{{ bos_token }}")
  assert chat_template.render(template, [dict(role='user', content='<é>')], False,
                              dict(bos_token='<s>')) == '[{"role": "user", "content": "<é>"}]<s>'
  with pytest.raises(jinja2.TemplateError, match='no system role'):
    chat_template.render(template, [dict(role='system', content='x')], False, {})


def test_smollm2_config_checks_and_fits_its_lengths():
  """configs/smollm2.py passes the run's config check, and its prompts and instruction fit
  the rollout lengths it sets."""
  import importlib.util
  import jax
  from score_jax import config_defaults, episodes
  from score_jax.tasks import get_task
  spec = importlib.util.spec_from_file_location('smollm2_config', os.path.join(
      os.path.dirname(__file__), '..', 'configs', 'smollm2.py'))
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  config = module.get_config()
  config_defaults.check(config, jax.device_count())
  tok = tokenizer_lib.load_tokenizer(config.tokenizer.path)
  fmt = chat_template.prompt_format(tok)
  task = get_task(config.task)
  eps = episodes.Episodes(None, (None,) * 3, tok, task, fmt, config.rollout)
  prompts, _ = eps.prompts(task.eval_problems(8))
  assert prompts.shape == (8, config.rollout.max_prompt_len)
  assert len(eps.instr_I) < config.rollout.max_len
  assert task.reward('37 + 67 = 104\n\nThis is 3 steps.', task.make_problem(37, 67)) == 1.0
