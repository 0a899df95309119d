"""The Defender for IoT (legacy ``azureiotsecurity``) agent configuration: parse, validate, report.

The configuration lives in the desired properties under :data:`CONFIG_OBJECT_NAME`; every property is wrapped as
``{"value": …}`` (defender-spec §1.1). Parsing follows the reference agents' contract (§1.3, §1.4):

* a missing key, or a key whose value is ``null``, takes its default;
* a key present with a missing/``null``/wrongly typed ``value`` is a *TypeMismatch*; so is an unparseable ISO 8601
  duration, a zero duration, an unknown priority and (our addition, never a crash) a size outside the documented
  range (message size 8192..262144, cache at least 8192);
* the update is **atomic**: one bad key and nothing changes — the previous configuration stays in force, is
  reported back unchanged and a ConfigurationError event names the bad keys;
* an accepted configuration is checked for the advisory issues the reference agents report (NotOptimal,
  Conflict); those do not stop it from being applied.

Patches are never parsed as the whole object (that is C's bug, §1.3): the caller keeps the whole desired
document, merges each patch into it (:func:`merge_desired_patch`) and recomputes from the result.
"""

from __future__ import annotations

import enum
import math
import re
from collections.abc import Mapping
from dataclasses import dataclass, fields, replace
from typing import Any, Literal

from leafguard.errors import ConfigurationError

CONFIG_OBJECT_NAME = "ms_iotn:urn_azureiot_Security_SecurityAgentConfiguration"
"""The key of the Defender agent configuration object in the twin's desired and reported properties."""

MIN_MESSAGE_SIZE_BYTES = 8192
MAX_MESSAGE_SIZE_BYTES = 262144
"""IoT Hub's device-to-cloud message limit (256 KB); the twin schema's maximum too."""
MIN_CACHE_SIZE_BYTES = 8192
MESSAGE_BILLING_MULTIPLE_BYTES = 4096
"""IoT Hub meters messages in 4 KB units; the reference agents call other sizes "not optimal"."""

ErrorType = Literal["TypeMismatch", "NotOptimal", "Conflict"]


class Priority(enum.Enum):
    """Where an event type's events go: the high or the low queue, or nowhere (not produced at all)."""

    HIGH = "High"
    LOW = "Low"
    OFF = "Off"


@dataclass(frozen=True, slots=True)
class ConfigIssue:
    """One problem found in a desired configuration; becomes one ConfigurationError payload item."""

    name: str
    """The configuration key (``ConfigurationName``)."""
    error_type: ErrorType
    used: str
    """The value the agent actually uses for that key (``UsedConfiguration``)."""
    message: str


class AgentConfigError(ConfigurationError):
    """A desired agent configuration was rejected; the previous configuration stays in force."""

    def __init__(self, issues: tuple[ConfigIssue, ...]) -> None:
        self.issues = issues
        super().__init__("; ".join(f"{i.name}: {i.message}" for i in issues))


@dataclass(frozen=True, slots=True)
class AgentConfig:
    """The effective agent configuration of one leaf. Defaults are the twin schema's (defender-spec §1.2)."""

    high_priority_message_frequency_s: float = 7 * 60.0
    low_priority_message_frequency_s: float = 5 * 3600.0
    snapshot_frequency_s: float = 13 * 3600.0
    max_local_cache_size_bytes: int = 2_560_000
    max_message_size_bytes: int = 204_800
    priority_connected_hardware: Priority = Priority.LOW
    priority_listening_ports: Priority = Priority.HIGH
    priority_process_create: Priority = Priority.LOW
    priority_process_terminate: Priority = Priority.LOW
    priority_system_information: Priority = Priority.LOW
    priority_local_users: Priority = Priority.HIGH
    priority_login: Priority = Priority.HIGH
    priority_connection_create: Priority = Priority.LOW
    priority_firewall_configuration: Priority = Priority.LOW
    priority_os_baseline: Priority = Priority.LOW
    priority_diagnostic: Priority = Priority.LOW
    priority_configuration_error: Priority = Priority.LOW
    priority_dropped_events_statistics: Priority = Priority.LOW
    priority_message_statistics: Priority = Priority.LOW
    aggregation_enabled_process_create: bool = True
    aggregation_interval_process_create_s: float = 3600.0
    aggregation_enabled_connection_create: bool = True
    aggregation_interval_connection_create_s: float = 3600.0
    aggregation_enabled_process_terminate: bool = True
    aggregation_interval_process_terminate_s: float = 3600.0
    baseline_custom_checks_enabled: bool = False
    baseline_custom_checks_file_path: str | None = None
    baseline_custom_checks_file_hash: str | None = None
    hub_resource_id: str = ""

    def __post_init__(self) -> None:
        problems = _range_problems(self)
        if problems:
            raise AgentConfigError(tuple(ConfigIssue(k, "TypeMismatch", "", m) for k, m in problems))

    # -- construction ---------------------------------------------------------------------------------------

    @classmethod
    def parse(cls, desired: Mapping[str, Any]) -> AgentConfig:
        """Strict parse of a whole desired-properties document; raises :class:`AgentConfigError`."""
        values, issues = _parse_section(desired.get(CONFIG_OBJECT_NAME))
        if issues:
            raise AgentConfigError(issues)
        return cls(**values)

    def apply_desired(self, desired: object) -> ConfigOutcome:
        """The configuration that a desired-properties document yields, with this one as the previous one.

        ``desired`` is the *whole* desired-properties document (``properties.desired``), not a patch;
        anything that is not a JSON object is rejected. Never raises for bad content: a rejected update
        returns this configuration unchanged, ``accepted=False`` and TypeMismatch issues; an accepted one
        returns the new configuration and its advisory issues.
        """
        section = desired.get(CONFIG_OBJECT_NAME) if isinstance(desired, Mapping) else desired
        values, issues = _parse_section(section)
        if issues:
            current = self.reported_section()
            used = tuple(replace(i, used=_used_text(current.get(i.name))) for i in issues)
            return ConfigOutcome(self, False, used)
        new = replace(AgentConfig(), **values)
        return ConfigOutcome(new, True, new.advisories())

    # -- checks and reporting -------------------------------------------------------------------------------

    def advisories(self) -> tuple[ConfigIssue, ...]:
        """The reference agents' advisory checks (defender-spec §1.4), in their order."""
        out: list[ConfigIssue] = []
        if self.max_message_size_bytes % MESSAGE_BILLING_MULTIPLE_BYTES:
            out.append(
                ConfigIssue(
                    "maxMessageSizeInBytes",
                    "NotOptimal",
                    str(self.max_message_size_bytes),
                    "Message size should be multiple of 4096",
                )
            )
        if self.max_local_cache_size_bytes < self.max_message_size_bytes:
            out.append(
                ConfigIssue(
                    "maxLocalCacheSizeInBytes",
                    "Conflict",
                    str(self.max_local_cache_size_bytes),
                    "MaxLocalCacheSize is smaller than MaxMessageSize",
                )
            )
        if self.high_priority_message_frequency_s > self.low_priority_message_frequency_s:
            out.append(
                ConfigIssue(
                    "highPriorityMessageFrequency",
                    "Conflict",
                    format_duration(self.high_priority_message_frequency_s),
                    "High priority interval is longer than low priority interval",
                )
            )
        return tuple(out)

    def reported_section(self) -> dict[str, dict[str, Any]]:
        """Every key, wrapped as ``{"value": …}``: priorities ``High|Low|Off``, durations ISO 8601 (C# style).

        ``baselineCustomChecksFilePath``/``…FileHash`` are left out while null, as both reference agents do.
        """
        out: dict[str, dict[str, Any]] = {}
        for spec in _SPECS:
            v = getattr(self, spec.attr)
            if v is None:
                continue
            if spec.kind == "duration":
                v = format_duration(v)
            elif spec.kind == "priority":
                v = v.value
            out[spec.key] = {"value": v}
        return out

    def reported(self) -> dict[str, Any]:
        """The reported-properties document: ``{CONFIG_OBJECT_NAME: reported_section()}``."""
        return {CONFIG_OBJECT_NAME: self.reported_section()}


@dataclass(frozen=True, slots=True)
class ConfigOutcome:
    """The result of applying a desired document: the configuration now in force and what to report."""

    config: AgentConfig
    accepted: bool
    issues: tuple[ConfigIssue, ...]
    """TypeMismatch issues when rejected; advisory (NotOptimal/Conflict) ones when accepted."""

    @property
    def reported(self) -> dict[str, Any]:
        """What to write to the reported properties (unchanged configuration when rejected)."""
        return self.config.reported()


def merge_desired_patch(desired: Mapping[str, Any], patch: Mapping[str, Any]) -> dict[str, Any]:
    """Apply a twin desired-properties patch to the whole desired document (JSON merge patch: null deletes).

    Keys starting with ``$`` (``$version``, ``$metadata``) are taken from the patch as they are.
    """
    out: dict[str, Any] = dict(desired)
    for key, value in patch.items():
        if value is None:
            out.pop(key, None)
        elif isinstance(value, Mapping) and isinstance(out.get(key), Mapping) and not key.startswith("$"):
            out[key] = merge_desired_patch(out[key], value)
        else:
            out[key] = value
    return out


# -- durations ----------------------------------------------------------------------------------------------

# The twin schema's pattern (defender-spec §1.2, [T-DEFS]): Y/M/W/D/H/M/S, a decimal only in the last
# component.
_SCHEMA_DURATION = re.compile(
    r"^P(?!$)((\d+Y)|(\d+\.\d+Y$))?((\d+M)|(\d+\.\d+M$))?((\d+W)|(\d+\.\d+W$))?((\d+D)|(\d+\.\d+D$))?"
    r"(T(?=\d)((\d+H)|(\d+\.\d+H$))?((\d+M)|(\d+\.\d+M$))?(\d+(\.\d+)?S)?)??$"
)
_N = r"(\d+(?:\.\d+)?)"
_DURATION_PARTS = re.compile(rf"^P(?:{_N}Y)?(?:{_N}M)?(?:{_N}W)?(?:{_N}D)?(?:T(?:{_N}H)?(?:{_N}M)?(?:{_N}S)?)?$")
# Years as 365 days and months as 30 days, like XmlConvert (C#); C ignores years altogether.
_UNIT_S = (365 * 86400.0, 30 * 86400.0, 7 * 86400.0, 86400.0, 3600.0, 60.0, 1.0)


def parse_duration(text: str) -> float:
    """Seconds in an ISO 8601 duration such as ``PT7M``; raises ``ValueError`` if malformed or zero."""
    m = _DURATION_PARTS.match(text) if _SCHEMA_DURATION.match(text) else None
    if m is None:
        raise ValueError(f"not an ISO 8601 duration: {text!r}")
    seconds = sum(float(g) * u for g, u in zip(m.groups(), _UNIT_S, strict=True) if g is not None)
    if not math.isfinite(seconds) or seconds <= 0:
        raise ValueError(f"duration must be positive: {text!r}")
    return seconds


def format_duration(seconds: float) -> str:
    """An ISO 8601 duration for a positive number of seconds: ``PT7M``, ``PT13H``, ``P1DT2H``, ``PT1.5S``."""
    whole = int(seconds)
    frac = seconds - whole
    days, rem = divmod(whole, 86400)
    hours, rem = divmod(rem, 3600)
    minutes, secs = divmod(rem, 60)
    out = "P" + (f"{days}D" if days else "")
    time = (f"{hours}H" if hours else "") + (f"{minutes}M" if minutes else "")
    if secs or frac:
        time += (f"{secs + frac:.3f}".rstrip("0").rstrip(".") if frac else str(secs)) + "S"
    if time:
        out += "T" + time
    return out if out != "P" else "PT0S"


# -- the table of keys ---------------------------------------------------------------------------------------

Kind = Literal["duration", "int", "priority", "bool", "str", "str?"]


@dataclass(frozen=True, slots=True)
class _Spec:
    key: str
    attr: str
    kind: Kind


def _camel_to_attr(key: str) -> str:
    snake = re.sub(r"(?<!^)(?=[A-Z])", "_", key).lower()
    return snake.replace("o_s_baseline", "os_baseline")


_DURATIONS = (
    ("highPriorityMessageFrequency", "high_priority_message_frequency_s"),
    ("lowPriorityMessageFrequency", "low_priority_message_frequency_s"),
    ("snapshotFrequency", "snapshot_frequency_s"),
)
_PRIORITY_TYPES = (
    "ConnectedHardware", "ListeningPorts", "ProcessCreate", "ProcessTerminate", "SystemInformation",
    "LocalUsers", "Login", "ConnectionCreate", "FirewallConfiguration", "OSBaseline", "Diagnostic",
    "ConfigurationError", "DroppedEventsStatistics", "MessageStatistics",
)  # fmt: skip
_AGGREGATED_TYPES = ("ProcessCreate", "ConnectionCreate", "ProcessTerminate")

_SPECS: tuple[_Spec, ...] = (
    *(_Spec(k, a, "duration") for k, a in _DURATIONS),
    _Spec("maxLocalCacheSizeInBytes", "max_local_cache_size_bytes", "int"),
    _Spec("maxMessageSizeInBytes", "max_message_size_bytes", "int"),
    *(_Spec(f"eventPriority{t}", "priority_" + _camel_to_attr(t), "priority") for t in _PRIORITY_TYPES),
    *(
        spec
        for t in _AGGREGATED_TYPES
        for spec in (
            _Spec(f"aggregationEnabled{t}", "aggregation_enabled_" + _camel_to_attr(t), "bool"),
            _Spec(f"aggregationInterval{t}", f"aggregation_interval_{_camel_to_attr(t)}_s", "duration"),
        )
    ),
    _Spec("baselineCustomChecksEnabled", "baseline_custom_checks_enabled", "bool"),
    _Spec("baselineCustomChecksFilePath", "baseline_custom_checks_file_path", "str?"),
    _Spec("baselineCustomChecksFileHash", "baseline_custom_checks_file_hash", "str?"),
    _Spec("hubResourceId", "hub_resource_id", "str"),
)
TWIN_KEYS: tuple[str, ...] = tuple(s.key for s in _SPECS)
"""Every configuration key this agent reads and reports."""

assert {s.attr for s in _SPECS} == {f.name for f in fields(AgentConfig)}, "key table and AgentConfig disagree"


def _parse_value(spec: _Spec, raw: object) -> Any:
    """The typed value of one ``{"value": …}`` wrapper's content; raises ``ValueError`` with the reason."""
    if spec.kind == "duration":
        if not isinstance(raw, str):
            raise ValueError(f"expected an ISO 8601 duration string, got {_json_type(raw)}")
        return parse_duration(raw)
    if spec.kind == "int":
        if isinstance(raw, bool) or not isinstance(raw, int):
            raise ValueError(f"expected an integer, got {_json_type(raw)}")
        return raw
    if spec.kind == "bool":
        if not isinstance(raw, bool):
            raise ValueError(f"expected a boolean, got {_json_type(raw)}")
        return raw
    if spec.kind == "priority":
        if not isinstance(raw, str):
            raise ValueError(f"expected High, Low or Off, got {_json_type(raw)}")
        for p in Priority:
            if raw.lower() == p.value.lower():
                return p
        raise ValueError(f"expected High, Low or Off, got {raw!r}")
    if spec.kind == "str?" and raw is None:
        return None
    if not isinstance(raw, str):
        raise ValueError(f"expected a string, got {_json_type(raw)}")
    return raw


def _parse_section(section: object) -> tuple[dict[str, Any], tuple[ConfigIssue, ...]]:
    """Typed values for every key present in ``section`` (defaults for the others), or the issues found."""
    defaults = AgentConfig()
    if section is None:
        return {}, ()
    if not isinstance(section, Mapping):
        return {}, (
            ConfigIssue(
                CONFIG_OBJECT_NAME,
                "TypeMismatch",
                "",
                f"Couldn't parse the following configurations: {CONFIG_OBJECT_NAME} "
                f"(expected an object, got {_json_type(section)})",
            ),
        )
    values: dict[str, Any] = {}
    bad: list[tuple[_Spec, str]] = []
    for spec in _SPECS:
        wrapper = section.get(spec.key)
        if wrapper is None:
            continue
        # "str?" keys accept {"value": null} as "not set"; every other kind needs a value.
        if not isinstance(wrapper, Mapping) or "value" not in wrapper:
            bad.append((spec, 'expected {"value": …}'))
            continue
        raw = wrapper["value"]
        if raw is None and spec.kind != "str?":
            bad.append((spec, "value is null"))
            continue
        try:
            values[spec.attr] = _parse_value(spec, raw)
        except ValueError as exc:
            bad.append((spec, str(exc)))
    # Range checks see the valid values merged over the defaults, so a size that is merely out of range is
    # named even when another key is mistyped.
    problems = dict(_range_problems_values({**_as_values(defaults), **values}))
    bad.extend((s, problems[s.key]) for s in _SPECS if s.key in problems)
    if not bad:
        return values, ()
    names = ", ".join(s.key for s, _ in bad)
    issues = tuple(
        ConfigIssue(
            spec.key,
            "TypeMismatch",
            "",
            f"Couldn't parse the following configurations: {names} ({spec.key}: {reason})",
        )
        for spec, reason in bad
    )
    return values, issues


def _used_text(wrapper: Mapping[str, Any] | None) -> str:
    if wrapper is None:
        return ""
    v = wrapper["value"]
    return ("true" if v else "false") if isinstance(v, bool) else str(v)


def _as_values(config: AgentConfig) -> dict[str, Any]:
    return {f.name: getattr(config, f.name) for f in fields(config)}


def _range_problems(config: AgentConfig) -> list[tuple[str, str]]:
    return _range_problems_values(_as_values(config))


def _range_problems_values(values: Mapping[str, Any]) -> list[tuple[str, str]]:
    out: list[tuple[str, str]] = []
    msg = values["max_message_size_bytes"]
    if not MIN_MESSAGE_SIZE_BYTES <= msg <= MAX_MESSAGE_SIZE_BYTES:
        out.append(
            (
                "maxMessageSizeInBytes",
                f"{msg} is outside {MIN_MESSAGE_SIZE_BYTES}..{MAX_MESSAGE_SIZE_BYTES}",
            )
        )
    cache = values["max_local_cache_size_bytes"]
    if cache < MIN_CACHE_SIZE_BYTES:
        out.append(("maxLocalCacheSizeInBytes", f"{cache} is below the minimum {MIN_CACHE_SIZE_BYTES}"))
    return out


def _json_type(v: object) -> str:
    if v is None:
        return "null"
    if isinstance(v, bool):
        return "a boolean"
    if isinstance(v, int | float):
        return f"a number ({v!r})"
    if isinstance(v, str):
        return f"a string ({v!r})"
    if isinstance(v, Mapping):
        return "an object"
    if isinstance(v, list | tuple):
        return "an array"
    return type(v).__name__
