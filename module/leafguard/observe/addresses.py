"""Addresses as the observation core holds them (raw bytes) and as it reports them (text)."""

from __future__ import annotations

import functools
import ipaddress
import socket

ZERO_V4 = b"\x00\x00\x00\x00"
ZERO_V6 = b"\x00" * 16
ULA = ipaddress.ip_network("fc00::/7")


def mac_text(mac: bytes) -> str:
    return mac.hex(":")


def ip_text(ip: bytes) -> str:
    return socket.inet_ntop(socket.AF_INET if len(ip) == 4 else socket.AF_INET6, ip)


@functools.lru_cache(maxsize=1024)
def recurring_ip_text(ip: bytes) -> str:
    """`ip_text` for addresses that recur (a gateway's leaves and their servers in every observation, a scan's
    target in every scanner's finding): formatted once while they do, and the findings kept share the text; a
    scan's random addresses only cycle through the cache."""
    return ip_text(ip)


@functools.lru_cache(maxsize=256)
def recurring_mac_text(mac: bytes) -> str:
    """`mac_text` for the MACs of findings, shared by the findings kept (up to `detect.detectors.MAX_ALERTS`)."""
    return mac_text(mac)


def is_unicast_mac(mac: bytes) -> bool:
    return not mac[0] & 1 and mac != b"\x00" * 6


def ip_sort_key(text: str) -> tuple[int, int]:
    """Addresses as text in numeric order, IPv4 first."""
    addr = ipaddress.ip_address(text)
    return addr.version, int(addr)
