#!/usr/bin/env python3
"""Writes the seed inputs of every fuzz target into fuzz/seeds/<target>/ (docs/fuzzing.md).

The committed corpora (fuzz/corpus/<target>/) grew from these and were minimised with
`cargo fuzz cmin`; run this again only to start a corpus over.
"""
import base64, json, os, struct, sys

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "seeds")


def write(target, name, data):
    d = os.path.join(ROOT, target)
    os.makedirs(d, exist_ok=True)
    if isinstance(data, str):
        data = data.encode()
    with open(os.path.join(d, name), "wb") as f:
        f.write(data)


def csum(b):
    if len(b) % 2:
        b += b"\0"
    s = sum(struct.unpack("!%dH" % (len(b) // 2), b))
    while s >> 16:
        s = (s & 0xFFFF) + (s >> 16)
    return (~s) & 0xFFFF


def ipv4(src, dst, proto, payload, frag=0x4000, ihl=5):
    opts = b"\x01" * ((ihl - 5) * 4)
    h = struct.pack("!BBHHHBBH4s4s", 0x40 | ihl, 0, 20 + len(opts) + len(payload), 0x1234,
                    frag, 64, proto, 0, bytes(src), bytes(dst)) + opts
    h = h[:10] + struct.pack("!H", csum(h)) + h[12:]
    return h + payload


def ipv6(src, dst, proto, payload):
    return struct.pack("!IHBB16s16s", 0x60000000, len(payload), proto, 64, bytes(src), bytes(dst)) + payload


def pseudo(src, dst, proto, length):
    if len(src) == 4:
        return bytes(src) + bytes(dst) + struct.pack("!BBH", 0, proto, length)
    return bytes(src) + bytes(dst) + struct.pack("!IxxxB", length, proto)


def udp(src, dst, sport, dport, payload, checksum=True):
    u = struct.pack("!HHHH", sport, dport, 8 + len(payload), 0) + payload
    if checksum:
        c = csum(pseudo(src, dst, 17, len(u)) + u) or 0xFFFF
        u = u[:6] + struct.pack("!H", c) + u[8:]
    return u


def tcp(src, dst, seq, payload, flags=0x10, partial=False):
    opts = bytes([1, 1, 8, 10, 0, 0, 0, 1, 0, 0, 0, 2])
    t = struct.pack("!HHIIBBHHH", 40000, 5201, seq, 0x1000, ((20 + len(opts)) // 4) << 4, flags,
                    512, 0, 0) + opts + payload
    ph = pseudo(src, dst, 6, len(t))
    if partial:  # CHECKSUM_PARTIAL: the field holds the folded pseudo-header sum
        c = (~csum(ph)) & 0xFFFF
    else:
        c = csum(ph + t)
    return t[:16] + struct.pack("!H", c) + t[18:]


A4, B4 = [10, 0, 0, 1], [10, 0, 0, 2]
A6 = [0xFD] + [0] * 14 + [1]
B6 = [0xFD] + [0] * 14 + [2]
S4, D4 = [10, 200, 0, 2], [10, 200, 0, 1]


def pattern(n, start=0):
    return bytes((i + start) & 0xFF for i in range(n))


# engine_open: mode byte + rest (see the target's doc comment)
write("engine_open", "raw-data", bytes([0]) + struct.pack("<IIQ", 4, 0x12345, 0) + pattern(48))
write("engine_open", "raw-init", bytes([0]) + struct.pack("<I", 1) + pattern(144))
write("engine_open", "raw-response", bytes([0]) + struct.pack("<I", 2) + pattern(88))
write("engine_open", "raw-cookie", bytes([0]) + struct.pack("<I", 3) + pattern(60))
write("engine_open", "indexed-data", bytes([1]) + struct.pack("<IIQ", 4, 0, 7) + pattern(48))
write("engine_open", "indexed-cookie", bytes([1]) + struct.pack("<II", 3, 0) + pattern(56))
write("engine_open", "sealed-udp4", bytes([2]) + ipv4(A4, B4, 17, udp(A4, B4, 5000, 5001, pattern(40))))
write("engine_open", "sealed-udp6", bytes([2]) + ipv6(A6, B6, 17, udp(A6, B6, 5000, 5001, pattern(40))))
write("engine_open", "sealed-spoofed", bytes([2]) + ipv4([10, 9, 9, 9], B4, 17, udp([10, 9, 9, 9], B4, 1, 2, b"x")))
write("engine_open", "sealed-short", bytes([2]) + ipv4(A4, B4, 17, b"")[:19])
write("engine_open", "tampered-tag", bytes([3]) + bytes([100, 0, 1]))
write("engine_open", "tampered-index", bytes([3]) + bytes([5, 0, 0x80]))
write("engine_open", "untampered", bytes([3]))

# uapi: request streams
H1, H2, H3 = "01" * 32, "02" * 32, "03" * 32
write("uapi", "get", "get=1\n\n")
write("uapi", "set-full",
      f"set=1\nprivate_key={H1}\nlisten_port=51820\nfwmark=7\nreplace_peers=true\n"
      f"public_key={H2}\npreshared_key={H3}\nendpoint=[fd00::1]:4000\n"
      f"persistent_keepalive_interval=25\nreplace_allowed_ips=true\nallowed_ip=10.0.0.7/24\n"
      f"allowed_ip=fd00::/64\nprotocol_version=1\n\nget=1\n\n")
write("uapi", "set-remove", f"set=1\npublic_key={H2}\nallowed_ip=10.0.0.0/8\n\n"
      f"set=1\npublic_key={H3}\nallowed_ip=10.0.0.0/8\nendpoint=1.2.3.4:5\n\n"
      f"set=1\npublic_key={H2}\nremove=true\n\nget=1\n\n")
write("uapi", "set-update-only", f"set=1\npublic_key={H2}\nupdate_only=true\nendpoint=1.2.3.4:5\n\nget=1\n\n")
write("uapi", "set-self", f"set=1\nprivate_key={H1}\npublic_key={H2}\n\nget=1\n\n")
write("uapi", "bad-line", "set=1\nnot a line\n\nget=1\n\n")
write("uapi", "unterminated", "get=1\n")
write("uapi", "unknown-op", "frob=1\n\n")

# gso_split: virtio header (native-endian u16s) + packet
def vhdr(flags, gso, hdr_len, gso_size, csum_start, csum_offset):
    return struct.pack("=BBHHHH", flags, gso, hdr_len, gso_size, csum_start, csum_offset)


t4 = ipv4(S4, D4, 6, tcp(S4, D4, 1000, pattern(4000), partial=True))
t6 = ipv6(A6, B6, 6, tcp(A6, B6, 1000, pattern(4000), partial=True))
u4 = ipv4(S4, D4, 17, udp(S4, D4, 5000, 5001, pattern(3000), checksum=False))
write("gso_split", "tcp4", vhdr(1, 1, 52, 1400, 20, 16) + t4)
write("gso_split", "tcp4-ecn-fin", vhdr(1, 0x81, 52, 1000, 20, 16) + t4[:33] + bytes([0x19]) + t4[34:])
write("gso_split", "tcp6", vhdr(1, 4, 72, 1380, 40, 16) + t6)
write("gso_split", "udp4", vhdr(1, 5, 28, 1200, 20, 6) + u4)
write("gso_split", "none-partial", vhdr(1, 0, 0, 0, 20, 16) + ipv4(S4, D4, 6, tcp(S4, D4, 1, b"hi", partial=True)))
write("gso_split", "none", vhdr(0, 0, 0, 0, 0, 0) + ipv4(S4, D4, 17, udp(S4, D4, 1, 2, b"hi")))

# gro_coalesce: 4-byte records (kind, len/6, x, at)
def recs(*rs):
    return b"".join(bytes(r) for r in rs)


write("gro_coalesce", "bulk4", recs(*[(0, 240, 0, 0)] * 20, (8, 100, 0, 0)))
write("gro_coalesce", "bulk6", recs(*[(1, 230, 0, 0)] * 20, (9, 10, 0, 0)))
write("gro_coalesce", "mixed-flows", recs((0, 200, 0, 0), (2, 200, 0, 0), (0, 200, 0, 0), (4, 200, 0, 0), (0, 200, 0, 0), (1, 200, 0, 0)))
write("gro_coalesce", "bad-tcp-csum", recs((0, 200, 0, 0), (0, 200, 0, 0), (0x10, 200, 0, 0), (0, 200, 0, 0)))
write("gro_coalesce", "bad-ip-csum", recs((0, 200, 0, 0), (0x20, 200, 0, 0), (0, 200, 0, 0)))
write("gro_coalesce", "gap", recs((0, 200, 0, 0), (0x80, 200, 3, 0), (0, 200, 0, 0)))
write("gro_coalesce", "flip", recs((0, 200, 0, 0), (0x40, 200, 1, 8), (0, 200, 0, 0), (0x41, 200, 0x10, 1)))
write("gro_coalesce", "max", recs(*[(0, 255, 0, 0)] * 48))
# UDP (flow 3: kind bits 1-2 set): byte 3 bit 7 DF; kind bit 3 the UDP flow, bit 4 bad UDP
# checksum, bit 7 an IPv4 ID jump of x/2+1 (x odd: no checksum)
write("gro_coalesce", "udp4-df", recs(*[(6, 199, 0, 0x80)] * 40, (6, 50, 0, 0x80)))
write("gro_coalesce", "udp4-ids", recs(*[(6, 199, 0, 0)] * 20, (0x86, 199, 4, 0), (6, 199, 0, 0)))
write("gro_coalesce", "udp6", recs(*[(7, 229, 0, 0)] * 30, (7, 1, 0, 0)))
write("gro_coalesce", "udp-mixed", recs((6, 100, 0, 0), (14, 100, 0, 0), (6, 100, 0, 0), (0, 100, 0, 0), (6, 100, 0, 0), (0x16, 100, 0, 0), (6, 100, 0, 0)))
write("gro_coalesce", "udp4-no-csum", recs((6, 100, 0, 0x80), (0x86, 100, 1, 0x80), (6, 100, 0, 0x80), (6, 100, 0, 0x80)))

# snat: IPv4 pool (4) + prefix (1) + new source (4) + IPv6 pool (16) + prefix (1) + new
# source (16) + packet; a prefix of 0xff: no rewrite of that family
def vxlan(src, dst, checksum):
    inner = bytes([8, 0, 0, 0, 0, 0, 1, 0]) + pattern(64)
    return ipv4(src, dst, 17, udp(src, dst, 34567, 8472, inner, checksum), frag=0)


def vxlan6(src, dst, checksum=True):
    inner = bytes([8, 0, 0, 0, 0, 0, 1, 0]) + pattern(64)
    return ipv6(src, dst, 17, udp(src, dst, 34567, 8472, inner, checksum))


def fragment6(src, dst, piece, offset, more, nxt=17):
    frag = struct.pack("!BBHI", nxt, 0, (offset << 3) | more, 0x12345678)
    return ipv6(src, dst, 44, frag + piece)


pool = bytes([100, 96, 0, 0, 16])
to = bytes([100, 96, 0, 1])
under6 = bytes([0x20, 0x01, 0x0d, 0xb8] + [0] * 11 + [5])
mesh6 = bytes([0xfd, 0x96] + [0] * 13 + [3])
pool6 = bytes([0xfd, 0x96] + [0] * 14) + bytes([64]) + bytes([0xfd, 0x96] + [0] * 13 + [1])
none6 = bytes(16) + bytes([0xff]) + bytes(16)
conf = pool + to + pool6
write("snat", "vxlan-csum", conf + vxlan([192, 168, 1, 5], [100, 96, 0, 3], True))
write("snat", "vxlan-nocsum", conf + vxlan([192, 168, 1, 5], [100, 96, 0, 3], False))
frag = ipv4([192, 168, 1, 5], [100, 96, 0, 3], 17, pattern(64), frag=0x2000)
write("snat", "first-fragment", conf + frag)
write("snat", "later-fragment", conf + ipv4([192, 168, 1, 5], [100, 96, 0, 3], 17, pattern(64), frag=0x0010))
write("snat", "options", conf + ipv4([192, 168, 1, 5], [100, 96, 0, 3], 17, udp([192, 168, 1, 5], [100, 96, 0, 3], 1, 2, pattern(9)), ihl=7))
write("snat", "outside-pool", conf + vxlan([192, 168, 1, 5], [10, 0, 0, 3], True))
write("snat", "tcp", conf + ipv4([192, 168, 1, 5], [100, 96, 0, 3], 6, tcp([192, 168, 1, 5], [100, 96, 0, 3], 1, b"x")))
write("snat", "v4-only", pool + to + none6 + vxlan6(under6, mesh6))
write("snat", "vxlan6", conf + vxlan6(under6, mesh6))
write("snat", "vxlan6-nocsum", conf + vxlan6(under6, mesh6, False))
udp6 = udp(under6, mesh6, 34567, 8472, pattern(40))
write("snat", "fragment6-first", conf + fragment6(under6, mesh6, udp6[:24], 0, 1))
write("snat", "fragment6-later", conf + fragment6(under6, mesh6, udp6[24:], 3, 0))
write("snat", "fragment6-tcp", conf + fragment6(under6, mesh6, udp6[:24], 0, 1, nxt=6))
write("snat", "hop-by-hop6", conf + ipv6(under6, mesh6, 0, bytes([17, 0, 1, 4, 0, 0, 0, 0]) + udp6))
write("snat", "outside-pool6", conf + vxlan6(under6, bytes([0xfd, 0] + [0] * 14)))

# journal
def journal(entries, version=1):
    return json.dumps({"version": version, "entries": entries})


route = {"kind": "route", "oif": 7, "gateway": "100.96.0.3", "onlink": True, "protocol": 4,
         "scope": 0, "prefsrc": None, "mtu": 1370}
write("journal", "empty", journal([]))
write("journal", "all-kinds", journal([
    {"key": {"kind": "fdb", "ifindex": 4, "mac": "0a:58:0a:f4:03:00"}, "prior": None,
     "applied": {"kind": "fdb", "dst": "100.96.0.3"}},
    {"key": {"kind": "neigh", "ifindex": 4, "ip": "10.244.3.0"},
     "prior": {"kind": "neigh", "mac": "0a:58:0a:f4:03:01"},
     "applied": {"kind": "neigh", "mac": "0a:58:0a:f4:03:00"}, "pending": {"was": None}},
    {"key": {"kind": "route", "table": 254, "dst": "10.244.3.0", "prefix": 24},
     "prior": None, "applied": route,
     "pending": {"was": dict(route, gateway=None, onlink=False, mtu=None)}},
    {"key": {"kind": "rule", "v6": True, "priority": 100}, "prior": None,
     "applied": {"kind": "rule", "table": 51820}},
]))
write("journal", "duplicate-keys", journal([
    {"key": {"kind": "rule", "v6": False, "priority": 1}, "prior": None, "applied": {"kind": "rule", "table": 1}},
    {"key": {"kind": "rule", "v6": False, "priority": 1}, "prior": None, "applied": {"kind": "rule", "table": 2}},
]))
write("journal", "wrong-version", journal([], version=2))
write("journal", "truncated", journal([])[:-3])

# mesh_plan: pick byte + JSON list of WireGuardPeers
def key(b):
    return base64.b64encode(bytes([b]) * 32).decode()


def peer(name, k, location, mesh, admitted=True, topology="cross-location", vtep=True):
    p = {
        "apiVersion": "isthmus.dev/v1alpha1", "kind": "WireGuardPeer",
        "metadata": {"name": name, "generation": 2},
        "spec": {"publicKey": key(k), "endpoint": f"203.0.113.{k}:51820", "location": location,
                 "nodeIP": "10.0.0.5", "podCIDRs": [f"10.244.{k}.0/24", "fd10::/64"],
                 "persistentKeepalive": 25, "mtu": 1420},
        "status": {"meshIP": mesh, "meshCIDR": "100.96.0.0/16", "topology": topology,
                   "conditions": [{"type": "Admitted", "status": "True" if admitted else "False",
                                   "reason": "NodeVerified", "message": "", "observedGeneration": 2,
                                   "lastTransitionTime": "2026-01-01T00:00:00Z"}]},
    }
    if vtep:
        p["spec"]["vtep"] = {"mac": f"0a:58:0a:f4:{k:02x}:00", "ip": f"10.244.{k}.0"}
    return p


write("mesh_plan", "cross-location", bytes([0]) + json.dumps([
    peer("a1", 1, "old", "100.96.0.1"), peer("a2", 2, "old", "100.96.0.2"),
    peer("b1", 3, "new", "100.96.0.3"), peer("b2", 4, "new", "100.96.0.4", admitted=False),
    peer("b3", 5, "new", None)]).encode())
write("mesh_plan", "full-mesh-v6", bytes([1]) + json.dumps([
    peer("a1", 1, "old", "fd00::1", topology="full"), peer("a2", 2, "old", "fd00::2", vtep=False),
    peer("b1", 3, "new", "fd00::3")]).encode())
write("mesh_plan", "not-admitted", bytes([0]) + json.dumps([peer("a1", 1, "old", "100.96.0.1", admitted=False)]).encode())
write("mesh_plan", "empty", bytes([0]) + b"[]")
