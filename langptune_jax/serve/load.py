"""Opening a :class:`~langptune_jax.serve.session.Session` from a run directory.

Two sources: the latest checkpoint of a training run (the base models with the
trained adapters and layers restored on top), or the HF directories `export`
wrote (``serve.export_dir``). The zero-shot profile writer is the base model:
the training run's weights before restoring, or ``encoder.path`` beside an
export.
"""

from __future__ import annotations

import pathlib

from flax import nnx

from langptune_jax import fs, parallel
from langptune_jax.models import embedder as embedder_lib
from langptune_jax.serve.session import Session
from langptune_jax.train import profiles as profiles_lib
from langptune_jax.weights import hf as hf_weights
from langptune_jax.weights import tokenizer as tok_lib

CHECKPOINTS = "checkpoints"


def has_checkpoint(workdir) -> bool:
  folder = _workdir(workdir) / CHECKPOINTS
  return folder.is_dir() and any(p.name.isdigit() for p in folder.iterdir())


def _workdir(workdir):
  return fs.as_path(workdir)


def open_session(config, workdir, *, warm_up: bool = True) -> Session:
  """The session for `workdir` (or for config.serve.export_dir when set)."""
  export_dir = str(config.serve.export_dir)
  if export_dir:
    return _from_export(config, workdir, pathlib.Path(export_dir).expanduser(), warm_up)
  return _from_checkpoint(config, workdir, warm_up)


def _from_checkpoint(config, workdir, warm_up: bool) -> Session:
  from langptune_jax.train import commands  # heavy: the whole training stack
  if not has_checkpoint(workdir):
    raise FileNotFoundError(f"no checkpoint in {_workdir(workdir) / CHECKPOINTS}: train "
                            "first, or point serve.export_dir at an exported run")
  trainer = commands.build_trainer(config, str(workdir))
  try:
    # The weights from before the restore, in Variables of its own: a merged module shares
    # the train state's Variables, which the restore updates in place.
    zero_shot = nnx.clone(trainer.writer_state.model)
    if not trainer.restore():
      raise FileNotFoundError(f"no checkpoint in {_workdir(workdir) / CHECKPOINTS}")
    return Session(config, writer=trainer.writer_state.model, zero_shot_writer=zero_shot,
                   ranker=trainer.ranker_state.model,
                   writer_tokenizer=trainer.writer_tokenizer,
                   ranker_tokenizer=trainer.ranker_tokenizer, data=trainer.data,
                   index_dir=_workdir(workdir), sampling=trainer.sampling,
                   warm_up=warm_up)
  finally:
    trainer.close()


def _from_export(config, workdir, export_dir: pathlib.Path, warm_up: bool) -> Session:
  from langptune_jax.train import commands
  for part in ("encoder", "decoder"):
    if not (export_dir / part / "config.json").is_file():
      raise FileNotFoundError(f"serve.export_dir={str(export_dir)!r}: no {part}/config.json "
                              "(run `export` first)")
  mesh = parallel.make_mesh(config.mesh)
  rules = parallel.rules_from_config(config.mesh.rules)
  enc = config.encoder

  def writer(path):
    return hf_weights.load_decoder(path, dtype=enc.dtype, param_dtype=enc.param_dtype,
                                   mesh=mesh, rules=rules)[0]

  dec = config.decoder
  ranker = embedder_lib.load_embedder(
      dec.family, str(export_dir / "decoder"), pooling=dec.pooling, normalize=bool(dec.normalize),
      dtype=dec.dtype, param_dtype=dec.param_dtype, mesh=mesh, attention=dec.attention)
  trained = writer(export_dir / "encoder")
  writer_tokenizer = tok_lib.load_tokenizer(str(export_dir / "encoder"))
  sampling = profiles_lib.SamplingSettings.from_config(
      config, profiles_lib.eos_ids(writer_tokenizer, trained), tok_lib.pad_id(writer_tokenizer))
  return Session(config, writer=trained, zero_shot_writer=writer(enc.path), ranker=ranker,
                 writer_tokenizer=writer_tokenizer,
                 ranker_tokenizer=tok_lib.load_tokenizer(str(export_dir / "decoder")),
                 data=commands.load_run_data(config, workdir), index_dir=export_dir,
                 sampling=sampling, warm_up=warm_up)

