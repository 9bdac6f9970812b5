"""Which rank died: a listening socket per rank that the others can probe after a failure.

When a rank is killed (``kill -9``, the OOM killer, a lost node), the survivors see only a collective
error such as gloo's "Connection reset by peer [10.0.0.7]:41123", or a SIGTERM from their launcher;
DeepSpeed's launcher reports an exit code without the rank. So each rank listens on a TCP port it
never accepts on (the kernel completes handshakes from the backlog while the process lives, and
refuses them once it is gone), and the ranks swap these addresses at start-up. After a failure a
survivor connects to every peer's port: the refused ones name the dead ranks. No thread, no
heartbeat, nothing sent during training.
"""
from __future__ import annotations

import socket
from concurrent.futures import ThreadPoolExecutor
from typing import Optional

__all__ = ["PeerWatch"]


class PeerWatch:
    """Built collectively (every rank at the same point, after the process group exists)."""

    def __init__(self, master_addr: str, master_port: int) -> None:
        import torch.distributed as dist

        self.rank = dist.get_rank()
        self._listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self._listener.bind(("0.0.0.0", 0))
        self._listener.listen(4096)
        address = (_route_address(master_addr, master_port), self._listener.getsockname()[1])
        self.addresses: list[Optional[tuple[str, int]]] = [None] * dist.get_world_size()
        dist.all_gather_object(self.addresses, address)

    def lost_ranks(self, timeout: float = 2.0) -> list[int]:
        """The peers whose process is gone (or that do not answer within ``timeout``)."""

        def gone(address: tuple[str, int]) -> bool:
            try:
                socket.create_connection(address, timeout=timeout).close()
                return False
            except OSError:
                return True

        peers = [r for r in range(len(self.addresses)) if r != self.rank]
        with ThreadPoolExecutor(max_workers=min(32, max(1, len(peers)))) as pool:
            return [r for r, lost in zip(peers, pool.map(lambda r: gone(self.addresses[r]), peers)) if lost]


def _route_address(host: str, port: int) -> str:
    """This machine's address on the route to ``host``, where the other ranks can reach it."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
        probe.connect((socket.gethostbyname(host), port))  # UDP: no packet is sent
        return probe.getsockname()[0]
