"""ShardServer on a real Ray Serve (TLS, 127.0.0.1): routes, ETag/Range, tokens, predict, atomic version swap."""

import json
import ssl
import threading
import time
import urllib.request
from pathlib import Path

import pytest
import torch
import yaml

from fedge.cloud.export import build_from_manifest
from fedge.cloud.serving import MULTIPLEX_HEADER, build_app, parse_range
from fedge.common.manifest import verify_manifest
from tests.shard_server import make_model

CONFIG = Path(__file__).resolve().parents[2] / "cloud" / "serve_shards.yaml"


# ---------------------------------------------------------------------- unit
@pytest.mark.parametrize(
    "header,size,want",
    [("bytes=0-9", 100, (0, 9)), ("bytes=90-", 100, (90, 99)), ("bytes=-10", 100, (90, 99)),
     ("bytes=50-500", 100, (50, 99)), ("bytes=100-", 100, None), ("bytes=-0", 100, None)],
)
def test_parse_range(header, size, want):
    assert parse_range(header, size) == want


@pytest.mark.parametrize("header", ["bytes=0-1,5-6", "items=0-1", "bytes=-"])
def test_parse_range_rejects_what_it_does_not_support(header):
    with pytest.raises(ValueError, match="Range"):
        parse_range(header, 100)


def test_serve_config_file_is_valid_for_serve_cli():
    from ray.serve.schema import ServeDeploySchema

    cfg = ServeDeploySchema.model_validate(yaml.safe_load(CONFIG.read_text()))
    app = cfg.applications[0]
    assert app.import_path == "fedge.cloud.serving:build_app"
    assert app.deployments[0].ray_actor_options.num_cpus == 0
    assert cfg.http_options.host == "127.0.0.1"
    assert build_app(app.args) is not None  # the builder Serve's CLI calls
    with pytest.raises(ValueError, match="store"):
        build_app({})


# ---------------------------------------------------------------------- real Serve


@pytest.mark.integration
def test_models_manifest_and_shard_bytes(shard_server):
    status, _, body = shard_server.get("/v1/models")
    idx = json.loads(body)
    assert status == 200 and "v1" in idx["versions"]
    status, headers, env = shard_server.get("/v1/models/v1/manifest")
    man = verify_manifest(env, shard_server.store.private.public_key())
    entry = man.file("router")
    status, headers, data = shard_server.get(f"/v1/models/v1/shards/{entry.file}", shard_server.auth())
    assert status == 200 and headers["etag"] == f'"{entry.sha256}"' and len(data) == entry.bytes
    # Range: the middle, a resume with If-Range, an unsatisfiable one, a conditional GET
    status, headers, part = shard_server.get(f"/v1/models/v1/shards/{entry.file}",
                                             shard_server.auth() | {"Range": "bytes=10-19"})
    assert status == 206 and part == data[10:20] and headers["content-range"] == f"bytes 10-19/{entry.bytes}"
    status, _, rest = shard_server.get(f"/v1/models/v1/shards/{entry.file}",
                                       shard_server.auth() | {"Range": "bytes=100-", "If-Range": headers["etag"]})
    assert status == 206 and rest == data[100:]
    status, _, full = shard_server.get(f"/v1/models/v1/shards/{entry.file}",
                                       shard_server.auth() | {"Range": "bytes=100-", "If-Range": '"stale"'})
    assert status == 200 and full == data  # the file changed: whole file, never a spliced one
    status, headers, _ = shard_server.get(f"/v1/models/v1/shards/{entry.file}",
                                          shard_server.auth() | {"Range": f"bytes={entry.bytes}-"})
    assert status == 416 and headers["content-range"] == f"bytes */{entry.bytes}"
    status, _, _ = shard_server.get(f"/v1/models/v1/shards/{entry.file}",
                                    shard_server.auth() | {"If-None-Match": f'"{entry.sha256}"'})
    assert status == 304
    assert shard_server.get("/v1/models/v7/manifest")[0] == 404
    assert shard_server.get("/v1/models/v1/shards/../../index.json", shard_server.auth())[0] == 404
    assert shard_server.get("/v1/models/v1/shards/nope.onnx", shard_server.auth())[0] == 404


@pytest.mark.integration
def test_shard_download_without_a_valid_token_is_refused(shard_server):
    path = "/v1/models/v1/shards/head.onnx"
    assert shard_server.get(path)[0] == 401
    assert shard_server.get(path, {"Authorization": "Bearer wrong", "X-Fedge-Device": "dev-1"})[0] == 403
    assert shard_server.get(path, {"Authorization": f"Bearer {shard_server.token}", "X-Fedge-Device": "dev-2"})[0] == 403
    assert shard_server.get(path, shard_server.auth())[0] == 200


@pytest.mark.integration
def test_server_speaks_tls_only_with_the_pinned_ca(shard_server):
    assert shard_server.url.startswith("https://127.0.0.1:")
    with pytest.raises(urllib.error.URLError, match="CERTIFICATE_VERIFY_FAILED"):
        urllib.request.urlopen(shard_server.url + "/v1/models", timeout=10, context=ssl.create_default_context())


def _post(srv, body, headers=None):
    req = urllib.request.Request(srv.url + "/v1/predict", data=json.dumps(body).encode(), method="POST",
                                 headers={"Content-Type": "application/json", **srv.auth(), **(headers or {})})
    ctx = ssl.create_default_context(cafile=str(srv.ca_file))
    try:
        with urllib.request.urlopen(req, timeout=60, context=ctx) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


@pytest.mark.integration
def test_predict_for_thin_clients_matches_the_model(shard_server):
    store = shard_server.store.store
    g = torch.Generator().manual_seed(3)
    img, aud = torch.rand(3, 3, 32, 32, generator=g), torch.randn(3, 40, 32, generator=g) * 10 - 40
    status, out = _post(shard_server, {"image": img.tolist(), "audio": aud.tolist()}, {MULTIPLEX_HEADER: "v1"})
    assert status == 200 and out["version"] == "v1"
    model = build_from_manifest(store.version_dir("v1"), store.manifest("v1"))
    with torch.no_grad():
        want = model(img, aud).logits.softmax(-1)
    assert torch.allclose(torch.tensor(out["probs"]), want, atol=1e-5)
    status, err = _post(shard_server, {"audio": [[1.0]]})
    assert status == 400 and "dimensions" in err["detail"]
    status, err = _post(shard_server, {})
    assert status == 400 and "image" in err["detail"]
    status, err = _post(shard_server, {"audio": aud.tolist(), "version": "v404"})
    assert status == 404


@pytest.mark.integration
def test_version_swap_under_a_stream_of_requests_has_zero_failures(shard_server):
    """Publish v2 while clients keep fetching manifests, shards and predictions: every request succeeds."""
    srv, store = shard_server, shard_server.store.store
    before = store.index()["latest"]
    failures, seen, counts = [], set(), {"n": 0}
    stop = threading.Event()
    aud = (torch.randn(1, 40, 32) * 10 - 40).tolist()

    def client(kind):
        while not stop.is_set():
            try:
                if kind == "predict":
                    status, out = _post(srv, {"audio": aud})
                    ok = status == 200
                    seen.add(out.get("version"))
                else:
                    status, _, env = srv.get("/v1/models/latest/manifest")
                    man = verify_manifest(env, srv.store.private.public_key())
                    f = man.file("head")
                    s2, h2, data = srv.get(f"/v1/models/{man.version}/shards/{f.file}", srv.auth())
                    ok = status == 200 and s2 == 200 and h2["etag"] == f'"{f.sha256}"' and len(data) == f.bytes
                    seen.add(man.version)
                counts["n"] += 1
                if not ok:
                    failures.append((kind, status))
            except Exception as e:  # noqa: BLE001  (any exception is a failed request)
                failures.append((kind, repr(e)))

    threads = [threading.Thread(target=client, args=(k,)) for k in ("manifest", "manifest", "predict")]
    for t in threads:
        t.start()
    time.sleep(1.0)
    store.publish(make_model(7), version="v2", private_key=srv.store.private, image_size=32, audio_frames=32)
    t_end = time.time() + 3.0
    while "v2" not in seen and time.time() < t_end + 30:
        time.sleep(0.2)
    time.sleep(1.0)
    stop.set()
    for t in threads:
        t.join(timeout=60)
    assert failures == []
    assert counts["n"] > 20 and {before, "v2"} <= seen
    assert store.index()["latest"] == "v2"


def test_keys_and_token_commands(tmp_path):
    from typer.testing import CliRunner

    from fedge.cloud.serving import token_digest
    from fedge.common.cli import build_app
    from fedge.common.manifest import load_private_key, load_public_key

    r = CliRunner().invoke(build_app(), ["cloud", "keys", "--out", str(tmp_path / "k")])
    assert r.exit_code == 0, r.output
    load_private_key(tmp_path / "k" / "manifest.key")
    load_public_key(tmp_path / "k" / "manifest.pub")
    r = CliRunner().invoke(build_app(), ["cloud", "keys", "--out", str(tmp_path / "k")])
    assert r.exit_code == 1 and "already exists" in r.output
    tokens = tmp_path / "k" / "tokens.json"
    r = CliRunner().invoke(build_app(), ["cloud", "token", "cam-1", "--tokens", str(tokens)])
    assert r.exit_code == 0, r.output
    assert json.loads(tokens.read_text()) == {"cam-1": token_digest(r.output.strip())}
    r = CliRunner().invoke(build_app(), ["cloud", "token", "bad id", "--tokens", str(tokens)])
    assert r.exit_code == 1 and "device id" in r.output
