"""`fedmoe agent init`: the node's key pair, which Flower's SuperNode authentication uses.

The private key stays on the node (mode 0600, OpenSSH format, the one `flower-supernode
--auth-supernode-private-key` reads); the public key goes to the platform admin, who binds it to
the enterprise's name (`fedmoe admin nodes register NAME --public-key FILE`).
"""

from __future__ import annotations

from pathlib import Path

from fedmoe.contract.keys import fingerprint, load_public_key, write_key_pair

PRIVATE_KEY_FILE = "node.key"
PUBLIC_KEY_FILE = "node.pub"


def make_node_keys(directory: Path, force: bool = False) -> tuple[Path, Path, str]:
    """Write node.key and node.pub into `directory`; returns (private, public, fingerprint)."""
    private_path, public_path = directory / PRIVATE_KEY_FILE, directory / PUBLIC_KEY_FILE
    if not force and (private_path.exists() or public_path.exists()):
        raise FileExistsError(
            f"{private_path} exists: this node has a key already (registered keys cannot be replaced "
            "silently); pass --force to make a new one, then register it again"
        )
    line = write_key_pair(private_path, public_path)
    return private_path, public_path, fingerprint(load_public_key(line))
