"""Recipes: a run is an ordered list of phases, and a recipe names that list.

Every phase is data in the config, `config.phases.<name>` (config_defaults.py documents
the fields), so each of its fields can be overridden on the command line
(`--config.phases.stage2.steps=300`). A recipe is the ordered tuple of phase names that a
run trains and evaluates; `--config.recipe=NAME` picks one. SCoRe is
`score = (base, stage1, stage2)`. A phase starts from the final params of its `init`
phase ('' = the run's initial weights) and, for RL, is held by a KL to the frozen params
of its `reference` phase. A phase with `steps=0` is its init's params under a new name.

`resolve(config)` checks a recipe and returns its `Phase`s, with the RL objective of each
as `objective.Objective` (per-turn terms); `describe` prints what every turn gets.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
from typing import Optional

import ml_collections

from score_jax import objective as objective_lib

KINDS = ('sft', 'rl')
SFT_DATA = ('transcripts', 'star', 'star_right', 'pair')  # config_defaults.sft_phase
SELECT = ('last', 'best_reward')  # which params a phase hands on (see train.py)


@dataclasses.dataclass(frozen=True)
class Recipe:
  phases: tuple[str, ...]
  turns: int = 2  # attempts per episode when config.turns = 0
  about: str = ''


RECIPES = {
    'score': Recipe(('base', 'stage1', 'stage2'), 2, 'SCoRe: Stage I, then Stage II'),
    'score3': Recipe(('base', 'stage1a', 'stage1b', 'stage2_3turn'), 3,
                     'three-attempt SCoRe (extended paper): Stage 1(a), 1(b), 2'),
    # The paper's Table 2 (methods) and Table 4 (ablations); SCORE.md.
    'self_refine': Recipe(('base',), 2, 'the base, prompted with the correction instruction'),
    'star': Recipe(('base', 'star'), 2, 'STaR: SFT on own traces that correct'),
    'pair_sft': Recipe(('base', 'pair_sft'), 2, 'Pair-SFT: SFT on own (wrong, right) pairs'),
    'single_turn_rl': Recipe(('base', 'single_turn_rl'), 2, 'w/o multi-turn training'),
    'multi_turn_rl': Recipe(('base', 'multi_turn_rl'), 2, 'both rewards, no Stage I, no bonus'),
    'score_no_stage1': Recipe(('base', 'stage2_no_stage1'), 2, 'w/o Stage I'),
    'score_no_shaping': Recipe(('base', 'stage1', 'stage2_no_shaping'), 2, 'w/o reward shaping'),
    'score_star_stage2': Recipe(('base', 'stage1', 'stage2_star'), 2,
                                'STaR instead of REINFORCE in Stage II'),
    'score_offline_turn1': Recipe(('base', 'stage1', 'stage2_offline'), 2,
                                  'base first attempts mixed into Stage II'),
}


class ConfigError(ValueError):
  """A config value that cannot work; the message names the field."""


def check(ok: bool, field: str, value, why: str):
  if not ok:
    raise ConfigError(f'config.{field}={value!r}: {why}')


@dataclasses.dataclass(frozen=True)
class Phase:
  """One resolved phase of a recipe: its position, its config and its objective."""
  name: str
  index: int  # position in the recipe; seeds the phase's problems and random numbers
  cfg: ml_collections.ConfigDict
  turns: int  # attempts per episode in this phase
  objective: Optional[objective_lib.Objective]  # RL phases only

  @property
  def kind(self) -> str:
    return self.cfg.kind

  @property
  def steps(self) -> int:
    return self.cfg.steps


def run_turns(config) -> int:
  """Attempts per episode of the run (and of its evaluation)."""
  recipe = RECIPES.get(config.recipe)
  return config.turns or (recipe.turns if recipe else 2)


def _check_per_turn(field: str, values, turns: int):
  check(isinstance(values, tuple) and 1 <= len(values) <= turns, field, values,
        f'needs 1 to {turns} entries, one per attempt (the last one repeats)')


def _objective(name: str, p, turns: int, rl) -> objective_lib.Objective:
  f = f'phases.{name}'
  check(bool(p.train_turns) and all(1 <= t <= turns for t in p.train_turns)
        and len(set(p.train_turns)) == len(p.train_turns), f'{f}.train_turns', p.train_turns,
        f'must name distinct attempts in 1..{turns} (this phase samples {turns})')
  _check_per_turn(f'{f}.kl_coefs', p.kl_coefs, turns)
  _check_per_turn(f'{f}.reward_weights', p.reward_weights, turns)
  check(min(p.kl_coefs) >= 0, f'{f}.kl_coefs', p.kl_coefs, 'must be >= 0')
  check(p.alpha >= 0, f'{f}.alpha', p.alpha, 'must be >= 0')
  check(0 <= p.offline_turn1 < 1, f'{f}.offline_turn1', p.offline_turn1, 'must be in [0, 1)')
  if p.offline_turn1:
    check(turns >= 2, f'{f}.offline_turn1', p.offline_turn1, 'needs at least two attempts')
    groups = p.offline_turn1 * rl.num_prompts
    check(abs(groups - round(groups)) < 1e-9 and round(groups) >= 1, f'{f}.offline_turn1',
          p.offline_turn1, f'must be a multiple of 1/rl.num_prompts ({rl.num_prompts} RLOO '
          'groups per step; offline first attempts come as whole groups)')
  check(p.kl_target >= 0, f'{f}.kl_target', p.kl_target, 'must be >= 0 (0 = fixed betas)')
  check(p.select in SELECT, f'{f}.select', p.select, f'must be one of {SELECT}')
  check(rl.kl_estimator in objective_lib.KL_ESTIMATORS, 'rl.kl_estimator', rl.kl_estimator,
        f'must be one of {objective_lib.KL_ESTIMATORS}')
  check(rl.kl_form in objective_lib.KL_FORMS, 'rl.kl_form', rl.kl_form,
        f'must be one of {objective_lib.KL_FORMS}')
  check(rl.baseline in objective_lib.BASELINES, 'rl.baseline', rl.baseline,
        f'must be one of {objective_lib.BASELINES}')
  return objective_lib.Objective(
      turns=turns, train_turns=tuple(sorted(p.train_turns)),
      reward_weights=objective_lib.Objective.expand(p.reward_weights, turns),
      alpha=float(p.alpha), kl_coefs=objective_lib.Objective.expand(p.kl_coefs, turns),
      baselines=(rl.baseline,) * turns, kl_estimator=rl.kl_estimator, kl_form=rl.kl_form,
      rloo_k=rl.samples_per_prompt, normalize_advantages=rl.normalize_advantages)


def resolve(config) -> list[Phase]:
  """The phases of `config.recipe`, checked; raises ConfigError naming the bad field."""
  check(config.recipe in RECIPES, 'recipe', config.recipe, f'must be one of {tuple(RECIPES)}')
  turns = run_turns(config)
  check(isinstance(turns, int) and turns >= 1, 'turns', config.turns,
        'must be a positive number of attempts (0 = the recipe\'s)')
  phases, seen = [], set()
  for index, name in enumerate(RECIPES[config.recipe].phases):
    check(name in config.phases, 'recipe', config.recipe,
          f'names phase {name!r}, which config.phases does not define')
    p, f = config.phases[name], f'phases.{name}'
    check(p.kind in KINDS, f'{f}.kind', p.kind, f'must be one of {KINDS}')
    check(p.init == '' or p.init in seen, f'{f}.init', p.init,
          f'must be \'\' (the initial weights) or an earlier phase of the recipe {sorted(seen)}')
    check(isinstance(p.steps, int) and p.steps >= 0, f'{f}.steps', p.steps,
          'must be a non-negative integer')
    check(p.learning_rate >= 0, f'{f}.learning_rate', p.learning_rate, 'must be >= 0')
    phase_turns = p.turns or turns
    check(1 <= phase_turns <= turns, f'{f}.turns', p.turns,
          f'must be 0 (the run\'s {turns}) or between 1 and {turns}')
    obj = None
    if p.kind == 'rl':
      check(p.reference == '' or p.reference in seen, f'{f}.reference', p.reference,
            f'must be \'\' (the initial weights) or an earlier phase {sorted(seen)}')
      obj = _objective(name, p, phase_turns, config.rl)
    else:
      check(p.data in SFT_DATA, f'{f}.data', p.data, f'must be one of {SFT_DATA}')
      check(all(1 <= t <= phase_turns for t in p.loss_turns), f'{f}.loss_turns', p.loss_turns,
            f'must name attempts in 1..{phase_turns} (empty = all)')
      check(p.batch_size > 0, f'{f}.batch_size', p.batch_size, 'must be positive')
      if p.data != 'transcripts':
        check(p.samples > 0, f'{f}.samples', p.samples, 'self-generated data needs samples > 0')
        check(1 <= p.rounds <= max(p.steps, 1), f'{f}.rounds', p.rounds,
              f'must be between 1 and the phase\'s {p.steps} steps')
        check(phase_turns >= (1 if p.data == 'pair' else 2) and (p.data != 'pair' or phase_turns == 2),
              f'{f}.turns', p.turns, f'{p.data} data needs two attempts')
    phases.append(Phase(name, index, p, phase_turns, obj))
    seen.add(name)
  return phases


# Fields that change how a run executes but not what it computes: a resumed run may
# change them freely.
_EXECUTION_ONLY = ('mode', 'mesh', 'sharding_rules', 'checkpoint', 'log_every', 'eval',
                   'recipe', 'phases', 'rl.microbatches', 'rollout.batch_size',
                   'rollout.slots', 'rollout.live_spans')


def _without(d: dict, dotted: str):
  head, _, rest = dotted.partition('.')
  if head in d:
    if rest:
      _without(d[head], rest)
    else:
      del d[head]


def fingerprints(config, phases: list[Phase]) -> dict[str, tuple[str, dict]]:
  """(digest, what it digests) per phase: the run's settings, the phase's own fields and
  those of its init and reference, recursively. A workdir whose checkpoint was made under
  another fingerprint is refused instead of silently reused (`changed_fields` names the
  difference)."""
  shared = json.loads(config.to_json_best_effort())
  for field in _EXECUTION_ONLY:
    _without(shared, field)
  out = {}
  for p in phases:
    parents = {n: out[n][0] for n in (p.cfg.init, p.cfg.get('reference', '')) if n}
    run = shared
    if p.kind == 'sft' and p.cfg.data == 'transcripts':  # Nothing sampled: RL settings unused.
      run = {k: v for k, v in shared.items() if k != 'rl'}
    inputs = dict(run=run, phase=json.loads(p.cfg.to_json_best_effort()), turns=p.turns,
                  parents=parents)
    text = json.dumps(inputs, sort_keys=True)
    out[p.name] = (hashlib.sha256(text.encode()).hexdigest()[:16], inputs)
  return out


def changed_fields(old: dict, new: dict, prefix: str = '') -> list[str]:
  """Dotted names of the leaves where two nested dicts differ."""
  out = []
  for k in sorted(set(old) | set(new)):
    a, b = old.get(k), new.get(k)
    if isinstance(a, dict) and isinstance(b, dict):
      out += changed_fields(a, b, f'{prefix}{k}.')
    elif a != b:
      out.append(f'{prefix}{k}: {a!r} -> {b!r}')
  return out


def describe(phases: list[Phase]) -> str:
  """What every attempt of every phase gets: one line per phase."""
  lines = []
  for p in phases:
    head = f'{p.name:<14} {p.kind} {p.steps:>5} steps  init={p.cfg.init or "(initial)"}'
    if p.kind == 'sft':
      lines.append(f'{head}  data={p.cfg.data} loss on attempts '
                   f'{tuple(p.cfg.loss_turns) or "all"}')
      continue
    o = p.objective
    turns = ', '.join(
        f't{t + 1}: ' + ('trained' if t + 1 in o.train_turns else 'sampled') +
        f' w={o.reward_weights[t]:g}' + (f' +{o.alpha:g}Δr' if t and o.alpha else '') +
        f' β={o.kl_coefs[t]:g}' for t in range(o.turns))
    extra = f'  offline t1 {p.cfg.offline_turn1:g}' if p.cfg.offline_turn1 else ''
    lines.append(f'{head}  ref={p.cfg.reference or "(initial)"}  {turns}{extra}')
  return '\n'.join(lines)
