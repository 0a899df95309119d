"""Managed-leaf credentials and leaf map entries: the secrets file reloaded on change, the group-key derivation,
bad input reported without ever showing a key."""

from __future__ import annotations

import base64
import os
from pathlib import Path

import orjson
import pytest
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.hmac import HMAC

from leafguard.errors import ConfigurationError
from leafguard.hub.credentials import LeafCredentials, Secret, derive_device_key
from leafguard.hub.leaves import IdentityMode, LeafEntry
from leafguard.hub.settings import LeafClientSettings
from leafguard.service.gateway import parse_leaf_entries, parse_leaf_map

KEY_A = base64.b64encode(b"a" * 32).decode()
KEY_B = base64.b64encode(b"b" * 32).decode()
GROUP = base64.b64encode(bytes(range(64))).decode()


def test_group_key_derivation_is_the_dps_enrolment_group_convention() -> None:
    mac = HMAC(base64.b64decode(GROUP), hashes.SHA256())  # an independent HMAC implementation
    mac.update(b"plc1")
    assert derive_device_key(GROUP, "plc1") == base64.b64encode(mac.finalize()).decode()
    assert derive_device_key(GROUP, "plc1") != derive_device_key(GROUP, "plc2")
    with pytest.raises(ConfigurationError, match="not base64"):
        derive_device_key("not base64!", "plc1")


def write(path: Path, doc: object) -> None:
    path.write_bytes(orjson.dumps(doc))
    # A second write within the same mtime tick must still be seen as a change: the size differs in these tests,
    # and bumping the mtime makes it certain.
    st = path.stat()
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns + 1_000_000))


def test_secrets_file_is_reloaded_when_it_changes_and_a_bad_one_keeps_the_old_keys(tmp_path: Path) -> None:
    secrets = tmp_path / "secrets.json"
    cs = f"HostName=h.azure-devices.net;DeviceId=plc2;SharedAccessKey={KEY_B}"
    write(secrets, {"plc1": KEY_A, "plc2": cs, "plc1/azureiotsecurity": KEY_B})
    creds = LeafCredentials(secrets)
    assert creds.reload() and creds.generation == 1
    one = creds.for_leaf("plc1", None)
    assert one is not None and one.key is not None and one.key.reveal() == KEY_A and one.source == "secrets"
    module = creds.for_leaf("plc1", "azureiotsecurity")
    assert module is not None and module.key is not None and module.key.reveal() == KEY_B
    two = creds.for_leaf("plc2", "azureiotsecurity")
    assert two is not None and two.connection_string is not None and two.connection_string.reveal() == cs
    assert creds.for_leaf("plc3", None) is None, "no group key: a leaf without a secret is not managed"
    assert not creds.reload(), "unchanged file: nothing to do"

    write(secrets, {"plc1": KEY_A, "plc2": f"garbage {KEY_B}"})
    assert not creds.reload()
    assert "plc2" in creds.errors["secrets"] and KEY_B not in creds.errors["secrets"]
    assert creds.for_leaf("plc2", None) == two, "the keys read before stay in force"
    secrets.write_text('{"plc1": "' + KEY_A + '", ')  # torn JSON
    assert not creds.reload() and KEY_A not in creds.errors["secrets"]

    write(secrets, {"plc1": KEY_B})
    assert creds.reload() and creds.generation == 2 and "secrets" not in creds.errors
    again = creds.for_leaf("plc1", None)
    assert again is not None and again.key is not None and again.key.reveal() == KEY_B
    assert creds.for_leaf("plc2", None) is None


def test_group_key_derives_every_leaf_and_the_secrets_file_wins(tmp_path: Path) -> None:
    group = tmp_path / "group.key"
    group.write_text(GROUP + "\n")
    secrets = tmp_path / "secrets.json"
    write(secrets, {"plc1": KEY_A})
    creds = LeafCredentials(secrets, group)
    creds.reload()
    derived = creds.for_leaf("plc9", "azureiotsecurity")
    assert derived is not None and derived.source == "group key" and derived.key is not None
    assert derived.key.reveal() == derive_device_key(GROUP, "plc9")
    own = creds.for_leaf("plc1", None)
    assert own is not None and own.key is not None and own.key.reveal() == KEY_A
    group.write_text("%%%")
    assert not creds.reload() and "group key is not base64" in creds.errors["group key"]
    assert creds.for_leaf("plc9", None) == derived


def test_a_key_never_shows_in_repr_or_str() -> None:
    secret = Secret(KEY_A)
    assert KEY_A not in repr(secret) and KEY_A not in str(secret) and KEY_A not in f"{secret!r} {secret}"
    creds_text = repr(LeafCredentials(None, None).for_leaf("x", None))
    assert KEY_A not in creds_text


def test_leaf_map_takes_strings_and_objects() -> None:
    section = {
        "5C-CF-7F-07-AE-FB": "plant1-sensor7",
        "00:11:22:33:44:55": {"deviceId": "plc1", "identity": "device", "ip": "10.0.0.7"},
        "00:11:22:33:44:66": {"deviceId": "plc2"},
    }
    entries = parse_leaf_entries(section)
    assert entries["5c:cf:7f:07:ae:fb"] == LeafEntry("5c:cf:7f:07:ae:fb", "plant1-sensor7", None)
    assert not entries["5c:cf:7f:07:ae:fb"].managed
    plc1 = entries["00:11:22:33:44:55"]
    assert plc1.managed and plc1.mode is IdentityMode.DEVICE and plc1.ip == "10.0.0.7"
    assert entries["00:11:22:33:44:66"].mode_or(IdentityMode.MODULE) is IdentityMode.MODULE
    assert parse_leaf_map(section) == {"5c:cf:7f:07:ae:fb": "plant1-sensor7", "00:11:22:33:44:55": "plc1",
                                       "00:11:22:33:44:66": "plc2"}


@pytest.mark.parametrize(
    ("entry", "message"),
    [
        ({"deviceId": "plc 1"}, "not a valid device id"),
        ({"identity": "module"}, "deviceId None"),
        ({"deviceId": "plc1", "identity": "gateway"}, 'identity must be "module" or "device"'),
        ({"deviceId": "plc1", "ip": "10.0.0.300"}, "not an IP address"),
        ({"deviceId": "plc1", "key": KEY_A}, "unknown key 'key'"),
        (["plc1"], "must be a device id or an object"),
    ],
)
def test_bad_leaf_map_entries_are_configuration_errors(entry: object, message: str) -> None:
    with pytest.raises(ConfigurationError, match=message) as err:
        parse_leaf_entries({"00:11:22:33:44:55": entry})
    assert KEY_A not in str(err.value)


def test_leaf_client_settings_from_flags_and_environment(tmp_path: Path) -> None:
    env = {"LEAFGUARD_LEAF_SECRETS": "/run/secrets/leaves.json", "LEAFGUARD_LEAF_IDENTITY": "device"}
    settings = LeafClientSettings.from_env(env)
    assert settings.secrets_path == Path("/run/secrets/leaves.json") and settings.group_key_path is None
    assert settings.default_mode is IdentityMode.DEVICE and settings.configured
    flagged = LeafClientSettings.from_env(env, secrets=str(tmp_path / "s.json"), group_key_file="/k")
    assert flagged.secrets_path == tmp_path / "s.json" and flagged.group_key_path == Path("/k")
    assert not LeafClientSettings.from_env({}).configured
    with pytest.raises(ConfigurationError, match="LEAFGUARD_LEAF_IDENTITY"):
        LeafClientSettings.from_env({"LEAFGUARD_LEAF_IDENTITY": "both"})
