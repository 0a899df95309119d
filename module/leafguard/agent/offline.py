"""The offline driver: ``leafguard analyze --security-messages FILE`` runs the observation core and the agents over
capture files, on packet time, and writes every message the run would send to a JSONL file."""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from pathlib import Path

from leafguard.agent.fleet import make_fleet
from leafguard.agent.local import JsonlMessageWriter
from leafguard.agent.pump import AnalyzerLike, SecurityMessagePump


class OfflineMessageWriter:
    """``leafguard analyze --security-messages FILE [--agent-config FILE]``: the messages of a capture run.

    Call :meth:`step` after every ``analyzer.feed(batch)`` and :meth:`finish` once at the end (it runs the final
    flush and closes the file). The file is truncated when the writer is created.
    """

    def __init__(
        self,
        out_path: Path | str,
        agent_config_path: Path | str | None = None,
        leaf_map: Mapping[str, str] | None = None,
    ) -> None:
        self.fleet = make_fleet(agent_config_path, leaf_map)
        self._writer = JsonlMessageWriter(out_path, append=False)
        self._pump = SecurityMessagePump(self.fleet, self._writer.write)

    @property
    def lines(self) -> int:
        return self._writer.lines

    def step(self, analyzer: AnalyzerLike) -> None:
        self._pump.after_batch(analyzer)

    def finish(self, analyzer: AnalyzerLike) -> None:
        try:
            self._pump.finish(analyzer)
        finally:
            self._writer.close()


def write_security_messages(
    captures: Iterable[Path | str],
    out_path: Path | str,
    agent_config_path: Path | str | None = None,
    leaf_map: Mapping[str, str] | None = None,
) -> int:
    """Run the observation core over capture files and write every message the run would send (JSONL).

    The clock is packet time; the run ends with the final flush. Returns the number of messages written.
    Raises ConfigurationError for an unreadable ``--agent-config`` file, CaptureFileError for a bad capture.
    """
    from leafguard.capture.pcapfile import read_batches
    from leafguard.observe.analyzer import Analyzer

    writer = OfflineMessageWriter(out_path, agent_config_path, leaf_map)
    analyzer = Analyzer()
    for path in captures:
        for batch in read_batches(path):
            analyzer.feed(batch)
            writer.step(analyzer)
    writer.finish(analyzer)
    return writer.lines
