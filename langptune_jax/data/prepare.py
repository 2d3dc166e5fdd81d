"""The `prepare` command: raw files -> tokenized TFDS dataset + stats.json + summary.

`prepare(config)` runs the whole pipeline and returns (dataset path, stats);
`run(config, workdir)` is the CLI entry: it prints a summary table; a `DataError`
(a `ValueError`) reaches the CLI, which prints it as one line.
"""

from __future__ import annotations

import dataclasses
import os
import pathlib
import time
from typing import Any

from langptune_jax import fs, model_limits
from langptune_jax import settings as settings_lib
from langptune_jax.data import amazon, builder, core, movielens
from langptune_jax.weights import tokenizer as tok_lib

SOURCES = {"amazon": amazon.load, "movielens": movielens.load}


def dataset_dir(config: Any, workdir: str | os.PathLike | None) -> pathlib.Path:
  """`data.dataset_dir`, else <workdir>/dataset (`config`: Settings or a config)."""
  d = config.data.dataset_dir
  if d:
    return fs.path(d) if fs.is_remote(d) else pathlib.Path(d).expanduser()
  if not workdir:
    raise ValueError("data.dataset_dir is empty and no workdir was given")
  return (fs.path(workdir) if fs.is_remote(workdir) else pathlib.Path(workdir).expanduser()
          ) / "dataset"


def _tokenizer(settings: settings_lib.Settings, section: str):
  path = getattr(settings, section).path
  if not path:
    raise core.DataError(f"{section}.path is empty; it names the {section} tokenizer "
                         "(local HF directory or .gguf file)")
  try:
    return tok_lib.load_tokenizer(path)
  except FileNotFoundError as e:
    raise core.DataError(f"{section}.path: {e}") from None


def prepare(config: Any, workdir: str | os.PathLike | None = None
            ) -> tuple[pathlib.Path, dict[str, Any]]:
  """Builds the dataset described by `config.data`; returns (path, stats).

  `config`: :class:`~langptune_jax.settings.Settings` or a validated config.
  """
  settings = settings_lib.of(config)
  cfg = settings.data
  source = cfg.source
  if source not in SOURCES:
    raise ValueError(f"data.source={source!r}; expected one of {', '.join(SOURCES)}")
  out_dir = dataset_dir(settings, workdir)
  model_limits.check(settings)  # lengths the models cannot hold fail here, not after the build
  start = time.perf_counter()
  enc_tok = _tokenizer(settings, "encoder")
  dec_tok = _tokenizer(settings, "decoder")
  skips = core.SkipLog()
  log = core.FilterLog()
  t_read = time.perf_counter()
  src = SOURCES[source](cfg, skips, log)
  t_build = time.perf_counter()
  prepared = core.build_splits(src, cfg, enc_tok, dec_tok, log, seed=settings.seed)
  t_write = time.perf_counter()
  # Timings vary run to run: kept out of stats.json so rebuilds stay byte-identical.
  seconds = prepared.stats.pop("seconds")
  extra = {
      "filters": log.stages,
      "skipped": skips.as_dict(),
      "settings": {"data": dataclasses.asdict(cfg), "encoder_path": settings.encoder.path,
                   "decoder_path": settings.decoder.path, "seed": settings.seed},
  }
  path = builder.write(
      prepared, out_dir, history_len=cfg.history_len, prompt_len=cfg.prompt_max_len,
      decoder_len=cfg.decoder_max_len,
      encoder_pad=tok_lib.pad_id(enc_tok), decoder_pad=tok_lib.pad_id(dec_tok),
      extra_stats=extra)
  stats = dict(prepared.stats)
  stats.update(extra)
  stats["seconds"] = dict(
      seconds, load_tokenizers=t_read - start, read_and_kcore=t_build - t_read,
      filters_and_splits=t_write - t_build, write=time.perf_counter() - t_write,
      total=time.perf_counter() - start)
  return path, stats


def summary(stats: dict[str, Any]) -> str:
  """A plain-text table of filters, skipped records and split sizes."""
  lines = ["", f"{'filter':<52} {'users':>17} {'items':>15} {'interactions':>19}"]
  for s in stats["filters"]:
    if "users_before" not in s:
      before, after = s.get("rows_before", s.get("review_lines", "")), s.get(
          "rows_after", s.get("interactions_after", ""))
      lines.append(f"{s['filter']:<52} {'':>17} {'':>15} {before:>9}->{after:<9}")
      continue
    lines.append(
        f"{s['filter']:<52} {s['users_before']:>8}->{s['users_after']:<8} "
        f"{s['items_before']:>7}->{s['items_after']:<7} "
        f"{s['interactions_before']:>9}->{s['interactions_after']:<9}")
  if stats["skipped"]:
    lines += ["", f"{'skipped records':<52} {'count':>8}  first lines"]
    for reason, v in stats["skipped"].items():
      lines.append(f"{reason:<52} {v['count']:>8}  {', '.join(v['first'])}")
  lines += ["", f"{'split':<10} {'users':>8} {'items':>8} {'interactions':>13}"]
  for name, s in stats["splits"].items():
    lines.append(f"{name:<10} {s.get('users', ''):>8} {s.get('items', ''):>8} "
                 f"{s.get('interactions', ''):>13}")
  lp = stats["length_percentiles"]
  for key, v in lp.items():
    if v:
      lines.append(f"{key}: p50 {v['p50']:.0f}  p90 {v['p90']:.0f}  p99 {v['p99']:.0f}  "
                   f"max {v['max']}")
  return "\n".join(lines)


def run(config: Any, workdir: str | os.PathLike | None) -> int:
  """CLI entry point; returns the process exit status."""
  # DataError is a ValueError: the CLI prints it as one line.
  path, stats = prepare(config, workdir)
  print(summary(stats))
  secs = stats["seconds"]
  print(f"\ndataset written to {path} in {secs['total']:.1f}s ("
        + ", ".join(f"{k} {v:.1f}s" for k, v in secs.items() if k != "total") + ")")
  return 0
