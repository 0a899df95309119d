"""Credentials of managed leaves: a secrets file and/or a group key, never twin properties.

* The secrets file (``LEAFGUARD_LEAF_SECRETS`` / ``--leaf-secrets``) is a JSON object: device id → the base64
  symmetric key of the device, or a whole connection string (``HostName=…;DeviceId=…;SharedAccessKey=…``). A key
  for the ``azureiotsecurity`` module itself may be given under ``"<device>/azureiotsecurity"``. The file is read
  again when it changes; a bad file is reported and the keys read before stay in force.
* The group key file (``LEAFGUARD_LEAF_GROUP_KEY_FILE`` / ``--leaf-group-key-file``) holds one base64 key, the
  enrolment group's: each leaf's key is derived as ``base64(HMAC-SHA256(base64decode(group_key), device_id))``,
  the DPS symmetric-key enrolment-group convention. The secrets file wins over the group key.

A key never appears in a log line, an error, a twin or a file LeafGuard writes: keys are held as :class:`Secret`,
whose ``repr``/``str`` are a placeholder, and errors name the file, the device id and what is wrong, nothing more.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
from dataclasses import dataclass
from pathlib import Path

import orjson

from leafguard.errors import ConfigurationError

MAX_SECRETS_FILE_BYTES = 4 * 1024 * 1024
"""A secrets file larger than this is refused (10 000 leaves of connection strings fit in about 2.5 MB)."""


class Secret:
    """A key (or connection string) that only :meth:`reveal` gives out; printing it shows a placeholder."""

    __slots__ = ("_value",)

    def __init__(self, value: str) -> None:
        self._value = value

    def reveal(self) -> str:
        return self._value

    def __repr__(self) -> str:
        return "Secret(<hidden>)"

    __str__ = __repr__

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Secret) and hmac.compare_digest(self._value, other._value)

    def __hash__(self) -> int:
        return hash(hashlib.sha256(self._value.encode()).digest())


@dataclass(frozen=True, slots=True)
class LeafCredential:
    """What a leaf client signs with: a symmetric key, or a whole connection string."""

    key: Secret | None
    connection_string: Secret | None
    source: str
    """``secrets`` or ``group key``: where it came from (for the operator, never the key)."""


def derive_device_key(group_key_b64: str, device_id: str) -> str:
    """The DPS enrolment-group convention: ``base64(HMAC-SHA256(base64decode(group_key), device_id))``."""
    try:
        group_key = base64.b64decode(group_key_b64.strip(), validate=True)
    except (binascii.Error, ValueError):
        raise ConfigurationError("the group key is not base64") from None
    return base64.b64encode(hmac.new(group_key, device_id.encode(), hashlib.sha256).digest()).decode()


def _valid_key(text: str) -> bool:
    try:
        return len(base64.b64decode(text, validate=True)) > 0
    except (binascii.Error, ValueError):
        return False


def connection_string_fields(text: str) -> dict[str, str]:
    """``Key=value;Key=value`` → dict (values may contain ``=``, as base64 keys do)."""
    fields: dict[str, str] = {}
    for part in text.split(";"):
        if part:
            key, sep, value = part.partition("=")
            if not sep:
                raise ConfigurationError("a connection string field has no '='")
            fields[key] = value
    return fields


def _parse_secret(path: Path, device: str, value: object) -> LeafCredential:
    if not isinstance(value, str) or not value:
        raise ConfigurationError(f"{path}: the secret for {device!r} must be a non-empty string")
    if "SharedAccessKey=" in value:
        fields = connection_string_fields(value)
        if not _valid_key(fields.get("SharedAccessKey", "")):
            raise ConfigurationError(f"{path}: the connection string for {device!r} has no valid SharedAccessKey")
        named = fields.get("DeviceId")
        if named is not None and named != device.split("/", maxsplit=1)[0]:
            raise ConfigurationError(f"{path}: the connection string for {device!r} names another DeviceId")
        return LeafCredential(None, Secret(value), "secrets")
    if not _valid_key(value):
        raise ConfigurationError(f"{path}: the key for {device!r} is not base64 (nor a connection string)")
    return LeafCredential(Secret(value), None, "secrets")


class LeafCredentials:
    """The secrets file and group key of this run; :meth:`reload` picks up changes (call it on the loop)."""

    def __init__(self, secrets_path: Path | None = None, group_key_path: Path | None = None) -> None:
        self.secrets_path = secrets_path
        self.group_key_path = group_key_path
        self._secrets: dict[str, LeafCredential] = {}
        self._group_key: Secret | None = None
        self._stamps: dict[Path, tuple[int, int] | None] = {}
        self.errors: dict[str, str] = {}
        """The error of each source in force (``secrets``, ``group key``); the keys read before stay."""
        self.generation = 0
        """Bumped whenever the credentials in force change (clients in auth failed try again)."""

    @property
    def configured(self) -> bool:
        return self.secrets_path is not None or self.group_key_path is not None

    def reload(self) -> bool:
        """Read the files again if they changed; True when the credentials in force changed."""
        changed = False
        if self.secrets_path is not None and self._changed(self.secrets_path):
            try:
                secrets = self._read_secrets(self.secrets_path)
            except ConfigurationError as exc:
                self.errors["secrets"] = str(exc)
            else:
                self.errors.pop("secrets", None)
                changed |= secrets != self._secrets
                self._secrets = secrets
        if self.group_key_path is not None and self._changed(self.group_key_path):
            try:
                key = self._read_group_key(self.group_key_path)
            except ConfigurationError as exc:
                self.errors["group key"] = str(exc)
            else:
                self.errors.pop("group key", None)
                changed |= key != self._group_key
                self._group_key = key
        if changed:
            self.generation += 1
        return changed

    def for_leaf(self, device_id: str, module_id: str | None) -> LeafCredential | None:
        """The credential of ``device_id`` (or of its module, if the file names one); None: the leaf is not managed."""
        if module_id is not None:
            own = self._secrets.get(f"{device_id}/{module_id}")
            if own is not None:
                return own
        found = self._secrets.get(device_id)
        if found is not None:
            return found
        if self._group_key is not None:
            return LeafCredential(Secret(derive_device_key(self._group_key.reveal(), device_id)), None, "group key")
        return None

    def _changed(self, path: Path) -> bool:
        try:
            st = path.stat()
            stamp: tuple[int, int] | None = (st.st_mtime_ns, st.st_size)
        except OSError:
            stamp = None
        if path in self._stamps and self._stamps[path] == stamp:
            return False
        self._stamps[path] = stamp
        return True

    @staticmethod
    def _read_secrets(path: Path) -> dict[str, LeafCredential]:
        try:
            data = path.read_bytes()
        except OSError as exc:
            raise ConfigurationError(f"{path}: cannot read the leaf secrets: {exc.strerror}") from None
        if len(data) > MAX_SECRETS_FILE_BYTES:
            raise ConfigurationError(f"{path}: larger than {MAX_SECRETS_FILE_BYTES} bytes")
        try:
            doc = orjson.loads(data)
        except orjson.JSONDecodeError:
            # orjson's message can quote the text around the error: it is a secrets file, say where only.
            raise ConfigurationError(f"{path}: not valid JSON") from None
        if not isinstance(doc, dict):
            raise ConfigurationError(f"{path}: must hold a JSON object of device id -> key or connection string")
        return {str(device): _parse_secret(path, str(device), value) for device, value in doc.items()}

    @staticmethod
    def _read_group_key(path: Path) -> Secret:
        try:
            text = path.read_text(encoding="utf-8", errors="replace").strip()
        except OSError as exc:
            raise ConfigurationError(f"{path}: cannot read the group key: {exc.strerror}") from None
        if not _valid_key(text):
            raise ConfigurationError(f"{path}: the group key is not base64")
        return Secret(text)
