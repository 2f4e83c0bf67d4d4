"""`fedge cloud certs`: the files are in the formats Flower 1.42 reads, and a real SuperLink/SuperNode use them."""

from __future__ import annotations

import json
import socket
import ssl
import stat
import subprocess
import threading

import pytest
from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.serialization import load_ssh_private_key, load_ssh_public_key
from flwr.cli.supernode.register import try_load_public_key
from flwr.supercore.primitives.asymmetric import uses_nist_ec_curve

from fedge.cloud.certs import CertError, CertLayout, generate, server_sans
from tests.conftest import free_port

from .procs import BIN, Proc, env_with, flwr_config, port_open, wait_for


@pytest.fixture(scope="module")
def certs(tmp_path_factory):
    out = tmp_path_factory.mktemp("certs")
    generate(out, hostnames=["cloud.example.org"], ips=["10.0.0.5"], nodes=["edge-0", "edge-1"])
    return CertLayout(out)


def test_layout_has_every_file_and_private_keys_are_owner_only(certs):
    for p in (certs.ca_cert, certs.server_cert, certs.node_public_key("edge-0")):
        assert p.is_file()
    for p in (certs.ca_key, certs.server_key, certs.superexec_secret, certs.node_private_key("edge-0"),
              certs.node_private_key("edge-1")):
        assert stat.S_IMODE(p.stat().st_mode) == 0o600, p
    assert certs.node_names() == ["edge-0", "edge-1"]


def test_server_certificate_is_signed_by_the_ca_and_names_loopback_and_hosts(certs):
    ca = x509.load_pem_x509_certificate(certs.ca_cert.read_bytes())
    srv = x509.load_pem_x509_certificate(certs.server_cert.read_bytes())
    srv.verify_directly_issued_by(ca)  # raises if the signature or issuer is wrong
    assert server_sans(certs.server_cert) == (["cloud.example.org", "localhost"], ["10.0.0.5", "127.0.0.1"])
    assert ca.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    assert not srv.extensions.get_extension_for_class(x509.BasicConstraints).value.ca


def test_node_keys_are_p384_in_the_openssh_formats_flower_loads(certs):
    # flower-supernode --auth-supernode-private-key uses load_ssh_private_key(data, None)
    priv = load_ssh_private_key(certs.node_private_key("edge-0").read_bytes(), None)
    assert isinstance(priv, ec.EllipticCurvePrivateKey) and priv.curve.name == "secp384r1"
    pub = load_ssh_public_key(certs.node_public_key("edge-0").read_bytes())
    assert pub.public_numbers() == priv.public_key().public_numbers()
    assert uses_nist_ec_curve(pub)
    assert try_load_public_key(certs.node_public_key("edge-0"))  # what `flwr supernode register` runs
    other = load_ssh_private_key(certs.node_private_key("edge-1").read_bytes(), None)
    assert other.public_key().public_numbers() != pub.public_numbers()


def test_tls_handshake_on_loopback_verifies_against_the_ca(certs):
    srv_ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    srv_ctx.load_cert_chain(certs.server_cert, certs.server_key)
    with socket.socket() as lsock:
        lsock.bind(("127.0.0.1", 0))
        lsock.listen(1)
        port = lsock.getsockname()[1]

        def serve() -> None:
            conn, _ = lsock.accept()
            with srv_ctx.wrap_socket(conn, server_side=True) as s:
                s.sendall(b"ok")

        t = threading.Thread(target=serve, daemon=True)
        t.start()
        cli_ctx = ssl.create_default_context(cafile=str(certs.ca_cert))  # hostname checking on
        with socket.create_connection(("127.0.0.1", port), timeout=5) as raw, \
                cli_ctx.wrap_socket(raw, server_hostname="127.0.0.1") as s:
            assert s.recv(2) == b"ok"
        t.join(5)


def test_rerun_keeps_the_ca_and_node_keys_and_adds_what_is_new(tmp_path):
    first = generate(tmp_path, nodes=["a"])
    lay = first.layout
    ca, key_a = lay.ca_cert.read_bytes(), lay.node_private_key("a").read_bytes()
    second = generate(tmp_path, hostnames=["new.example"], nodes=["a", "b"])
    assert lay.ca_cert.read_bytes() == ca and lay.node_private_key("a").read_bytes() == key_a
    assert lay.node_private_key("b") in second.written and lay.server_cert in second.written
    assert "new.example" in server_sans(lay.server_cert)[0]
    srv = x509.load_pem_x509_certificate(lay.server_cert.read_bytes())
    srv.verify_directly_issued_by(x509.load_pem_x509_certificate(ca))
    third = generate(tmp_path, hostnames=["new.example"], nodes=["a", "b"])
    assert third.written == ()  # nothing to do
    generate(tmp_path, nodes=["a"], overwrite=True)
    assert lay.ca_cert.read_bytes() != ca and lay.node_private_key("a").read_bytes() != key_a


@pytest.mark.parametrize("kwargs, message", [
    ({"hostnames": ["bad host"]}, "hostname 'bad host'"),
    ({"ips": ["300.1.1.1"]}, "IP '300.1.1.1'"),
    ({"nodes": ["../evil"]}, "node name '../evil'"),
    ({"nodes": ["a", "a"]}, "given twice"),
    ({"days": 0}, "days must be >= 1"),
])
def test_bad_input_fails_with_one_line_naming_it_and_writes_nothing(tmp_path, kwargs, message):
    with pytest.raises(CertError, match=message.replace("(", r"\(").replace(".", r"\.")) as e:
        generate(tmp_path / "out", **kwargs)
    assert "\n" not in str(e.value)
    assert not (tmp_path / "out").exists()


def test_half_a_ca_is_refused_rather_than_silently_replaced(tmp_path):
    lay = generate(tmp_path).layout
    lay.ca_key.unlink()
    with pytest.raises(CertError, match="only one of ca.crt / ca.key"):
        generate(tmp_path)


def test_cli_writes_the_layout_and_reports_bad_input_in_one_line(tmp_path):
    fedge = str(BIN / "fedge")
    r = subprocess.run([fedge, "cloud", "certs", "--out", str(tmp_path / "c"), "-n", "edge-0", "-H", "h.example"],
                       check=False, capture_output=True, text=True, timeout=120, env=env_with())
    assert r.returncode == 0, r.stderr
    assert CertLayout(tmp_path / "c").node_names() == ["edge-0"]
    assert "--enable-supernode-auth" in r.stdout
    r = subprocess.run([fedge, "cloud", "certs", "--out", str(tmp_path / "d"), "-n", "a/b"],
                       check=False, capture_output=True, text=True, timeout=120, env=env_with())
    assert r.returncode == 2
    assert r.stderr.strip() == "fedge cloud certs: node name 'a/b': use letters, digits, '.', '_' or '-' " \
                               "(at most 63, no '/')"


@pytest.mark.integration
def test_real_superlink_accepts_a_registered_node_over_tls_and_refuses_an_unregistered_one(certs, tmp_path):
    """flower-superlink with the generated TLS files and node auth; `flwr supernode register` one node's key."""
    port = free_port()
    env = env_with({"FLWR_HOME": str(tmp_path / "flwr")})
    flwr_config(tmp_path / "flwr", "rehearsal", f"127.0.0.1:{port}", certs.ca_cert)
    link = Proc([str(BIN / "flower-superlink"), "--ssl-ca-certfile", str(certs.ca_cert),
                 "--ssl-certfile", str(certs.server_cert), "--ssl-keyfile", str(certs.server_key),
                 "--enable-supernode-auth", "--disable-runtime-dependency-installation",
                 "--host", "127.0.0.1", "--port", str(port), "--database", str(tmp_path / "link.db")],
                tmp_path / "superlink.log", env)
    procs = [link]
    try:
        wait_for(lambda: port_open(port), 60, "the SuperLink port", procs)
        reg = subprocess.run([str(BIN / "flwr"), "supernode", "register", str(certs.node_public_key("edge-0")),
                              "rehearsal", "--format", "json"], check=False, capture_output=True, text=True, env=env,
                             timeout=60)
        assert reg.returncode == 0, reg.stdout + reg.stderr
        node_id = json.loads(reg.stdout[reg.stdout.index("{"):])["node-id"]

        def supernode(name: str, key_of: CertLayout, p: int, extra: list[str]) -> Proc:
            return Proc([str(BIN / "flower-supernode"), "--superlink", f"127.0.0.1:{port}",
                         "--root-certificates", str(key_of.ca_cert),
                         "--auth-supernode-private-key", str(key_of.node_private_key(name)),
                         "--port", str(p), *extra], tmp_path / f"{name}-{p}.log", env)

        good = supernode("edge-0", certs, free_port(), [])
        procs.append(good)
        bad = supernode("edge-1", certs, free_port(), ["--max-retries", "2", "--max-wait-time", "20"])
        procs.append(bad)
        other = CertLayout(tmp_path / "other-ca")
        generate(other.root)
        stranger = Proc([str(BIN / "flower-supernode"), "--superlink", f"127.0.0.1:{port}",
                         "--root-certificates", str(other.ca_cert),  # trusts another CA: TLS must fail
                         "--auth-supernode-private-key", str(certs.node_private_key("edge-0")),
                         "--port", str(free_port()), "--max-retries", "1", "--max-wait-time", "15"],
                        tmp_path / "stranger.log", env)
        procs.append(stranger)
        wait_for(lambda: f"SuperNode ID: {node_id}" in good.text(), 90, "the registered node to connect", procs)
        wait_for(lambda: not stranger.alive(), 90, "the node trusting another CA to give up", procs)
        assert stranger.p.returncode != 0 and "SuperNode ID" not in stranger.text()
        wait_for(lambda: not bad.alive(), 90, "the unregistered node to be refused", procs)
        assert bad.p.returncode != 0
        assert "Failed to activate SuperNode" in bad.text()

        ls = subprocess.run([str(BIN / "flwr"), "supernode", "ls", "rehearsal", "--format", "json"],
                            check=False, capture_output=True, text=True, env=env, timeout=60)
        assert ls.returncode == 0, ls.stdout + ls.stderr
        nodes = json.loads(ls.stdout[ls.stdout.index("{"):])["nodes"]
        assert [(int(n["node-id"]), n["status"]) for n in nodes] == [(int(node_id), "online")]
        assert good.alive()
    finally:
        for p in reversed(procs):
            p.stop()
