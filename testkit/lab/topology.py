"""The attack lab: a leaf segment in network namespaces, with LeafGuard's gateway, leaves doing their work, services
to attack and an attacker.

Topology (all inside namespaces the lab creates; 10.88.0.0/24, fd88::/64 and 198.18.0.0/24 never leave them)::

    attacker 10.88.0.66 ─────┐
    target   10.88.0.10 ─────┤  sshd :22, vsftpd :21, mosquitto :1883 (passwords), TCP :80 :443 :8883, UDP :5683
    sensor   DHCP (.100-)  ──┤  MQTT publishes, DNS, NTP, HTTP polling, mDNS, SSDP       br0 in "gw": 10.88.0.1,
    camera   10.88.0.20  ────┤  a 25 frame/s RTP-like stream to the hmi                 the leaves' router, dnsmasq
    plc      10.88.0.30  ────┤  Modbus/TCP :502                                         (DHCP, DNS); LeafGuard and
    hmi      10.88.0.31  ────┘  polls the PLC every 0.5 s                               tcpdump capture on br0
                                                          gw ── wan0 198.18.0.1 ── cloud 198.18.0.2 (NTP, HTTP, MQTT)

The gateway routes 10.89.0.0/27 as unreachable: an off-link subnet for ICMP sweeps through the router. Attacker,
target and sensor have IPv6 (fd88::66, fd88::10, fd88::40) for the neighbour-discovery cases.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from testkit.netns import Lab, Netns, dhcp_lease

SCRIPTS = Path(__file__).parent / "scripts"
LEAF_NET = "10.88.0.0/24"
LEAF_NET6 = "fd88::/64"
GW_IP = "10.88.0.1"
CLOUD_IP = "198.18.0.2"
SWEEP_NET = "10.89.0.0/27"
HOSTS = {
    # name: (MAC, IPv4 or "" for DHCP, IPv6 or "")
    "attacker": ("02:88:00:00:00:66", "10.88.0.66", "fd88::66"),
    "target": ("02:88:00:00:00:10", "10.88.0.10", "fd88::10"),
    "sensor": ("02:88:00:00:00:40", "", "fd88::40"),
    "camera": ("02:88:00:00:00:20", "10.88.0.20", ""),
    "plc": ("02:88:00:00:00:30", "10.88.0.30", ""),
    "hmi": ("02:88:00:00:00:31", "10.88.0.31", ""),
}
TOOLS = (
    "nmap", "arp-scan", "hping3", "hydra", "ncrack", "atk6-parasite6", "atk6-fake_advertise6", "tcpdump", "dnsmasq",
)  # fmt: skip
SERVICES = ("/usr/sbin/sshd", "/usr/sbin/vsftpd", "/usr/sbin/mosquitto")


def missing_tools() -> list[str]:
    return [t for t in TOOLS if shutil.which(t) is None] + [s for s in SERVICES if not Path(s).exists()]


@dataclass
class AttackLab:
    lab: Lab
    work: Path
    ns: dict[str, Netns] = field(default_factory=dict)
    ips: dict[str, str] = field(default_factory=dict)
    gw_mac: str = ""

    @property
    def gw(self) -> Netns:
        return self.ns["gw"]

    def mac(self, name: str) -> str:
        return HOSTS[name][0]


def build(lab: Lab, work: Path) -> AttackLab:
    """Create the namespaces and links, start the services and the leaves' normal work."""
    al = AttackLab(lab, work)
    gw = al.ns["gw"] = lab.netns("gw")
    cloud = al.ns["cloud"] = lab.netns("cloud")
    ports = []
    for i, (name, (mac, _ip, ip6)) in enumerate(HOSTS.items()):
        ns = al.ns[name] = lab.netns(name, ipv6=bool(ip6))
        port = f"p{i}"
        lab.veth(gw, port, ns, "eth0", up=False)
        ns.run("ip", "link", "set", "eth0", "address", mac)
        ports.append(port)
        if ip6:
            ns.run("sysctl", "-q", "-w", "net.ipv6.conf.eth0.accept_ra=0")
    lab.bridge(gw, "br0", ports)
    gw.up(*ports)
    gw.addr("br0", f"{GW_IP}/24")
    gw.run("sysctl", "-q", "-w", "net.ipv4.ip_forward=1")
    gw.run("ip", "route", "add", "unreachable", SWEEP_NET)
    lab.veth(gw, "wan0", cloud, "eth0")
    gw.addr("wan0", "198.18.0.1/24")
    cloud.addr("eth0", f"{CLOUD_IP}/24")
    cloud.run("ip", "route", "add", LEAF_NET, "via", "198.18.0.1")
    al.gw_mac = gw.mac("br0")
    for name, (_mac, ip, ip6) in HOSTS.items():
        ns = al.ns[name]
        ns.up("eth0")
        if ip:
            ns.addr("eth0", f"{ip}/24")
            al.ips[name] = ip
        if ip6:
            ns.run("ip", "-6", "addr", "add", f"{ip6}/64", "dev", "eth0", "nodad")
    _start_services(al)
    lease = dhcp_lease(al.ns["sensor"], "eth0", "sensor-lab1", GW_IP)
    al.ns["sensor"].addr("eth0", f"{lease}/24")
    al.ips["sensor"] = lease
    for name in HOSTS:
        al.ns[name].run("ip", "route", "add", "default", "via", GW_IP)
    _start_leaves(al)
    return al


def _wait_listening(ns: Netns, proto: str, addr: str, within: float = 10.0) -> None:
    deadline = time.monotonic() + within
    while addr not in ns.run("ss", f"-ln{proto}", check=False).stdout:
        assert time.monotonic() < deadline, f"nothing listens on {proto} {addr} in {ns.name}"
        time.sleep(0.05)


def _start_services(al: AttackLab) -> None:
    work = al.work
    quiet = {"stdout": subprocess.DEVNULL, "stderr": subprocess.DEVNULL}
    al.gw.popen(
        "dnsmasq", "--no-daemon", "--conf-file=/dev/null", "--no-resolv", "--no-hosts", "--no-ping",
        "--bind-interfaces", "--interface=br0", f"--listen-address={GW_IP}", "--except-interface=lo",
        f"--address=/plant.test/{CLOUD_IP}", "--dhcp-range=10.88.0.100,10.88.0.150,255.255.255.0,1h",
        f"--dhcp-option=option:router,{GW_IP}", "--dhcp-authoritative", f"--dhcp-leasefile={work / 'leases'}",
        f"--pid-file={work / 'dnsmasq.pid'}", "--user=root", "--group=root", "--log-facility=-", **quiet,
    )  # fmt: skip
    cloud = al.ns["cloud"]
    cloud_api = cloud.popen(sys.executable, str(SCRIPTS / "cloud.py"), CLOUD_IP, stdout=subprocess.PIPE)
    assert cloud_api.stdout is not None and cloud_api.stdout.readline().strip() == b"ready"
    (work / "mosquitto-cloud.conf").write_text(f"listener 1883 {CLOUD_IP}\nallow_anonymous true\npersistence false\n")
    cloud.popen("/usr/sbin/mosquitto", "-c", str(work / "mosquitto-cloud.conf"), **quiet)
    target = al.ns["target"]
    ip = HOSTS["target"][1]
    # sshd: password logins allowed, for nobody that exists here (every guess fails).
    Path("/run/sshd").mkdir(exist_ok=True)
    target.popen(
        "/usr/sbin/sshd", "-D", "-e", "-f", "/dev/null", "-o", f"ListenAddress={ip}",
        "-o", "PasswordAuthentication=yes",
        "-o", "HostKey=/etc/ssh/ssh_host_ed25519_key", "-o", f"PidFile={work / 'sshd.pid'}", "-o", "MaxStartups=64",
        "-o", "UsePAM=no", stdout=subprocess.DEVNULL, stderr=(work / "sshd.log").open("wb"),
    )  # fmt: skip
    (work / "vsftpd.conf").write_text(
        f"listen=YES\nlisten_address={ip}\nbackground=NO\nanonymous_enable=NO\nlocal_enable=YES\n"
        "pam_service_name=vsftpd\nsecure_chroot_dir=/var/run/vsftpd/empty\nseccomp_sandbox=NO\n"
        "delay_failed_login=0\nmax_login_fails=1\n"
    )
    target.popen("/usr/sbin/vsftpd", str(work / "vsftpd.conf"), **quiet)
    (work / "mosquitto.passwd").write_text("")
    subprocess.run(["mosquitto_passwd", "-b", str(work / "mosquitto.passwd"), "plant", "s3cret-lab"], check=True)
    (work / "mosquitto.conf").write_text(
        f"listener 1883 {ip}\nallow_anonymous false\nuser root\npassword_file {work / 'mosquitto.passwd'}\n"
        "persistence false\n"
    )
    target.popen("/usr/sbin/mosquitto", "-c", str(work / "mosquitto.conf"), **quiet)
    # A few more open ports (an IoT device's web UI, TLS, MQTT over TLS) and one open UDP port (CoAP).
    target.popen(sys.executable, "-c", _LISTENERS, ip, **quiet)
    for proto, addr in (("t", f"{ip}:22"), ("t", f"{ip}:21"), ("t", f"{ip}:1883"), ("t", f"{ip}:8883"),
                        ("u", f"{ip}:5683")):  # fmt: skip
        _wait_listening(target, proto, addr)
    _wait_listening(cloud, "t", f"{CLOUD_IP}:1883")
    _wait_listening(al.gw, "u", f"{GW_IP}:53")


_LISTENERS = """
import socket, sys, threading
ip = sys.argv[1]
def tcp(port):
    s = socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1); s.bind((ip, port)); s.listen(64)
    while True:
        c, _ = s.accept(); c.close()
def udp():
    u = socket.socket(socket.AF_INET, socket.SOCK_DGRAM); u.bind((ip, 5683))
    while True:
        d, a = u.recvfrom(2048); u.sendto(d, a)
for p in (80, 443, 8883):
    threading.Thread(target=tcp, args=(p,), daemon=True).start()
threading.Thread(target=udp, daemon=True).start()
threading.Event().wait()
"""


def _start_leaves(al: AttackLab) -> None:
    quiet = {"stdout": subprocess.DEVNULL, "stderr": subprocess.DEVNULL}
    script = str(SCRIPTS / "benign.py")
    al.ns["plc"].popen(sys.executable, script, "plc", al.ips["plc"], **quiet)
    _wait_listening(al.ns["plc"], "t", f"{al.ips['plc']}:502")
    al.ns["hmi"].popen(sys.executable, script, "hmi", al.ips["hmi"], al.ips["plc"], **quiet)
    al.ns["camera"].popen(sys.executable, script, "camera", al.ips["camera"], al.ips["hmi"], **quiet)
    al.ns["sensor"].popen(sys.executable, script, "sensor", al.ips["sensor"], **quiet)
    # The sensor's MQTT session opens now (a cleartext session: its CONNECT is a finding of its own); the cases
    # start once it is up, so that they see the leaves' steady work.
    time.sleep(2.0)
