#!/usr/bin/env python3
# Writes cases for the lz4_differential test: lz4 blocks (LZ4_compress_default output,
# the same with bytes mutated or cut off or the raw size changed, random sequences of
# random shape, and random bytes), each with the verdict and output of liblz4's
# LZ4_decompress_safe, the decoder PostgreSQL calls, given the raw size as capacity. It
# calls the system liblz4 (the one the server links) through ctypes: nothing to install.
# Usage: lz4_differential.py OUT_FILE CASES   (LIBLZ4 overrides the library path)
# Record: raw u32, block length u32, ok u8 (liblz4 returned exactly raw), output length
# u32, block, output; little-endian.
import ctypes, os, random, struct, sys
lib = ctypes.CDLL(os.environ.get("LIBLZ4", "/lib/x86_64-linux-gnu/liblz4.so.1"))
print("liblz4", lib.LZ4_versionNumber(), file=sys.stderr)
rng = random.Random(26)
words = [b"alpha", b"beta", b"gamma", b'{"role": "user"}', b"\x00\xff", b"content"]
def sample():
    kind = rng.randrange(4)
    n = rng.choice([0, 1, 5, 12, 13, 20, 64, 300, 5000, 70000])
    if kind == 0:
        return bytes(rng.randrange(256) for _ in range(n))
    if kind == 1:
        return bytes([rng.randrange(256)]) * n
    out = b""
    while len(out) < n:
        out += rng.choice(words) if kind == 2 else bytes([rng.randrange(4)])
    return out[:n]
def compress(data):
    cap = lib.LZ4_compressBound(len(data))
    dst = ctypes.create_string_buffer(max(cap, 1))
    n = lib.LZ4_compress_default(data, dst, len(data), cap)
    return dst.raw[:n]
def decompress(block, raw):
    # create_string_buffer zeroes it, so liblz4's offset-0 copies read defined bytes.
    dst = ctypes.create_string_buffer(raw + 1)
    r = lib.LZ4_decompress_safe(block, dst, len(block), raw)
    return r, dst.raw[:max(r, 0)]
def lenext(n):
    b = b""
    while n >= 255:
        b += b"\xff"; n -= 255
    return b + bytes([n])
def random_sequences():
    # Valid-by-construction sequences of random shape, without the encoder's end-of-block
    # discipline: they probe exactly where liblz4's end rules begin.
    blk, produced = b"", 0
    for _ in range(rng.randrange(0, 4)):
        lit = rng.choice([0, 1, 2, 3, 7, 12, 15, 16, 300])
        ml = rng.choice([4, 5, 8, 18, 19, 20, 300])
        if produced + lit == 0:
            lit = 1
        tok = (min(lit, 15) << 4) | min(ml - 4, 15)
        blk += bytes([tok]) + (lenext(lit - 15) if lit >= 15 else b"")
        blk += bytes(rng.randrange(256) for _ in range(lit))
        produced += lit
        blk += struct.pack("<H", rng.randrange(1, min(produced, 65535) + 1))
        blk += lenext(ml - 19) if ml >= 19 else b""
        produced += ml
    last = rng.choice([0, 1, 4, 5, 6, 15, 20])
    blk += bytes([min(last, 15) << 4]) + (lenext(last - 15) if last >= 15 else b"")
    blk += bytes(rng.randrange(256) for _ in range(last))
    produced += last
    return blk, produced
out = open(sys.argv[1], "wb")
stats = {"ok": 0, "err": 0}
for case in range(int(sys.argv[2])):
    if rng.randrange(3) == 0:
        blk, raw = random_sequences()
        block = bytearray(blk)
        m = rng.choice([0, 0, 0, 1, 5])
    else:
        data = sample()
        block = bytearray(compress(data))
        raw = len(data)
        m = rng.randrange(6)
    if m >= 1 and block:
        for _ in range(rng.randrange(1, 4)):
            block[rng.randrange(len(block))] = rng.randrange(256)
    if m == 5:
        raw = max(0, raw + rng.randrange(-6, 7))
    if rng.randrange(10) == 0:
        block = bytearray(rng.randrange(256) for _ in range(rng.randrange(1, 40)))
        raw = rng.randrange(0, 60)
    if rng.randrange(8) == 0 and block:
        block = block[: rng.randrange(len(block))]
    block = bytes(block)
    r, dec = decompress(block, raw)
    ok = 1 if r == raw else 0   # exact size: the Rust decoder's (stricter) rule
    stats["ok" if ok else "err"] += 1
    out.write(struct.pack("<IIBI", raw, len(block), ok, len(dec) if ok else 0))
    out.write(block)
    if ok:
        out.write(dec)
print(stats, file=sys.stderr)
