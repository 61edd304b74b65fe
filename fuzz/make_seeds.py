#!/usr/bin/env python3
"""make_seeds.py: writes the checked-in seed corpora fuzz/corpus/{checkpoint,config,route}/.

Run from the repository root: python3 fuzz/make_seeds.py. Deterministic (fixed RNG seed), so the files
only change when this script does. The byte layouts are those the harnesses read (see each harness's
header comment); the checkpoint seeds follow the format documented in examples/checkpoint.h."""
import os
import random
import struct
import zlib

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "corpus")


def write(kind, name, data):
    d = os.path.join(ROOT, kind)
    os.makedirs(d, exist_ok=True)
    with open(os.path.join(d, name), "wb") as f:
        f.write(bytes(data))


# ---- checkpoint: byte 0 = harness flags, then a ckpt.bin ----
def record(name, shape, values):
    body = struct.pack("<I", len(name)) + name.encode() + struct.pack("<I", len(shape))
    body += b"".join(struct.pack("<I", s) for s in shape)
    body += b"".join(struct.pack("<f", v) for v in values)
    return body + struct.pack("<I", zlib.crc32(body) & 0xFFFFFFFF)


def ckpt(records, step=10, version=1):
    recs = b"".join(record(*r) for r in records)
    model = struct.pack("<11i", 3, 2, 0, 0, 4, 6, 2, 2, 1, 8, 256)
    train = struct.pack("<6i", 1, 2, 0, 1, 5, 20) + struct.pack("<5f", 3e-3, 2.0, 0.01, 0.1, 1.0)
    train += struct.pack("<Q", 1234)
    state = struct.pack("<4QI", step, 99, 320, 1000, 0xDEADBEEF)
    trailer = struct.pack("<II", 0, len(records)) + b"SCMOEEND"
    total = 164 + len(recs) + len(trailer)
    head = b"SCMOECKP" + struct.pack("<II", version, 164) + model + train + state
    head += struct.pack("<IQ", len(records), total)
    assert len(head) == 160
    head += struct.pack("<I", zlib.crc32(head) & 0xFFFFFFFF)
    return head + recs + trailer


def seq(n, scale=0.01):
    return [scale * (i - n / 2) for i in range(n)]


LIST = [("wte", [8, 4]), ("wte#m", [8, 4]), ("lnf.weight", [4]), ("pair0.l1.experts.0.w1", [4, 6]),
        ("pair0.l1.experts.1.w1", [4, 6]), ("pair0.l1.gate.weight", [4, 2])]


def numel(shape):
    n = 1
    for s in shape:
        n *= s
    return n


full = ckpt([(n, s, seq(numel(s))) for n, s in LIST])
write("checkpoint", "valid", b"\x00" + full)
write("checkpoint", "valid_fixup", b"\x07" + full)
write("checkpoint", "valid_roundtrip", b"\x0f" + full)
write("checkpoint", "truncated", b"\x00" + full[: len(full) // 2])
write("checkpoint", "header_only", b"\x03" + full[:164])
write("checkpoint", "magic_only", b"\x00" + full[:8])
write("checkpoint", "wrong_version", b"\x00" + ckpt([(n, s, seq(numel(s))) for n, s in LIST], version=2))
write("checkpoint", "shape_mismatch", b"\x00" + ckpt([("wte", [4, 8], seq(32))] + [(n, s, seq(numel(s))) for n, s in LIST[1:]]))
write("checkpoint", "missing_tensor", b"\x00" + ckpt([(n, s, seq(numel(s))) for n, s in LIST[1:]]))
write("checkpoint", "extra_records", b"\x00" + ckpt([("other", [3, 3, 3], seq(27))] + [(n, s, seq(numel(s))) for n, s in LIST]))


# ---- config: the bytes config_from() reads, then the object, the shape and the inputs ----
def pick(v, lo):
    b = v - lo
    assert 0 <= b < 224
    return b


def config_seed(d=8, h=16, E=4, k=2, max_tokens=32, arch=3, pos=2, heads=2, seq_len=8, pair=1, act=0, prio=0,
                cf=0, check_finite=0, combine=0, wire=0, overlap=1, ogs=0, slot=-1, progress=0, rng=None):
    b = [pick(d, 1), pick(h, 1), pick(E, 1), pick(k, 1), pick(max_tokens, 1), cf, 0, prio, 1, 0, 1, 0, 0]
    b += [rng.randrange(256) for _ in range(8)]  # seed
    b += [act, check_finite, arch, pick(pos, 1), combine, pick(heads, 1), pick(seq_len, 1), 1, pick(2, 1), 0,
          progress, pick(4, 1), overlap, pick(slot, -1), ogs, 0, wire]
    b += [pair, 3, 2, 100]  # pair?, T byte, B byte, raw byte (>= 32: finite inputs)
    b += [rng.randrange(256) for _ in range(2 * 4 * 8 * d)]
    return b


rng = random.Random(7)
write("config", "pair_scmoe_pos2", config_seed(rng=rng))
write("config", "pair_top2_swiglu", config_seed(arch=0, act=1, rng=rng))
write("config", "pair_shared_add_bf16", config_seed(arch=2, combine=1, wire=1, ogs=1, rng=rng))
write("config", "pair_scmoe_pos3_serial", config_seed(pos=3, overlap=0, slot=2, progress=2, rng=rng))
write("config", "moe_k2_batch_prio", config_seed(pair=0, prio=1, cf=2, rng=rng))
write("config", "moe_dropless_checkfinite", config_seed(pair=0, cf=4, check_finite=1, rng=rng))
write("config", "invalid_heads", config_seed(d=6, heads=4, rng=rng))
write("config", "empty", [])


# ---- route: world, ep, E_local, k, priority, cap mode, cf, tokens per rank, extra, records, chunks ----
def route_seed(world, ep_idx, el, k, prio, cap_mode, cf, tokens, rng, chunks=None):
    b = [world - 1, ep_idx, el - 1, k - 1, prio, cap_mode, cf]
    b += tokens + [1]
    if cap_mode >= 192:
        b += [rng.randrange(256), 0]
    for _ in range(sum(tokens)):
        b += [rng.randrange(256) for _ in range(k)] + [rng.randrange(250)]
    if chunks is not None:
        b += [chunks]
    return b


write("route", "w1_k1", route_seed(1, 0, 4, 1, 0, 0, 4, [16], rng))
write("route", "w2_k2_drops", route_seed(2, 1, 2, 2, 0, 0, 3, [8, 12], rng))
write("route", "w4_ep2_batch", route_seed(4, 1, 2, 2, 1, 0, 2, [5, 0, 9, 3], rng))
write("route", "w8_ep4_dropless", route_seed(8, 2, 1, 1, 1, 0, 0, [3, 1, 4, 1, 5, 9, 2, 6], rng))
write("route", "w3_raw_capacity", route_seed(3, 2, 3, 3, 0, 200, 0, [7, 7, 7], rng))
write("route", "w6_ep3_k4", route_seed(6, 2, 2, 4, 0, 0, 5, [4, 4, 0, 4, 4, 2], rng))
write("route", "w2_k2_chunks3", route_seed(2, 1, 2, 2, 0, 0, 3, [8, 12], rng, chunks=3))
write("route", "w4_ep2_batch_chunks1", route_seed(4, 1, 2, 2, 1, 0, 2, [5, 0, 9, 3], rng, chunks=1))
write("route", "w8_ep8_chunks16", route_seed(8, 3, 1, 2, 0, 0, 0, [3, 1, 4, 1, 5, 9, 2, 6], rng, chunks=16))
print("seeds written under", ROOT)
