"""Mesh construction, logical axis rules and sharding placement (8 emulated CPU devices)."""

import os
import pathlib
import socket
import subprocess
import sys
import textwrap

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from cpu_devices import xla_flags
from flax import nnx
from jax.sharding import PartitionSpec as P

from langptune_jax import parallel
from langptune_jax.models.layers import Embed, Linear
from langptune_jax.parallel import ShardingError

REPO = pathlib.Path(__file__).resolve().parent.parent


def mesh_config(data=-1, fsdp=1, tensor=1):
  return ml_collections.ConfigDict({"data": data, "fsdp": fsdp, "tensor": tensor})


def test_emulated_devices():
  assert jax.device_count() == 8


@pytest.mark.parametrize("axes,expected", [
    ((-1, 1, 1), (8, 1, 1)),
    ((2, -1, 1), (2, 4, 1)),
    ((1, -1, 2), (1, 4, 2)),
    ((2, 2, 2), (2, 2, 2)),
    ((-1, 2, 4), (1, 2, 4)),
    ((8, 1, 1), (8, 1, 1)),
])
def test_make_mesh_shapes(axes, expected):
  mesh = parallel.make_mesh(mesh_config(*axes))
  assert mesh.axis_names == parallel.MESH_AXES
  assert tuple(mesh.shape[a] for a in parallel.MESH_AXES) == expected
  ids = sorted(d.id for d in mesh.devices.flat)
  assert ids == sorted(d.id for d in jax.devices())


def test_make_mesh_on_device_subsets():
  one = parallel.make_mesh(mesh_config(), devices=jax.devices()[:1])
  assert dict(one.shape) == {"data": 1, "fsdp": 1, "tensor": 1}
  four = parallel.make_mesh(mesh_config(fsdp=2), devices=jax.devices()[:4])
  assert dict(four.shape) == {"data": 2, "fsdp": 2, "tensor": 1}


@pytest.mark.parametrize("axes,n,message", [
    ((-1, 3, 1), 8, "mesh.fsdp=3: 8 devices are not divisible by the fixed axes' product 3 "
                    "(mesh.data=-1 takes the rest)"),
    ((-1, 3, 2), 8, "mesh.fsdp=3, mesh.tensor=2: 8 devices are not divisible"),
    ((2, 2, 1), 8, "mesh.data=2, mesh.fsdp=2: the mesh data=2 x fsdp=2 x tensor=1 needs 4 devices "
                   "but 8 are available"),
    ((-1, -1, 1), 8, "mesh: only one axis may be -1, got mesh.data, mesh.fsdp"),
    ((0, 1, 1), 8, "mesh.data=0: each mesh axis must be >= 1 or -1 (fill)"),
    ((-2, 1, 1), 8, "mesh.data=-2: each mesh axis must be >= 1 or -1 (fill)"),
    ((2, 1, 1), 1, "mesh.data=2: the mesh data=2 x fsdp=1 x tensor=1 needs 2 devices but 1"),
])
def test_impossible_meshes_have_clear_errors(axes, n, message):
  with pytest.raises(ShardingError) as info:
    parallel.mesh_shape(mesh_config(*axes), n)
  assert str(info.value).startswith(message)
  assert isinstance(info.value, ValueError)


def test_first_matching_rule_wins():
  rules = (("embed", "tensor"), ("embed", "fsdp"), ("mlp", None))
  assert parallel.logical_to_spec(("embed", "mlp"), rules) == P("tensor", None)
  assert parallel.logical_to_spec(("embed",), rules[1:]) == P("fsdp")


def test_mesh_axis_is_never_used_twice():
  rules = (("batch", ("data", "fsdp")), ("embed", "fsdp"), ("mlp", "tensor"))
  # fsdp is taken by batch, so embed is replicated.
  assert parallel.logical_to_spec(("batch", "embed"), rules) == P(("data", "fsdp"), None)
  assert parallel.logical_to_spec(("embed", "batch"), rules) == P("fsdp", "data")
  assert parallel.logical_to_spec(("mlp", None, "embed"), rules) == P("tensor", None, "fsdp")


def test_size_one_mesh_axes_are_dropped():
  mesh = parallel.make_mesh(mesh_config(fsdp=1))
  # Without a mesh nothing is dropped (embed loses fsdp only because batch took it).
  assert parallel.logical_to_spec(("batch", "embed")) == P(("data", "fsdp"), None)
  assert parallel.logical_to_spec(("batch", "embed"), mesh=mesh) == P("data", None)
  mesh = parallel.make_mesh(mesh_config(data=1, fsdp=-1))
  assert parallel.logical_to_spec(("batch", "vocab"), mesh=mesh) == P("fsdp", None)


def test_unknown_logical_name():
  with pytest.raises(ShardingError, match="no sharding rule for logical axis 'experts'"):
    parallel.logical_to_spec(("batch", "experts"))


def test_rules_from_config():
  assert parallel.rules_from_config(None) is parallel.DEFAULT_RULES
  rules = parallel.rules_from_config([["batch", ["data", "fsdp"]], ["embed", None], ("mlp", "tensor")])
  assert rules == (("batch", ("data", "fsdp")), ("embed", None), ("mlp", "tensor"))


def test_fit_spec_drops_indivisible_dimensions():
  mesh = parallel.make_mesh(mesh_config(data=2, fsdp=4))
  assert parallel.fit_spec(P("data", "fsdp"), (6, 12), mesh) == P("data", "fsdp")
  assert parallel.fit_spec(P("data", "fsdp"), (3, 6), mesh) == P(None, None)
  assert parallel.fit_spec(P(("data", "fsdp")), (4, 5), mesh) == P(None, None)


def test_constrain_places_activations():
  x = jnp.arange(8 * 6, dtype=jnp.float32).reshape(8, 6)
  assert parallel.constrain(x, ("batch", "embed")) is x  # no active mesh: identity
  mesh = parallel.make_mesh(mesh_config(data=2, fsdp=2, tensor=2))

  @jax.jit
  def f(x):
    return parallel.constrain(x * 2, ("batch", "mlp"))

  with parallel.use_mesh(mesh):
    assert parallel.active_mesh()[0] is mesh
    y = f(x)
  assert parallel.active_mesh() is None
  assert y.sharding.spec == P(("data", "fsdp"), "tensor")
  np.testing.assert_array_equal(np.asarray(y), np.asarray(x) * 2)


class _Tiny(nnx.Module):

  def __init__(self, rngs):
    self.embed = Embed(32, 16, rngs=rngs)
    self.up = Linear(16, 24, axes=("embed", "mlp"), rngs=rngs)
    self.odd = Linear(16, 5, axes=("embed", "mlp"), rngs=rngs)  # 5 does not split over tensor


def test_state_shardings_and_shard_module():
  mesh = parallel.make_mesh(mesh_config(data=2, fsdp=2, tensor=2))
  model = _Tiny(nnx.Rngs(0))
  before = np.asarray(model.up.kernel[...])
  shardings = parallel.state_shardings(nnx.state(model), mesh)
  assert shardings["embed"]["embedding"].get_value().spec == P("tensor", "fsdp")
  parallel.shard_module(model, mesh)
  assert model.up.kernel[...].sharding.spec == P("fsdp", "tensor")
  assert model.odd.kernel[...].sharding.spec == P("fsdp", None)
  assert model.embed.embedding[...].sharding.spec == P("tensor", "fsdp")
  # Each device holds a quarter of the [16, 24] kernel.
  shard_shapes = {s.data.shape for s in model.up.kernel[...].addressable_shards}
  assert shard_shapes == {(8, 12)}
  np.testing.assert_array_equal(np.asarray(model.up.kernel[...]), before)


def test_put_and_global_batch():
  mesh = parallel.make_mesh(mesh_config(data=4, fsdp=2))
  host = np.arange(16 * 3, dtype=np.int32).reshape(16, 3)
  arr = parallel.put(host, mesh, ("batch", None))
  assert arr.sharding.spec == P(("data", "fsdp"), None)
  np.testing.assert_array_equal(np.asarray(arr), host)
  batch = parallel.global_batch({"tokens": host, "mask": host > 3}, mesh)
  assert batch["tokens"].sharding.spec == P(("data", "fsdp"), None)
  assert {s.data.shape for s in batch["tokens"].addressable_shards} == {(2, 3)}
  np.testing.assert_array_equal(np.asarray(batch["mask"]), host > 3)
  assert parallel.data_parallel_size(mesh) == 8
  assert parallel.batch_sharding(mesh, 1).spec == P(("data", "fsdp"))
  tp = parallel.make_mesh(mesh_config(data=2, tensor=4))
  assert parallel.data_parallel_size(tp) == 2


_WORKER = textwrap.dedent("""
    import os, sys
    os.environ["XLA_FLAGS"] = "{flags}"
    os.environ["JAX_PLATFORMS"] = "cpu"
    import jax, numpy as np
    import ml_collections
    port, pid = sys.argv[1], int(sys.argv[2])
    jax.distributed.initialize(f"localhost:{port}", num_processes=2, process_id=pid)
    from langptune_jax import distributed, parallel
    mesh = parallel.make_mesh(ml_collections.ConfigDict({"data": -1, "fsdp": 2, "tensor": 1}))
    # Every process passes the 16 global rows but places only its own: rows of the
    # other process are poisoned here and must never be read.
    rows = np.full(16, np.nan, np.float32)
    own = distributed.local_rows(16, mesh)
    rows[own] = np.arange(16, dtype=np.float32)[own]
    batch = parallel.global_batch({"x": rows[:, None]}, mesh)
    total = jax.jit(lambda b: b["x"].sum())(batch)
    gathered = distributed.to_host(batch)["x"]  # every process sees all 16 rows
    print("RESULT", jax.device_count(), dict(mesh.shape)["data"], batch["x"].shape, float(total),
          gathered.ravel().tolist() == list(range(16)))
""")


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("localhost", 0))
    return s.getsockname()[1]


@pytest.mark.multiprocess
def test_two_processes_build_one_mesh_and_global_batch(tmp_path):
  script = tmp_path / "worker.py"
  script.write_text(_WORKER.replace("{flags}", xla_flags(4)))
  port = str(_free_port())
  env = {**os.environ, "PYTHONPATH": str(REPO)}
  env.pop("XLA_FLAGS", None)
  procs = [subprocess.Popen([sys.executable, str(script), port, str(i)], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
           for i in range(2)]
  outputs = []
  for proc in procs:
    try:
      out, _ = proc.communicate(timeout=240)
    except subprocess.TimeoutExpired:
      for p in procs:
        p.kill()
      pytest.fail("multi-process workers timed out")
    outputs.append(out)
    assert proc.returncode == 0, out[-3000:]
  for out in outputs:
    line = [ln for ln in out.splitlines() if ln.startswith("RESULT")][-1]
    # 2 processes x 4 devices; data = 8 / fsdp 2; 16 global rows; sum(0..15) = 120.
    assert line == "RESULT 8 4 (16, 1) 120.0 True", line
