"""The report: what the observation core knows, as the JSON of `leafguard analyze` and as `LeafView` snapshots.

Pure functions of the state records (`observe.state`); the analyzer decides which MACs are leaves.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from operator import attrgetter
from typing import Any

from leafguard.decode.frames import PROTO_TCP
from leafguard.observe.addresses import ip_sort_key, ip_text, mac_text
from leafguard.observe.model import LeafView, Service
from leafguard.observe.oui import vendor_of
from leafguard.observe.state import CaptureStats, Flow, MacState

ADDRESS_TEXT_CACHE = 4096
"""Addresses kept as text while conversations are reported (a few recur in most of them)."""

# Conversations in the report: first seen, then 5-tuple.
_report_order = attrgetter("first", "proto", "a_ip", "a_port", "b_ip", "b_port")


def os_evidence(st: MacState) -> tuple[str | None, str | None, str | None]:
    """OS name, vendor and version where the traffic states them; never a guess from weaker hints."""
    vc = st.details.dhcp_vendor_class or ""
    if vc.startswith("MSFT"):
        return "Windows", "Microsoft", None
    if vc.startswith("android-dhcp-"):
        return "Android", "Google", vc.removeprefix("android-dhcp-") or None
    server = st.details.ssdp_server or ""
    # UPnP SERVER header: "OS/version UPnP/1.x product/version" (UPnP Device Architecture 1.1, section 1.1.3).
    first = server.replace(",", " ").split(" ", 1)[0]
    name, sep, version = first.partition("/")
    if sep and name and "upnp" in server.lower() and name.lower() not in ("upnp", "unspecified"):
        return name, None, version or None
    return None, None, None


def leaf_view(st: MacState) -> LeafView:
    mac = mac_text(st.mac)
    os_name, os_vendor, os_version = os_evidence(st)
    said = st.details
    return LeafView(
        mac=mac,
        ips=tuple(sorted((ip_text(ip) for ip in st.ips), key=ip_sort_key)),
        vendor=vendor_of(mac),
        hostnames=tuple(sorted(said.hostnames)),
        dhcp_hostname=said.dhcp_hostname,
        dhcp_vendor_class=said.dhcp_vendor_class,
        dhcp_param_request_list=said.dhcp_prl,
        randomized_mac=bool(st.mac[0] & 2),
        first_seen=st.first_seen,
        last_seen=st.last_seen,
        services=tuple(Service("tcp" if p == "tcp" else "udp", port) for p, port in sorted(said.services)),
        os_name=os_name,
        os_vendor=os_vendor,
        os_version=os_version,
    )


def leaf_json(m: MacState) -> dict[str, Any]:
    v = leaf_view(m)
    said = m.details
    return {
        "mac": v.mac,
        "ips": list(v.ips),
        "vendor": v.vendor,
        "hostnames": list(v.hostnames),
        "dhcp": {
            "hostname": v.dhcp_hostname,
            "vendor_class": v.dhcp_vendor_class,
            "param_request_list": list(v.dhcp_param_request_list),
        },
        "randomized_mac": v.randomized_mac,
        "first_seen": v.first_seen,
        "last_seen": v.last_seen,
        "packets_out": m.packets_out,
        "bytes_out": m.bytes_out,
        "packets_in": m.packets_in,
        "bytes_in": m.bytes_in,
        "services": [{"protocol": s.protocol, "port": s.port} for s in v.services],
        "dns_queries": sorted(said.dns_queries),
        "tls_sni": sorted(said.tls_sni),
        "tls_versions": [f"0x{x:04x}" for x in sorted(said.tls_versions)],
        "ssdp": {"server": said.ssdp_server, "usn": said.ssdp_usn},
        "os": {"name": v.os_name, "vendor": v.os_vendor, "version": v.os_version},
    }


def conversation_rows(flows: Iterable[Flow]) -> Iterator[dict[str, Any]]:
    """Conversations in report order (first seen, then 5-tuple), built one at a time."""
    names: dict[bytes, str] = {}

    def text(ip: bytes) -> str:
        got = names.get(ip)
        if got is None:
            if len(names) >= ADDRESS_TEXT_CACHE:
                names.clear()
            got = names[ip] = ip_text(ip)
        return got

    for f in sorted(flows, key=_report_order):
        yield {
            "protocol": "tcp" if f.proto == PROTO_TCP else "udp",
            "a_addr": text(f.a_ip),
            "a_port": f.a_port,
            "b_addr": text(f.b_ip),
            "b_port": f.b_port,
            "packets_ab": f.packets_ab,
            "bytes_ab": f.bytes_ab,
            "packets_ba": f.packets_ba,
            "bytes_ba": f.bytes_ba,
            "first_seen": f.first,
            "last_seen": f.last,
            "state": f.state,
        }


def capture_json(st: CaptureStats, *, alerts_dropped: int, alerts_suppressed: int) -> dict[str, Any]:
    return {
        "files": list(st.files),
        "packets": st.packets,
        "bytes": st.bytes,
        "first_ts": st.first_ts,
        "last_ts": st.last_ts,
        "link_types": sorted(st.link_types),
        "decode_errors": st.decode_errors,
        "truncated": st.truncated,
        "evicted_flows": st.evicted_flows,
        "evicted_leaves": st.evicted_macs,
        "evicted_names": st.evicted_names,
        "observations_dropped": st.observations_dropped,
        "alerts_dropped": alerts_dropped,
        "alerts_suppressed": alerts_suppressed,
    }
