"""Session fixtures for sharded delivery: a published model store and a real TLS Serve on 127.0.0.1.

Registered in tests/conftest.py so that tests/cloud and tests/edge share one export and one Serve instance.
"""

from __future__ import annotations

import ssl
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

IMAGE_SIZE, AUDIO_FRAMES = 32, 32


def make_model(seed: int, **kw: Any) -> Any:
    """A LoRA-wrapped model with non-zero adapters (export must merge them); ``kw`` go to ``build_model``."""
    import torch

    from fedge.common.lora import apply_lora
    from fedge.common.model import build_model

    m = build_model(seed=seed, precision={"image": "fp32", "audio": "fp32"}, **kw)
    apply_lora(m)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for n, p in m.named_parameters():
            if "lora_B" in n:
                p.copy_(torch.randn(p.shape, generator=g) * 0.05)
    return m.eval()


@dataclass
class Store:
    root: Path
    store: Any  # fedge.cloud.model_store.ModelStore
    private: Any
    public_pem: Path
    model: Any  # the LoRA-wrapped torch model of v1


@dataclass
class Server:
    url: str
    store: Store
    ca_file: Path
    tokens_file: Path
    device: str
    token: str

    def get(self, path: str, headers: dict[str, str] | None = None) -> tuple[int, dict[str, str], bytes]:
        ctx = ssl.create_default_context(cafile=str(self.ca_file))
        req = urllib.request.Request(self.url + path, headers=headers or {})
        try:
            with urllib.request.urlopen(req, timeout=30, context=ctx) as r:
                return r.status, dict(r.headers), r.read()
        except urllib.error.HTTPError as e:
            return e.code, dict(e.headers), e.read()

    def auth(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.token}", "X-Fedge-Device": self.device}


@pytest.fixture(scope="session")
def shard_store(tmp_path_factory) -> Store:
    """A ModelStore with version v1 published (LoRA merged, signed)."""
    from fedge.cloud.model_store import ModelStore
    from fedge.common.manifest import generate_keypair, load_private_key

    root = tmp_path_factory.mktemp("shards")
    priv_path, pub_path = generate_keypair(root / "keys")
    private = load_private_key(priv_path)
    store = ModelStore(root / "store")
    model = make_model(seed=0)
    store.publish(model, version="v1", private_key=private, image_size=IMAGE_SIZE, audio_frames=AUDIO_FRAMES,
                  public_key=private.public_key())
    return Store(root=root, store=store, private=private, public_pem=pub_path, model=model)


MODALITY_VERSION = "v1-modality"


@pytest.fixture(scope="session")
def modality_version(shard_store) -> str:
    """Version ``v1-modality`` of a model with modality-affine experts (image: 0-1, audio: 2-3, shared: 4),
    published into the shared store without moving ``latest`` (other tests keep following it)."""
    store = shard_store.store
    latest = store.index()["latest"]
    model = make_model(seed=3, num_experts=5, shared_experts=1, top_k=2, expert_affinity="modality")
    store.publish(model, version=MODALITY_VERSION, private_key=shard_store.private, image_size=IMAGE_SIZE,
                  audio_frames=AUDIO_FRAMES, public_key=shard_store.private.public_key())
    store.set_latest(latest)
    return MODALITY_VERSION


@pytest.fixture(scope="session")
def shard_server(ray_session, shard_store) -> Server:
    """The ShardServer on a real Serve over TLS on 127.0.0.1 with device tokens on; Serve shut down after."""
    from ray import serve

    from fedge.cloud.certs import generate
    from fedge.cloud.serving import add_device_token, start_shard_server
    from tests.conftest import free_port

    certs = generate(shard_store.root / "certs").layout
    tokens = shard_store.root / "tokens.json"
    token = add_device_token(tokens, "dev-1")
    port = free_port()
    url = start_shard_server(shard_store.store.root, host="127.0.0.1", port=port, tokens_file=tokens,
                             ssl_certfile=certs.server_cert, ssl_keyfile=certs.server_key)
    srv = Server(url=url, store=shard_store, ca_file=certs.ca_cert, tokens_file=tokens, device="dev-1",
                 token=token)
    yield srv
    serve.shutdown()
