"""The federation's base as the server keeps it: published once per base version for devices, and replaced by
global training on Ray Train every ``training.every_versions`` versions."""

from __future__ import annotations

import logging
import math
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from fedge.common.base_weights import save_base
from fedge.common.config import FedgeConfig
from fedge.common.lora import base_state, load_base_state
from fedge.common.model import MultimodalMoE, model_kwargs
from fedge.common.run_log import Event

from .builders import publisher_for
from .dashboard import LiveEvent, LiveState
from .run_log import event

__all__ = ["BASES_SUBDIR", "PublishedBase"]

log = logging.getLogger("fedge.server")

BASES_SUBDIR = "bases"  # a copy of each published base, for `fedge evaluate RUN_DIR` (common/evaluate_cli.py)


class PublishedBase:
    """The base the global adapters belong to, as devices fetch it, and the global training runs that replace it.

    Built at the start of a run: a resumed run whose aggregator holds a trained base publishes and loads it; a
    run that publishes at all publishes the config's base as version 0, so that the next base reaches devices
    as deltas.
    """

    def __init__(self, cfg: FedgeConfig, *, actor: Any, model: MultimodalMoE, run_dir: Path | None,
                 live: LiveState, version: int) -> None:
        import ray

        self.cfg, self.actor, self.model, self.run_dir, self.live = cfg, actor, model, run_dir, live
        # the published base (model store version) the current version's adapters belong to, as devices fetch
        # it; "" = the config's base, which every party builds itself. Global training publishes a new one.
        self.base_model = ""
        self.last_trained = version
        base_version, base = ray.get(actor.get_base.remote())
        publishing = cfg.training.every_versions > 0 or bool(cfg.publish.store) or base is not None
        self.publisher = publisher_for(cfg, run_dir) if publishing else None
        if base is not None:  # resumed after a global training: devices and the evaluation need its base
            self.install(base_version, self.publish(base_version, base))
        elif self.publisher is not None:  # devices start from it, so that the next base reaches them as deltas
            self.install(0, self.publish(0, {k: v.numpy() for k, v in base_state(self.model).items()}))

    def maybe_train(self, v: int, params: dict[str, np.ndarray]) -> int | None:
        """Every ``training.every_versions`` versions: global training on Ray Train, then a new base; returns the
        version that holds fresh adapters for it, or None (not due, or failed).

        The newest adapters ``params`` are merged into the base, the whole model trains on the cloud's data
        (``training.data_path`` or generated), and the aggregator is rebased: the next version holds fresh
        adapters for the new base, updates trained on the old base are refused as ``unknown_version``, and
        the new base is published (:mod:`fedge.cloud.publisher`) and every later message names it
        (``wire.BASE_MODEL``): devices fetch it from the shard server. The loop waits for it;
        with a virtual clock it costs no virtual time. A failed training run is reported and the federation
        goes on with the old base.
        """
        tr = self.cfg.training
        if tr.every_versions <= 0:  # on demand only (the default)
            return None
        from .training import TrainingError, run_global_training, training_due

        if not training_due(v, tr.every_versions, self.last_trained):
            return None
        import ray

        self.last_trained = v
        print(f"[fedge] global training on version {v} ({tr.steps} steps, {tr.workers} Ray Train worker(s))",
              flush=True)
        over: dict[str, Any] = {}
        free = float(ray.available_resources().get("CPU", 0.0))
        if tr.workers * tr.cpus_per_worker > free:  # e.g. a simulation's nodes hold the CPUs: share them
            over["cpus_per_worker"] = 0.0
        try:
            res = run_global_training(self.cfg, base_state(self.model), params, base_version=v, **over)
        except TrainingError as e:
            log.error("global training on version %d failed, keeping the base: %s", v, e)
            event(self.run_dir, event=Event.GLOBAL_TRAINING_FAILED, version=v, error=str(e)[:500])
            self.live.event(LiveEvent.TRAINING_FAILED, version=v, error=str(e)[:500])
            return None
        base, bv, fresh = res.rebase_args()
        try:
            base = self.publish(bv, base)  # the weights devices rebuild: the server rebases on exactly those
        except (OSError, ValueError, RuntimeError) as e:  # e.g. a full disk, an export that disagrees
            log.error("publishing the base trained on version %d failed, keeping the old base: %s", v, e)
            event(self.run_dir, event=Event.PUBLISH_FAILED, version=v, error=str(e)[:500])
            return None
        new_v = int(ray.get(self.actor.rebase.remote(base, bv, adapters=fresh)))
        path = self.install(bv, base)
        self.last_trained = new_v
        loss = (res.first_loss(), res.last_loss()) if res.metrics else (math.nan, math.nan)
        event(self.run_dir, event=Event.GLOBAL_TRAINING, base_version=bv, version=new_v, steps=res.steps,
              seconds=res.seconds, loss_first=loss[0], loss_last=loss[1], base=path,
              failures=len(res.failures))
        self.live.event(LiveEvent.TRAINING, base_version=bv, version=new_v, steps=res.steps, seconds=res.seconds,
                        loss_first=loss[0], loss_last=loss[1])
        print(f"[fedge] global training: {res.steps} steps in {res.seconds:.1f} s, loss {loss[0]:.3f} -> "
              f"{loss[1]:.3f}; base {bv} -> version {new_v}", flush=True)
        return new_v

    def publish(self, base_version: int, base: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Publish ``base`` as the store version of ``base_version`` (once) and name it in later messages.

        Returns the weights devices rebuild from the store: ``base``, except that a shard published as a delta
        against the previous base holds previous + decoded delta (within half a quantization step of the
        change); a version already in the store (a resumed run) is read back as published.
        """
        assert self.publisher is not None
        from .export import load_state_from_shards
        from .publisher import base_version_name, plain_from_state

        name = base_version_name(base_version)
        have = self.publisher.published(name)
        if have is not None:
            state = load_state_from_shards(self.publisher.store.version_dir(name), have)
            self.base_model = name
            return {k: v.numpy() for k, v in state.items()}
        t0 = time.monotonic()
        manifest, published = self.publisher.publish(plain_from_state(base, model_kwargs(self.cfg)), version=name)
        seconds = time.monotonic() - t0
        deltas = manifest.shards("delta")
        event(self.run_dir, event=Event.PUBLISHED, base_version=base_version, model=name, serial=manifest.serial,
              store=str(self.publisher.store.root), seconds=seconds,
              training_bytes=manifest.total_bytes("safetensors"), delta_bytes=manifest.total_bytes("delta"),
              deltas=len(deltas))
        print(f"[fedge] published base {name} (serial {manifest.serial}) in {seconds:.1f} s: "
              f"{manifest.total_bytes('safetensors')} training bytes, {len(deltas)} deltas of "
              f"{manifest.total_bytes('delta')} bytes", flush=True)
        self.base_model = name
        return published

    def install(self, base_version: int, base: dict[str, np.ndarray]) -> str:
        """Load ``base`` into the evaluation model; return the published version devices fetch it as.

        A copy goes to ``<run_dir>/bases/<version>.safetensors`` too: ``fedge evaluate RUN_DIR`` scores the final
        adapters on the newest base there."""
        load_base_state(self.model, {k: torch.from_numpy(np.array(a, dtype=np.float32)) for k, a in base.items()})
        if self.run_dir and self.base_model:
            path = self.run_dir / BASES_SUBDIR / f"{self.base_model}.safetensors"
            if not path.is_file():
                save_base(self.model, path)
        self.live.event(LiveEvent.PUBLISHED, base_version=base_version, model=self.base_model)
        return self.base_model
