"""What every bound ZeroMQ socket of ours does the same way."""

import zmq


def bind(socket: zmq.Socket, address: str, error: type[Exception], what: str = "", when_in_use: str = "") -> str:
    """Bind `socket` to `address` and return the endpoint bound (a * port filled in); if it cannot be bound, close
    the socket and raise `error`, one line for the user, which ends with `when_in_use` if the address is taken."""
    try:
        socket.bind(address)
    except zmq.ZMQError as problem:
        socket.close()
        hint = f"; {when_in_use}" if when_in_use and problem.errno == zmq.EADDRINUSE else ""
        raise error(f"cannot bind {what}{address}: {problem}{hint}") from None
    return socket.getsockopt_string(zmq.LAST_ENDPOINT)
