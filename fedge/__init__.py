"""fedge: edge-cloud federated training of multimodal mixture-of-experts models.

Subpackages: :mod:`fedge.common` (model, codec, wire contract, config; every side needs it), :mod:`fedge.edge`
(the device: ingest, ClientApp, agent; never Ray), :mod:`fedge.cloud` (aggregator, trainer, shard server) and
:mod:`fedge.simulations` (whole federations on one machine).
"""

from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

try:
    __version__ = version("fedge")
except PackageNotFoundError:  # a source tree or a Flower app bundle run without the distribution installed
    __version__ = "0+unknown"

# An installed wheel holds the subpackages inside this folder. A source tree (an editable install, a checkout on
# sys.path) and the Flower app bundle `flwr run` builds from it keep them in the top-level folders beside it.
_TREE = Path(__file__).resolve().parent.parent
if not (Path(__file__).parent / "common").is_dir() and (_TREE / "common" / "__init__.py").is_file():
    __path__.append(str(_TREE))

__all__ = ["__version__"]
