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


def enable_tcp_nodelay(sdk_client: Any) -> bool:
    """Hook every MQTT socket the client opens; returns whether the hook is in place."""
    stage = getattr(getattr(getattr(sdk_client, "_mqtt_pipeline", None), "_pipeline", None), "next", None)
    while stage is not None:
        transport = getattr(stage, "transport", None)
        paho = getattr(transport, "_mqtt_client", None)
        if paho is not None and hasattr(paho, "on_socket_open"):
            paho.on_socket_open = _set_nodelay
            return True
        stage = getattr(stage, "next", None)
    log.warning("cannot set TCP_NODELAY on the MQTT socket (SDK internals changed): large messages are slower")
    return False
