"""Edge-mode settings: the module identity from the ``IOTEDGE_*`` environment and the uplink's tuning."""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass

from leafguard.errors import ConfigurationError
from leafguard.hub.outbox import DEFAULT_OUTBOX_MAX_BYTES

EDGE_ENV = (
    "IOTEDGE_IOTHUBHOSTNAME",
    "IOTEDGE_DEVICEID",
    "IOTEDGE_MODULEID",
    "IOTEDGE_GATEWAYHOSTNAME",
    "IOTEDGE_MODULEGENERATIONID",
    "IOTEDGE_WORKLOADURI",
    "IOTEDGE_APIVERSION",
)
"""The seven variables ``IoTHubModuleClient.create_from_edge_environment()`` needs (iothub-protocol.md §1.2)."""

SECURITY_OUTPUT = "security"
"""The module output the deployment manifest routes to ``$upstream``."""

_ENV_OVERRIDES = {
    "LEAFGUARD_OUTBOX_MAX_BYTES": "outbox_max_bytes",
    "LEAFGUARD_SEND_TIMEOUT_S": "send_timeout_s",
    "LEAFGUARD_CONNECT_TIMEOUT_S": "connect_timeout_s",
    "LEAFGUARD_BACKOFF_MAX_S": "backoff_max_s",
    "LEAFGUARD_REPORTED_INTERVAL_S": "reported_interval_s",
    "LEAFGUARD_METHOD_TIMEOUT_S": "method_timeout_s",
}


@dataclass(frozen=True, slots=True)
class EdgeSettings:
    """Who we are to the edge hub, and how the uplink behaves. Validated on construction."""

    hub_hostname: str
    device_id: str
    module_id: str
    gateway_hostname: str
    output_name: str = SECURITY_OUTPUT
    outbox_max_bytes: int = DEFAULT_OUTBOX_MAX_BYTES
    """Security messages waiting for the hub's acknowledgement, in body bytes (policy: drop Low, then oldest)."""
    send_timeout_s: float = 30.0
    """A send not acknowledged within this time means the connection is broken: reconnect, send again."""
    connect_timeout_s: float = 60.0
    twin_timeout_s: float = 30.0
    """The SDK has no timeout on twin requests (a lost response waits forever); ours."""
    backoff_initial_s: float = 1.0
    backoff_max_s: float = 60.0
    reported_interval_s: float = 5.0
    """At most one reported-properties patch per this interval (leaf changes are coalesced)."""
    health_interval_s: float = 60.0
    """The health section alone is reported at most this often."""
    desired_queue_max: int = 64
    method_timeout_s: float = 25.0
    """A direct method not answered within this is answered 504 (IoT Hub's default response timeout is 30 s)."""
    max_concurrent_methods: int = 8
    """Method calls in progress at once; more are answered 503 at once (policy: reject when busy)."""
    keep_alive_s: int = 60

    def __post_init__(self) -> None:
        for name in ("hub_hostname", "device_id", "module_id", "gateway_hostname", "output_name"):
            if not getattr(self, name):
                raise ConfigurationError(f"edge settings: {name} is empty")
        for name in (
            "send_timeout_s",
            "connect_timeout_s",
            "twin_timeout_s",
            "backoff_initial_s",
            "reported_interval_s",
            "health_interval_s",
            "method_timeout_s",
        ):
            value = getattr(self, name)
            if not (math.isfinite(value) and value > 0):
                raise ConfigurationError(f"edge settings: {name} must be a positive number of seconds")
        if self.backoff_max_s < self.backoff_initial_s:
            raise ConfigurationError("edge settings: backoff_max_s must be at least backoff_initial_s")
        if self.outbox_max_bytes < 262_144:
            raise ConfigurationError("edge settings: the outbox must hold at least one largest message (256 KiB)")
        if self.desired_queue_max < 1 or self.keep_alive_s < 1 or self.max_concurrent_methods < 1:
            raise ConfigurationError(
                "edge settings: desired_queue_max, keep_alive_s and max_concurrent_methods must be positive"
            )

    @property
    def identity(self) -> str:
        return f"{self.device_id}/{self.module_id}"

    @classmethod
    def from_env(cls, env: Mapping[str, str]) -> EdgeSettings:
        """From the ``IOTEDGE_*`` variables (all required) and optional ``LEAFGUARD_*`` tuning overrides."""
        missing = [k for k in EDGE_ENV if not env.get(k)]
        if missing:
            raise ConfigurationError(f"incomplete IoT Edge environment: {', '.join(missing)} not set")
        tuning: dict[str, float | int] = {}
        for var, field_name in _ENV_OVERRIDES.items():
            raw = env.get(var)
            if raw is None:
                continue
            try:
                tuning[field_name] = int(raw) if field_name == "outbox_max_bytes" else float(raw)
            except ValueError as exc:
                raise ConfigurationError(f"{var}={raw!r} is not a number") from exc
        return cls(
            hub_hostname=env["IOTEDGE_IOTHUBHOSTNAME"],
            device_id=env["IOTEDGE_DEVICEID"],
            module_id=env["IOTEDGE_MODULEID"],
            gateway_hostname=env["IOTEDGE_GATEWAYHOSTNAME"],
            **tuning,  # type: ignore[arg-type]
        )
