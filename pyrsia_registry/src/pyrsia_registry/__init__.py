"""pyrsia_registry: the pyrsia node, its OCI Distribution API and node API (ASGI).

``start_node(NodeConfig(...))`` runs a node inside your anyio program;
``NodeApp``/``OciApp``/``NodeApi`` are ASGI apps you can mount in another server.
"""

from ._api import NodeApi, format_records
from ._app import NodeApp
from ._config import (
    NodeConfig,
    default_data_dir,
    format_size,
    load_settings,
    parse_rate,
    parse_size,
    save_settings,
)
from ._docker import DockerService
from ._node import Build, BuildError, Node, NotInLog
from ._oci import OciApp
from ._runtime import RunningNode, run_node, start_node
from ._verify_offline import VerifyFailed, VerifyReport, verify_offline
from ._witness import WitnessTarget, parse_witness_target, verify_witnessed

__version__ = "0.1.0"

__all__ = [
    "Build",
    "BuildError",
    "DockerService",
    "Node",
    "NodeApi",
    "NodeApp",
    "NodeConfig",
    "NotInLog",
    "OciApp",
    "RunningNode",
    "VerifyFailed",
    "VerifyReport",
    "WitnessTarget",
    "__version__",
    "default_data_dir",
    "format_records",
    "format_size",
    "load_settings",
    "parse_rate",
    "parse_size",
    "parse_witness_target",
    "run_node",
    "save_settings",
    "start_node",
    "verify_offline",
    "verify_witnessed",
]
