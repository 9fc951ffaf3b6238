"""Seeded mutators: byte-level (flips, truncations, insertions, length fields at 0/max) and
JSON-level (wrong types, huge and negative numbers, NaN/Infinity literals, deep nesting, huge
lists), each a pure function of a `random.Random`, so a case is reproducible from its seed."""

from __future__ import annotations

import copy
import json
import random
import struct
from typing import Any

INTERESTING_INTS = (0, 1, 2, 7, 8, 0x7F, 0x80, 0xFF, 0x100, 0x7FFF, 0xFFFF, 1 << 20, (1 << 29), (1 << 31) - 1, 1 << 31, (1 << 32) - 1)
INTERESTING_BYTES = (0x00, 0x01, 0x7F, 0x80, 0xFE, 0xFF, ord("["), ord("{"), ord('"'), ord("\\"))


class Raw:
    """JSON text written as is (NaN, 1e999, 5,000-digit numbers, nesting): what `json.dumps` cannot make."""

    def __init__(self, text: str):
        self.text = text


def to_json(value: Any) -> bytes:
    """JSON with every `Raw` spliced in verbatim."""
    raws: list[str] = []

    def place(node: Any) -> Any:
        if isinstance(node, Raw):
            raws.append(node.text)
            return f"\x00RAW{len(raws) - 1}\x00"
        if isinstance(node, dict):
            return {str(k): place(v) for k, v in node.items()}
        if isinstance(node, list | tuple):
            return [place(v) for v in node]
        return node

    text = json.dumps(place(value), separators=(",", ":"))
    for i, raw in enumerate(raws):
        text = text.replace(f'"\\u0000RAW{i}\\u0000"', raw, 1)
    return text.encode("utf-8", "surrogatepass")


def nested(depth: int, open_: str = "[", close: str = "]") -> Raw:
    return Raw(open_ * depth + close * depth)


def hostile_value(rng: random.Random, budget: int) -> Any:
    """A value of a wrong type, an extreme number or a structure at the edge of what parsers bound."""
    pick = rng.randrange(24)
    if pick == 0:
        return None
    if pick == 1:
        return rng.choice([True, False])
    if pick == 2:
        return rng.choice([0, -1, 1, -(2**63), 2**63, 2**64, 10**30, -(10**30)]) + rng.choice([0, 0, 1, -1])
    if pick == 3:
        return rng.choice(INTERESTING_INTS)
    if pick == 4:
        return rng.choice([0.5, -0.0, 1e308, -1e308, 5e-324, 3.4e38])
    if pick == 5:
        return Raw(rng.choice(["NaN", "Infinity", "-Infinity", "1e999", "-1e999", "1E400", "0e0", "-0"]))
    if pick == 6:
        return Raw(rng.choice("123456789") * rng.choice([20, 40, 400, 4301, 5000, min(budget, 100_000)]))
    if pick == 7:
        return ""
    if pick == 8:
        return "x" * rng.choice([1, 64, 65, 256, 257, 4096, min(budget, 70_000)])
    if pick == 9:
        return rng.choice(["\x00", "é", "../../etc/passwd", "a/b", "+", "#", "$SYS", " ", "A" * 65, "fp32|", "|", "topk:0", "q8:1e9"])
    if pick == 10:
        return Raw(rng.choice(['"\\ud800"', '"\\u0000"', '"\\x"', '"', "'a'", "tru", "nul", "{", "[", "]"]))
    if pick == 11:
        return []
    if pick == 12:
        return {}
    if pick == 13:
        return [rng.choice([1, "a", None, [], {}])]
    if pick == 14:
        return {"a": 1, "": None}
    if pick == 15:
        return nested(rng.choice([10, 100, 199, 200, 201, 1000, min(budget // 2, 100_000)]))
    if pick == 16:
        depth = rng.choice([50, 300, min(budget // 6, 100_000)])
        return Raw('{"a":' * depth + "1" + "}" * depth)
    if pick == 17:
        n = rng.choice([1000, 40_000, max(1, budget // 4)])
        return Raw("[" + ",".join(["1"] * n) + "]")
    if pick == 18:
        return Raw('{"a":1,"a":2}')
    if pick == 19:
        return [rng.randrange(-3, 1 << 31) for _ in range(rng.choice([0, 1, 9, 17]))]
    if pick == 20:
        return rng.choice(INTERESTING_INTS) * rng.choice([1, -1])
    if pick == 21:
        return {"name": "w", "shape": [rng.choice(INTERESTING_INTS)]}
    if pick == 22:
        return Raw("[" + ",".join(['{"name":"a","shape":[1]}'] * rng.choice([2, 1000, max(2, min(40_000, budget // 26))])) + "]")
    return [None] * rng.choice([2, 100, 5000])


def _paths(node: Any, prefix: tuple = ()) -> list[tuple]:
    out = [prefix]
    if isinstance(node, dict):
        for k, v in node.items():
            out += _paths(v, prefix + (k,))
    elif isinstance(node, list):
        for i, v in enumerate(node[:64]):
            out += _paths(v, prefix + (i,))
    return out


def _set(root: Any, path: tuple, value: Any) -> Any:
    if not path:
        return value
    node = root
    for key in path[:-1]:
        node = node[key]
    node[path[-1]] = value
    return root


def mutate_json(rng: random.Random, value: Any, budget: int = 1 << 20) -> bytes:
    """`value` (parsed JSON) with one to three structural mutations, as JSON text of at most about
    `budget` bytes (a mutation that would outgrow it is undone)."""
    root = json.loads(json.dumps(value))
    text = to_json(root)
    for _ in range(rng.choice([1, 1, 1, 2, 3])):
        before = copy.deepcopy(root) if len(text) < 1 << 16 else None
        root = _mutate_once(rng, root, budget)
        grown = to_json(root)
        if len(grown) <= budget + 64:
            text = grown
        elif before is not None:
            root = before
        else:
            break
    return text


def _mutate_once(rng: random.Random, root: Any, budget: int) -> Any:
    path = rng.choice(_paths(root))
    parent = root
    for key in path[:-1]:
        parent = parent[key]
    op = rng.randrange(6)
    if op <= 2 or not path:
        return _set(root, path, hostile_value(rng, budget))
    if op == 3 and isinstance(parent, dict):
        parent.pop(path[-1], None)  # a required field missing
    elif op == 4 and isinstance(parent, dict):
        parent[rng.choice(["extra", "__class__", "kind", "signed", "payload_len", "sig", "Sender"])] = hostile_value(rng, budget)
    elif isinstance(parent, list) and parent:
        parent.extend([parent[path[-1]]] * rng.choice([1, 2, 100]))
    else:
        return _set(root, path, hostile_value(rng, budget))
    return root


def mutate_bytes(rng: random.Random, data: bytes, dictionary: tuple[bytes, ...] = ()) -> bytes:
    """One to four byte-level edits: flips, interesting bytes, integers at random offsets,
    truncation, deletion, duplication, insertion of random or dictionary bytes."""
    buf = bytearray(data)
    for _ in range(rng.choice([1, 1, 2, 3, 4])):
        op = rng.randrange(9)
        n = len(buf)
        pos = rng.randrange(n + 1)
        if op == 0 and n:
            buf[pos % n] ^= 1 << rng.randrange(8)
        elif op == 1 and n:
            buf[pos % n] = rng.choice(INTERESTING_BYTES)
        elif op == 2 and n >= 4:
            fmt = rng.choice([">I", "<I", ">Q", "<Q", ">H", "B"])
            size = struct.calcsize(fmt)
            value = rng.choice(INTERESTING_INTS + (n, n - 1, n + 1, (1 << (8 * size)) - 1)) % (1 << (8 * size))
            at = min(pos, n - size)
            buf[at : at + size] = struct.pack(fmt, value)
        elif op == 3:
            del buf[rng.randrange(n + 1) :]
        elif op == 4 and n:
            del buf[pos : pos + rng.randrange(1, 64)]
        elif op == 5 and n:
            end = min(n, pos + rng.randrange(1, 256))
            buf[pos:pos] = buf[pos:end] * rng.choice([1, 2, 16])
        elif op == 6:
            buf[pos:pos] = rng.randbytes(rng.randrange(1, 32))
        elif op == 7 and dictionary:
            buf[pos:pos] = rng.choice(dictionary)
        else:
            buf[pos:pos] = bytes([rng.choice(INTERESTING_BYTES)]) * rng.choice([1, 8, 1000])
    return bytes(buf)
