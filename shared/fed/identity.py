"""Site identity from keys: the coordinator's registry of SuperNode keys, and the check of a node's claim.

In a deployment every SuperNode authenticates with a key the operator registered (``flwr supernode
register``), and Flower gives each registered key a node id that stays with the key. ``mdmt deploy
register-site`` records which site each key was registered for, here, as JSON::

    {"nodes": {"<node id>": {"site": "A", "public-key-sha256": "<hex>"}}}

The ServerApp reads this file (run config ``site-registry``) and refuses a node whose claimed site (the
``site`` of its own node config, which the site chooses) is not the site its key was registered for.
Simulated nodes have no keys: no registry, and the claims are taken as they come.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Mapping
from pathlib import Path

from mdmt.errors import ConfigError

NODES = "nodes"


def key_fingerprint(public_key: bytes) -> str:
    """sha256 (hex) of a public key file's bytes, as the registry records it."""
    return hashlib.sha256(public_key.strip()).hexdigest()


def _read(path: Path) -> dict:
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        raise ConfigError(
            f"'site-registry' {path}: not found; register the sites' keys with 'mdmt deploy register-site'"
        ) from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ConfigError(f"'site-registry' {path}: not a readable registry ({exc}); write it again") from None
    if not isinstance(data, dict) or not isinstance(data.get(NODES), dict):
        raise ConfigError(f"'site-registry' {path}: no '{NODES}' table; write it with 'mdmt deploy register-site'")
    return data


def load_registry(path: str | Path) -> dict[int, str]:
    """node id -> site of every registered key; one-line ConfigError for a missing or malformed file."""
    path = Path(path).expanduser()
    out: dict[int, str] = {}
    for node, entry in _read(path)[NODES].items():
        site = entry.get("site") if isinstance(entry, dict) else None
        if not str(node).isdigit() or not isinstance(site, str) or not site:
            raise ConfigError(f"'site-registry' {path}: entry {node!r} is not '<node id>': {{\"site\": NAME}}")
        out[int(node)] = site
    return out


def record_node(path: str | Path, node_id: int, site: str, public_key: bytes) -> Path:
    """Add or replace ``node_id``'s entry; any other entry for the same site or key is dropped (a site
    whose key was replaced is registered again under a new node id)."""
    path = Path(path).expanduser()
    data = _read(path) if path.exists() else {NODES: {}}
    fp = key_fingerprint(public_key)
    nodes = {
        n: e
        for n, e in data[NODES].items()
        if isinstance(e, dict) and e.get("site") != site and e.get("public-key-sha256") != fp
    }
    nodes[str(int(node_id))] = {"site": site, "public-key-sha256": fp}
    data[NODES] = dict(sorted(nodes.items(), key=lambda kv: int(kv[0])))
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")
    os.replace(tmp, path)
    return path


def check_claim(registry: Mapping[int, str], node_id: int, claimed: str) -> str | None:
    """None when node ``node_id`` may serve ``claimed``; otherwise why it is refused (one line)."""
    registered = registry.get(int(node_id))
    if registered is None:
        return f"node {node_id} claims site {claimed!r} but its key is not in the site registry"
    if registered != claimed:
        return f"node {node_id} claims site {claimed!r} but its key is registered for site {registered!r}"
    return None
