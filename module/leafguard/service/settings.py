"""Service settings, parsed once from the command line and environment into a frozen record."""

from __future__ import annotations

import argparse
import ipaddress
import math
import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from leafguard.capture.live import interface_macs
from leafguard.errors import ConfigurationError
from leafguard.hub.settings import EDGE_ENV, EdgeSettings, LeafClientSettings
from leafguard.hub.spool import DEFAULT_SPOOL_MAX_BYTES, FsyncPolicy, SpoolSettings
from leafguard.observe.settings import AnalyzerSettings

EDGE_HTTP_PORT = 9600
"""Where edgeAgent and edgeHub serve their built-in metrics; the metrics collector expects modules there too."""


@dataclass(frozen=True, slots=True)
class ServiceSettings:
    interfaces: tuple[str, ...]
    pcap: Path | None
    replay_speed: float
    local_dir: Path | None
    analyzer: AnalyzerSettings
    write_interval_s: float
    extra_filter: str
    promiscuous: bool
    http_port: int | None
    """``/healthz`` and ``/metrics``: on by default in edge mode (:data:`EDGE_HTTP_PORT`), off locally."""
    http_host: str = "127.0.0.1"
    """Loopback unless configured: on the host network, 0.0.0.0 would serve the leaf-facing interfaces too."""
    health_down_after_s: float = 60.0
    """``/healthz`` answers 503 once capture or the uplink has been down for longer than this."""
    tick_interval_s: float = 1.0
    desired_poll_interval_s: float = 2.0
    """How often the settings files (``gateway.json``, ``desired/``) and the module twin's document are read."""
    drop_report_interval_s: float = 60.0
    """At most one capture-drop Diagnostic per leaf per this interval."""
    shutdown_deadline_s: float = 10.0
    edge: EdgeSettings | None = None
    """Edge mode (inside IoT Edge, no local folder): the uplink through the edge hub instead of ``local_dir``."""
    stop_after_replay: bool = False
    """``--demo``: stop once the replay is done (the ordered shutdown flushes and sends every message)."""
    spool: SpoolSettings | None = None
    """The data directory's durable spool (``--data-dir`` / ``LEAFGUARD_DATA_DIR``); None: memory only."""

    @property
    def live(self) -> bool:
        return bool(self.interfaces)

    @classmethod
    def from_args(cls, args: argparse.Namespace, env: Mapping[str, str] = os.environ) -> ServiceSettings:
        interfaces = tuple(args.interface or ())
        demo = bool(getattr(args, "demo", False))
        pcap = args.pcap
        if demo:
            from leafguard.demo import demo_capture

            pcap = str(demo_capture())
        env_ifaces = env.get("LEAFGUARD_INTERFACES", "")
        if not interfaces and not pcap and env_ifaces:
            interfaces = tuple(i for i in env_ifaces.replace(",", " ").split() if i)
        if not interfaces and not pcap:
            raise ConfigurationError(
                "leafguard run needs a source: --interface IF (or LEAFGUARD_INTERFACES), --pcap FILE or --demo"
            )
        local = args.local_dir or env.get("LEAFGUARD_LOCAL_DIR")
        edge = None
        if local is None:
            if not any(k in env for k in EDGE_ENV):
                raise ConfigurationError("outside IoT Edge, leafguard run needs --local-dir DIR (local mode)")
            # Edge mode; names the missing variables if any.
            leaves = LeafClientSettings.from_env(env, secrets=getattr(args, "leaf_secrets", None),
                                                 group_key_file=getattr(args, "leaf_group_key_file", None))
            edge = EdgeSettings.from_env(env, leaves)
        speed = float(args.replay_speed)
        if math.isnan(speed) or speed < 0:
            raise ConfigurationError("--replay-speed must be 0 (as fast as possible) or a positive factor")
        if args.write_interval <= 0:
            raise ConfigurationError("--write-interval must be positive")
        return cls(
            interfaces=interfaces,
            pcap=Path(pcap) if pcap else None,
            replay_speed=speed,
            local_dir=Path(local) if local is not None else None,
            analyzer=AnalyzerSettings.from_cli(
                args.leaf_net or _env_list(env, "LEAFGUARD_LEAF_NETS"),
                # The gateway's own MACs: those given, and those of the interfaces it captures on.
                [*(args.gateway_mac or _env_list(env, "LEAFGUARD_GATEWAY_MACS") or []), *interface_macs(interfaces)],
                learning_period_s=_number(args.learning_period, env, "LEAFGUARD_LEARNING_PERIOD_S"),
                silent_after_s=_number(args.silent_after, env, "LEAFGUARD_SILENT_AFTER_S"),
                flood_rate_per_s=_number(args.flood_rate, env, "LEAFGUARD_FLOOD_RATE"),
            ),
            write_interval_s=float(args.write_interval),
            extra_filter=args.extra_filter or "",
            promiscuous=not args.no_promisc,
            # A demo lasts a second: no HTTP server unless asked for (9600 may be taken on a workstation).
            http_port=_http_port(args.http_port, env, edge is not None and not demo),
            http_host=_http_host(args.http_host or env.get("LEAFGUARD_HTTP_HOST", "")),
            health_down_after_s=_positive(env, "LEAFGUARD_HEALTH_DOWN_AFTER_S", 60.0),
            desired_poll_interval_s=_positive(env, "LEAFGUARD_SETTINGS_POLL_S", 2.0),
            edge=edge,
            stop_after_replay=demo,
            spool=_spool_settings(getattr(args, "data_dir", None) or env.get("LEAFGUARD_DATA_DIR"), env),
        )


def _env_list(env: Mapping[str, str], name: str) -> list[str] | None:
    """A comma- or space-separated list from the environment (an IoT Edge manifest's ``env``), or None."""
    items = [i for i in env.get(name, "").replace(",", " ").split() if i]
    return items or None


def _number(flag: float | None, env: Mapping[str, str], name: str) -> float | None:
    """A flag's number (seconds, or a rate), else the environment's, else None."""
    if flag is not None:
        return flag
    text = env.get(name, "").strip()
    if not text:
        return None
    try:
        return float(text)
    except ValueError as exc:
        raise ConfigurationError(f"{name}={text!r} is not a number") from exc


def _http_port(flag: int | None, env: Mapping[str, str], edge: bool) -> int | None:
    """``--http-port``, else ``LEAFGUARD_HTTP_PORT`` (``off`` disables it), else 9600 in edge mode."""
    if flag is not None:
        text, name = str(flag), "--http-port"
    else:
        text, name = env.get("LEAFGUARD_HTTP_PORT", "").strip(), "LEAFGUARD_HTTP_PORT"
        if not text:
            return EDGE_HTTP_PORT if edge else None
        if text.lower() == "off":
            return None
    try:
        port = int(text)
    except ValueError:
        port = -1
    if not 1 <= port <= 65535:
        raise ConfigurationError(f"{name}={text!r} is not a TCP port (1-65535{', or off' if flag is None else ''})")
    return port


def _http_host(text: str) -> str:
    """An IP address to bind (``LEAFGUARD_HTTP_HOST`` / ``--http-host``); loopback when not configured."""
    text = text.strip()
    if not text:
        return "127.0.0.1"
    try:
        ipaddress.ip_address(text)
    except ValueError as exc:
        raise ConfigurationError(f"LEAFGUARD_HTTP_HOST={text!r} is not an IP address (e.g. 0.0.0.0 or ::1)") from exc
    return text


def _positive(env: Mapping[str, str], name: str, default: float) -> float:
    value = _number(None, env, name)
    if value is None:
        return default
    if not (math.isfinite(value) and value > 0):
        raise ConfigurationError(f"{name} must be a positive number of seconds")
    return value


def _spool_settings(data_dir: str | None, env: Mapping[str, str]) -> SpoolSettings | None:
    """The spool in ``--data-dir`` / ``LEAFGUARD_DATA_DIR``, tuned by ``LEAFGUARD_SPOOL_MAX_BYTES``,
    ``LEAFGUARD_SPOOL_FSYNC`` (always, interval, never) and ``LEAFGUARD_SPOOL_FSYNC_INTERVAL_S``."""
    if not data_dir:
        return None
    raw_max = env.get("LEAFGUARD_SPOOL_MAX_BYTES", "").strip()
    try:
        max_bytes = int(raw_max) if raw_max else DEFAULT_SPOOL_MAX_BYTES
    except ValueError as exc:
        raise ConfigurationError(f"LEAFGUARD_SPOOL_MAX_BYTES={raw_max!r} is not a number of bytes") from exc
    raw_policy = env.get("LEAFGUARD_SPOOL_FSYNC", "interval").strip().lower()
    try:
        policy = FsyncPolicy(raw_policy)
    except ValueError as exc:
        raise ConfigurationError(f"LEAFGUARD_SPOOL_FSYNC={raw_policy!r}: expected always, interval or never") from exc
    return SpoolSettings(
        Path(data_dir),
        max_bytes=max_bytes,
        fsync=policy,
        fsync_interval_s=_positive(env, "LEAFGUARD_SPOOL_FSYNC_INTERVAL_S", 1.0),
    )
