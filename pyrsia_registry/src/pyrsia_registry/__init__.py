"""pyrsia_registry: the pyrsia node and its node API (ASGI), for every installed
package type (the Docker plugin's OCI Distribution API is mounted at ``/v2``).

``start_node(NodeConfig(...))`` runs a node inside your anyio program;
``NodeApp``/``NodeApi`` are ASGI apps you can mount in another server.
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
from ._node import Build, BuildError, Node, NotInLog
from ._runtime import RunningNode, run_node, start_node
from ._verify_offline import VerifyFailed, VerifyReport, verify_offline
from ._witness import WitnessTarget, parse_witness_target, verify_witnessed

__version__ = "0.1.0"

__all__ = [
    "Build",
    "BuildError",
    "Node",
    "NodeApi",
    "NodeApp",
    "NodeConfig",
    "NotInLog",
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
