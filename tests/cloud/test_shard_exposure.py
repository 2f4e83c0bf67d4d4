"""The shard server is never reachable beyond loopback without device tokens unless told ``--public``, and the
deployment guide starts it only with TLS and tokens."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from typer.testing import CliRunner

from fedge.cloud.serving import check_exposure

GUIDE = Path(__file__).resolve().parents[2] / "docs" / "deploy.md"


@pytest.mark.parametrize("host", ["127.0.0.1", "127.0.0.2", "::1", "localhost"])
def test_loopback_needs_no_token(host):
    check_exposure(host, None, public=False)


@pytest.mark.parametrize("host", ["0.0.0.0", "::", "192.0.2.10", "shards.example.org"])
def test_beyond_loopback_without_tokens_is_refused_unless_public(host, tmp_path):
    with pytest.raises(ValueError, match="without device tokens: pass --tokens .* or --public"):
        check_exposure(host, None, public=False)
    check_exposure(host, tmp_path / "tokens.json", public=False)
    check_exposure(host, None, public=True)


def test_serve_cli_refuses_a_public_bind_without_tokens_in_one_line_before_ray_starts(tmp_path):
    from fedge.cloud.cli import app

    store = tmp_path / "models"
    store.mkdir()
    r = CliRunner().invoke(app, ["serve", "--store", str(store), "--host", "0.0.0.0"])
    assert r.exit_code == 1
    (line,) = r.output.strip().splitlines()
    assert line.startswith("fedge cloud serve:") and "--public" in line
    r = CliRunner().invoke(app, ["serve", "--store", str(store), "--host", "0.0.0.0", "--tokens",
                                 str(tmp_path / "missing.json")])
    assert r.exit_code == 1 and "tokens file not found" in r.output


def test_every_guide_command_serves_shards_with_tls_and_tokens():
    lines = [ln for ln in GUIDE.read_text().replace("\\\n", " ").splitlines()
             if re.search(r"fedge cloud serve\b", ln) and not ln.lstrip().startswith(("#", "|"))]
    commands = [ln for ln in lines if "--store" in ln]
    assert commands, "the guide starts no shard server"
    for c in commands:
        assert "--ssl-certfile" in c and "--ssl-keyfile" in c and "--tokens" in c, c
        assert "--public" not in c, c
