"""BasePublisher: immutable, serially numbered versions whose deltas name the shard they apply to."""

from __future__ import annotations

import pytest
import torch

from fedge.cloud.publisher import BasePublisher, base_version_name
from fedge.common.manifest import generate_keypair
from fedge.common.model import build_model

KW = {"dim": 16, "num_experts": 2, "top_k": 1, "expert_hidden": 16, "num_classes": 4, "n_mels": 40,
      "precision": None}


def test_versions_are_serial_immutable_and_deltas_name_the_previous_shards(tmp_path):
    key, _ = generate_keypair(tmp_path / "keys")
    pub = BasePublisher(tmp_path / "models", key, image_size=32, audio_frames=32, onnx=False)
    m = build_model(**KW)
    first, _ = pub.publish(m, version=base_version_name(0))
    with torch.no_grad():
        m.head.fc2.weight.add_(0.01)  # only the head changes
    second, state = pub.publish(m, version=base_version_name(3))
    assert (first.serial, second.serial) == (1, 2) and second.version == "base-000003"
    (delta,) = second.shards("delta")
    assert delta.name == "head" and delta.delta_from == first.file("head", "safetensors").sha256
    # unchanged shards keep their bytes, so a device holding them downloads nothing for them
    same = [f.name for f in second.shards("safetensors") if f.sha256 == first.file(f.name, "safetensors").sha256]
    assert sorted(same) == sorted(f.name for f in first.shards("safetensors") if f.name != "head")
    assert abs(float(state["head.fc2.weight"][0, 0]) - float(m.head.fc2.weight[0, 0])) < 1e-3
    with pytest.raises(FileExistsError, match="already exists"):
        pub.publish(m, version=base_version_name(3))


def test_cloud_train_with_publish_and_no_signing_key_fails_in_one_line_before_ray(tmp_path):
    import typer
    from typer.testing import CliRunner

    from fedge.cloud.cli.train import train_command

    app = typer.Typer()
    app.command()(train_command)
    r = CliRunner().invoke(app, ["--publish", str(tmp_path / "models"), "--key", str(tmp_path / "none.key")])
    assert r.exit_code == 2
    assert "signing key file not found" in r.output
