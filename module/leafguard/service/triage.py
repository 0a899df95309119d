"""Triage from the gateway settings (module twin or ``gateway.json``): ``mute`` and ``learn``.

* ``mute``: a list of rules (`leafguard.detect.muting`: ``type`` and/or ``mac``, ``until`` or ``forS``), replaced
  whole when the list changes and validated as a whole (one bad rule: the rules in force stay, the error is
  reported). ``forS`` counts from when the list is applied. Rules added by the ``mute`` direct method are kept
  beside these.
* ``learn``: a token (a string or a number), or ``{"token": ..., "mac": "<MAC>"}`` for one leaf. Each new token
  accepts the current state into the baseline once (`Analyzer.learn`): the leaves seen now, the peers and services
  they use, the next hop each uses as its gateway. A document seen again with the same token learns nothing.

What is in force is reported as ``triage`` in ``stats.json`` and the twin's health section: the rules, how many
alerts they dropped, the last token learned and how many leaves it took in, and the last error.
"""

from __future__ import annotations

from typing import Any

from leafguard.detect.muting import parse_rules
from leafguard.errors import ConfigurationError
from leafguard.observe.analyzer import Analyzer

_UNSEEN = object()


class Triage:
    def __init__(self, analyzer: Analyzer) -> None:
        self.analyzer = analyzer
        self._mute_section: object = _UNSEEN
        self._learned: object = None
        self.learned_leaves: int | None = None
        self.error: str | None = None

    def apply(self, mute: object, learn: object, now: float) -> None:
        """Apply the two sections of a settings document (``now``: the detection clock)."""
        errors = []
        if mute != self._mute_section:
            self._mute_section = mute
            try:
                self.analyzer.detectors.muting.set(parse_rules(mute, now))
            except ConfigurationError as exc:
                errors.append(str(exc))
        if learn is not None:
            try:
                token, mac = _learn_section(learn)
            except ConfigurationError as exc:
                errors.append(str(exc))
            else:
                if token != self._learned:
                    self._learned = token
                    self.learned_leaves = self.analyzer.learn(mac)
        self.error = "; ".join(errors) or None

    def forget(self, error: str) -> None:
        """The document could not be read: report it, keep what is in force, apply the next one afresh."""
        self.error = error
        self._mute_section = _UNSEEN

    def status(self, now: float) -> dict[str, Any]:
        muting = self.analyzer.detectors.muting
        return {
            "mute": muting.in_force(now),
            "muted": muting.muted,
            "learnToken": self._learned,
            "learnedLeaves": self.learned_leaves,
            "error": self.error,
        }


def _learn_section(section: object) -> tuple[object, str | None]:
    if isinstance(section, bool) or not isinstance(section, str | int | float | dict):
        raise ConfigurationError("learn must be a token (a string or a number) or {token, mac}")
    if not isinstance(section, dict):
        return section, None
    unknown = set(section) - {"token", "mac"}
    if unknown:
        raise ConfigurationError(f"learn: {', '.join(sorted(unknown))} is not a learn field (token, mac)")
    token, mac = section.get("token"), section.get("mac")
    if isinstance(token, bool) or not isinstance(token, str | int | float):
        raise ConfigurationError("learn.token must be a string or a number")
    if mac is not None:
        if not isinstance(mac, str):
            raise ConfigurationError("learn.mac must be a MAC address")
        mac = mac.lower().replace("-", ":")
    return (token, mac), mac
