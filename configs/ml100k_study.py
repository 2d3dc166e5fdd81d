"""CPU study: what training buys on MovieLens-100K (SmolLM2-135M writer, MiniLM ranker).

The demo's models and data (configs/demo.py), run longer: every MovieLens-100K user,
4 alternating iterations, a validation evaluation after each (the per-iteration curve
in validation.png), and the final table on `test` with every baseline, bootstrap
intervals, the paired comparison with zero-shot profiles and the profiles' readability
(distinct-n, perplexity under the reference writer). Sized from the demo's step times
for about an hour on a 2-core CPU; not part of CI. A run's table, plots, command, seed,
wall time and commit belong under docs/results/.

  langptune-jax train --config=configs/ml100k_study.py --workdir=runs/ml100k_study
"""

import pathlib
import sys

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))

import demo  # noqa: E402  (configs/ is not a package)


def get_config():
  c = demo.get_config()
  c.train.num_iterations = 4
  c.train.eval_every_iterations = 1  # validation after every iteration: the study's curve
  c.train.cl_users = 112  # profiles per CL phase (a seeded subset of the train users)
  c.cl.num_emb_updates = 16
  c.rl.num_lm_updates = 24  # 96 RLSO updates in all, 384 prompts x 2 samples
  c.rl.prompts_per_update = 4
  c.eval.reference_perplexity = True
  c.eval.sasrec_steps = 1000
  c.baselines.history_steps = 32
  c.checkpoint.every_steps = 50
  return c
