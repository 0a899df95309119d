"""Edge mode: LeafGuard's uplink through the IoT Edge hub (azure-iot-device), see docs/edge-mode.md.

* :mod:`~leafguard.hub.settings`: :class:`EdgeSettings` from the ``IOTEDGE_*`` environment.
* :mod:`~leafguard.hub.outbox`, :mod:`~leafguard.hub.link`, :mod:`~leafguard.hub.twin`: the pure parts (the
  byte-bounded outbox and its drop policy, link states and backoff, the module twin's desired and reported
  documents).
* :mod:`~leafguard.hub.transport`: :class:`EdgeTransport`, the asyncio shell around one module client.
* :mod:`~leafguard.hub.output`: :class:`EdgeAgentOutput`, the fleet's side (the local mode's counterpart).

Only `transport` (and `output`) import the SDK; the service imports them in edge mode only.
"""
