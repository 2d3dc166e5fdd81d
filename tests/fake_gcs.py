"""An emulated Cloud Storage bucket on 127.0.0.1 for the bucket-workdir tests.

`gcp-storage-emulator` (an in-memory server of the GCS JSON API) answers both
clients a run uses: gcsfs, behind etils.epath, through ``STORAGE_EMULATOR_HOST``
and tensorstore (orbax's array writer) through ``TENSORSTORE_GCS_HTTP_URL``
with a fixed test token. Child processes inherit the variables, so a CLI run
started from a test writes into the same bucket. The server ignores
``ifGenerationMatch=0`` (create-if-absent), which the work directory lock
relies on; `_honour_create_if_absent` adds it.
"""

import contextlib
import http
import os
import socket

BUCKET = "langptune-test"


def _honour_create_if_absent() -> None:
  """Uploads with ifGenerationMatch=0 answer 412 when the object exists (as GCS does)."""
  from gcp_storage_emulator import server
  from gcp_storage_emulator.handlers import objects
  insert = objects.insert
  if getattr(insert, "create_if_absent", False):
    return

  def insert_if_absent(request, response, storage, *args, **kwargs):
    if request.query.get("ifGenerationMatch") == ["0"]:
      name = (request.query.get("name") or [None])[0]
      if name is None and isinstance(request.data, dict):
        name = request.data.get("meta", {}).get("name")
      with contextlib.suppress(Exception):  # NotFound: absent, go ahead
        storage.get_file_obj(request.params["bucket_name"], name)
        response.status = http.HTTPStatus.PRECONDITION_FAILED
        return
    return insert(request, response, storage, *args, **kwargs)

  insert_if_absent.create_if_absent = True
  objects.insert = insert_if_absent
  for _, methods in server.HANDLERS:
    for method, handler in list(methods.items()):
      if handler is insert:
        methods[method] = insert_if_absent


@contextlib.contextmanager
def emulated_bucket():
  """Starts the server with an empty BUCKET; yields ``gs://BUCKET``."""
  from gcp_storage_emulator.server import create_server
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
  _honour_create_if_absent()
  server = create_server("127.0.0.1", port, in_memory=True, default_bucket=BUCKET)
  server.start()
  url = f"http://127.0.0.1:{port}"
  env = {"STORAGE_EMULATOR_HOST": url, "TENSORSTORE_GCS_HTTP_URL": url,
         "GOOGLE_AUTH_TOKEN_FOR_TESTING": "test-token", "GOOGLE_CLOUD_PROJECT": "test",
         # no credential look-up, and no bucket-layout call to the real control API
         # (children read these at import)
         "FSSPEC_GCS_TOKEN": "anon", "GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT": "false"}
  saved = {k: os.environ.get(k) for k in env}
  os.environ.update(env)
  import fsspec
  fsspec.config.conf.setdefault("gcs", {})["token"] = "anon"
  try:
    yield f"gs://{BUCKET}"
  finally:
    server.stop()
    for key, value in saved.items():
      if value is None:
        os.environ.pop(key, None)
      else:
        os.environ[key] = value
