"""Edge-mode settings: the module identity from the ``IOTEDGE_*`` environment and the uplink's tuning."""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

from leafguard.errors import ConfigurationError
from leafguard.hub.leaves import IdentityMode, parse_identity_mode
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
    "LEAFGUARD_INFLIGHT_WINDOW": "inflight_window",
}
_INT_FIELDS = frozenset({"outbox_max_bytes", "inflight_window"})


@dataclass(frozen=True, slots=True)
class LeafClientSettings:
    """Managed leaves: where their credentials are, and how each leaf's own client behaves."""

    secrets_path: Path | None = None
    """``LEAFGUARD_LEAF_SECRETS`` / ``--leaf-secrets``: JSON, device id → key or connection string."""
    group_key_path: Path | None = None
    """``LEAFGUARD_LEAF_GROUP_KEY_FILE`` / ``--leaf-group-key-file``: the enrolment group's base64 key."""
    default_mode: IdentityMode = IdentityMode.MODULE
    """``LEAFGUARD_LEAF_IDENTITY``: the twin of a leaf whose entry does not say (``module`` or ``device``)."""
    connect_timeout_s: float = 30.0
    twin_timeout_s: float = 15.0
    send_timeout_s: float = 30.0
    backoff_initial_s: float = 1.0
    backoff_max_s: float = 60.0
    health_interval_s: float = 60.0
    """A leaf's inventory section alone is reported at most this often; a configuration change goes at once."""
    outbox_max_bytes: int = 1024 * 1024
    """Per leaf: messages waiting for the hub's acknowledgement, in body bytes (drop Low, then oldest)."""
    keep_alive_s: int = 60

    @property
    def configured(self) -> bool:
        return self.secrets_path is not None or self.group_key_path is not None

    def __post_init__(self) -> None:
        for name in ("connect_timeout_s", "twin_timeout_s", "send_timeout_s", "backoff_initial_s",
                     "health_interval_s"):
            value = getattr(self, name)
            if not (math.isfinite(value) and value > 0):
                raise ConfigurationError(f"leaf client settings: {name} must be a positive number of seconds")
        if self.backoff_max_s < self.backoff_initial_s:
            raise ConfigurationError("leaf client settings: backoff_max_s must be at least backoff_initial_s")
        if self.outbox_max_bytes < 262_144:
            raise ConfigurationError("leaf client settings: the outbox must hold at least one largest message")

    @classmethod
    def from_env(cls, env: Mapping[str, str], *, secrets: str | None = None,
                 group_key_file: str | None = None) -> LeafClientSettings:
        """Flags win over ``LEAFGUARD_LEAF_SECRETS`` / ``LEAFGUARD_LEAF_GROUP_KEY_FILE`` / ``LEAFGUARD_LEAF_IDENTITY``;
        ``LEAFGUARD_LEAF_BACKOFF_MAX_S`` tunes the backoff."""
        secrets = secrets or env.get("LEAFGUARD_LEAF_SECRETS") or None
        group = group_key_file or env.get("LEAFGUARD_LEAF_GROUP_KEY_FILE") or None
        mode = parse_identity_mode(env.get("LEAFGUARD_LEAF_IDENTITY") or None, "LEAFGUARD_LEAF_IDENTITY")
        backoff_max_s = 60.0
        raw = env.get("LEAFGUARD_LEAF_BACKOFF_MAX_S")
        if raw:
            try:
                backoff_max_s = float(raw)
            except ValueError as exc:
                raise ConfigurationError(f"LEAFGUARD_LEAF_BACKOFF_MAX_S={raw!r} is not a number") from exc
        return cls(Path(secrets) if secrets else None, Path(group) if group else None, mode,
                   backoff_initial_s=min(1.0, backoff_max_s), backoff_max_s=backoff_max_s)


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
    inflight_window: int = 16
    """Messages handed to the SDK and not yet acknowledged, at most (below paho's own limit of 20)."""
    send_timeout_s: float = 30.0
    """A send not acknowledged within this time means the connection is broken: reconnect, send again."""
    connect_timeout_s: float = 60.0
    twin_timeout_s: float = 30.0
    """The SDK has no timeout on twin requests (a lost response waits forever); ours."""
    backoff_initial_s: float = 1.0
    backoff_max_s: float = 60.0
    reported_interval_s: float = 0.5
    """At most one reported-properties patch per this interval: changes within it go in one patch. Patches go
    only when something changed, so this bounds bursts; it is short so that a change shows within a second."""
    health_interval_s: float = 60.0
    """The health section alone is reported at most this often."""
    desired_queue_max: int = 64
    method_timeout_s: float = 25.0
    """A direct method not answered within this is answered 504 (IoT Hub's default response timeout is 30 s)."""
    max_concurrent_methods: int = 8
    """Method calls in progress at once; more are answered 503 at once (policy: reject when busy)."""
    keep_alive_s: int = 60
    workload_uri: str = ""
    """``IOTEDGE_WORKLOADURI``: the trust bundle for the leaves' own clients comes from there."""
    api_version: str = ""
    module_generation_id: str = ""
    ca_file: Path | None = None
    """``EdgeModuleCACertificateFile`` (the local-dev fallback): the edge hub's CA when there is no workload API."""
    leaves: LeafClientSettings = field(default_factory=LeafClientSettings)

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
        if not 1 <= self.inflight_window <= 20:
            raise ConfigurationError("edge settings: inflight_window must be 1 to 20 (paho keeps at most 20 in flight)")
        if self.desired_queue_max < 1 or self.keep_alive_s < 1 or self.max_concurrent_methods < 1:
            raise ConfigurationError(
                "edge settings: desired_queue_max, keep_alive_s and max_concurrent_methods must be positive"
            )

    @property
    def identity(self) -> str:
        return f"{self.device_id}/{self.module_id}"

    @classmethod
    def from_env(cls, env: Mapping[str, str], leaves: LeafClientSettings | None = None) -> EdgeSettings:
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
                tuning[field_name] = int(raw) if field_name in _INT_FIELDS else float(raw)
            except ValueError as exc:
                raise ConfigurationError(f"{var}={raw!r} is not a number") from exc
        return cls(
            hub_hostname=env["IOTEDGE_IOTHUBHOSTNAME"],
            device_id=env["IOTEDGE_DEVICEID"],
            module_id=env["IOTEDGE_MODULEID"],
            gateway_hostname=env["IOTEDGE_GATEWAYHOSTNAME"],
            workload_uri=env["IOTEDGE_WORKLOADURI"],
            api_version=env["IOTEDGE_APIVERSION"],
            module_generation_id=env["IOTEDGE_MODULEGENERATIONID"],
            ca_file=Path(env["EdgeModuleCACertificateFile"]) if env.get("EdgeModuleCACertificateFile") else None,
            leaves=leaves or LeafClientSettings.from_env(env),
            **tuning,  # type: ignore[arg-type]
        )
