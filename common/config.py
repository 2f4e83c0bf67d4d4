"""Typed, validated run configuration: Flower run config (flat dotted keys) -> TOML file -> CLI overrides.

The shape mirrors the brief's framework config (``modal_types``, per-modality ``precision``,
``communication``, ``fault_tolerance``) plus the sections fedge itself needs. Every section is a frozen
dataclass validated in ``__post_init__``; unknown keys and bad values raise :class:`ConfigError` naming the
dotted key. Modules never read this object whole: entry points pass flat keyword arguments on.

The sections live by concept in :mod:`~fedge.common.config_learning` (model and training),
:mod:`~fedge.common.config_federation` (communication, aggregation, DP), :mod:`~fedge.common.config_data` (data,
simulation, device profiles) and :mod:`~fedge.common.config_services` (shards, publishing, dashboard), the
generic loading in :mod:`~fedge.common.config_load`. This module assembles the whole run config and re-exports
every public name, so ``from fedge.common.config import X`` is the one import the rest of fedge needs.
"""

from __future__ import annotations

import dataclasses
import json
import os
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fedge.common.config_check import ConfigError, check
from fedge.common.config_data import DataConfig, ProfilesConfig, SimulationConfig
from fedge.common.config_federation import (
    SERVER_OPTS,
    STALENESS_FNS,
    AggregationConfig,
    CommunicationConfig,
    FaultToleranceConfig,
    PrivacyConfig,
)
from fedge.common.config_learning import (
    LR_SCHEDULES,
    MODALITIES,
    PRECISIONS,
    SCOPES,
    ImportanceConfig,
    ModelConfig,
    PrecisionConfig,
    TrainConfig,
    TrainingConfig,
)
from fedge.common.config_load import build, flatten, merge, nest, parse_overrides, render_toml
from fedge.common.config_services import DashboardConfig, PublishConfig, ShardsConfig

__all__ = [
    "LR_SCHEDULES",
    "MODALITIES",
    "PRECISIONS",
    "REMOVED_KEYS",
    "RUNS_DIR_ENV",
    "SCOPES",
    "SERVER_OPTS",
    "STALENESS_FNS",
    "AggregationConfig",
    "CommunicationConfig",
    "ConfigError",
    "DashboardConfig",
    "DataConfig",
    "FaultToleranceConfig",
    "FedgeConfig",
    "ImportanceConfig",
    "ModelConfig",
    "PrecisionConfig",
    "PrivacyConfig",
    "ProfilesConfig",
    "PublishConfig",
    "ShardsConfig",
    "SimulationConfig",
    "TrainConfig",
    "TrainingConfig",
    "config_from_context",
    "default_run_dir",
    "load_config",
    "parse_overrides",
]


@dataclass(frozen=True)
class FedgeConfig:
    """The whole run config."""

    modal_types: tuple[str, ...] = MODALITIES
    seed: int = 0
    run_dir: str = ""
    precision: PrecisionConfig = field(default_factory=PrecisionConfig)
    communication: CommunicationConfig = field(default_factory=CommunicationConfig)
    fault_tolerance: FaultToleranceConfig = field(default_factory=FaultToleranceConfig)
    aggregation: AggregationConfig = field(default_factory=AggregationConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    dp: PrivacyConfig = field(default_factory=PrivacyConfig)
    importance: ImportanceConfig = field(default_factory=ImportanceConfig)
    data: DataConfig = field(default_factory=DataConfig)
    training: TrainingConfig = field(default_factory=TrainingConfig)
    simulation: SimulationConfig = field(default_factory=SimulationConfig)
    profiles: ProfilesConfig = field(default_factory=ProfilesConfig)
    shards: ShardsConfig = field(default_factory=ShardsConfig)
    publish: PublishConfig = field(default_factory=PublishConfig)
    dashboard: DashboardConfig = field(default_factory=DashboardConfig)

    def __post_init__(self) -> None:
        mt = self.modal_types
        if isinstance(mt, str):
            mt = tuple(s.strip() for s in mt.split(",") if s.strip())
            object.__setattr__(self, "modal_types", mt)
        check(len(mt) > 0, "modal_types", "must name at least one modality")
        for m in mt:
            check(m in MODALITIES, "modal_types", f"unknown modality {m!r}; known: {MODALITIES}")
        check(len(set(mt)) == len(mt), "modal_types", "lists a modality twice")

    # ------------------------------------------------------------------ conversions
    def to_flat(self) -> dict[str, Any]:
        """Flat dotted keys with Flower-compatible scalar values (tuples become comma-joined strings)."""
        out: dict[str, Any] = {}
        for key, value in flatten(dataclasses.asdict(self)).items():
            out[key] = ",".join(value) if isinstance(value, (list, tuple)) else value
        return out

    def to_toml(self) -> str:
        """A TOML document that :func:`load_config` reads back to an equal config."""
        return render_toml(self.to_flat())

    def save(self, run_dir: str | Path) -> Path:
        """Write the resolved config into ``run_dir/config.toml`` (and .json) and return the TOML path."""
        d = Path(run_dir)
        d.mkdir(parents=True, exist_ok=True)
        (d / "config.json").write_text(json.dumps(self.to_flat(), indent=2, sort_keys=True))
        path = d / "config.toml"
        path.write_text(self.to_toml())
        return path


RUNS_DIR_ENV = "FEDGE_RUNS_DIR"


def default_run_dir(run_id: int | str) -> Path:
    """Where a ServerApp started without ``run_dir`` keeps its record (config, metrics, events, checkpoints,
    bases): ``$FEDGE_RUNS_DIR/run-<run_id>``, by default under ``~/.fedge/runs``."""
    root = os.environ.get(RUNS_DIR_ENV) or str(Path.home() / ".fedge" / "runs")
    return Path(root).expanduser().resolve() / f"run-{run_id}"


# keys that once existed and changed nothing: an old config that sets them still loads, with a warning
REMOVED_KEYS = {"fault_tolerance.recovery_time_s": "it was a target, never a setting"}


def load_config(
    run_config: Mapping[str, Any] | None = None,
    toml_path: str | Path | None = None,
    overrides: Mapping[str, Any] | None = None,
) -> FedgeConfig:
    """Resolve a config from Flower's flat run config, then a TOML file, then flat overrides (in that order).

    Raises
    ------
    ConfigError
        On an unknown key or a bad value; the message names the dotted key.
    FileNotFoundError
        When ``toml_path`` does not exist.
    """
    tree: dict[str, Any] = {}
    if run_config:
        tree = merge(tree, nest(run_config))
    if toml_path is not None:
        p = Path(toml_path)
        if not p.is_file():
            raise FileNotFoundError(f"config file not found: {p}")
        try:
            tree = merge(tree, tomllib.loads(p.read_text()))
        except tomllib.TOMLDecodeError as e:
            raise ConfigError(f"config file {p}: not valid TOML: {e}") from None
    if overrides:
        tree = merge(tree, nest(overrides))
    return build(FedgeConfig, tree, "", REMOVED_KEYS)


def config_from_context(run_config: Mapping[str, Any]) -> FedgeConfig:
    """The config of a Flower run: ``context.run_config`` overlaid by ``$FEDGE_RUN_CONFIG`` (a TOML path).

    ``fedge simulate`` resolves its scenario into a TOML file and points the variable at it, because
    ``run_simulation`` carries no run config; ``flwr run`` users set keys with ``--run-config``.
    """
    extra = os.environ.get("FEDGE_RUN_CONFIG")
    return load_config(run_config=run_config, toml_path=extra or None)
