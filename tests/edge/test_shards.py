"""ShardCache against the real TLS ShardServer: per-modality subsets, lazy experts, integrity, signatures, tokens,
offline use, resumed downloads, the LRU byte budget."""

import json
import shutil
import socket
import threading
import time

import numpy as np
import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from fedge.common.manifest import Manifest, SignatureError, sign_manifest
from fedge.edge.inference import ShardedRunner
from fedge.edge.shards import (
    CacheBudgetError,
    ShardAuthError,
    ShardCache,
    ShardError,
    ShardIntegrityError,
    ShardTLSError,
    ShardUnavailableError,
)

pytestmark = pytest.mark.integration


def _cache(srv, tmp_path, modalities, **kw):
    opts = {"public_key": srv.store.public_pem, "modalities": modalities, "token": srv.token,
            "device": srv.device, "ca_file": srv.ca_file}
    return ShardCache(srv.url, tmp_path / "cache", **(opts | kw))


def _inputs(n=4, seed=0):
    rng = np.random.default_rng(seed)
    return (rng.random((n, 3, 32, 32), dtype=np.float32),
            (rng.standard_normal((n, 40, 32)) * 10 - 40).astype(np.float32))


def _files(cache, names):
    m = cache.manifest()
    return sorted(f"{m.file(n).sha256}.onnx" for n in names)


@pytest.mark.parametrize("modalities", [("image",), ("audio",), ("image", "audio")], ids=["camera", "mic", "full"])
def test_device_downloads_only_its_modalities_and_the_experts_it_routes_to(shard_server, tmp_path, modalities):
    cache = _cache(shard_server, tmp_path, modalities)
    base = [f"encoder.{m}" for m in modalities] + ["router", "head"]
    cache.ensure_base()
    assert cache.cached_files() == _files(cache, base)  # no expert, no other encoder yet
    image, audio = _inputs()
    out = ShardedRunner(cache).predict(image=image if "image" in modalities else None,
                                       audio=audio if "audio" in modalities else None)
    used = sorted({e for es in out.experts for e in es})
    assert cache.cached_files() == _files(cache, base + [f"expert.{e}" for e in used])
    want = sum(cache.manifest().file(n).bytes for n in base + [f"expert.{e}" for e in used])
    assert cache.stats.downloaded_bytes == want


def test_tampered_shard_is_refused_and_deleted(shard_server, tmp_path):
    store = shard_server.store.store
    version = store.index()["latest"]
    path = store.version_dir(version) / "router.onnx"
    original = path.read_bytes()
    try:
        path.write_bytes(original[:-4] + b"evil")  # same size, different bytes
        cache = _cache(shard_server, tmp_path, ("audio",))
        with pytest.raises(ShardIntegrityError, match="sha256"):
            cache.path("router")
        assert not any("router" in f or cache.manifest().file("router").sha256 in f for f in cache.cached_files())
        assert not list((cache.dir / "partial").iterdir())
    finally:
        path.write_bytes(original)
    assert cache.path("router").read_bytes() == original  # the genuine bytes are accepted


def test_manifest_signed_by_another_key_is_refused(shard_server, tmp_path):
    store = shard_server.store.store
    latest = store.index()["latest"]
    forged = tmp_path / "forged"
    shutil.copytree(store.version_dir(latest), forged)
    body = json.loads((forged / "manifest.json").read_bytes())["manifest"]
    body["version"], body["serial"] = f"forged-{tmp_path.name}", store.next_serial()
    (forged / "manifest.json").write_bytes(sign_manifest(Manifest.from_dict(body), Ed25519PrivateKey.generate()))
    store.publish_dir(forged, body["version"])
    store.set_latest(latest)  # keep other tests on the genuine version
    cache = _cache(shard_server, tmp_path, ("audio",), version=body["version"])
    with pytest.raises(SignatureError, match="pinned key"):
        cache.manifest()
    assert cache.stats.downloaded_bytes == 0 and cache.cached_files() == []
    # a device pinned to another key refuses the genuine manifest too
    other = Ed25519PrivateKey.generate().public_key()
    with pytest.raises(SignatureError):
        _cache(shard_server, tmp_path / "o", ("audio",), public_key=other).manifest()


def test_shard_request_without_a_valid_token_is_refused(shard_server, tmp_path):
    with pytest.raises(ShardAuthError, match="401"):
        _cache(shard_server, tmp_path / "a", ("audio",), token=None).ensure_base()
    with pytest.raises(ShardAuthError, match="403"):
        _cache(shard_server, tmp_path / "b", ("audio",), token="guess").ensure_base()


def test_cache_serves_offline(shard_server, tmp_path):
    image, audio = _inputs(seed=1)
    online = ShardedRunner(_cache(shard_server, tmp_path, ("image", "audio")))
    want = online.predict(image=image, audio=audio)
    with socket.socket() as s:  # a port where nothing listens: the server is gone
        s.bind(("127.0.0.1", 0))
        dead = f"https://127.0.0.1:{s.getsockname()[1]}"
    offline_cache = ShardCache(dead, tmp_path / "cache", public_key=shard_server.store.public_pem,
                               modalities=("image", "audio"), ca_file=shard_server.ca_file, timeout=2, retries=0)
    got = ShardedRunner(offline_cache).predict(image=image, audio=audio)
    assert got.version == want.version and np.allclose(got.logits, want.logits)
    assert offline_cache.stats.downloaded_bytes == 0
    missing = ShardCache(dead, tmp_path / "empty", public_key=shard_server.store.public_pem, modalities=("audio",),
                         timeout=2, retries=0)
    with pytest.raises(ShardUnavailableError, match="no manifest cached"):
        missing.manifest()


class CuttingProxy:
    """A TCP proxy to the server that drops its first connection after ``cut_after`` response bytes, then, for
    ``outage_s`` seconds, every new connection at once (a server restarting behind it)."""

    def __init__(self, upstream_port: int, cut_after: int, outage_s: float = 0.0) -> None:
        self.upstream, self.cut_after, self.connections = upstream_port, cut_after, 0
        self.outage_s, self.cut_at, self.refused = outage_s, None, 0
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(8)
        self.port = self.sock.getsockname()[1]
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self.sock.accept()
            except OSError:
                return
            self.connections += 1
            if self.cut_at is not None and time.monotonic() - self.cut_at < self.outage_s:
                self.refused += 1
                client.close()
                continue
            limit = self.cut_after if self.connections == 1 else None
            if limit is not None:
                self.cut_at = time.monotonic() + 3600  # until the cut happens
            up = socket.create_connection(("127.0.0.1", self.upstream))
            threading.Thread(target=self._pipe, args=(client, up, None), daemon=True).start()
            threading.Thread(target=self._pipe, args=(up, client, limit), daemon=True).start()

    def _pipe(self, src: socket.socket, dst: socket.socket, limit: int | None) -> None:
        sent = 0
        try:
            while data := src.recv(4096):
                if limit is not None and sent + len(data) >= limit:
                    dst.sendall(data[: limit - sent])
                    self.cut_at = time.monotonic()
                    break
                dst.sendall(data)
                sent += len(data)
        except OSError:
            pass
        for s in (src, dst):
            try:
                s.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            s.close()

    def close(self) -> None:
        self.sock.close()


def test_download_cut_midway_resumes_with_a_range_request(shard_server, tmp_path):
    port = int(shard_server.url.rsplit(":", 1)[1])
    probe = _cache(shard_server, tmp_path / "probe", ("image",))
    entry = probe.manifest().file("encoder.image")
    proxy = CuttingProxy(port, cut_after=entry.bytes // 2)
    try:
        cache = _cache(shard_server, tmp_path, ("image",), chunk_bytes=4096, retries=0)
        cache.url = f"https://127.0.0.1:{proxy.port}"
        cache._manifest = probe.manifest()  # the manifest came before the network broke
        with pytest.raises(Exception, match="interrupted"):
            cache.path("encoder.image")
        part = next((cache.dir / "partial").iterdir())
        got_before = part.stat().st_size
        assert 0 < got_before < entry.bytes
        cache.retries = 1
        path = cache.path("encoder.image")  # second connection: the proxy lets it through
    finally:
        proxy.close()
    assert path.read_bytes() == (shard_server.store.store.version_dir(cache.manifest().version)
                                 / entry.file).read_bytes()
    assert cache.stats.resumed == 1
    assert cache.stats.downloaded_bytes == entry.bytes  # the first part was not fetched again


def test_a_cut_download_rides_out_a_server_restart_within_retry_s(shard_server, tmp_path):
    """Cut mid-shard, then every connection refused for 1.5 s: with ``retry_s`` the same call resumes the
    download once the server is back, instead of failing the round."""
    port = int(shard_server.url.rsplit(":", 1)[1])
    probe = _cache(shard_server, tmp_path / "probe", ("image",))
    entry = probe.manifest().file("encoder.image")
    proxy = CuttingProxy(port, cut_after=entry.bytes // 2, outage_s=1.5)
    try:
        cache = _cache(shard_server, tmp_path, ("image",), chunk_bytes=4096, retries=0, retry_s=20.0)
        cache.url = f"https://127.0.0.1:{proxy.port}"
        cache._manifest = probe.manifest()
        path = cache.path("encoder.image")
    finally:
        proxy.close()
    assert proxy.refused >= 2  # it retried through the outage (backoff 0.2, 0.4, 0.8 s ...)
    assert path.read_bytes() == (shard_server.store.store.version_dir(cache.manifest().version)
                                 / entry.file).read_bytes()
    assert cache.stats.resumed == 1 and cache.stats.downloaded_bytes == entry.bytes


def test_lru_keeps_the_cache_within_its_byte_budget(shard_server, tmp_path):
    probe = _cache(shard_server, tmp_path / "probe", ("audio",))
    m = probe.manifest()
    base = sum(m.file(n).bytes for n in probe.required())
    expert = m.file("expert.0").bytes
    cache = _cache(shard_server, tmp_path, ("audio",), budget_bytes=base + expert + expert // 2)
    cache.ensure_base()
    cache.expert(0)
    cache.unpin(["expert.0"])
    cache.expert(1)  # does not fit beside expert 0: the least recently used unpinned file goes
    assert cache.stats.evicted == 1
    assert cache.cached_bytes() <= cache.budget
    assert _files(cache, ["expert.1"])[0] in cache.cached_files()
    assert _files(cache, ["expert.0"])[0] not in cache.cached_files()
    with pytest.raises(CacheBudgetError, match="budget"):
        cache.expert(2)  # everything cached is pinned now


def test_corrupted_cache_file_is_fetched_again(shard_server, tmp_path):
    cache = _cache(shard_server, tmp_path, ("audio",))
    path = cache.path("head")
    path.write_bytes(b"rot")
    fresh = _cache(shard_server, tmp_path, ("audio",))
    assert fresh.path("head").stat().st_size == fresh.manifest().file("head").bytes
    assert fresh.stats.downloaded_bytes == fresh.manifest().file("head").bytes


def test_runner_follows_a_new_version_without_refetching_unchanged_shards(shard_server, tmp_path):
    store = shard_server.store.store
    latest = store.index()["latest"]
    cache = _cache(shard_server, tmp_path, ("audio",))
    runner = ShardedRunner(cache)
    _, audio = _inputs(seed=2)
    before = runner.predict(audio=audio)
    fetched = cache.stats.downloaded_bytes
    # republish the same weights under a new version name (a version whose shards did not change)
    copy = tmp_path / "republish"
    shutil.copytree(store.version_dir(latest), copy)
    body = json.loads((copy / "manifest.json").read_bytes())["manifest"]
    body["version"], body["serial"] = f"re-{tmp_path.name}", store.next_serial()
    (copy / "manifest.json").write_bytes(sign_manifest(Manifest.from_dict(body), shard_server.store.private))
    store.publish_dir(copy, body["version"])
    try:
        assert runner.refresh() == body["version"]
        after = runner.predict(audio=audio)
    finally:
        store.set_latest(latest)
    assert after.version == body["version"] and np.allclose(after.logits, before.logits)
    assert cache.stats.downloaded_bytes == fetched  # content-addressed: nothing fetched twice


def test_untrusted_tls_certificate_is_an_error_not_offline(shard_server, tmp_path):
    cache = _cache(shard_server, tmp_path, ("audio",))
    cache.ensure_base()  # a verified manifest is cached now
    untrusting = ShardCache(shard_server.url, tmp_path / "cache", public_key=shard_server.store.public_pem,
                            modalities=("audio",), retries=0)  # system trust store: our CA is not in it
    with pytest.raises(ShardTLSError, match="not trusted"):
        untrusting.manifest()


def test_mic_only_device_with_modality_affine_experts_never_fetches_image_shards(shard_server, modality_version,
                                                                                 tmp_path):
    cache = _cache(shard_server, tmp_path, ("audio",), version=modality_version)
    man = cache.manifest()
    assert man.version == modality_version
    image_shards = {"encoder.image", "expert.0", "expert.1"}  # the image encoder and the image group
    runner = ShardedRunner(cache)
    used: set[int] = set()
    for seed in range(6):  # a stream of windows over varied inputs
        _, audio = _inputs(n=8, seed=seed)
        out = runner.predict(audio=audio, quality=np.random.default_rng(seed).random((8, 2), dtype=np.float32))
        used |= {e for es in out.experts for e in es}
    assert used and used <= {2, 3, 4}
    base = ["encoder.audio", "router", "head"]
    assert cache.cached_files() == _files(cache, base + [f"expert.{e}" for e in sorted(used)])
    assert not {man.file(n).sha256 for n in image_shards} & {f.split(".")[0] for f in cache.cached_files()}
    with pytest.raises(ShardError, match="modality 'image'"):
        cache.path("expert.0")  # an image-group expert is refused outright
    # prefetching by group fetches exactly the audio group, still no image shard
    assert cache.device_experts() == ("expert.2", "expert.3", "expert.4")
    cache.ensure_experts()
    assert cache.cached_files() == _files(cache, base + ["expert.2", "expert.3", "expert.4"])
    # everything but the image encoder and the image group: the most a mic-only device can ever download
    assert cache.stats.downloaded_bytes == man.total_bytes("onnx") - sum(man.file(n).bytes for n in image_shards)
