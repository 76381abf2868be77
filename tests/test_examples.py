"""The examples run as users run them."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
from support.clients import skopeo
from support.fixtures import SeededUpstream
from support.node import NodeProcess

pytestmark = pytest.mark.process
EXAMPLES = Path(__file__).resolve().parent.parent / "examples"


def test_verify_image_example(tmp_path: Path, seeded_upstream: SeededUpstream) -> None:
    with NodeProcess(tmp_path / "n", upstream=seeded_upstream.url) as node:
        skopeo("copy", "--all", "--src-tls-verify=false",
               f"docker://127.0.0.1:{node.port}/library/multi:1.0", f"dir:{tmp_path / 'x'}")
        out = subprocess.run([sys.executable, str(EXAMPLES / "verify_image.py"), "--node",
                              node.url, "--image", "multi:1.0"], capture_output=True, text=True,
                             timeout=60)
        assert out.returncode == 0, out.stderr
        assert out.stdout.count("ok  ") == 8  # list by tag and digest, 2 manifests, 2+2 blobs
        missing = subprocess.run([sys.executable, str(EXAMPLES / "verify_image.py"), "--node",
                                  node.url, "--image", "nope:1"], capture_output=True, text=True,
                                 timeout=60)
        assert missing.returncode == 1 and "FAILED" in missing.stderr
