"""The operator guide names every setting the code reads: each environment variable, each live detection setting
and each key of the Defender agent configuration (so a new setting cannot ship undocumented)."""

from __future__ import annotations

import re

from leafguard.agent.config import TWIN_KEYS
from leafguard.service.gateway import DETECTION_KEYS
from tests.conftest import REPO

GUIDE = REPO / "docs" / "operator-guide.md"
# The guide abbreviates a family of keys after its first member: `eventPriorityConnectionCreate`, `…Diagnostic`.
FAMILIES = ("eventPriority", "aggregationEnabled", "aggregationInterval", "baselineCustomChecks")


def _code_env_vars() -> set[str]:
    found: set[str] = set()
    for path in (REPO / "module" / "leafguard").rglob("*.py"):
        found.update(re.findall(r'"(LEAFGUARD_[A-Z0-9_]+)"', path.read_text()))
    return found


def test_every_environment_variable_is_documented() -> None:
    text = GUIDE.read_text()
    names = _code_env_vars()
    assert len(names) >= 10
    missing = [n for n in sorted(names) if f"`{n}`" not in text]
    assert not missing, f"add these to the environment table of docs/operator-guide.md: {missing}"


def test_every_detection_setting_is_documented() -> None:
    text = GUIDE.read_text()
    missing = [k for k in DETECTION_KEYS if f"detection.{k}" not in text]
    assert not missing, f"add these to the gateway settings table of docs/operator-guide.md: {missing}"


def test_every_agent_configuration_key_is_documented() -> None:
    text = GUIDE.read_text()
    missing = []
    for key in TWIN_KEYS:
        family = next((f for f in FAMILIES if key.startswith(f)), None)
        short = f"…{key[len(family):]}" if family else None
        if f"`{key}`" not in text and not (short and short in text):
            missing.append(key)
    assert not missing, f"add these to the Defender configuration table of docs/operator-guide.md: {missing}"
