r"""The paper's comparison in one command: methods and ablations x seeds -> tables and plots.

    python -m score_jax.experiments --config=configs/demo.py --workdir=runs/paper --seeds=0,1,2
    python -m score_jax.experiments --config=configs/demo.py --workdir=runs/quick --quick

Every method is a recipe (recipes.RECIPES) run in one workdir per seed, <workdir>/seed<S>:
phases with the same name and settings are shared, so each seed trains one base (and one
Stage I for the methods that start from it), and a killed suite continues where it
stopped (run.py resumes every phase). Budgets are matched in config_defaults.py: every RL
method trains as many steps and episodes as Stage I + Stage II; the SFT methods sample as
many episodes and fine-tune for as many steps.

Beside the paper's table (Acc@t1, Acc@t2, Δ, Δi→c, Δc→i) each method gets the measures of
correction itself: P(right at t2 | wrong at t1), the accuracy of its second attempt after
the *base's* wrong first attempts (the same mistakes for every method), the share of
identical attempts and the edit-distance histogram; and, for `--scaling_methods`, the
inference-time scaling curves (evaluate.inference_scaling). Written to
<workdir>/paper.json, paper.md and the plots paper_methods.png, paper_edit.png,
paper_scaling.png. `--report` writes the same for the methods finished so far to
<workdir>/report/ without training anything (e.g. beside a running suite).
"""
import json
import os
import sys
import time

import jax
import ml_collections
import numpy as np
from absl import app
from absl import flags
from absl import logging
from ml_collections import config_flags

from score_jax import checkpoints
from score_jax import config_defaults
from score_jax import evaluate
from score_jax import hosts
from score_jax import recipes
from score_jax import run as run_lib

# The paper's Table 2 (methods) and Table 4 (ablations), in its order.
TABLE2 = ("self_refine", "star", "pair_sft", "score")
TABLE4 = ("score", "single_turn_rl", "multi_turn_rl", "score_no_stage1", "score_no_shaping",
          "score_star_stage2", "score_offline_turn1")
METHODS = tuple(dict.fromkeys(TABLE2 + TABLE4))
COLUMNS = (("Acc@t1", "acc_t1"), ("Acc@t2", "acc_t2"), ("Δ", "delta"), ("Δi→c", "delta_i2c"),
           ("Δc→i", "delta_c2i"), ("P(c|i)", "correct_given_wrong"),
           ("fix base", "repair_base_acc"), ("same", "edit_ratio_zero_share"))

_CONFIG = config_flags.DEFINE_config_file("config", None, "Config file (a Python module).")
_WORKDIR = flags.DEFINE_string("workdir", None, "The suite's directory.")
_SEEDS = flags.DEFINE_list("seeds", ["0", "1", "2"], "Seeds; one base per seed.")
_METHODS = flags.DEFINE_list("methods", list(METHODS), f"Recipes among {METHODS}.")
_SCALING = flags.DEFINE_list("scaling_methods", ["self_refine", "score", "multi_turn_rl",
                                                 "single_turn_rl"],
                             "Methods whose inference-time scaling curves are drawn.")
_SCALING_K = flags.DEFINE_integer("scaling_k", 16, "Largest K (2K samples per problem).")
_SCALING_N = flags.DEFINE_integer("scaling_problems", 200, "Held-out problems for scaling.")
_REPORT = flags.DEFINE_bool("report", False, "Tables and plots of the methods finished so far "
                            "(read from the workdir while a suite runs, or after it stopped); "
                            "trains and evaluates nothing.")
_QUICK = flags.DEFINE_bool("quick", False, "One seed, short phases, 200 problems: a smoke "
                           "run of the whole suite (about 20 minutes on 2 CPU cores).")


def quick(config, flags_values: dict) -> dict:
  """The --quick overrides of the config and of the suite's own settings."""
  config.phases.stage1.steps, config.phases.stage2.steps = 40, 30
  config.eval.num_problems = 200
  return dict(flags_values, seeds=flags_values["seeds"][:1], scaling_problems=50, scaling_k=4)


def work_units(config, methods, seeds, workdir) -> dict:
  """(seed, phase) -> steps x attempts still to train: the suite's remaining work."""
  units = {}
  for seed in seeds:
    for method in methods:
      c = _method_config(config, method, seed)
      for p in recipes.resolve(c):
        done = checkpoints.latest_step(os.path.join(_seed_dir(workdir, seed), p.name)) or 0
        units[(seed, p.name)] = max(p.steps - done, 0) * p.turns
  return units


def _seed_dir(workdir, seed) -> str:
  return os.path.join(workdir, f"seed{seed}")


def _method_config(config, method: str, seed: int):
  c = ml_collections.ConfigDict(config.to_dict())  # a copy; references resolved
  c.recipe, c.seed = method, int(seed)
  return c


def _base_mistakes(run, problems, path: str) -> list:
  """The base's greedy wrong first attempts on the held-out problems (saved once)."""
  if not os.path.exists(path):
    batch = evaluate.sample_scored(run.episodes, run.params_of("base"), problems, (0,), 0.0, 1)
    evaluate.write_jsonl(path, (dict(id=p.id, first_attempt=batch.texts[0][i])
                                for i, p in enumerate(problems) if batch.rewards_BxT[i, 0] < 0.5))
  hosts.sync("base mistakes written")
  with open(path) as f:
    wrong = {d["id"]: d["first_attempt"] for d in map(json.loads, f)}
  return [(p, wrong[p.id]) for p in problems if p.id in wrong]


def measure(method: str, seed_dir: str, settings: dict, out: dict):
  """`run.train_and_evaluate`'s `after`: the correction measures of the method's last phase."""
  def after(run, results):
    last = run.phases[-1].name
    r = dict(results[last])
    cache = os.path.join(seed_dir, "eval", f"measures_{last}.json")
    if os.path.exists(cache):
      with open(cache) as f:
        r.update(json.load(f))
    else:
      extra = {}
      problems = run.task.eval_problems(run.config.eval.num_problems)
      mistakes = _base_mistakes(run, problems, os.path.join(seed_dir, "eval", "base_mistakes.jsonl"))
      params = run.params_of(last)
      if mistakes:
        extra["repair_base_acc"] = evaluate.fixed_repair_accuracy(
            run.episodes, params, [p for p, _ in mistakes], [a for _, a in mistakes],
            run.config.eval.batch_size)
      extra["repair_base_n"] = len(mistakes)
      if method in settings["scaling_methods"]:
        extra["scaling"] = evaluate.inference_scaling(
            run.episodes, params, problems[:settings["scaling_problems"]], settings["scaling_k"],
            run.config.eval.batch_size, seed=run.config.seed)
      evaluate.write_json(cache, extra)
      r.update(extra)
    out[method] = r
  return after


def summarize(results: dict, methods, seeds) -> dict:
  """method -> {metric: (mean, std over seeds)} for the table columns."""
  out = {}
  for m in methods:
    rows = [results[s][m] for s in seeds if m in results.get(s, {})]
    if not rows:  # not run (yet)
      continue
    out[m] = {key: (float(np.mean([r[key] for r in rows if key in r])),
                    float(np.std([r[key] for r in rows if key in r])))
              for _, key in COLUMNS if any(key in r for r in rows)}
  return out


def format_tables(summary: dict, results: dict, seeds) -> str:
  """Markdown: Table 2 and Table 4 (mean ± std over seeds, in percent), then every seed."""
  def cell(v):
    return f"{100 * v[0]:.1f} ± {100 * v[1]:.1f}" if len(seeds) > 1 else f"{100 * v[0]:.1f}"

  def table(title, methods):
    head = "| method | " + " | ".join(h for h, _ in COLUMNS) + " |"
    lines = [f"### {title}", "", head, "|" + "---|" * (len(COLUMNS) + 1)]
    for m in methods:
      if m in summary:
        lines.append(f"| {m} | " + " | ".join(
            cell(summary[m][k]) if k in summary[m] else "–" for _, k in COLUMNS) + " |")
    return lines

  lines = table("Methods (the paper's Table 2)", TABLE2) + [""] + table(
      "Ablations (the paper's Table 4)", TABLE4) + ["", "### Per seed", "",
      "| seed | method | " + " | ".join(h for h, _ in COLUMNS) + " |",
      "|" + "---|" * (len(COLUMNS) + 2)]
  for s in seeds:
    for m, r in results.get(s, {}).items():
      lines.append(f"| {s} | {m} | " + " | ".join(
          f"{100 * r[k]:.1f}" if k in r else "–" for _, k in COLUMNS) + " |")
  return "\n".join(lines)


def _save(fig, ax, path: str, xlabel: str, ylabel: str, title: str, legend_size: int = 7):
  import matplotlib.pyplot as plt
  ax.set_xlabel(xlabel)
  ax.set_ylabel(ylabel)
  ax.set_title(title)
  ax.legend(fontsize=legend_size)
  fig.tight_layout()
  fig.savefig(path, dpi=120)
  plt.close(fig)


def plot(summary: dict, results: dict, seeds, workdir: str):
  """paper_methods.png (Acc@t1 / Acc@t2 / Δ per method), paper_edit.png (edit-distance
  histograms: the collapse figure), paper_scaling.png (inference-time scaling curves)."""
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  methods = list(summary)
  fig, ax = plt.subplots(figsize=(max(6, 1.2 * len(methods)), 3.8))
  x = np.arange(len(methods))
  for i, (label, key) in enumerate((("Acc@t1", "acc_t1"), ("Acc@t2", "acc_t2"), ("Δ", "delta"))):
    mean = [100 * summary[m].get(key, (0, 0))[0] for m in methods]
    std = [100 * summary[m].get(key, (0, 0))[1] for m in methods]
    ax.bar(x + (i - 1) * 0.27, mean, 0.27, yerr=std, label=label, capsize=2)
  ax.set_xticks(x, methods, rotation=30, ha="right", fontsize=8)
  ax.axhline(0, color="k", lw=0.5)
  _save(fig, ax, os.path.join(workdir, "paper_methods.png"), "", "% of held-out problems",
        f"Methods, mean ± std over seeds {','.join(map(str, seeds))}", 8)

  fig, ax = plt.subplots(figsize=(6, 3.8))
  edges = np.linspace(0, 1, evaluate.HIST_BINS + 1)
  for m in methods:
    hist = np.sum([results[s][m]["edit_ratio_hist"] for s in seeds if m in results[s]], axis=0)
    ax.plot((edges[:-1] + edges[1:]) / 2, hist / max(hist.sum(), 1), marker=".", label=m)
  _save(fig, ax, os.path.join(workdir, "paper_edit.png"),
        "edit distance ratio between attempts 1 and 2", "share of problems",
        "Collapse: mass at 0 means the second attempt copies the first")

  scaled = [m for m in methods if any("scaling" in results[s].get(m, {}) for s in seeds)]
  if scaled:
    fig, ax = plt.subplots(figsize=(6, 3.8))
    for m in scaled:
      curves = [results[s][m]["scaling"] for s in seeds if "scaling" in results[s].get(m, {})]
      k = np.asarray(curves[0]["k"])
      for kind, style in (("parallel", "--"), ("sequential", "-")):
        ax.plot(2 * k, 100 * np.mean([c[kind] for c in curves], axis=0), style, marker=".",
                label=f"{m} {kind}")
    _save(fig, ax, os.path.join(workdir, "paper_scaling.png"), "samples per problem (2K)",
          "majority-vote accuracy (%)",
          "Inference-time scaling: 2K parallel vs K parallel + K corrections", 6)


def finished_results(config, workdir: str, seeds, methods) -> dict:
  """seed -> method -> results, for the methods whose last phase is evaluated and measured
  (the files `measure` reads: eval/<phase>.json and eval/measures_<phase>.json)."""
  out = {}
  for seed in seeds:
    for m in methods:
      last = recipes.resolve(_method_config(config, m, seed))[-1].name
      paths = [os.path.join(_seed_dir(workdir, seed), "eval", f"{f}{last}.json")
               for f in ("", "measures_")]
      if all(map(os.path.exists, paths)):
        r = {}
        for path in paths:
          with open(path) as f:
            r.update(json.load(f))
        out.setdefault(seed, {})[m] = r
  return out


def write_report(results: dict, seeds, methods, out_dir: str, extra: dict):
  """paper.json, paper.md and the plots in `out_dir`; returns the summary."""
  summary = summarize(results, methods, seeds)
  text = format_tables(summary, results, seeds)
  os.makedirs(out_dir, exist_ok=True)
  evaluate.write_json(os.path.join(out_dir, "paper.json"),
                      dict(summary=summary, results=results, seeds=list(seeds), **extra))
  with open(os.path.join(out_dir, "paper.md"), "w") as f:
    f.write(text + "\n")
  plot(summary, results, seeds, out_dir)
  print("\n" + text + f"\n\nwritten: {out_dir}/paper.json, paper.md, paper_*.png", flush=True)
  return summary


def run_suite(config, workdir: str, seeds, methods, settings: dict) -> dict:
  unknown = [m for m in methods if m not in METHODS]
  if unknown:
    raise recipes.ConfigError(f"--methods: unknown {unknown}; known: {list(METHODS)}")
  os.makedirs(workdir, exist_ok=True)
  for seed in seeds:  # Every method's config is checked before any work.
    for m in methods:
      config_defaults.check(_method_config(config, m, seed), jax.device_count())
  total = sum(work_units(config, methods, seeds, workdir).values())
  t0, results = time.time(), {}
  for i, (seed, method) in enumerate((s, m) for s in seeds for m in methods):
    seed_dir = _seed_dir(workdir, seed)
    print(f"\n[suite] {i + 1}/{len(seeds) * len(methods)}: seed {seed}, {method}", flush=True)
    run_lib.train_and_evaluate(_method_config(config, method, seed), seed_dir,
                               after=measure(method, seed_dir, settings,
                                             results.setdefault(seed, {})))
    left = sum(work_units(config, methods, seeds, workdir).values())
    done, elapsed = total - left, time.time() - t0
    # Resumed work costs nothing, so the rate comes from this invocation's training only.
    eta = f"ETA {elapsed / done * left / 60:.1f} min" if done else "ETA once new training ran"
    print(f"[suite] {100 * (total - left) / max(total, 1):.0f}% of this invocation's training "
          f"done in {elapsed / 60:.1f} min, {eta}", flush=True)
  summary = write_report(results, seeds, methods, workdir,
                         dict(settings=settings, minutes_this_invocation=(time.time() - t0) / 60))
  return dict(summary=summary, results=results)


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  config, workdir = _CONFIG.value, _WORKDIR.value
  if config is None or not workdir:
    raise app.UsageError("--config and --workdir are required")
  if not flags.FLAGS["verbosity"].present:
    logging.set_verbosity(logging.WARNING)
  # Every method compiles the same sampler and evaluation again: a persistent cache keyed
  # by the computation makes the repeats cost a lookup.
  jax.config.update("jax_compilation_cache_dir", os.path.join(workdir, "jax_cache"))
  jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
  settings = dict(seeds=[int(s) for s in _SEEDS.value], scaling_methods=list(_SCALING.value),
                  scaling_k=_SCALING_K.value, scaling_problems=_SCALING_N.value)
  if _QUICK.value:  # On the config itself, so that the budgets tied to Stage I / II follow.
    settings = quick(config, settings)
  try:
    if _REPORT.value:  # Beside the suite's own files, so a running suite is not disturbed.
      seeds, methods = settings["seeds"], list(_METHODS.value)
      results = finished_results(config, workdir, seeds, methods)
      seeds = [s for s in seeds if s in results]
      write_report(results, seeds, methods, os.path.join(workdir, "report"),
                   dict(settings=settings, finished={s: list(results[s]) for s in seeds}))
      return
    run_suite(config, workdir, settings["seeds"], list(_METHODS.value), settings)
  except recipes.ConfigError as e:
    print(f"error: {e}", file=sys.stderr)
    sys.exit(2)


if __name__ == "__main__":
  app.run(main)
