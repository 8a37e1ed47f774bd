"""Extra Swarm nodes on this one machine: a Docker engine per network namespace (issue 17, part 3).

The recipe is shared/DESIGN.md's ("The real environment", several Swarm nodes): each node is a
network namespace with its own `dockerd` (`unshare -m`, `mount --make-rprivate /`, cgroup2 mounted
on /sys/fs/cgroup, a tmpfs exec-root, `--bridge none`). The namespaces and the machine meet on one
layer-2 segment, a bridge inside a namespace of its own (the "switch"): the machine's own firewall
(FORWARD policy DROP, bridged frames sent through iptables) never sees node-to-node traffic, and
deleting the switch's namespace removes the bridge and every veth with it.

    machine  hsw-host 172.31.251.1/24 --+
    hsw-node1  eth1  172.31.251.2/24 ---+-- br0 in netns hsw-switch
    hsw-node2  eth1  172.31.251.3/24 ---+

A node's engine and everything it starts (its containerd, the shims, the containers) live in a
cgroup of their own (`hsw-nodeN` at the root of the cgroup2 hierarchy, the engine's
`--cgroup-parent` too), so losing the node is one write: `cgroup.kill`, every process of
the node dies at once, as in a power cut; its link stays up, so its address refuses connections.

Owns: the namespaces, links, cgroups, engines and engine state directories it creates; `close()`
takes them all down and returns what is still there. Must not: touch the machine's own engine
(only `Nodes.join` asks it for the join token), or any namespace, link or process it did not make.
Images reach a node by `docker save | docker -H NODE load` (no registry), skipped when the node has
them already (its data root under $HAPROXY_SWARM_CACHE/swarm-nodes is kept between runs for that).
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path

from swarmkit import DOCKER, docker, gwbridge_exists, wait_for

__all__ = ["HOST_ADDRESS", "Node", "Nodes", "clean", "leftovers"]

PREFIX = "hsw"  # every namespace, link and cgroup this module makes starts with it
SUBNET = "172.31.251"
HOST_ADDRESS = f"{SUBNET}.1"  # the machine's own end: the manager's --advertise-addr
HOST_LINK = f"{PREFIX}-host"
SWITCH = f"{PREFIX}-switch"
# The cgroup2 hierarchy as the machine mounts it: /sys/fs/cgroup itself on a cgroup2-only machine,
# /sys/fs/cgroup/unified on a hybrid one (as here: the machine's engine uses cgroup v1).
CGROUP_ROOT = (Path("/sys/fs/cgroup") if Path("/sys/fs/cgroup/cgroup.controllers").exists()
               else Path("/sys/fs/cgroup/unified"))
RUN = Path("/run/haproxy-swarm-nodes")  # sockets and pid files (the exec-roots are tmpfs'd over)
CACHE = Path(os.environ.get("HAPROXY_SWARM_CACHE", "/var/cache/haproxy-swarm")) / "swarm-nodes"


def sh(*args: str, check: bool = True, timeout: float = 30.0) -> str:
    """Run a command on the machine; fails naming it and its stderr."""
    proc = subprocess.run(list(args), capture_output=True, text=True, timeout=timeout, check=False)
    if check and proc.returncode != 0:
        raise AssertionError(f"{' '.join(args)} exited {proc.returncode}: {proc.stderr.strip()}")
    return proc.stdout


def netns_list() -> list[str]:
    return [line.split()[0] for line in sh("ip", "netns", "list").splitlines() if line.strip()]


def cgroup_pids(cgroup: Path) -> list[int]:
    """Every process in `cgroup` and the cgroups below it."""
    pids: list[int] = []
    if cgroup.is_dir():
        for procs in cgroup.rglob("cgroup.procs"):
            with contextlib.suppress(OSError):
                pids += [int(p) for p in procs.read_text().split()]
    return pids


def remove_cgroup(cgroup: Path) -> None:
    """rmdir `cgroup` bottom-up (a cgroup directory goes only when empty of processes and children)."""
    if not cgroup.is_dir():
        return
    for sub in sorted((p for p in cgroup.rglob("*") if p.is_dir()), key=lambda p: -len(p.parts)):
        with contextlib.suppress(OSError):
            sub.rmdir()
    with contextlib.suppress(OSError):
        cgroup.rmdir()


@dataclass
class Node:
    """One extra Swarm node: a namespace, its address on the test's segment, its own dockerd."""

    index: int  # 1, 2, ...: the node's name and address follow from it
    proc: subprocess.Popen[bytes] | None = None

    @property
    def name(self) -> str:
        return f"{PREFIX}-node{self.index}"

    @property
    def address(self) -> str:
        return f"{SUBNET}.{self.index + 1}"

    @property
    def host(self) -> str:
        """The engine's address for `docker -H`."""
        return f"unix://{RUN / self.name / 'docker.sock'}"

    @property
    def cgroup(self) -> Path:
        return CGROUP_ROOT / self.name

    @property
    def data_root(self) -> Path:
        return CACHE / self.name

    def docker(self, *args: str, input: str | None = None, timeout: float = 120.0, check: bool = True) -> str:
        """`docker -H NODE ARGS` (the node's own engine)."""
        return docker("-H", self.host, *args, input=input, timeout=timeout, check=check)

    def start(self, fresh: bool) -> None:
        """Start the node's dockerd in its namespace and wait until it answers. `fresh`: forget any
        swarm and container state a previous run left in the data root (its images stay)."""
        if fresh:
            for stale in ("swarm", "containers", "network", "containerd"):
                shutil.rmtree(self.data_root / stale, ignore_errors=True)
        run = RUN / self.name
        (run / "exec").mkdir(parents=True, exist_ok=True)
        self.data_root.mkdir(parents=True, exist_ok=True)
        self.cgroup.mkdir(exist_ok=True)
        # `ip netns exec` remounts /sys, hiding the machine's cgroup mounts (dockerd would say "Devices
        # cgroup isn't mounted"): cgroup2 is mounted again, and the shell joins the node's cgroup.
        script = (
            "mount --make-rprivate / && "
            "mount -t cgroup2 none /sys/fs/cgroup && "
            f"echo $$ > /sys/fs/cgroup/{self.name}/cgroup.procs && "
            f"mount -t tmpfs -o mode=0711 tmpfs {run / 'exec'} && "
            f"exec /usr/sbin/dockerd --data-root {self.data_root} --exec-root {run / 'exec'} "
            f"-H {self.host} --pidfile {run / 'dockerd.pid'} --bridge none "
            f"--cgroup-parent /{self.name} --storage-driver overlay2"
        )
        log = open(self.data_root / "dockerd.log", "ab")  # noqa: SIM115 - handed to the engine
        env = os.environ | {"DOCKER_SERVICE_PREFER_OFFLINE_IMAGE": "1"}  # no registry to ask
        self.proc = subprocess.Popen(["ip", "netns", "exec", self.name, "unshare", "-m", "sh", "-c", script],
                                     stdin=subprocess.DEVNULL, stdout=log, stderr=log, env=env,
                                     start_new_session=True)
        log.close()

        def answers() -> bool:
            if self.proc is not None and self.proc.poll() is not None:
                tail = (self.data_root / "dockerd.log").read_text(errors="replace")[-2000:]
                raise AssertionError(f"{self.name}'s dockerd exited {self.proc.returncode}:\n{tail}")
            return self.docker("version", check=False, timeout=10).strip() != ""
        wait_for(answers, f"{self.name}'s dockerd answers", 60, 0.2)

    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def kill(self) -> float:
        """Lose the node: SIGKILL every process of it at once (engine, containerd, shims, tasks) by
        its cgroup; returns when none is left, with how long that took."""
        start = time.monotonic()
        (self.cgroup / "cgroup.kill").write_text("1")
        wait_for(lambda: not cgroup_pids(self.cgroup), f"every process of {self.name} gone", 30, 0.05)
        if self.proc is not None:
            self.proc.wait(timeout=10)
        return time.monotonic() - start

    def stop(self) -> None:
        """Leave the swarm, remove the node's containers, stop its engine (SIGTERM, then its cgroup
        is killed for anything that outlived it) and remove its cgroup. Safe on a node already gone."""
        if self.running():
            self.docker("swarm", "leave", "--force", check=False, timeout=60)
            ids = self.docker("ps", "-aq", check=False, timeout=30).split()
            if ids:
                self.docker("rm", "-f", *ids, check=False, timeout=60)
            self.docker("network", "prune", "-f", check=False, timeout=30)
            assert self.proc is not None
            self.proc.send_signal(signal.SIGTERM)
            with contextlib.suppress(subprocess.TimeoutExpired):  # its cgroup is killed below
                self.proc.wait(timeout=30)
        if self.cgroup.is_dir() and cgroup_pids(self.cgroup):
            (self.cgroup / "cgroup.kill").write_text("1")
            with contextlib.suppress(AssertionError):
                wait_for(lambda: not cgroup_pids(self.cgroup), f"every process of {self.name} gone", 30, 0.05)
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(timeout=10)
        remove_cgroup(self.cgroup)

    def load_images(self, images: list[str]) -> float:
        """Give the node the machine's `images` (docker save | load), those it lacks, and drop any
        other image it has (older builds: the data root is kept between runs); seconds taken."""
        start = time.monotonic()
        wanted = {i: docker("image", "inspect", "-f", "{{.Id}}", i).strip() for i in images}
        missing = [i for i, image_id in wanted.items()
                   if self.docker("image", "inspect", "-f", "{{.Id}}", i, check=False).strip() != image_id]
        if missing:
            save = subprocess.Popen([DOCKER, "save", *missing], stdout=subprocess.PIPE)
            load = subprocess.run([DOCKER, "-H", self.host, "load", "-q"], stdin=save.stdout, capture_output=True,
                                  timeout=300, check=False)
            assert save.stdout is not None
            save.stdout.close()
            save.wait(timeout=60)
            if save.returncode or load.returncode:
                raise AssertionError(f"moving {missing} to {self.name}: {load.stderr.decode(errors='replace')}")
        others = set(self.docker("images", "-q", "--no-trunc").split()) - set(wanted.values())
        if others:
            self.docker("rmi", "-f", *others, check=False)
        return time.monotonic() - start


@dataclass
class Nodes:
    """The test's segment and its extra nodes; the machine's engine is the manager."""

    count: int = 2
    nodes: list[Node] = field(default_factory=list)
    joined: bool = False
    made_gwbridge: bool = False  # `swarm init` made docker_gwbridge on the machine; `close` removes it

    def create(self) -> None:
        """The switch, the machine's link and `count` node namespaces with their links, then each
        node's engine. Fails if any of it is already there (another run's, not ours to take)."""
        if os.geteuid() != 0:
            raise AssertionError("the extra Swarm nodes need root: network namespaces, mounts, cgroups, dockerd")
        if left := leftovers():
            raise AssertionError("state of another run is here; remove it first (python3 tests/swarm/nodes.py): "
                                 f"{left}")
        sh("ip", "netns", "add", SWITCH)
        sh("ip", "-n", SWITCH, "link", "add", "br0", "type", "bridge")
        sh("ip", "-n", SWITCH, "link", "set", "br0", "up")
        sh("ip", "-n", SWITCH, "link", "set", "lo", "up")
        sh("ip", "link", "add", HOST_LINK, "type", "veth", "peer", "name", "p0", "netns", SWITCH)
        sh("ip", "addr", "add", f"{HOST_ADDRESS}/24", "dev", HOST_LINK)
        sh("ip", "link", "set", HOST_LINK, "up")
        sh("ip", "-n", SWITCH, "link", "set", "p0", "master", "br0", "up")
        for i in range(1, self.count + 1):
            node = Node(i)
            self.nodes.append(node)
            sh("ip", "netns", "add", node.name)
            sh("ip", "-n", node.name, "link", "set", "lo", "up")
            sh("ip", "-n", SWITCH, "link", "add", f"p{i}", "type", "veth", "peer", "name", "eth1",
               "netns", node.name)
            sh("ip", "-n", SWITCH, "link", "set", f"p{i}", "master", "br0", "up")
            sh("ip", "-n", node.name, "addr", "add", f"{node.address}/24", "dev", "eth1")
            sh("ip", "-n", node.name, "link", "set", "eth1", "up")
        for node in self.nodes:
            node.start(fresh=True)

    def join(self) -> None:
        """`docker swarm init` on the machine's engine (advertised on the segment), each node joins
        as a worker; returns when the manager lists every node Ready."""
        state = docker("info", "--format", "{{.Swarm.LocalNodeState}}").strip()
        if state != "inactive":
            raise AssertionError(f"the machine's engine is already in a swarm ({state}); the test makes its own")
        self.made_gwbridge = not gwbridge_exists()
        docker("swarm", "init", "--advertise-addr", HOST_ADDRESS, "--listen-addr", f"{HOST_ADDRESS}:2377")
        self.joined = True
        token = docker("swarm", "join-token", "-q", "worker").strip()
        for node in self.nodes:
            node.docker("swarm", "join", "--token", token, "--advertise-addr", node.address,
                        f"{HOST_ADDRESS}:2377", timeout=60)
        wait_for(lambda: len(self.ready()) == len(self.nodes) + 1, "every node Ready in `docker node ls`", 60, 0.5)

    def ready(self) -> dict[str, str]:
        """The manager's view: {hostname or address: status} of the Ready nodes."""
        out = docker("node", "ls", "--format", "{{.ID}} {{.Status}}")
        ids = [line.split()[0] for line in out.splitlines() if line.split()[1:] == ["Ready"]]
        if not ids:
            return {}
        addresses = docker("node", "inspect", "--format", "{{.Status.Addr}}", *ids).split()
        return dict(zip(addresses, ids, strict=True))

    def node_id(self, address: str) -> str:
        """The swarm's id of the node whose address is `address` (any state)."""
        out = docker("node", "ls", "-q").split()
        for node_id, addr in zip(out, docker("node", "inspect", "--format", "{{.Status.Addr}}", *out).split(),
                                 strict=True):
            if addr == address:
                return node_id
        raise AssertionError(f"no node with address {address}")

    def state(self, address: str) -> str:
        return docker("node", "inspect", "--format", "{{.Status.State}}", self.node_id(address)).strip()

    def close(self) -> list[str]:
        """Take everything down (nodes, the machine's swarm, the links, the namespaces); return what
        is still there. Safe after any failure, also half-way through `create`."""
        for node in self.nodes:
            with contextlib.suppress(Exception):
                node.stop()
        if self.joined:
            docker("swarm", "leave", "--force", check=False, timeout=60)
        if self.made_gwbridge:
            docker("network", "rm", "docker_gwbridge", check=False)
        for name in [n.name for n in self.nodes] + [SWITCH]:
            sh("ip", "netns", "del", name, check=False)
        sh("ip", "link", "del", HOST_LINK, check=False)
        left = leftovers()
        if self.made_gwbridge and gwbridge_exists():
            left.append("network docker_gwbridge")
        if self.joined and docker("info", "--format", "{{.Swarm.LocalNodeState}}").strip() != "inactive":
            left.append("the machine's engine is still in a swarm")
        return left


def leftovers() -> list[str]:
    """Anything of this module's on the machine: namespaces, links, cgroups, engines, mounts."""
    left = [f"netns {n}" for n in netns_list() if n.startswith(PREFIX)]
    left += [f"link {line.split()[0]}" for line in sh("ip", "-br", "link").splitlines()
             if line.split() and line.split()[0].startswith(PREFIX)]
    left += [f"cgroup {p}" for p in CGROUP_ROOT.glob(f"{PREFIX}-*")]
    engines = sh("pgrep", "-a", "-x", "dockerd", check=False).splitlines()
    left += [f"dockerd {line}" for line in engines if str(RUN) in line]
    mounts = Path("/proc/self/mounts").read_text()
    left += [f"mount {line.split()[1]}" for line in mounts.splitlines() if str(RUN) in line]
    return left


def clean() -> list[str]:
    """Remove what a run that could not clean up (pytest itself killed) left of this module's: its
    nodes' processes (by their cgroups), namespaces, link and cgroups. The machine's swarm is not
    touched. Returns what is still there."""
    for cgroup in CGROUP_ROOT.glob(f"{PREFIX}-*"):
        if cgroup_pids(cgroup):
            (cgroup / "cgroup.kill").write_text("1")
            with contextlib.suppress(AssertionError):
                wait_for(lambda c=cgroup: not cgroup_pids(c), f"every process of {cgroup.name} gone",  # type: ignore[misc]
                         30, 0.05)
        remove_cgroup(cgroup)
    for name in netns_list():
        if name.startswith(PREFIX):
            sh("ip", "netns", "del", name, check=False)
    sh("ip", "link", "del", HOST_LINK, check=False)
    return leftovers()


if __name__ == "__main__":
    # python3 tests/swarm/nodes.py: clear a crashed run's nodes (then `docker swarm leave --force`
    # on the machine if its engine is still in the test's swarm).
    left = clean()
    print("\n".join(left) if left else "nothing of the test's nodes is left")
    raise SystemExit(1 if left else 0)
