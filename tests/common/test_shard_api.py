"""The shard API contract: paths built from the route templates, bearer credentials, one definition shared by
the shard server and the device cache."""

import ast
import types
import urllib.parse
from pathlib import Path

import pytest

from fedge.common import pki_files, shard_api
from fedge.common.shard_api import (
    MANIFEST_ROUTE,
    MODELS_ROUTE,
    PREDICT_ROUTE,
    SHARD_ROUTE,
    bearer,
    bearer_token,
    manifest_path,
    sha256_etag,
    shard_path,
)

ROOT = Path(__file__).resolve().parents[2]
# the modules on either side of the contract: none may spell a route, header or file name of its own
SIDES = ("cloud/serving.py", "edge/shards.py", "edge/shard_download.py", "edge/base_fetch.py", "edge/agent.py",
         "cloud/certs.py", "cloud/model_store.py")
CONTRACT_WORDS = ("/v1", "Bearer", "Authorization", "X-Fedge", "x-fedge", "application/")


def test_manifest_path_fills_the_version_into_the_route():
    assert manifest_path("v3") == "/v1/models/v3/manifest"
    assert manifest_path("latest") == "/v1/models/latest/manifest"


def test_shard_path_quotes_version_and_file():
    assert shard_path("v3", "expert.0.onnx") == "/v1/models/v3/shards/expert.0.onnx"
    assert shard_path("v 3", "a b.onnx") == "/v1/models/v%203/shards/a%20b.onnx"


def test_paths_match_the_routes_the_server_registers():
    routing = pytest.importorskip("starlette.routing")
    manifest_re, _, _ = routing.compile_path(MANIFEST_ROUTE)
    shard_re, _, _ = routing.compile_path(SHARD_ROUTE)
    m = manifest_re.match(manifest_path("v 3"))
    assert m and urllib.parse.unquote(m["version"]) == "v 3"
    m = shard_re.match(shard_path("v3", "head.safetensors"))
    assert m and (m["version"], m["file"]) == ("v3", "head.safetensors")


def test_bearer_token_round_trips_and_rejects_other_schemes():
    assert bearer("tok") == "Bearer tok"
    assert bearer_token(bearer("tok")) == "tok"
    assert bearer_token("Basic dG9r") is None
    assert bearer_token("bearer tok") is None  # the scheme is compared as sent, as before
    assert bearer_token("") is None


def test_etag_is_the_quoted_sha256():
    assert sha256_etag("ab" * 32) == f'"{"ab" * 32}"'


def test_modules_export_every_public_name():
    for mod in (shard_api, pki_files):
        public = {n for n, v in vars(mod).items()
                  if not n.startswith("_") and not isinstance(v, types.ModuleType) and n != "annotations"}
        assert sorted(mod.__all__) == sorted(public)


def _code_strings(path: Path) -> list[str]:
    """Every string literal of a module's code (f-string parts included), docstrings left out."""
    tree = ast.parse(path.read_text(), filename=str(path))
    docstrings = set()
    for node in ast.walk(tree):
        if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)) and node.body:
            first = node.body[0]
            if isinstance(first, ast.Expr) and isinstance(first.value, ast.Constant):
                docstrings.add(id(first.value))
    return [n.value for n in ast.walk(tree)
            if isinstance(n, ast.Constant) and isinstance(n.value, str) and id(n) not in docstrings]


def _contract_names() -> set[str]:
    names = {getattr(shard_api, n) for n in shard_api.__all__} | {getattr(pki_files, n) for n in pki_files.__all__}
    return {v for v in names if isinstance(v, str) and v != shard_api.LATEST}


@pytest.mark.parametrize("side", SIDES)
def test_no_side_spells_a_route_header_or_file_name_itself(side):
    names = _contract_names()
    strings = _code_strings(ROOT / side)
    bad = [s for s in strings if s in names or any(w in s for w in CONTRACT_WORDS)]
    assert not bad, f"{side} spells contract names itself: {bad}"


def test_server_routes_and_device_requests_come_from_the_contract():
    # a side is one module or several (the device cache and its HTTP download)
    for side, used in ((("cloud/serving.py",), {"MODELS_ROUTE", "MANIFEST_ROUTE", "SHARD_ROUTE", "PREDICT_ROUTE",
                                                 "DEVICE_HEADER", "AUTH_HEADER", "bearer_token", "sha256_etag"}),
                       (("edge/shards.py", "edge/shard_download.py"),
                        {"manifest_path", "shard_path", "DEVICE_HEADER", "AUTH_HEADER", "bearer", "sha256_etag",
                         "CREDENTIAL_HEADERS"})):
        imported = {a.name for f in side for n in ast.walk(ast.parse((ROOT / f).read_text()))
                    if isinstance(n, ast.ImportFrom) and n.module == "fedge.common.shard_api" for a in n.names}
        assert used <= imported, f"{side} does not take {sorted(used - imported)} from fedge.common.shard_api"


def test_serve_app_registers_exactly_the_contract_routes():
    pytest.importorskip("ray.serve")
    from fedge.cloud.serving import api

    assert set(api.openapi()["paths"]) == {MODELS_ROUTE, MANIFEST_ROUTE, SHARD_ROUTE, PREDICT_ROUTE}
