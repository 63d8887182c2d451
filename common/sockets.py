"""What every bound ZeroMQ socket of ours does the same way."""

import zmq


def bind(socket: zmq.Socket, address: str, error: type[Exception], what: str = "") -> str:
    """Bind `socket` to `address` and return the endpoint bound (a * port filled in); if it cannot be bound, close
    the socket and raise `error`, one line for the user."""
    try:
        socket.bind(address)
    except zmq.ZMQError as problem:
        socket.close()
        raise error(f"cannot bind {what}{address}: {problem}") from None
    return socket.getsockopt_string(zmq.LAST_ENDPOINT)
