"""Hosts made of Linux network namespaces on one bridge, and a token bucket filter on a host's link.

Needs root and iproute2 (`ip`, `tc`), and iptables to cut a host off. Addresses are assigned only inside the namespaces made here; deleting a
namespace deletes its veth ends, so `tear_down` leaves nothing behind.
"""

import os
import subprocess
import sys

from common.errors import UserError
from coordinator.spawn import stop_workers

TBF_BURST = "64kb"  # a burst a few packets deep: enough for tbf to reach its rate at 1 Gbit/s without overshooting
TBF_LATENCY = "200ms"  # queueing allowed before tbf drops: TCP then paces itself instead of losing packets


class HostsError(UserError):
    """A namespace, link or filter that could not be made."""


def ip(*args: str) -> None:
    """Run `ip args`, raising HostsError with its complaint."""
    _run("ip", *args)


def _run(*command: str) -> None:
    done = subprocess.run(command, capture_output=True, text=True)
    if done.returncode != 0:
        raise HostsError(f"{' '.join(command)}: {done.stderr.strip()}")


class Hosts:
    """Namespaces wired to a bridge that lives in a namespace of its own; processes started in them."""

    def __init__(self, prefix: str, subnet: str):
        self.prefix = prefix  # short: interface names are at most 15 characters
        self.subnet = subnet  # the first three octets of a private /24, e.g. "10.77.0"
        self.namespaces = []
        self.processes = []
        self.switch = None

    def address(self, index: int) -> str:
        return f"{self.subnet}.{index + 1}"

    def add_switch(self) -> None:
        self.switch = self._namespace("sw")
        ip("-n", self.switch, "link", "add", "name", "bridge0", "type", "bridge")
        ip("-n", self.switch, "link", "set", "bridge0", "up")

    def _namespace(self, suffix: str) -> str:
        name = f"{self.prefix}{suffix}"
        ip("netns", "add", name)
        self.namespaces.append(name)
        ip("-n", name, "link", "set", "lo", "up")
        return name

    def add_host(self, index: int) -> tuple:
        """A namespace with address `address(index)` on the bridge: (namespace, its interface)."""
        namespace, port, interface = self._namespace(f"h{index}"), f"p{index}", f"eth{index}"
        ip("-n", self.switch, "link", "add", port, "type", "veth", "peer", "name", interface, "netns", namespace)
        ip("-n", self.switch, "link", "set", port, "master", "bridge0", "up")
        ip("-n", namespace, "addr", "add", f"{self.address(index)}/24", "dev", interface)
        ip("-n", namespace, "link", "set", interface, "up")
        return namespace, interface

    def shape(self, index: int, rate: str) -> None:
        """Limit host `index`'s link to `rate` both ways: its own interface sends, the switch's port receives."""
        for namespace, interface in ((f"{self.prefix}h{index}", f"eth{index}"), (self.switch, f"p{index}")):
            _run("ip", "netns", "exec", namespace, "tc", "qdisc", "add", "dev", interface, "root", "tbf",
                 "rate", rate, "burst", TBF_BURST, "latency", TBF_LATENCY)

    def cut_off(self, index: int) -> None:
        """Drop every packet into and out of host `index`: a partition, where nothing is refused and all is lost."""
        self._every_packet(index, "-A")

    def heal(self, index: int) -> None:
        """Undo `cut_off`."""
        self._every_packet(index, "-D")

    def _every_packet(self, index: int, action: str) -> None:
        for chain in ("INPUT", "OUTPUT"):
            _run("ip", "netns", "exec", f"{self.prefix}h{index}", "iptables", action, chain, "-j", "DROP")

    def link_bytes(self, index: int) -> int:
        """Bytes host `index`'s interface has sent plus received, headers included: what its link carried."""
        statistics = f"/sys/class/net/eth{index}/statistics"
        done = subprocess.run(
            ["ip", "netns", "exec", f"{self.prefix}h{index}", "cat", f"{statistics}/tx_bytes", f"{statistics}/rx_bytes"],
            capture_output=True, text=True, check=True,
        )
        return sum(int(count) for count in done.stdout.split())

    def start(self, namespace: str, command: list, environment: dict, **popen) -> subprocess.Popen:
        """`command` (a console script of this project, run as `python -m`) inside a namespace, unbuffered, in text."""
        program, *args = command
        process = subprocess.Popen(
            ["ip", "netns", "exec", namespace, sys.executable, "-m", program, *map(str, args)],  # exec keeps the pid
            stdin=subprocess.DEVNULL, env={**os.environ, "PYTHONUNBUFFERED": "1", **environment}, text=True, **popen,
        )
        self.processes.append(process)
        return process

    def tear_down(self) -> None:
        stop_workers(self.processes)  # the coordinator's way with its spawned workers: SIGTERM, then SIGKILL
        for namespace in reversed(self.namespaces):  # deleting a namespace deletes its veth ends too
            subprocess.run(["ip", "netns", "delete", namespace], capture_output=True)
