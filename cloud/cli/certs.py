"""``fedge cloud certs``: a deployment's CA, SuperLink TLS certificate and SuperNode authentication keys
(:func:`fedge.cloud.certs.generate`)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from fedge.cloud.certs import CertError, generate

__all__ = ["certs_command"]


def certs_command(
    out: Annotated[Path, typer.Option("--out", "-o", help="Folder to write into (created if missing).")] = Path(
        "certs"),
    hostname: Annotated[list[str] | None, typer.Option(
        "--hostname", "-H", help="Extra DNS name of the SuperLink / shard server (repeatable); localhost is "
        "always included.")] = None,
    ip: Annotated[list[str] | None, typer.Option(
        "--ip", help="Extra IP address of the SuperLink (repeatable); 127.0.0.1 is always included.")] = None,
    node: Annotated[list[str] | None, typer.Option(
        "--node", "-n", help="SuperNode name to create an ECDSA P-384 authentication key pair for "
        "(repeatable).")] = None,
    days: Annotated[int, typer.Option("--days", min=1, help="Validity of the CA and server certificates.")] = 365,
    overwrite: Annotated[bool, typer.Option("--overwrite", help="Replace existing files (a new CA invalidates "
                                            "every certificate issued before).")] = False,
) -> None:
    """Generate a CA, the SuperLink TLS certificate and SuperNode authentication keys (Flower's formats).

    Layout: OUT/ca.crt, OUT/superlink.{crt,key}, OUT/supernodes/NAME/auth.{key,pub}. Re-running with more
    --node or --hostname adds to the folder and keeps the CA.
    """
    try:
        res = generate(out, hostnames=hostname or [], ips=ip or [], nodes=node or [], days=days,
                       overwrite=overwrite)
    except CertError as e:
        typer.echo(f"fedge cloud certs: {e}", err=True)
        raise typer.Exit(2) from None
    for p in res.written:
        typer.echo(f"wrote {p}")
    for p in res.kept:
        typer.echo(f"kept  {p}")
    lay = res.layout
    typer.echo(f"SuperLink: flower-superlink --ssl-ca-certfile {lay.ca_cert} --ssl-certfile {lay.server_cert} "
               f"--ssl-keyfile {lay.server_key} --enable-supernode-auth")
    for n in lay.node_names():
        typer.echo(f"node {n}: register {lay.node_public_key(n)}; run with --root-certificates {lay.ca_cert} "
                   f"--auth-keys {lay.node_dir(n)}")
