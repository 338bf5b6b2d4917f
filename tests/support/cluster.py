"""Several real relays on one real PostgreSQL (issue 12): each node its own folder, config,
listeners and [cluster] node name; all of them one keystore and one queue (the same
database), one pepper, one sink."""

from __future__ import annotations

import contextlib
import shutil
from collections.abc import AsyncIterator
from pathlib import Path

from keystore.opening import open_keystore
from relay.app import Relay
from relay.config import load_config
from tests.support.relayrun import Harness, write_config


def cluster_config(folder: Path, sink_port: int, url: str, node: str, **parts: str) -> Path:
    """write_config's relay with `[keystore] url` and `[queue] url` = `url`, named `node`.
    `cluster`: more lines for the [cluster] table (a short lease)."""
    cluster_extra = parts.pop("cluster", "")
    folder.mkdir(parents=True, exist_ok=True)
    path = write_config(folder, sink_port, **parts)
    text = path.read_text()
    text = text.replace('[keystore]\npath = "keystore.db"\n', f'[keystore]\nurl = "{url}"\n', 1)
    text = text.replace("[queue]\n", f'[queue]\nurl = "{url}"\n', 1)
    assert text.count(url) == 2, "the config template changed: update tests/support/cluster.py"
    path.write_text(text + f'\n[cluster]\nnode = "{node}"\n{cluster_extra}\n')
    return path


async def init_keystore(config_path: Path) -> None:
    """`keystore init` for a config (tables and pepper), in-process."""
    config = load_config(config_path)
    ks = config.keystore
    store = await open_keystore(path=ks.path, url=ks.url, pepper_file=ks.pepper_file, create=True)
    await store.close()


@contextlib.asynccontextmanager
async def running_cluster(root: Path, sink, url: str, nodes: tuple[str, ...] = ("a", "b"),
                          **parts: str) -> AsyncIterator[list[Harness]]:
    """One Relay per node name, started in order, in root/<node>; the first node's pepper
    is copied to the others (as an operator copies it to every node)."""
    harnesses: list[Harness] = []
    try:
        for index, node in enumerate(nodes):
            folder = root / node
            path = cluster_config(folder, sink.port, url, node, **parts)
            if index == 0:
                await init_keystore(path)
            else:
                shutil.copy2(root / nodes[0] / "pepper", folder / "pepper")
            relay = Relay(load_config(path))
            harnesses.append(Harness(folder, relay, sink))
            await relay.start()
        yield harnesses
    finally:
        for harness in reversed(harnesses):
            await harness.relay.stop(grace=0.5)
