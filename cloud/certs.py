"""Certificates and keys for a deployment: a CA, the SuperLink's TLS certificate, SuperNode authentication keys.

Flower 1.42 reads them in these formats (checked against its sources):

- ``flower-superlink --ssl-ca-certfile --ssl-certfile --ssl-keyfile``: PEM CA certificate, PEM server
  certificate, PEM private key (PKCS#8, unencrypted). A SuperNode checks the server certificate against the CA
  given by ``--root-certificates`` and the address it dials must be one of the certificate's SANs, so the
  certificate always carries ``IP:127.0.0.1`` and ``DNS:localhost`` plus the hostnames and IPs asked for.
- ``--superexec-auth-secret-file`` (SuperLink with ``--isolation process`` and its separate ``flower-superexec``):
  raw bytes, not empty; fedge writes 64 hex characters.
- ``flower-supernode --auth-supernode-private-key``: an OpenSSH private key (``load_ssh_private_key``) on a
  NIST elliptic curve; ``flwr supernode register`` reads the matching OpenSSH public key
  (``load_ssh_public_key``). fedge uses ECDSA P-384 for both.

The same server certificate serves the shard server's HTTPS (its SANs name the cloud host). Private keys are
written with mode 0600; nothing is overwritten unless asked.
"""

from __future__ import annotations

import datetime as dt
import ipaddress
import re
import secrets
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from fedge.common.fsio import atomic_write
from fedge.common.pki_files import (
    CA_CERT,
    CA_KEY,
    NODE_PRIVATE_KEY,
    NODE_PUBLIC_KEY,
    NODES_DIR,
    SERVER_CERT,
    SERVER_KEY,
    SUPEREXEC_SECRET,
)

__all__ = [
    "DEFAULT_HOSTS",
    "DEFAULT_IPS",
    "HOSTNAME",
    "NODE_NAME",
    "CertError",
    "CertLayout",
    "Generated",
    "generate",
    "make_ca",
    "make_node_keys",
    "make_server_cert",
    "server_sans",
]

NODE_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,62}$")
HOSTNAME = re.compile(r"^(?=.{1,253}$)([A-Za-z0-9*]([A-Za-z0-9-]{0,61}[A-Za-z0-9])?)(\.[A-Za-z0-9]([A-Za-z0-9-]{0,61}[A-Za-z0-9])?)*$")
DEFAULT_HOSTS: tuple[str, ...] = ("localhost",)
DEFAULT_IPS: tuple[str, ...] = ("127.0.0.1",)


class CertError(ValueError):
    """Bad input to certificate generation (a name, a hostname, an existing file); the message says which."""


@dataclass(frozen=True)
class CertLayout:
    """Where :func:`generate` puts each file under ``root`` (the layout every deploy/ file assumes).

    ``root/ca.crt``, ``root/ca.key``, ``root/superlink.crt``, ``root/superlink.key``, ``root/superexec.secret``
    and, per SuperNode,
    ``root/supernodes/<name>/auth.key`` (OpenSSH private) and ``auth.pub`` (OpenSSH public).
    """

    root: Path

    @property
    def ca_cert(self) -> Path:
        """PEM certificate of the CA: ``--ssl-ca-certfile`` (SuperLink), ``--root-certificates`` (SuperNode)."""
        return self.root / CA_CERT

    @property
    def ca_key(self) -> Path:
        """PEM private key of the CA (keep it offline once the certificates are issued)."""
        return self.root / CA_KEY

    @property
    def server_cert(self) -> Path:
        """PEM server certificate: ``flower-superlink --ssl-certfile`` and the shard server's HTTPS."""
        return self.root / SERVER_CERT

    @property
    def server_key(self) -> Path:
        """PEM (PKCS#8) server private key: ``flower-superlink --ssl-keyfile``."""
        return self.root / SERVER_KEY

    @property
    def superexec_secret(self) -> Path:
        """Shared secret of SuperLink and a separate SuperExec (``--superexec-auth-secret-file``, process isolation)."""
        return self.root / SUPEREXEC_SECRET

    @property
    def nodes_dir(self) -> Path:
        """Folder holding one sub-folder of authentication keys per SuperNode."""
        return self.root / NODES_DIR

    def node_dir(self, name: str) -> Path:
        """The key folder of SuperNode ``name`` (what ``fedge edge run --auth-keys`` takes)."""
        return self.nodes_dir / name

    def node_private_key(self, name: str) -> Path:
        """OpenSSH ECDSA P-384 private key: ``flower-supernode --auth-supernode-private-key``."""
        return self.node_dir(name) / NODE_PRIVATE_KEY

    def node_public_key(self, name: str) -> Path:
        """OpenSSH public key: ``flwr supernode register``."""
        return self.node_dir(name) / NODE_PUBLIC_KEY

    def node_names(self) -> list[str]:
        """Names of the SuperNodes that have a key pair here, sorted."""
        if not self.nodes_dir.is_dir():
            return []
        return sorted(p.name for p in self.nodes_dir.iterdir() if (p / NODE_PUBLIC_KEY).is_file())


@dataclass(frozen=True)
class Generated:
    """What one :func:`generate` call wrote (paths), for printing and tests."""

    layout: CertLayout
    written: tuple[Path, ...]
    kept: tuple[Path, ...]


def _check_names(hostnames: Sequence[str], ips: Sequence[str], nodes: Sequence[str]) -> None:
    for h in hostnames:
        if not HOSTNAME.match(h):
            raise CertError(f"hostname {h!r} is not a valid DNS name")
    for ip in ips:
        try:
            ipaddress.ip_address(ip)
        except ValueError:
            raise CertError(f"IP {ip!r} is not an IPv4 or IPv6 address") from None
    for n in nodes:
        if not NODE_NAME.match(n):
            raise CertError(f"node name {n!r}: use letters, digits, '.', '_' or '-' (at most 63, no '/')")
    if len(set(nodes)) != len(nodes):
        raise CertError("a node name is given twice")


def _write(path: Path, data: bytes, private: bool) -> None:
    """Write atomically; private keys get mode 0600 from the start (never world-readable, not even briefly)."""
    atomic_write(path, data, mode=0o600 if private else 0o644)


def _name(cn: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.ORGANIZATION_NAME, "fedge"),
                      x509.NameAttribute(NameOID.COMMON_NAME, cn)])


def _pem_key(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())


def _load_ca(layout: CertLayout) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
    cert = x509.load_pem_x509_certificate(layout.ca_cert.read_bytes())
    key = serialization.load_pem_private_key(layout.ca_key.read_bytes(), password=None)
    if not isinstance(key, ec.EllipticCurvePrivateKey):
        raise CertError(f"{layout.ca_key}: the CA key is not an EC key")
    return cert, key


def make_ca(days: int, now: dt.datetime) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
    """A self-signed CA certificate (P-384, SHA-384) allowed to sign only end-entity certificates."""
    key = ec.generate_private_key(ec.SECP384R1())
    name = _name("fedge CA")
    cert = (
        x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5)).not_valid_after(now + dt.timedelta(days=days))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(x509.KeyUsage(digital_signature=True, key_cert_sign=True, crl_sign=True,
                                     content_commitment=False, key_encipherment=False, data_encipherment=False,
                                     key_agreement=False, encipher_only=False, decipher_only=False), critical=True)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .sign(key, hashes.SHA384())
    )
    return cert, key


def make_server_cert(
    ca_cert: x509.Certificate, ca_key: ec.EllipticCurvePrivateKey, *, hostnames: Sequence[str],
    ips: Sequence[str], days: int, now: dt.datetime,
) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
    """A TLS server certificate signed by the CA whose SANs are ``hostnames`` (DNS) and ``ips`` (IP)."""
    key = ec.generate_private_key(ec.SECP384R1())
    sans: list[x509.GeneralName] = [x509.DNSName(h) for h in hostnames]
    sans += [x509.IPAddress(ipaddress.ip_address(ip)) for ip in ips]
    cn = hostnames[0] if hostnames else ips[0]
    cert = (
        x509.CertificateBuilder().subject_name(_name(cn)).issuer_name(ca_cert.subject)
        .public_key(key.public_key()).serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5)).not_valid_after(now + dt.timedelta(days=days))
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.SubjectAlternativeName(sans), critical=False)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .add_extension(x509.KeyUsage(digital_signature=True, key_cert_sign=False, crl_sign=False,
                                     content_commitment=False, key_encipherment=False, data_encipherment=False,
                                     key_agreement=True, encipher_only=False, decipher_only=False), critical=True)
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), critical=False)
        .sign(ca_key, hashes.SHA384())
    )
    return cert, key


def make_node_keys(name: str) -> tuple[bytes, bytes]:
    """An ECDSA P-384 key pair as (OpenSSH private key, OpenSSH public key line with ``name`` as comment)."""
    key = ec.generate_private_key(ec.SECP384R1())
    private = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.OpenSSH,
                                serialization.NoEncryption())
    public = key.public_key().public_bytes(serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH)
    return private, public + f" fedge-{name}\n".encode()


def generate(
    out_dir: str | Path,
    *,
    hostnames: Sequence[str] = (),
    ips: Sequence[str] = (),
    nodes: Sequence[str] = (),
    days: int = 365,
    overwrite: bool = False,
) -> Generated:
    """Create (or complete) a certificate folder for one deployment.

    Parameters
    ----------
    out_dir
        Folder to write into (see :class:`CertLayout`).
    hostnames, ips
        Extra SANs of the server certificate, on top of ``localhost`` and ``127.0.0.1``.
    nodes
        SuperNode names to create authentication key pairs for.
    days
        Validity of the CA and server certificates.
    overwrite
        Replace existing files. Without it an existing CA is reused (so that adding a node or a hostname later
        keeps every issued certificate valid), an existing node key pair is kept, and the server certificate is
        re-issued only when its SANs differ from those asked for.

    Raises
    ------
    CertError
        A hostname, IP or node name is invalid, ``days`` is not positive, or only half of the CA exists.
    """
    if days < 1:
        raise CertError(f"days must be >= 1, got {days}")
    hosts = list(dict.fromkeys([*DEFAULT_HOSTS, *hostnames]))
    addrs = list(dict.fromkeys([*DEFAULT_IPS, *ips]))
    _check_names(hosts, addrs, list(nodes))
    layout = CertLayout(Path(out_dir))
    now = dt.datetime.now(dt.UTC)
    written: list[Path] = []
    kept: list[Path] = []

    has_cert, has_key = layout.ca_cert.exists(), layout.ca_key.exists()
    if has_cert != has_key and not overwrite:
        raise CertError(f"{layout.root}: found only one of {CA_CERT} / {CA_KEY}; pass overwrite to start afresh")
    new_ca = overwrite or not has_cert
    if new_ca:
        ca_cert, ca_key = make_ca(days, now)
        _write(layout.ca_key, _pem_key(ca_key), private=True)
        _write(layout.ca_cert, ca_cert.public_bytes(serialization.Encoding.PEM), private=False)
        written += [layout.ca_cert, layout.ca_key]
    else:
        ca_cert, ca_key = _load_ca(layout)
        kept += [layout.ca_cert, layout.ca_key]

    if overwrite or not layout.superexec_secret.exists():
        _write(layout.superexec_secret, secrets.token_hex(32).encode(), private=True)
        written.append(layout.superexec_secret)
    else:
        kept.append(layout.superexec_secret)

    want = (sorted(hosts), sorted(addrs))
    if new_ca or not layout.server_cert.exists() or not layout.server_key.exists() \
            or server_sans(layout.server_cert) != want:
        cert, key = make_server_cert(ca_cert, ca_key, hostnames=hosts, ips=addrs, days=days, now=now)
        _write(layout.server_key, _pem_key(key), private=True)
        _write(layout.server_cert, cert.public_bytes(serialization.Encoding.PEM), private=False)
        written += [layout.server_cert, layout.server_key]
    else:
        kept += [layout.server_cert, layout.server_key]

    for n in nodes:
        priv_path, pub_path = layout.node_private_key(n), layout.node_public_key(n)
        if priv_path.exists() and pub_path.exists() and not overwrite:
            kept += [priv_path, pub_path]
            continue
        private, public = make_node_keys(n)
        _write(priv_path, private, private=True)
        _write(pub_path, public, private=False)
        written += [priv_path, pub_path]
    return Generated(layout=layout, written=tuple(written), kept=tuple(kept))


def server_sans(cert_path: str | Path) -> tuple[list[str], list[str]]:
    """The (DNS names, IP addresses) a PEM certificate is valid for, each sorted."""
    cert = x509.load_pem_x509_certificate(Path(cert_path).read_bytes())
    try:
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        return [], []
    return (sorted(san.get_values_for_type(x509.DNSName)),
            sorted(str(ip) for ip in san.get_values_for_type(x509.IPAddress)))

