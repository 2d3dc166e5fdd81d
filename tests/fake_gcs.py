"""An emulated Cloud Storage bucket on 127.0.0.1 for the bucket-workdir tests.

`gcp-storage-emulator` (an in-memory server of the GCS JSON API) answers both
clients a run uses: gcsfs, behind etils.epath, through ``STORAGE_EMULATOR_HOST``
and tensorstore (orbax's array writer) through ``TENSORSTORE_GCS_HTTP_URL``
with a fixed test token. Child processes inherit the variables, so a CLI run
started from a test writes into the same bucket. Two things GCS does that the
server lacks are added by `_patch_server`: ``ifGenerationMatch=0`` uploads
(create-if-absent, which the work directory lock relies on) and the
``x-goog-generation`` header of a download (tensorstore reads it).
"""

import contextlib
import http
import logging
import os
import socket

BUCKET = "langptune-test"


def _replace_handler(old, new) -> None:
  from gcp_storage_emulator import server
  from gcp_storage_emulator.handlers import objects
  setattr(objects, old.__name__, new)  # handlers that call it by name
  for _, methods in server.HANDLERS:
    for method, handler in list(methods.items()):
      if handler is old:
        methods[method] = new


def _patch_server() -> None:
  from gcp_storage_emulator.handlers import objects
  if getattr(objects.insert, "patched", False):
    return
  insert, download = objects.insert, objects.download

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

  def download_with_generation(request, response, storage, *args, **kwargs):
    with contextlib.suppress(Exception):  # NotFound: the handler answers 404
      obj = storage.get_file_obj(request.params["bucket_name"], request.params["object_id"])
      response["x-goog-generation"] = str(obj["generation"])
      response["x-goog-metageneration"] = str(obj.get("metageneration", "1"))
    return download(request, response, storage, *args, **kwargs)

  insert_if_absent.__name__, insert_if_absent.patched = "insert", True
  download_with_generation.__name__ = "download"
  _replace_handler(insert, insert_if_absent)
  _replace_handler(download, download_with_generation)


@contextlib.contextmanager
def emulated_bucket():
  """Starts the server with an empty BUCKET; yields ``gs://BUCKET``."""
  from gcp_storage_emulator.server import create_server
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
  _patch_server()
  logging.getLogger("gcp_storage_emulator").setLevel(logging.CRITICAL)  # every 404 is an ERROR
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
