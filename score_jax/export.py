r"""A trained policy back to Hugging Face: safetensors + config.json + tokenizer files.

    python -m score_jax.export --workdir=runs/smollm2 --phase=stage2 --out=exported/smollm2
    python -m score_jax.export --workdir=runs/demo --phase=stage2 --out=exported/demo \
        --config=configs/demo.py [--config.model.num_layers=...]   # the run's config
    python -m score_jax.export --workdir=... --phase=base --out=... \
        --model_preset=smollm2_135m --tokenizer=path/to/model.gguf

Reads the phase's Orbax checkpoint `<workdir>/<phase>/<step>` (`--step`, default the
latest) and writes `<out>/model.safetensors` (HF names and layouts: the inverse of the
import, `weights/mapping.py`), `config.json` for the HF architecture that computes the
same network (`weights/hf_config.py`; an architecture that cannot express the config is
an error, not an approximation), `generation_config.json` (EOS and the chat format's
end-of-turn token stop generation) and the tokenizer the run used: tokenizer.json and
friends copied from an HF directory, converted from a GGUF file's metadata, or the
SentencePiece `tokenizer.model`. `AutoModelForCausalLM.from_pretrained(out)` loads it.

The model config comes from, in this order: `--config` (a config file plus overrides, as
`score_jax.main` takes them), the run's own `<workdir>/config.json`, or `--model_preset`.
"""
import json
import os
import shutil
import sys

import jax
import ml_collections
import numpy as np
from absl import app
from absl import flags
from ml_collections import config_flags

from score_jax import checkpoints
from score_jax import model as model_lib
from score_jax.weights import hf as hf_lib
from score_jax.weights import hf_config
from score_jax.weights import mapping

# Tokenizer files of an HF directory that transformers reads.
_TOKENIZER_FILES = ('tokenizer.json', 'tokenizer_config.json', 'special_tokens_map.json',
                    'chat_template.jinja', 'tokenizer.model')


def run_config(workdir: str, config=None, preset: str | None = None):
  """The ConfigDict to export with: `config`, else `<workdir>/config.json`, else a preset."""
  if config is not None:
    return config
  saved = os.path.join(workdir, 'config.json')
  if os.path.isfile(saved):
    with open(saved) as f:
      return ml_collections.ConfigDict(json.load(f))
  if preset:
    from score_jax import presets
    return ml_collections.ConfigDict(dict(model=presets.get(preset), tokenizer=dict(path='')))
  raise ValueError(f'no model config: pass --config, --model_preset, or run with a '
                   f'{saved} (written by the run)')


def restore(workdir: str, phase: str, model_config: model_lib.ModelConfig, step=None):
  """(params on the first local device, step) from `<workdir>/<phase>`."""
  directory = os.path.join(workdir, phase)
  device = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
  abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=device),
                          mapping.abstract_params(model_config))
  ckpt = checkpoints.Checkpointer(directory)
  try:
    step = ckpt.latest_step() if step is None else step
    params, _, _ = ckpt.restore(step, abstract)
  finally:
    ckpt.close()
  return params, step


def write_tokenizer(path: str, out: str):
  """The run's tokenizer into `out`, in files transformers reads."""
  from score_jax import tokenizer as tokenizer_lib
  if path.endswith('.gguf'):
    tokenizer_lib.HFTokenizer.from_gguf(path).save(out)
    return
  directory = path if os.path.isdir(path) else os.path.dirname(path)
  if os.path.isfile(os.path.join(directory, 'tokenizer.json')):
    for name in _TOKENIZER_FILES:
      if os.path.isfile(os.path.join(directory, name)):
        shutil.copy(os.path.join(directory, name), os.path.join(out, name))
    return
  model_file = path if os.path.isfile(path) else os.path.join(directory, 'tokenizer.model')
  sp = tokenizer_lib.Tokenizer.load(model_file)  # SentencePiece: Gemma's or trained here
  shutil.copy(model_file, os.path.join(out, 'tokenizer.model'))
  piece = lambda i: sp.id_to_piece(i) if i is not None and i >= 0 else None
  with open(os.path.join(out, 'tokenizer_config.json'), 'w') as f:
    json.dump(dict(tokenizer_class='GemmaTokenizer', bos_token=piece(sp.bos_id),
                   eos_token=piece(sp.eos_id), pad_token=piece(sp.pad_id),
                   unk_token=piece(sp.unk_id), add_bos_token=True, add_eos_token=False), f,
              indent=2)


def export(params, model_config: model_lib.ModelConfig, out: str, tokenizer_path: str | None,
           dtype: str | None = None, stop_pieces=()):
  """Writes the HF directory `out` for `params` of `model_config`."""
  os.makedirs(out, exist_ok=True)
  target = np.dtype(jax.numpy.dtype(dtype or model_config.param_dtype))
  tensors = {k: v.astype(target) for k, v in mapping.hf_tensors(params).items()}
  token_ids, stop_ids = {}, []
  if tokenizer_path:
    from score_jax import tokenizer as tokenizer_lib
    tok = tokenizer_lib.load_tokenizer(tokenizer_path)
    token_ids = dict(bos_token_id=tok.bos_id, eos_token_id=tok.eos_id, pad_token_id=tok.pad_id)
    stop_ids = [tok.piece_id(p) for p in stop_pieces]
    if getattr(tok, 'chat_template', None) and not stop_pieces:
      from score_jax import chat_template
      stop_ids = [tok.piece_id(p) for p in chat_template.prompt_format(tok).stop_pieces]
  config = hf_config.hf_config_from_model(model_config, **token_ids)
  config['dtype'] = str(target)
  hf_lib.write_safetensors(tensors, os.path.join(out, 'model.safetensors'))
  with open(os.path.join(out, 'config.json'), 'w') as f:
    json.dump(config, f, indent=2)
  if token_ids:
    eos = sorted({i for i in [token_ids['eos_token_id'], *stop_ids] if i is not None})
    with open(os.path.join(out, 'generation_config.json'), 'w') as f:
      json.dump(dict(token_ids, eos_token_id=eos), f, indent=2)
    write_tokenizer(tokenizer_path, out)


def _define_flags():
  """The CLI's flags, defined only when run as a program: `--config` would clash with
  score_jax.main's in a process that imports both (the tests)."""
  f = dict(
      config=config_flags.DEFINE_config_file('config', None, "The run's config file (optional)."),
      workdir=flags.DEFINE_string('workdir', None, "The run's workdir (checkpoints)."),
      phase=flags.DEFINE_string('phase', 'stage2', 'Checkpoint directory <workdir>/<phase>.'),
      step=flags.DEFINE_integer('step', None, 'Checkpoint step (default: the latest).'),
      out=flags.DEFINE_string('out', None, 'Output directory.'),
      model_preset=flags.DEFINE_string('model_preset', None,
                                       'score_jax.presets name, without a config.'),
      tokenizer=flags.DEFINE_string('tokenizer', None, "Tokenizer path (default: the config's, "
                                    'else <workdir>/tokenizer.model).'),
      dtype=flags.DEFINE_enum('dtype', None, ['float32', 'bfloat16'],
                              "Stored dtype (default: the model's param_dtype)."))
  return f


def main(argv, f):
  if len(argv) > 1:
    raise app.UsageError(f'unexpected arguments: {argv[1:]}')
  workdir, out = f['workdir'].value, f['out'].value
  if not workdir or not out:
    raise app.UsageError('--workdir and --out are required')
  try:
    config = run_config(workdir, f['config'].value, f['model_preset'].value)
    model_config = model_lib.ModelConfig.from_config(config.model)
    params, step = restore(workdir, f['phase'].value, model_config, f['step'].value)
    tokenizer_path = f['tokenizer'].value or config.get('tokenizer', {}).get('path') or None
    if not tokenizer_path and os.path.isfile(os.path.join(workdir, 'tokenizer.model')):
      tokenizer_path = os.path.join(workdir, 'tokenizer.model')
    fmt = config.get('prompt_format')
    stop_pieces = ()
    if fmt and fmt != 'chat_template':
      from score_jax.tasks import formats
      stop_pieces = formats.get_prompt_format(fmt).stop_pieces
    export(params, model_config, out, tokenizer_path, f['dtype'].value, stop_pieces)
  except (ValueError, checkpoints.CheckpointError, FileNotFoundError) as e:
    print(f'error: {e}', file=sys.stderr)
    sys.exit(2)
  print(f"exported {workdir}/{f['phase'].value}/{step} as "
        f'{hf_config.hf_model_type(model_config)} -> {out}')


if __name__ == '__main__':
  _flags = _define_flags()
  app.run(lambda argv: main(argv, _flags))
