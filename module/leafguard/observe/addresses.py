"""Addresses as the observation core holds them (raw bytes) and as it reports them (text)."""

from __future__ import annotations

import ipaddress
import socket

ZERO_V4 = b"\x00\x00\x00\x00"
ZERO_V6 = b"\x00" * 16
ULA = ipaddress.ip_network("fc00::/7")


def mac_text(mac: bytes) -> str:
    return mac.hex(":")


def ip_text(ip: bytes) -> str:
    return socket.inet_ntop(socket.AF_INET if len(ip) == 4 else socket.AF_INET6, ip)


def is_unicast_mac(mac: bytes) -> bool:
    return not mac[0] & 1 and mac != b"\x00" * 6


def ip_sort_key(text: str) -> tuple[int, int]:
    """Addresses as text in numeric order, IPv4 first."""
    addr = ipaddress.ip_address(text)
    return addr.version, int(addr)
