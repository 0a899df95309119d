"""Classic BPF programs for the live capture socket, compiled by libpcap at run time.

The kernel filter never drops a frame that the core counts. It only decides *how many bytes* of each frame
reach user space: a classic BPF program's return value is the snap length (0 drops the frame, ``n`` keeps its
first ``n`` bytes) and the ring header still carries the original length. The default program keeps

* whole (``inventory_snaplen``): ARP, DHCP, DNS, mDNS, LLMNR, NetBIOS, SSDP, DHCPv6, and IPv4 TCP segments
  that start a TLS handshake record, an HTTP request or an MQTT CONNECT;
* the first ``snaplen`` bytes of every other frame: all headers (802.1Q + IPv6 + TCP with options is 122
  bytes) and the first payload bytes of each segment;
* whole: every frame shorter than :data:`GUARD_LEN`.

Per-MAC and per-conversation packet and byte counters stay exact because every frame arrives, with its wire
length; only mid-flow payload bytes, which nothing reads, are cut. An operator's extra filter expression
narrows what is captured at all: it is and-ed into every branch.

libpcap compiles each expression (``pcap_compile`` on a ``pcap_open_dead`` handle, link type Ethernet) and
:func:`splice` joins the programs: every ``ret #0`` of the inventory program becomes a jump to the program with
the short snap length, and a length test in front sends short frames to a third one, so that no load of the
inventory program can run past the end of a runt or a malformed frame (in classic BPF that aborts the
program with 0: a silent drop).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import socket
import struct
import threading
from dataclasses import dataclass

from leafguard.errors import CaptureError

DLT_EN10MB = 1
PCAP_NETMASK_UNKNOWN = 0xFFFFFFFF
SO_ATTACH_FILTER = 26
BPF_MAXINSNS = 4096

BPF_RET_K = 0x06
BPF_JMP_JA = 0x05
BPF_JMP_JGE_K = 0x35
BPF_LD_W_LEN = 0x80

DEFAULT_SNAPLEN = 512
DEFAULT_INVENTORY_SNAPLEN = 65535

_TCP_PAYLOAD = "tcp[((tcp[12:1] & 0xf0) >> 2):{n}]"
INVENTORY_EXPRESSION = (
    "arp or rarp or (udp and (port 53 or port 67 or port 68 or port 137 or port 138"
    " or port 1900 or port 5353 or port 5355 or port 546 or port 547))"
    # TCP segments that start a TLS handshake record, an HTTP request or an MQTT CONNECT (IPv4: libpcap's
    # tcp[] does not follow IPv6). A large ClientHello puts the SNI anywhere (Chrome shuffles extensions) and
    # request headers often pass 512 bytes; random payload that happens to match only costs some copying.
    f" or (tcp and ({_TCP_PAYLOAD.format(n=1)} = 0x16 or {_TCP_PAYLOAD.format(n=1)} = 0x10"
    f" or {_TCP_PAYLOAD.format(n=4)} = 0x47455420 or {_TCP_PAYLOAD.format(n=4)} = 0x504f5354"
    f" or {_TCP_PAYLOAD.format(n=4)} = 0x50555420 or {_TCP_PAYLOAD.format(n=4)} = 0x48454144))"
)
"""Frames kept whole: the deep decoders read their full payload (DHCP options sit past byte 282)."""

GUARD_LEN = 160
"""Frames shorter than this skip the inventory program and are kept whole. Its loads reach byte 138 at most
(14 + 60-byte IPv4 header + 60-byte TCP header + 4), so from here on none can run past the frame's end: in
classic BPF such a load aborts the program with 0, which would drop a runt or a malformed frame silently."""


class _BpfInsn(ctypes.Structure):
    _fields_ = (
        ("code", ctypes.c_ushort),
        ("jt", ctypes.c_ubyte),
        ("jf", ctypes.c_ubyte),
        ("k", ctypes.c_uint32),
    )


class _BpfProgram(ctypes.Structure):
    _fields_ = (("bf_len", ctypes.c_uint), ("bf_insns", ctypes.POINTER(_BpfInsn)))


class _Timeval(ctypes.Structure):
    _fields_ = (("tv_sec", ctypes.c_long), ("tv_usec", ctypes.c_long))


class _PcapPkthdr(ctypes.Structure):
    _fields_ = (("ts", _Timeval), ("caplen", ctypes.c_uint32), ("len", ctypes.c_uint32))


_lib: ctypes.CDLL | None = None
# pcap_compile keeps parser state in globals in older libpcap releases; one compile at a time.
_compile_lock = threading.Lock()


def _libpcap() -> ctypes.CDLL:
    global _lib
    if _lib is None:
        name = ctypes.util.find_library("pcap") or "libpcap.so.0.8"
        try:
            lib = ctypes.CDLL(name)
        except OSError as exc:
            raise CaptureError(
                f"cannot load libpcap ({name}): install libpcap0.8 to compile capture filters"
            ) from exc
        lib.pcap_open_dead.restype = ctypes.c_void_p
        lib.pcap_open_dead.argtypes = (ctypes.c_int, ctypes.c_int)
        lib.pcap_compile.restype = ctypes.c_int
        lib.pcap_compile.argtypes = (
            ctypes.c_void_p,
            ctypes.POINTER(_BpfProgram),
            ctypes.c_char_p,
            ctypes.c_int,
            ctypes.c_uint32,
        )
        lib.pcap_geterr.restype = ctypes.c_char_p
        lib.pcap_geterr.argtypes = (ctypes.c_void_p,)
        lib.pcap_freecode.restype = None
        lib.pcap_freecode.argtypes = (ctypes.POINTER(_BpfProgram),)
        lib.pcap_close.restype = None
        lib.pcap_close.argtypes = (ctypes.c_void_p,)
        lib.pcap_offline_filter.restype = ctypes.c_int
        lib.pcap_offline_filter.argtypes = (
            ctypes.POINTER(_BpfProgram),
            ctypes.POINTER(_PcapPkthdr),
            ctypes.c_char_p,
        )
        _lib = lib
    return _lib


Insn = tuple[int, int, int, int]
"""One classic BPF instruction: ``(code, jt, jf, k)``, as ``tcpdump -dd`` prints it."""


@dataclass(frozen=True, slots=True)
class BpfProgram:
    """A classic BPF program ready for ``SO_ATTACH_FILTER``."""

    insns: tuple[Insn, ...]
    expression: str
    """What the program was compiled from, for logs and reported state."""

    def __len__(self) -> int:
        return len(self.insns)

    def attach(self, sock: socket.socket) -> None:
        """Attach (or atomically replace) the socket's filter."""
        arr = (_BpfInsn * len(self.insns))(*(_BpfInsn(*i) for i in self.insns))
        # struct sock_fprog { unsigned short len; struct sock_filter *filter; } with native padding.
        fprog = struct.pack("HL", len(self.insns), ctypes.addressof(arr))
        sock.setsockopt(socket.SOL_SOCKET, SO_ATTACH_FILTER, fprog)

    def run(self, frame: bytes, wirelen: int | None = None) -> int:
        """The snap length the program returns for ``frame`` (0: dropped), by libpcap's interpreter."""
        lib = _libpcap()
        arr = (_BpfInsn * len(self.insns))(*(_BpfInsn(*i) for i in self.insns))
        prog = _BpfProgram(len(self.insns), ctypes.cast(arr, ctypes.POINTER(_BpfInsn)))
        hdr = _PcapPkthdr(_Timeval(0, 0), len(frame), wirelen if wirelen is not None else len(frame))
        return int(lib.pcap_offline_filter(ctypes.byref(prog), ctypes.byref(hdr), frame))


def compile_expression(expression: str, snaplen: int) -> BpfProgram:
    """Compile a pcap filter expression for Ethernet; matches return ``snaplen``.

    Raises:
        CaptureError: the expression is invalid (libpcap's message is included).
    """
    lib = _libpcap()
    with _compile_lock:
        handle = lib.pcap_open_dead(DLT_EN10MB, snaplen)
        if not handle:
            raise CaptureError("libpcap could not open a dead handle to compile a filter")
        try:
            prog = _BpfProgram()
            rc = lib.pcap_compile(handle, ctypes.byref(prog), expression.encode(), 1, PCAP_NETMASK_UNKNOWN)
            if rc != 0:
                err = (lib.pcap_geterr(handle) or b"").decode(errors="replace")
                raise CaptureError(f"invalid capture filter {expression!r}: {err}")
            try:
                insns = tuple(
                    (prog.bf_insns[i].code, prog.bf_insns[i].jt, prog.bf_insns[i].jf, prog.bf_insns[i].k)
                    for i in range(prog.bf_len)
                )
            finally:
                lib.pcap_freecode(ctypes.byref(prog))
        finally:
            lib.pcap_close(handle)
    return BpfProgram(insns, expression)


def splice(
    first: BpfProgram, rest: BpfProgram, *, min_len: int = 0, short: BpfProgram | None = None
) -> BpfProgram:
    """Run ``first``; where it would drop the frame, run ``rest`` instead.

    Frames shorter than ``min_len`` skip ``first`` and run ``short`` (or ``rest`` when there is none).
    """
    n = len(first.insns)
    out: list[Insn] = []
    if min_len > 0:
        to_short = n + (len(rest.insns) if short is not None else 0)
        out += [
            (BPF_LD_W_LEN, 0, 0, 0),
            (BPF_JMP_JGE_K, 1, 0, min_len),
            # Conditional jumps reach 255 instructions at most; ja reaches past any program.
            (BPF_JMP_JA, 0, 0, to_short),
        ]
    for i, (code, jt, jf, k) in enumerate(first.insns):
        if code == BPF_RET_K and k == 0:
            out.append((BPF_JMP_JA, 0, 0, n - 1 - i))
        else:
            out.append((code, jt, jf, k))
    out.extend(rest.insns)
    if short is not None:
        out.extend(short.insns)
    if len(out) > BPF_MAXINSNS:
        raise CaptureError(
            f"capture filter too long ({len(out)} instructions, the kernel takes {BPF_MAXINSNS}): "
            "simplify the extra filter expression"
        )
    return BpfProgram(tuple(out), f"{first.expression} || {rest.expression}")


def capture_program(
    extra: str = "",
    *,
    snaplen: int = DEFAULT_SNAPLEN,
    inventory_snaplen: int = DEFAULT_INVENTORY_SNAPLEN,
) -> BpfProgram:
    """The live filter: inventory frames whole, the rest cut to ``snaplen``, all narrowed by ``extra``.

    Raises:
        CaptureError: ``extra`` is not a valid pcap filter expression.
    """
    extra = extra.strip()
    if extra:
        # Compile the operator's expression alone first so its error message is about it, not our wrapper.
        narrow = compile_expression(extra, snaplen)
        whole = compile_expression(f"({extra}) and ({INVENTORY_EXPRESSION})", inventory_snaplen)
    else:
        narrow = compile_expression("", snaplen)
        whole = compile_expression(INVENTORY_EXPRESSION, inventory_snaplen)
    short = compile_expression(extra, inventory_snaplen)
    prog = splice(whole, narrow, min_len=GUARD_LEN, short=short)
    return BpfProgram(prog.insns, extra or "(all frames)")
