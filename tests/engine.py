"""A private Docker engine for tests: its own daemons, sockets, data, address pool and firewall fence.

Nothing of the machine's Docker configuration is used or changed: containerd and dockerd get their
own folders under one temporary directory, and clients reach them through DOCKER_HOST. What the daemons
change on the machine (the firewall, IP forwarding, the bridge) is saved first and put back after.
"""

import os
import shutil
import subprocess
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path

POOL = "10.213.0.0/16"  # container addresses: a range this machine does not use
BRIDGE_ADDRESS = "10.213.0.1/24"  # docker0, the first /24 of the pool
PACKAGES = {"dockerd": "docker.io", "containerd": "containerd", "docker-compose": "docker-compose",
            "debootstrap": "debootstrap", "iptables-save": "iptables"}
# The kernel settings dockerd changes: forwarding on, and bridged packets through the firewall.
SYSCTLS = [Path("/proc/sys/net/ipv4/ip_forward"), *map(Path("/proc/sys/net/bridge").joinpath, (
    "bridge-nf-call-iptables", "bridge-nf-call-ip6tables"))]
BUILTIN_CHAINS = {"filter": ("INPUT", "FORWARD", "OUTPUT"), "nat": ("PREROUTING", "INPUT", "OUTPUT", "POSTROUTING"),
                  "mangle": ("PREROUTING", "INPUT", "FORWARD", "OUTPUT", "POSTROUTING"),
                  "raw": ("PREROUTING", "OUTPUT")}
# Containers may talk to each other and to the bridge (the published ports' proxy), nothing else:
# not forwarded out of the machine (DOCKER-USER, which dockerd consults first) and not to the host's other addresses.
FENCE = [("DOCKER-USER", "-s", POOL, "!", "-d", POOL, "-j", "DROP"),
         ("INPUT", "-s", POOL, "!", "-d", POOL, "-j", "DROP")]
START_TIMEOUT = 30  # seconds for a daemon's socket to answer
STEP_TIMEOUT = 300  # seconds for any one docker command or wait: longer is a hang


def missing_packages() -> list:
    """The Debian packages whose programs are not installed."""
    return sorted({package for program, package in PACKAGES.items() if shutil.which(program) is None})


def why_no_engine() -> str | None:
    """Why a private engine cannot start here, or None."""
    if os.geteuid() != 0:
        return "starting dockerd needs root"
    missing = missing_packages()
    if missing:
        return f"missing Debian packages {' '.join(missing)} (.ci/run installs them)"
    return None


@contextmanager
def private_engine():
    """Start containerd and dockerd on their own; yields the environment for docker and docker-compose."""
    root = Path(tempfile.mkdtemp(prefix="sp-engine-", dir="/tmp"))  # short: unix socket paths are limited
    with machine_restored():
        processes = []
        try:
            containerd_socket = root / "containerd.sock"
            processes.append(_daemon(root, "containerd", "--address", containerd_socket, "--root",
                                      root / "containerd", "--state", root / "containerd-state",
                                      "--config", _write(root / "containerd.toml", "")))
            _wait_for_socket(containerd_socket, processes[-1], root / "containerd.log")
            docker_socket = root / "docker.sock"
            processes.append(_daemon(
                root, "dockerd", "--containerd", containerd_socket, "--data-root", root / "data",
                "--exec-root", root / "exec", "--pidfile", root / "docker.pid", "-H", f"unix://{docker_socket}",
                "--config-file", _write(root / "daemon.json", "{}"), "--bip", BRIDGE_ADDRESS,
                "--default-address-pool", f"base={POOL},size=24",
            ))
            environment = {**os.environ, "DOCKER_HOST": f"unix://{docker_socket}"}
            _wait_for_docker(environment, processes[-1], root / "dockerd.log")
            for chain, *rule in FENCE:
                subprocess.run(["iptables", "-I", chain, "1", *rule], check=True)
            yield environment
        finally:
            for process in reversed(processes):  # dockerd first: it stops its containers through containerd
                process.terminate()
                try:
                    process.wait(30)
                except subprocess.TimeoutExpired:
                    process.kill()
                    process.wait()
            subprocess.run(["ip", "link", "delete", "docker0"], capture_output=True)  # dockerd leaves it behind
            _remove_tree(root)


def _daemon(root: Path, program: str, *args) -> subprocess.Popen:
    log = open(root / f"{program}.log", "w")
    return subprocess.Popen([program, *map(str, args)], stdout=log, stderr=subprocess.STDOUT, start_new_session=True)


def _write(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


def _wait_for_socket(socket: Path, process: subprocess.Popen, log: Path) -> None:
    deadline = time.monotonic() + START_TIMEOUT
    while not socket.exists():
        if process.poll() is not None or time.monotonic() > deadline:
            raise RuntimeError(f"{process.args[0]} did not start: {log.read_text()[-2000:]}")
        time.sleep(0.1)


def _wait_for_docker(environment: dict, process: subprocess.Popen, log: Path) -> None:
    deadline = time.monotonic() + START_TIMEOUT
    while subprocess.run(["docker", "version"], env=environment, capture_output=True).returncode != 0:
        if process.poll() is not None or time.monotonic() > deadline:
            raise RuntimeError(f"dockerd did not start: {log.read_text()[-2000:]}")
        time.sleep(0.2)


@contextmanager
def machine_restored():
    """Put the firewall and the kernel settings back as they were, whatever happens inside."""
    firewall = subprocess.run(["iptables-save"], capture_output=True, text=True, check=True).stdout
    settings = {path: path.read_text() for path in SYSCTLS if path.exists()}
    try:
        yield
    finally:
        subprocess.run(["iptables-restore"], input=_restoring(firewall), text=True, check=True)
        for path, value in settings.items():
            path.write_text(value)


def _restoring(saved: str) -> str:
    """iptables-restore input that brings back `saved`: tables it lacks are emptied, with their policies ACCEPT."""
    current = subprocess.run(["iptables-save"], capture_output=True, text=True, check=True).stdout
    added = [line[1:] for line in current.splitlines() if line.startswith("*") and f"\n{line}\n" not in f"\n{saved}\n"]
    emptied = [f"*{table}\n" + "".join(f":{chain} ACCEPT [0:0]\n" for chain in BUILTIN_CHAINS[table]) + "COMMIT\n"
               for table in added]
    return saved + "".join(emptied)


def _remove_tree(root: Path) -> None:
    """Remove the engine's folder; overlay mounts left by a crash are unmounted first."""
    mounts = [fields[1] for fields in map(str.split, Path("/proc/mounts").read_text().splitlines())
              if fields[1].startswith(str(root))]
    for mount in sorted(mounts, reverse=True):
        subprocess.run(["umount", "-l", mount], capture_output=True)
    shutil.rmtree(root, ignore_errors=True)


STANDIN_CACHE = Path("/var/cache/scatterprop-test/python-3.11-slim-standin.tar")
STANDIN_PACKAGES = "python3,python3-venv,python3-pip,ca-certificates"
DEBIAN_MIRROR = "http://deb.debian.org/debian"
# What the official python:3.11-slim image sets and the Dockerfile relies on.
STANDIN_CHANGES = ("ENV PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin", "ENV LANG=C.UTF-8",
                   'CMD ["python3"]')


def import_standin_python(environment: dict) -> None:
    """Tag a Debian bookworm (Python 3.11) as python:3.11-slim, which Docker Hub would give but cannot be reached."""
    if not STANDIN_CACHE.exists():
        _build_standin(STANDIN_CACHE)
    changes = [argument for change in STANDIN_CHANGES for argument in ("--change", change)]
    subprocess.run(["docker", "import", *changes, str(STANDIN_CACHE), "python:3.11-slim"],
                   env=environment, check=True, capture_output=True)


def _build_standin(tarball: Path) -> None:
    """debootstrap a minimal bookworm with pip, made to behave as the official image does, into a tarball."""
    with tempfile.TemporaryDirectory(prefix="standin-", dir="/var/tmp") as work:
        system = Path(work) / "rootfs"
        subprocess.run(["debootstrap", "--variant=minbase", f"--include={STANDIN_PACKAGES}", "bookworm",
                        str(system), DEBIAN_MIRROR], check=True, capture_output=True)
        for marker in system.glob("usr/lib/python3*/EXTERNALLY-MANAGED"):  # the official image lets pip install
            marker.unlink()
        (system / "usr/bin/python").symlink_to("python3")
        _trust_this_machines_registry(system)
        for cache in ("var/cache/apt/archives", "var/lib/apt/lists"):  # only the download's leftovers
            shutil.rmtree(system / cache)
            (system / cache).mkdir()
        tarball.parent.mkdir(parents=True, exist_ok=True)
        partial = tarball.with_suffix(".partial")
        subprocess.run(["tar", "-C", str(system), "-cf", str(partial), "."], check=True)
        partial.rename(tarball)


def _trust_this_machines_registry(system: Path) -> None:
    """This machine reaches PyPI through its own certificate authorities and pip settings: give them to the image."""
    authorities = Path("/usr/local/share/ca-certificates")
    if authorities.is_dir():
        shutil.copytree(authorities, system / authorities.relative_to("/"), dirs_exist_ok=True)
        subprocess.run(["chroot", str(system), "update-ca-certificates"], check=True, capture_output=True)
    if Path("/etc/pip.conf").exists():  # here: which bundle of authorities pip should trust
        shutil.copy("/etc/pip.conf", system / "etc/pip.conf")


def checked(environment: dict, *command) -> str:
    """Run a docker or docker-compose command on the engine; its output, or a failed assertion with its errors."""
    done = subprocess.run(command, env=environment, capture_output=True, text=True, timeout=STEP_TIMEOUT)
    assert done.returncode == 0, f"{' '.join(map(str, command))}: {done.stderr[-3000:]}"
    return done.stdout


def container_log(environment: dict, container: str) -> str:
    done = subprocess.run(["docker", "logs", container], env=environment, capture_output=True, text=True,
                          timeout=STEP_TIMEOUT)
    return done.stdout + done.stderr


def wait_for_log(environment: dict, container: str, text: str, count: int = 1) -> str:
    """The container's log once `text` is in it `count` times; fails if the container stops first."""
    deadline = time.monotonic() + STEP_TIMEOUT
    while (log := container_log(environment, container)).count(text) < count:
        state = checked(environment, "docker", "inspect", "--format", "{{.State.Running}}", container).strip()
        assert state == "true" and time.monotonic() < deadline, log[-3000:]
        time.sleep(0.2)
    return log
