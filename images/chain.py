"""Layer identity: a layer is its content digest; a chain is the layers under it.

As in OCI and containerd: ChainID(L0) = DiffID(L0), ChainID(Ln) = sha256(ChainID(Ln-1) + " " + DiffID(Ln)).
Two images whose first layers are the same blobs share those chains, so their devices.
"""

from __future__ import annotations

import hashlib


def next_chain_id(parent: str | None, digest: str) -> str:
    """The chain id of layer `digest` on the chain `parent` (None: a base layer)."""
    if parent is None:
        return digest
    return "sha256:" + hashlib.sha256(f"{parent} {digest}".encode()).hexdigest()


def chain_ids(digests: list[str]) -> list[str]:
    """The chain id of each prefix of `digests` (each "sha256:<hex>")."""
    chains: list[str] = []
    for digest in digests:
        chains.append(next_chain_id(chains[-1] if chains else None, digest))
    return chains
