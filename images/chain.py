"""Layer identity: a layer is its content digest; a chain is the layers under it.

As in OCI and containerd: ChainID(L0) = DiffID(L0), ChainID(Ln) = sha256(ChainID(Ln-1) + " " + DiffID(Ln)).
Two images whose first layers are the same blobs share those chains, so their devices.
"""

from __future__ import annotations

import hashlib


def chain_ids(digests: list[str]) -> list[str]:
    """The chain id of each prefix of `digests` (each "sha256:<hex>")."""
    chains: list[str] = []
    for digest in digests:
        if not chains:
            chains.append(digest)
        else:
            chains.append("sha256:" + hashlib.sha256(f"{chains[-1]} {digest}".encode()).hexdigest())
    return chains
