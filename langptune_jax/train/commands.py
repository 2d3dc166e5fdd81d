"""The `train`, `evaluate` and `export` commands: wiring config -> data, models, Trainer.

Each command receives the validated config and the run directory from
:mod:`langptune_jax.main`. The prepared dataset is read from
``data.dataset_dir`` (default ``<workdir>/dataset``) and built first when it
does not exist yet, so ``train`` alone runs the whole pipeline.
"""

from __future__ import annotations

import dataclasses
import json
import pathlib
import shutil

import numpy as np

from langptune_jax import distributed, fs, model_limits, parallel
from langptune_jax import settings as settings_lib
from langptune_jax.data import builder as data_builder
from langptune_jax.data import loader as data_loader
from langptune_jax.data import prepare as data_prepare
from langptune_jax.models import bert as bert_lib
from langptune_jax.models import embedder as embedder_lib
from langptune_jax.observability import MetricsWriter
from langptune_jax.serve import index as index_lib
from langptune_jax.train import checkpoint as ckpt_lib
from langptune_jax.train import report
from langptune_jax.train import setup as setup_lib
from langptune_jax.train.loop import Trainer
from langptune_jax.train.run_data import RunData, UserSplit
from langptune_jax.weights import export as export_lib
from langptune_jax.weights import tokenizer as tok_lib

# Data settings that may differ between `prepare` and `train` (they don't shape the dataset);
# every other data.* field, the seed and both tokenizer paths must match. `shuffle_buffer`
# is a retired field that older datasets still record.
_FREE_DATA_SETTINGS = ("dataset_dir", "num_workers", "scan_workers", "shuffle_buffer")


def _user_split(columns: dict) -> UserSplit:
  history = np.where(columns["history_mask"].astype(bool), columns["history"], -1)
  return UserSplit(columns["user"].astype(np.int32), columns["prompt_tokens"].astype(np.int32),
                   columns["prompt_mask"].astype(bool), history.astype(np.int32),
                   columns["target"].astype(np.int32), list(columns["prompt"]))


def load_run_data(config, workdir) -> RunData:
  """The prepared dataset as in-memory arrays (prepares it first if it is missing)."""
  settings = settings_lib.of(config)
  folder = data_prepare.dataset_dir(settings, workdir)
  # The coordinator decides and prepares; the other processes wait for its dataset.
  if distributed.broadcast_from_coordinator(
      np.int32(not (folder / data_builder.STATS_FILE).exists())):
    if distributed.is_coordinator():
      print(f"no prepared dataset at {folder}: preparing it now")
      data_prepare.run(settings, workdir)
    distributed.sync("dataset_prepared")
  folder = fs.local_copy(folder, data_builder.STATS_FILE)  # array_record reads local files
  recorded = data_loader.load_stats(folder).get("settings", {})
  built = dict(recorded.get("data", {}), **{
      "encoder.path": recorded.get("encoder_path"), "decoder.path": recorded.get("decoder_path")})
  current = dict(dataclasses.asdict(settings.data), **{
      "encoder.path": settings.encoder.path, "decoder.path": settings.decoder.path})
  built["seed"] = recorded.get("seed")
  current["seed"] = settings.seed
  for name in sorted(set(built) - set(_FREE_DATA_SETTINGS)):
    if built[name] is not None and str(built[name]) != str(current.get(name)):
      field = name if "." in name or name == "seed" else f"data.{name}"
      raise ValueError(f"dataset {folder} was built with {field}={built[name]!r} but the config "
                       f"has {field}={current.get(name)!r}; re-run prepare or set "
                       "data.dataset_dir to another folder")
  splits = {name: _user_split(data_loader.load_split(folder, name))
            for name in ("train", "val", "test")}
  items = data_loader.load_split(folder, "items")
  order = np.argsort(items["item"])
  if not np.array_equal(items["item"][order], np.arange(len(order))):
    raise ValueError(f"dataset {folder}: item indices are not 0..{len(order) - 1}")
  return RunData(splits["train"], splits["val"], splits["test"],
                 items["decoder_tokens"][order].astype(np.int32),
                 items["decoder_mask"][order].astype(np.int32),
                 [items["text"][i] for i in order])


def build_trainer(config, workdir) -> Trainer:
  settings = settings_lib.of(config)
  model_limits.check(settings)  # before the dataset is built or a model is loaded
  mesh = parallel.make_mesh(settings.mesh)
  rules = parallel.rules_from_config(settings.mesh.rules)
  data = load_run_data(settings, workdir)
  encoder = setup_lib.load_writer(settings.encoder, mesh, rules)
  decoder = setup_lib.load_recommender(settings.decoder, mesh)
  writer = MetricsWriter(str(workdir), tensorboard=settings.logging.tensorboard,
                         jsonl=settings.logging.jsonl)
  return Trainer(config, str(workdir), data=data, encoder=encoder, decoder=decoder,
                 writer_tokenizer=tok_lib.load_tokenizer(settings.encoder.path),
                 ranker_tokenizer=tok_lib.load_tokenizer(settings.decoder.path),
                 writer=writer, mesh=mesh)


def _print_report(trainer: Trainer) -> None:
  if not distributed.is_coordinator():
    return
  settings = trainer.setup.settings
  table = report.write_report(str(trainer.workdir), trainer.history, trainer.curves,
                              settings.eval.ks, settings.logging.num_sample_profiles,
                              validation_split=settings.eval.split)
  print(table)
  print(f"\nresults: {fs.join(trainer.workdir, 'results.md')} "
        f"(plots: curves.png, metrics.png and, when validated, validation.png; "
        f"profiles/: per-user profiles and ranks)")


def train(config, workdir) -> int:
  trainer = build_trainer(config, workdir)
  try:
    trainer.run()
    if trainer.preempted:
      where = trainer.position
      print(f"preempted: checkpoint saved at iteration {where.iteration}, {where.phase} step "
            f"{where.step}; run the same command to resume")
    elif trainer.finished:
      _print_report(trainer)
      index_lib.index_trained_run(trainer)  # what recommend and serve rank with
    else:
      print(f"stopped at {trainer.position} (train.stop_after_steps); run again to resume")
  finally:
    trainer.close()
  return 0


def evaluate(config, workdir) -> int:
  """Scores the latest checkpoint in `workdir` (or the untrained models) on eval.final_split.

  Baselines and zero-shot profiles are the ones kept in the checkpoint (computed
  before training); without them they are computed now.
  """
  trainer = build_trainer(config, workdir)
  settings = trainer.setup.settings
  split = settings.eval.final_split
  try:
    restored = trainer.restore()
    tag = (f"checkpoint_iteration_{trainer.position.iteration}" if restored
           else "untrained")
    if split not in trainer.evaluator.zero_shot_texts:
      trainer.evaluate("zero_shot", split=split, baselines=True, write_records=False)
    trainer.evaluate(f"evaluate_{tag}_{split}", split=split,
                     baselines=not trainer.evaluator.reference_ranks.get(split))
    entry = trainer.history[-1]
    path = fs.join(workdir, f"evaluate_{tag}_{split}.json")
    if not distributed.is_coordinator():
      return 0
    fs.write_text(path, json.dumps(entry, indent=2))
    print(report.results_table(report.method_rows([entry]), settings.eval.ks,
                               report.entry_intervals(entry)))
    print(f"\nwritten: {path}")
  finally:
    trainer.close()
  return 0


def export(config, workdir, overwrite: bool | None = None) -> int:
  """Writes the trained encoder (LoRA merged) and decoder as HF directories.

  Everything is written to a temporary folder renamed to ``<workdir>/export`` at
  the end; a non-empty ``export`` is replaced only with ``overwrite`` (--overwrite).
  """
  overwrite = _overwrite_flag() if overwrite is None else bool(overwrite)
  root = fs.as_path(workdir)
  checkpoints = root / "checkpoints"
  if not ckpt_lib.has_checkpoint(checkpoints):  # before anything is built in the workdir
    raise FileNotFoundError(f"no checkpoint in {checkpoints}: train first")
  out = root / "export"
  export_lib.check_target(out, overwrite)
  trainer = build_trainer(config, workdir)
  try:
    if not trainer.restore():
      raise FileNotFoundError(f"no checkpoint in {checkpoints}: train first")
    with export_lib.staged_dir(out, overwrite=overwrite) as tmp:
      export_lib.export_decoder(trainer.writer_state.model, tmp / "encoder")  # merges LoRA
      settings = trainer.setup.settings
      _copy_tokenizer(settings.encoder.path, tmp / "encoder")
      _export_embedder(trainer.ranker_state.model, tmp / "decoder", settings.decoder.path)
    print(f"encoder (LoRA merged): {out / 'encoder'}\ndecoder: {out / 'decoder'}")
  finally:
    trainer.close()
  return 0


def _overwrite_flag() -> bool:
  """The CLI's --overwrite (defined by langptune_jax.main), False elsewhere."""
  from absl import flags
  return bool("overwrite" in flags.FLAGS and flags.FLAGS.is_parsed()
              and flags.FLAGS["overwrite"].value)


def _export_embedder(embedder: embedder_lib.Embedder, out: pathlib.Path, source: str) -> None:
  """The decoder as an HF directory: BERT weights (or a decoder LLM) plus its tokenizer."""
  if embedder.family != "bert":
    export_lib.export_decoder(embedder.model, out)
    _copy_tokenizer(source, out)
    return
  out.mkdir(parents=True, exist_ok=True)
  export_lib.write_safetensors(out / "model.safetensors", bert_lib.hf_state(embedder.model))
  shutil.copy(pathlib.Path(source) / "config.json", out / "config.json")
  _copy_tokenizer(source, out)


def _copy_tokenizer(source: str, target: pathlib.Path) -> None:
  """Saves the tokenizer next to exported weights so transformers can load the folder."""
  tok = tok_lib.load_tokenizer(source)
  tok.save_pretrained(str(target))
  src = pathlib.Path(source)
  if src.is_dir():
    for name in ("generation_config.json",):
      if (src / name).exists():
        shutil.copy(src / name, target / name)
