"""File names of a deployment's certificates and keys, written by the cloud and read by devices."""

from __future__ import annotations

# `fedge cloud certs` (fedge.cloud.certs.CertLayout): under its root folder
CA_CERT = "ca.crt"
CA_KEY = "ca.key"
SERVER_CERT = "superlink.crt"  # also the shard server's HTTPS certificate
SERVER_KEY = "superlink.key"
SUPEREXEC_SECRET = "superexec.secret"
NODES_DIR = "supernodes"  # one folder per SuperNode, holding:
NODE_PRIVATE_KEY = "auth.key"  # what `fedge edge run --auth-keys DIR` looks for
NODE_PUBLIC_KEY = "auth.pub"

# The Ed25519 key pair that signs shard manifests (fedge.common.manifest.generate_keypair)
SIGNING_KEY_STEM = "manifest"
SIGNING_PRIVATE_KEY = SIGNING_KEY_STEM + ".key"
SIGNING_PUBLIC_KEY = SIGNING_KEY_STEM + ".pub"
SIGNING_DIR = ".signing"  # in a model store: the key pair a single-host publisher generated

__all__ = [
    "CA_CERT",
    "CA_KEY",
    "NODES_DIR",
    "NODE_PRIVATE_KEY",
    "NODE_PUBLIC_KEY",
    "SERVER_CERT",
    "SERVER_KEY",
    "SIGNING_DIR",
    "SIGNING_KEY_STEM",
    "SIGNING_PRIVATE_KEY",
    "SIGNING_PUBLIC_KEY",
    "SUPEREXEC_SECRET",
]
