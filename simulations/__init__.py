"""Local federations on one machine: AV-digits device streams -> edge ingest -> stores -> fedge on Flower + Ray.

Modules: :mod:`avdigits` (the data set and its renderer), :mod:`prepare` (render + ingest, cached),
:mod:`stores` (glue to the edge ingest and store), :mod:`runner` (``run_simulation`` of fedge's apps),
:mod:`cluster` (joining an existing Ray cluster),
:mod:`report` (plots, TensorBoard, Markdown), :mod:`compare` (two settings, same data), :mod:`evaluation`,
:mod:`flower_baseline` (plain Flower FedAvg peer for benchmarks), :mod:`cli` (``fedge simulate``).
"""

__all__ = ["avdigits", "cli", "cluster", "compare", "evaluation", "flower_baseline", "prepare", "report", "runner", "stores"]
