"""``TCP_NODELAY`` on the SDK's MQTT socket.

A security message is larger than one TCP segment; with Nagle's algorithm its last segment waits for the ACK
of the previous ones, and the edge hub delays that ACK (delayed ACKs, ~40 ms): a 20 KB PUBLISH took ~44 ms
instead of 0.8 ms, capping large messages at ~23/s. azure-iot-device offers no socket option, but its paho
client calls ``on_socket_open`` with every socket it opens (each connect, each reconnect); we set the option
there. The client is reached through the SDK's pipeline (private attributes, pinned by
``test_tcp_nodelay_is_set_on_the_mqtt_socket``): if a future SDK moves them, we log once and go on without.
"""

from __future__ import annotations

import logging
import socket
from typing import Any

log = logging.getLogger("leafguard.hub")


def _set_nodelay(_client: Any, _userdata: Any, sock: Any) -> None:
    try:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    except (OSError, AttributeError) as exc:  # websockets wrapper, or a closed socket
        log.debug("TCP_NODELAY not set: %r", exc)


def paho_client(sdk_client: Any) -> Any:
    """The paho client under an SDK client's pipeline (None: the SDK's internals changed)."""
    stage = getattr(getattr(getattr(sdk_client, "_mqtt_pipeline", None), "_pipeline", None), "next", None)
    while stage is not None:
        paho = getattr(getattr(stage, "transport", None), "_mqtt_client", None)
        if paho is not None and hasattr(paho, "on_socket_open"):
            return paho
        stage = getattr(stage, "next", None)
    return None


def enable_tcp_nodelay(sdk_client: Any) -> bool:
    """Hook every MQTT socket the client opens; returns whether the hook is in place."""
    paho = paho_client(sdk_client)
    if paho is not None:
        paho.on_socket_open = _set_nodelay
        return True
    log.warning("cannot set TCP_NODELAY on the MQTT socket (SDK internals changed): large messages are slower")
    return False
