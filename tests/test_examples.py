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


def test_pyrsia_verify_offline(tmp_path: Path, seeded_upstream: SeededUpstream) -> None:
    from support.node import run_cli

    with NodeProcess(tmp_path / "n", upstream=seeded_upstream.url) as node:
        skopeo("copy", "--all", "--src-tls-verify=false",
               f"docker://127.0.0.1:{node.port}/library/ocimulti:1.0", f"dir:{tmp_path / 'x'}")
        run_cli(tmp_path, "status", port=node.port)  # the build has committed
        # While the node runs (its LevelDB is locked), from its data dir.
        ok = run_cli(tmp_path, "verify", "docker", "--image", "ocimulti:1.0", "--data-dir",
                     str(node.data_dir))
        assert ok.returncode == 0, ok.stderr
        assert ok.stdout.count("verified  ") == 8 and "8 stored artifact(s) hash correctly" in (
            ok.stdout)
        missing = run_cli(tmp_path, "verify", "docker", "--image", "nope:1", "--data-dir",
                          str(node.data_dir))
        assert missing.returncode == 1 and "no log record" in missing.stderr
        data_dir = node.data_dir
    # Tamper with a stored artifact: the bytes no longer match the log.
    layer = seeded_upstream.images["library/ocimulti:1.0"].blob_digests[-1].removeprefix(
        "sha256:")
    path = data_dir / "blobs" / "sha256" / layer[:2] / layer
    path.chmod(0o644)
    path.write_bytes(b"evil" + path.read_bytes()[4:])
    bad = run_cli(tmp_path, "verify", "docker", "--image", "ocimulti:1.0", "--data-dir",
                  str(data_dir))
    assert bad.returncode == 1 and "do not match" in bad.stderr
    assert "Traceback" not in bad.stderr
    nodir = run_cli(tmp_path, "verify", "docker", "--image", "x:1", "--data-dir",
                    str(tmp_path / "nothing"))
    assert nodir.returncode == 1 and "no ledger" in nodir.stderr
