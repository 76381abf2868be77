"""Verify an image's transparency-log records offline, as anyone can.

    python examples/verify_image.py --node http://127.0.0.1:7888 --image alpine:3.16.2

Asks the node for the image's records with ``--proof`` data (what ``pyrsia
inspect-log docker --image X --proof`` prints), then checks, with pyrsia_core
alone: each record's signature, its RFC 9162 inclusion proof against the
checkpoint's root, and the checkpoint's signatures against the node's key.
Exits non-zero with the reason if anything fails.
"""

from __future__ import annotations

import argparse
import sys

import httpx
from pyrsia_core.errors import PyrsiaError

from pyrsia_core import (
    NoteVerifier,
    PublicKey,
    Record,
    SignedRecord,
    leaf_hash,
    open_checkpoint,
    verify_inclusion,
)


def verify(node: str, image: str) -> int:
    status = httpx.get(f"{node}/api/status", timeout=30).json()
    key = PublicKey.from_hex(status["node_public_key"])
    origin = status["network_origin"]
    verifiers = [NoteVerifier(f"{origin}/{key.node_id}", key)]
    resp = httpx.get(f"{node}/api/inspect-log/docker", params={"image": image, "proof": "true"},
                     timeout=30)
    resp.raise_for_status()
    for item in resp.json():
        proof = item.pop("proof")
        record = Record.from_json(item)
        SignedRecord(record, bytes.fromhex(proof["record_signature"])).verify()
        checkpoint, _ = open_checkpoint(proof["checkpoint"], verifiers, threshold=1, origin=origin)
        verify_inclusion(
            leaf_hash(record.canonical()),
            proof["leaf_index"],
            checkpoint.size,
            [bytes.fromhex(h) for h in proof["inclusion_proof"]],
            checkpoint.root,
        )
        print(f"ok  {record.package_specific_artifact_id}  leaf {proof['leaf_index']} of "
              f"{checkpoint.size}")
    return 0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--node", default="http://127.0.0.1:7888")
    parser.add_argument("--image", required=True)
    args = parser.parse_args()
    try:
        return verify(args.node, args.image)
    except (PyrsiaError, KeyError, ValueError, httpx.HTTPError) as exc:
        print(f"verification FAILED: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
