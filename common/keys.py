"""CurveZMQ keys made and checked by pyzmq's `zmq.auth`, and the socket options that use them.

A key folder made by `coordinator keygen DIR`:

    DIR/coordinator.key             the coordinator's public key: every worker needs it
    DIR/coordinator.key_secret      the coordinator's key pair: stays with the coordinator
    DIR/allowed/<name>.key          each worker's public key: the coordinator's allow-list
    DIR/workers/<name>.key_secret   each worker's key pair: give it to that worker only

To admit another worker, put its public key file into DIR/allowed before the coordinator starts. A key
file's name is the worker's name: the coordinator admits the key under that name only.
"""

import logging
from contextlib import contextmanager
from pathlib import Path

import zmq
import zmq.auth
from zmq.auth.thread import ThreadAuthenticator

from common.errors import InputError, UserError

COORDINATOR = "coordinator"
ALLOWED = "allowed"
WORKERS = "workers"
SECRET_MODE = 0o600  # a secret key file is readable by its owner only
MAX_REMEMBERED_KEYS = 10_000  # refused keys logged once each; past that the set starts afresh

log = logging.getLogger("coordinator")


class KeyFileError(InputError):
    """A key folder or key file that cannot be read."""


class KeyFolderError(UserError):
    """A folder `coordinator keygen` cannot write new keys into."""


def generate(folder: Path, worker_names: list) -> None:
    """Write the coordinator's key pair and one per worker, laid out as the module docstring shows."""
    folder = Path(folder)
    if (folder / f"{COORDINATOR}.key_secret").exists():
        raise KeyFolderError(f"{folder} already holds keys; new ones would lock out every worker")
    try:
        (folder / ALLOWED).mkdir(parents=True, exist_ok=True)
        (folder / WORKERS).mkdir(exist_ok=True)
        Path(zmq.auth.create_certificates(folder, COORDINATOR)[1]).chmod(SECRET_MODE)
        for name in worker_names:
            public_file, secret_file = zmq.auth.create_certificates(folder / WORKERS, name)
            Path(secret_file).chmod(SECRET_MODE)
            Path(public_file).replace(folder / ALLOWED / f"{name}.key")
    except OSError as error:
        raise KeyFolderError(f"cannot write keys into {folder}: {error.strerror}") from None


def worker_secret_file(folder: Path, name: str) -> Path:
    return Path(folder) / WORKERS / f"{name}.key_secret"


def worker_name(secret_file: Path) -> str:
    """The name a worker key pair file was made for (`worker_secret_file`'s inverse): the one it may register as."""
    return Path(secret_file).name.removesuffix(".key_secret")


def server_public_file(folder: Path) -> Path:
    return Path(folder) / f"{COORDINATOR}.key"


def make_server(socket: zmq.Socket, folder: Path) -> None:
    """Make a socket a CURVE server with the coordinator's key pair; set before it binds."""
    public, secret = _key_pair(Path(folder) / f"{COORDINATOR}.key_secret")
    socket.curve_publickey, socket.curve_secretkey = public, secret
    socket.curve_server = True


def make_client(socket: zmq.Socket, secret_file: Path, server_file: Path) -> None:
    """Make a socket a CURVE client with a worker's key pair and the server's public key; set before it connects."""
    socket.curve_publickey, socket.curve_secretkey = _key_pair(secret_file)
    socket.curve_serverkey = _load(server_file)[0]


@contextmanager
def allow_list(folder: Path, context: zmq.Context):
    """pyzmq's authenticator, admitting to this context's CURVE servers only the keys in folder/allowed."""
    allowed = Path(folder) / ALLOWED
    if not allowed.is_dir():
        raise KeyFileError(f"{allowed} is not a folder of allowed worker keys")
    authenticator = ThreadAuthenticator(context)
    authenticator.start()
    try:
        authenticator.configure_curve_callback(domain="*", credentials_provider=AllowedKeys(allowed))
        yield authenticator
    finally:
        authenticator.stop()


def allowed_names(folder: Path) -> dict:
    """Each allowed worker's public key (z85, as the socket reports it) -> the name of its key file."""
    names = {}
    for path in sorted((Path(folder) / ALLOWED).glob("*.key")):
        public, _ = _load(path)
        names[public.decode()] = path.stem
    return names


class AllowedKeys:
    """The public keys in an allow-list folder; pyzmq's authenticator asks `callback` at every handshake.

    A refused key is logged once: a worker with the wrong key tries again every 100 ms or so.
    """

    def __init__(self, folder: Path):
        self.folder = folder
        self.keys = set(zmq.auth.load_certificates(folder))  # z85 public keys, as bytes
        self.refused = set()

    def callback(self, domain: str, key: bytes) -> bool:
        if key in self.keys:
            return True
        if key not in self.refused:
            if len(self.refused) >= MAX_REMEMBERED_KEYS:  # strangers can make up keys without end
                self.refused.clear()
            self.refused.add(key)
            log.warning("refused CURVE key %s: it is not in %s", key.decode(), self.folder)
        return False


def _key_pair(path: Path) -> tuple:
    public, secret = _load(path)
    if secret is None:
        raise KeyFileError(f"{path} holds no secret key")
    return public, secret


def _load(path: Path) -> tuple:
    try:
        return zmq.auth.load_certificate(path)
    except (OSError, ValueError) as error:
        raise KeyFileError(f"cannot read key file {path}: {error}") from None
