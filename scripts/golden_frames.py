"""Golden KV-event frames, made once by the engines' own code.

Why this exists: kvmesh reads vLLM's and SGLang's KV events with its own
msgspec structs (``engine_adapters/kv_events.py``) and derives a block's
tenant (LoRA adapter, cache salt) from them (``engine_adapters/block_mapper.py``).
Frames written by hand from reading the engines' code only test what the
reader understood (the untagged cache salt of vLLM 0.33 and SGLang's EAGLE
token pairs are easy to miss). These frames are made by the released
engines' code itself, so the tests check kvmesh against what the engines
really send.

What it does:

1. ``pip download --no-deps`` the released Linux x86-64 wheels (PyPI only)
   into a temporary directory: vLLM 0.33.0, SGLang 0.5.23, and vLLM 0.24.0
   for the older replay framing ``[seq, payload]``.
2. Loads ONLY their KV-event modules from the wheels: vLLM's
   ``vllm/distributed/kv_events.py`` (structs and ``ZmqEventPublisher``),
   ``vllm/v1/core/kv_cache_utils.py`` (``generate_block_hash_extra_keys``,
   ``to_event_extra_keys``, ``hash_block_tokens``) and ``vllm/utils/hashing.py``;
   SGLang's ``sglang/srt/disaggregation/kv_events.py`` (structs and publisher)
   and ``sglang/srt/mem_cache/events.py`` (``KVCacheEventRecorder``, which
   turns radix-tree nodes into events: pages, bigram tuples, salts, LoRA
   names) with ``sglang/srt/mem_cache/utils.py`` and
   ``sglang/srt/mem_cache/cpp_utils/native_hash.py``. Everything else they
   import (config, logging and network helpers, kernels) is a stand-in
   module defined here: those imports are not on the path that builds events.
   SGLang's page hash is a C++ extension (``hash_binding.cpp``); a Python
   SHA-256 stand-in computes it here. Block hashes are opaque ids to kvmesh,
   so only their types and the parent links matter.
3. Builds event batches with their structs and functions, publishes them
   through their own ``ZmqEventPublisher`` (inproc sockets), and records the
   payloads from a replay, one live message as the SUB socket receives it and
   one replay reply as a DEALER receives it.
4. Writes the frames to ``tests/fixtures/golden/`` with ``manifest.json``:
   per frame its engine, version, file, what it exercises, and what a correct
   reader derives from it (the prompts whose blocks must be live afterwards,
   under which adapter and salt, on which cache tier; which events cannot be
   mapped, and why). Re-running with the same wheels writes the same bytes.

Nothing of the engines' code is written to the repository, only the bytes it
produced. The tests read the fixtures and need neither the wheels nor the
network. Re-run after an engine release changes its events::

    .venv/bin/python scripts/golden_frames.py [--wheels DIR] [--out DIR]

``--wheels`` reuses (or keeps) downloaded wheels in DIR.
"""

from __future__ import annotations

import argparse
import atexit
import hashlib
import itertools
import json
import logging
import random
import re
import subprocess
import sys
import tempfile
import time
import types
import zipfile
from array import array
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import msgspec
import zmq

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_OUT = ROOT / "tests" / "fixtures" / "golden"

VLLM = "0.33.0"
VLLM_OLD = "0.24.0"  # a release whose replay replies are [seq, payload]
SGLANG = "0.5.23"

MODEL = "golden-model"  # the model name a router registers the engine under
TS = 1_767_225_600.0  # fixed batch timestamp, so re-runs write the same bytes
SALT = "tenant-1"
LORA = "sql-lora"
LORA_PATH = "/adapters/sql-lora"
LORA_ADAPTER_ID = 1
VLLM_BLOCK = 4
SGLANG_PAGE = 4
TOPIC = "kv-golden"


# --- loading only the event modules of a wheel ---------------------------------------------------


class _Stub(types.ModuleType):
    """A module the engines import but the event path never uses: any
    attribute is a fresh class, so annotations (``X | None``), base classes
    and ``from m import X`` all work."""

    def __getattr__(self, name: str) -> Any:
        if name.startswith("__"):
            raise AttributeError(name)
        cls = type(name, (), {"__init__": lambda self, *a, **k: None})
        setattr(self, name, cls)
        return cls


def _module(name: str, stub: bool = True, **attrs: Any) -> types.ModuleType:
    """``sys.modules[name]`` (created as a stand-in package if absent, with
    its parents), with ``attrs`` set on it."""
    mod = sys.modules.get(name)
    if mod is None:
        mod = _Stub(name) if stub else types.ModuleType(name)
        mod.__path__ = []  # a package, so submodules can be imported
        sys.modules[name] = mod
        parent, _, child = name.rpartition(".")
        if parent:
            setattr(_module(parent), child, mod)
    for k, v in attrs.items():
        setattr(mod, k, v)
    return mod


def _load(wheel: zipfile.ZipFile, path: str) -> types.ModuleType:
    """Execute one source file of the wheel as its own module."""
    name = path.removesuffix(".py").replace("/", ".")
    parent, _, child = name.rpartition(".")
    mod = types.ModuleType(name)
    mod.__file__ = f"{wheel.filename}/{path}"
    mod.__package__ = parent
    sys.modules[name] = mod
    setattr(_module(parent), child, mod)
    exec(compile(wheel.read(path), mod.__file__, "exec"), mod.__dict__)
    return mod


def _forget(top: str) -> None:
    """Drop every module of package ``top`` (two versions of one engine are loaded in turn)."""
    for name in [n for n in sys.modules if n == top or n.startswith(top + ".")]:
        del sys.modules[name]


class _KVEventsConfig:
    """Stand-in for vLLM's config dataclass, which the publisher only stores."""

    def __init__(self, **kwargs: Any) -> None:
        self.__dict__.update(kwargs)


def _load_vllm(wheel: zipfile.ZipFile) -> tuple[types.ModuleType, types.ModuleType, types.ModuleType]:
    """(kv_events, kv_cache_utils, hashing) of a vLLM wheel."""
    _forget("vllm")
    _module("cbor2")  # only vLLM's sha256_cbor uses it
    _module("vllm.envs", VLLM_KV_EVENTS_USE_INT_BLOCK_HASHES=True)  # vLLM's default
    _module("vllm.logger", init_logger=logging.getLogger)
    _module("vllm.config.kv_events", KVEventsConfig=_KVEventsConfig)
    _module("vllm.utils.math_utils", cdiv=lambda a, b: -(-a // b))
    _module("vllm.utils.network_utils")
    _module("vllm.multimodal.utils")
    _module("vllm.v1.kv_cache_interface")
    _module("vllm.v1.kv_cache_spec_registry")
    _module("vllm.v1.request")
    _module("vllm.v1.utils")
    hashing = _load(wheel, "vllm/utils/hashing.py")
    utils = _load(wheel, "vllm/v1/core/kv_cache_utils.py")
    events = _load(wheel, "vllm/distributed/kv_events.py")
    return events, utils, hashing


def _load_vllm_events_only(wheel: zipfile.ZipFile) -> types.ModuleType:
    """kv_events of a vLLM wheel whose hashing is not needed."""
    _forget("vllm")
    _module("vllm.logger", init_logger=logging.getLogger)
    _module("vllm.config.kv_events", KVEventsConfig=_KVEventsConfig)
    _module("vllm.v1.core.kv_cache_utils", ExternalBlockHash=bytes | int)
    return _load(wheel, "vllm/distributed/kv_events.py")


class _PageHash:
    """Stand-in for SGLang's C++ page hash (``hash_binding.cpp``, a chained
    SHA-256 per page): same inputs and output shape, hex digests."""

    @staticmethod
    def get_hash(
        raw: array[int],
        logical_len: int,
        unit_width: int,
        is_bigram: bool,
        prior_digest: bytes | None,
        page_size: int | None,
    ) -> str | list[str]:
        units: list[tuple[int, ...]]
        if is_bigram:
            units = [(raw[i], raw[i + 1]) for i in range(logical_len)]
        else:
            units = [tuple(raw[i * unit_width : (i + 1) * unit_width]) for i in range(logical_len)]
        step = page_size or max(1, logical_len)
        out: list[str] = []
        prior = prior_digest or b""
        for start in range(0, logical_len, step):
            h = hashlib.sha256(prior)
            h.update(array("q", [t for u in units[start : start + step] for t in u]).tobytes())
            prior = h.digest()
            out.append(h.hexdigest())
        return out if page_size else out[-1]


class _NetworkAddress:
    """Stand-in for SGLang's address parser (used only for tcp endpoints)."""

    @staticmethod
    def parse(text: str) -> Any:
        host, _, port = text.rpartition(":")
        return types.SimpleNamespace(host=host, port=int(port), is_ipv6=False)


def _load_sglang(wheel: zipfile.ZipFile) -> tuple[types.ModuleType, types.ModuleType]:
    """(kv_events, mem_cache.events) of an SGLang wheel."""
    _forget("sglang")
    _module("sglang.srt.runtime_context")
    _module("sglang.srt.utils.network", NetworkAddress=_NetworkAddress)
    _module("sglang.srt.environ")
    _module("sglang.srt.mem_cache.evict_policy")
    _module("sglang.kernels.ops.kvcache.mla_buffer")
    _module("sglang.srt.utils.cpp_extension_loader")
    kv_events = _load(wheel, "sglang/srt/disaggregation/kv_events.py")
    native = _load(wheel, "sglang/srt/mem_cache/cpp_utils/native_hash.py")
    setattr(native, "_load_native_hash_module", lambda: _PageHash)  # noqa: B010 - the one call into C++
    _load(wheel, "sglang/srt/mem_cache/utils.py")
    recorder = _load(wheel, "sglang/srt/mem_cache/events.py")
    return kv_events, recorder


# --- what the frames are checked against ----------------------------------------------------------


@dataclass
class Prompt:
    """Blocks a correct reader holds after the frame: the first ``live_blocks``
    full blocks of ``tokens`` under this adapter and salt, on cache tier
    ``tier`` (kvmesh's names: gpu, host, disk, external)."""

    tokens: list[int]
    live_blocks: int
    lora_name: str | None = None
    cache_salt: str | None = None
    tier: str = "gpu"

    def manifest(self) -> dict[str, Any]:
        return {
            "tokens": self.tokens,
            "live_blocks": self.live_blocks,
            "lora_name": self.lora_name,
            "cache_salt": self.cache_salt,
            "tier": self.tier,
        }


@dataclass
class Frame:
    name: str
    engine: str
    version: str
    exercises: list[str]
    block_size: int = 0
    rank: int = 0
    prompts: list[Prompt] = field(default_factory=list)
    skipped: list[dict[str, Any]] = field(default_factory=list)  # {"index", "reason"}
    mediums: list[str | None] = field(default_factory=list)
    kind: str = "payload"  # payload | live | replay
    data: bytes = b""

    @property
    def file(self) -> str:
        ext = ".msgpack" if self.kind == "payload" else ".frames.msgpack"
        return f"{self.engine}-{self.version}/{self.name}{ext}"

    def manifest(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "name": self.name,
            "engine": self.engine,
            "version": self.version,
            "kind": self.kind,
            "file": self.file,
            "exercises": self.exercises,
        }
        if self.kind == "payload":
            out |= {
                "block_size": self.block_size,
                "rank": self.rank,
                "prompts": [p.manifest() for p in self.prompts],
                "skipped": self.skipped,
                "mediums": self.mediums,
            }
        return out


def _tokens(seed: int, n: int) -> list[int]:
    rng = random.Random(seed)
    return [rng.randrange(256, 50_000) for _ in range(n)]


P1 = _tokens(1, 12)  # three blocks of four
P2 = _tokens(2, 8)  # two blocks


# --- running an engine's publisher ----------------------------------------------------------------


def _recv(sock: zmq.Socket[bytes], timeout_s: float = 5.0) -> list[bytes]:
    if not sock.poll(int(timeout_s * 1000)):
        raise RuntimeError("the engine's publisher did not answer")
    return sock.recv_multipart()


def _replay(ctx: zmq.Context[zmq.Socket[bytes]], endpoint: str, start: int) -> list[list[bytes]]:
    """Every reply to one replay request, as a DEALER receives them, end marker included."""
    dealer = ctx.socket(zmq.DEALER)
    dealer.connect(endpoint)
    try:
        dealer.send_multipart([b"", start.to_bytes(8, "big")])
        replies: list[list[bytes]] = []
        while True:
            msg = _recv(dealer)
            replies.append(msg)
            if b"\xff" * 8 in msg[1:3]:  # END_SEQ, in either framing
                return replies
    finally:
        dealer.close(linger=0)


def _payloads(replies: list[list[bytes]]) -> list[bytes]:
    return [msg[-1] for msg in replies[:-1]]


def _publish(
    publisher_cls: Any, rank_kw: str, rank: int, batches: list[Any], tag: str, live: bool = False
) -> tuple[list[list[bytes]], list[bytes] | None]:
    """Publish ``batches`` through the engine's own publisher on inproc
    sockets; (replay replies from seq 0, first live message if ``live``)."""
    ctx: zmq.Context[zmq.Socket[bytes]] = zmq.Context.instance()
    ep, rep = f"inproc://golden-{tag}", f"inproc://golden-{tag}-replay"
    pub = publisher_cls(**{rank_kw: rank}, endpoint=ep, replay_endpoint=rep, topic=TOPIC if live else "")
    sub = None
    try:
        if live:
            sub = ctx.socket(zmq.SUB)
            sub.setsockopt(zmq.SUBSCRIBE, b"")
            sub.connect(pub.offset_endpoint_port(ep, rank))
            time.sleep(0.3)  # let the subscription reach the PUB socket
        for b in batches:
            pub.publish(b)
        live_msg = _recv(sub) if sub is not None else None
        # The publisher sends from its own thread: ask until every batch is buffered.
        deadline = time.monotonic() + 10.0
        while True:
            replies = _replay(ctx, pub.offset_endpoint_port(rep, rank), 0)
            if len(replies) == len(batches) + 1:
                return replies, live_msg
            if time.monotonic() > deadline:
                raise RuntimeError(f"{tag}: replay returned {len(replies) - 1} of {len(batches)} batches")
            time.sleep(0.1)
    finally:
        if sub is not None:
            sub.close(linger=0)
        pub.shutdown()
        atexit.unregister(pub.shutdown)  # SGLang's registers it again for process exit


def _framing_frames(
    engine: str, version: str, replies: list[list[bytes]], live: list[bytes] | None, what: str
) -> list[Frame]:
    enc = msgspec.msgpack.encode
    out = [
        Frame(
            f"replay_{what}",
            engine,
            version,
            [f"replay reply framing {what} as a DEALER receives it, end marker included"],
            kind="replay",
            data=enc(replies),
        )
    ]
    if live is not None:
        out.append(
            Frame(
                "live",
                engine,
                version,
                ["live PUB message [topic, seq, payload] as a SUB receives it"],
                kind="live",
                data=enc([live]),
            )
        )
    return out


# --- vLLM -----------------------------------------------------------------------------------------


class _VllmRequest:
    """The attributes of vLLM's ``Request`` that ``generate_block_hash_extra_keys`` reads."""

    def __init__(self, lora: bool = False, salt: str | None = None, mm: list[Any] | None = None) -> None:
        self.lora_request = (
            types.SimpleNamespace(lora_name=LORA, name=LORA, lora_path=LORA_PATH, adapter_id=LORA_ADAPTER_ID)
            if lora
            else None
        )
        self.cache_salt = salt
        self.mm_features = mm or []
        self.prompt_embeds = None
        self._prompt_embeds_per_block_hashes: dict[Any, Any] = {}


def _mm_feature(identifier: str, offset: int, length: int) -> Any:
    pos = types.SimpleNamespace(offset=offset, length=length)
    return types.SimpleNamespace(identifier=identifier, mm_position=pos)


class _Vllm:
    """Builds vLLM events the way ``BlockPool._build_block_stored_event`` does."""

    def __init__(self, events: types.ModuleType, utils: types.ModuleType, hashing: types.ModuleType) -> None:
        self.ev = events
        self.utils = utils
        self.hash_fn = hashing.sha256  # vLLM's default prefix-caching hash
        utils.init_none_hash(self.hash_fn)

    def chain(
        self, tokens: list[int], req: _VllmRequest, lookahead: int = 0
    ) -> list[tuple[Any, Any, list[int]]]:
        """Per full block: (external hash, event extra keys, lookahead tokens)."""
        u = self.utils
        out: list[tuple[Any, Any, list[int]]] = []
        parent = None
        mm_idx = 0
        n = (len(tokens) - lookahead) // VLLM_BLOCK
        for i in range(n):
            start, end = i * VLLM_BLOCK, (i + 1) * VLLM_BLOCK
            if lookahead:
                extra, mm_idx = u.generate_lookahead_block_hash_extra_keys(
                    req, start, end, end + lookahead, mm_idx
                )
                hash_keys = (extra, *tokens[end : end + lookahead])
            else:
                extra, mm_idx = u.generate_block_hash_extra_keys(req, start, end, mm_idx)
                hash_keys = extra
            parent = u.hash_block_tokens(self.hash_fn, parent, tokens[start:end], hash_keys)
            out.append((u.maybe_convert_block_hash(parent), extra, tokens[end : end + lookahead]))
        return out

    def stored(
        self,
        tokens: list[int],
        first: int,
        last: int,
        req: _VllmRequest,
        medium: str | None = None,
        lookahead: int = 0,
        **extra_fields: Any,
    ) -> Any:
        """BlockStored of blocks [first, last) of ``tokens`` for ``req``."""
        chain = self.chain(tokens, req, lookahead)
        lora = req.lora_request
        return self.ev.BlockStored(
            block_hashes=[h for h, _, _ in chain[first:last]],
            parent_block_hash=chain[first - 1][0] if first else None,
            token_ids=tokens[first * VLLM_BLOCK : last * VLLM_BLOCK],
            block_size=VLLM_BLOCK,
            lora_id=lora.adapter_id if lora else None,
            medium=medium or self.ev.MEDIUM_GPU,
            lora_name=lora.name if lora else None,
            extra_keys=self.utils.to_event_extra_keys([k for _, k, _ in chain[first:last]]),
            group_idx=0,
            lookahead_token_ids=[t for _, _, t in chain[first:last]] if lookahead else None,
            **extra_fields,
        )

    def removed(self, hashes: list[Any], medium: str | None = None) -> Any:
        return self.ev.BlockRemoved(block_hashes=hashes, medium=medium or self.ev.MEDIUM_GPU, group_idx=0)

    def placeholder(self, h: Any) -> Any:
        """The offloading tracker's placeholder store (``_placeholder_stored``):
        a block on the CPU tier whose tokens the tracker does not know."""
        return self.ev.BlockStored(
            block_hashes=[h],
            parent_block_hash=None,
            token_ids=[],
            lora_id=None,
            block_size=0,
            medium=self.ev.MEDIUM_CPU,
            lora_name=None,
            group_idx=0,
            locality="LOCAL",
        )

    def batch(self, *events: Any) -> Any:
        return self.ev.KVEventBatch(ts=TS, events=list(events))


def _vllm_scenarios(v: _Vllm) -> list[tuple[Frame, Any]]:
    plain, salted = _VllmRequest(), _VllmRequest(salt=SALT)
    lora, salted_lora = _VllmRequest(lora=True), _VllmRequest(lora=True, salt=SALT)
    gpu, cpu, storage = v.ev.MEDIUM_GPU, v.ev.MEDIUM_CPU, v.ev.MEDIUM_STORAGE
    p1_hashes = [h for h, _, _ in v.chain(P1, plain)]
    p2_hashes = [h for h, _, _ in v.chain(P2, plain)]

    def frame(name: str, exercises: list[str], prompts: list[Prompt], **kw: Any) -> Frame:
        return Frame(name, "vllm", VLLM, exercises, VLLM_BLOCK, prompts=prompts, **kw)

    def two_events(req: _VllmRequest, **kw: Any) -> list[Any]:
        return [v.stored(P1, 0, 2, req, **kw), v.stored(P1, 2, 3, req, **kw)]

    out: list[tuple[Frame, Any]] = [
        (
            frame("plain", ["BlockStored without extra keys", "a continuation store"], [Prompt(P1, 3)]),
            v.batch(*two_events(plain)),
        ),
        (
            frame(
                "salted",
                ["cache_salt as the untagged first-block extra key ('tenant-1',)", "then None"],
                [Prompt(P1, 3, cache_salt=SALT)],
            ),
            v.batch(*two_events(salted)),
        ),
        (
            frame(
                "salted_lora",
                ["LoRA adapter and cache_salt untagged: ('sql-lora', 'tenant-1'), then ('sql-lora',)"],
                [Prompt(P1, 3, lora_name=LORA, cache_salt=SALT)],
            ),
            v.batch(*two_events(salted_lora)),
        ),
        (
            frame(
                "lora",
                ["LoRA adapter only: ('sql-lora',) on every block, lora_name and lora_id set"],
                [Prompt(P1, 3, lora_name=LORA)],
            ),
            v.batch(*two_events(lora)),
        ),
        (
            frame(
                "mm_salted",
                ["multimodal (identifier, offset) pair before the untagged cache salt"],
                [Prompt(P1, 3, cache_salt=SALT)],
            ),
            v.batch(*two_events(_VllmRequest(salt=SALT, mm=[_mm_feature("img-0", 1, 6)]))),
        ),
        (
            frame(
                "removed",
                ["BlockRemoved of one block of a stored prefix"],
                [Prompt(P1, 2), Prompt(P2, 2)],
                mediums=[gpu, gpu, gpu],
            ),
            v.batch(v.stored(P1, 0, 3, plain), v.stored(P2, 0, 2, plain), v.removed([p1_hashes[2]])),
        ),
        (
            frame(
                "cleared",
                ["AllBlocksCleared between two stores"],
                [Prompt(P2, 2)],
                mediums=[gpu, None, gpu],
            ),
            v.batch(v.stored(P1, 0, 3, plain), v.ev.AllBlocksCleared(), v.stored(P2, 0, 2, plain)),
        ),
        (
            frame(
                "tiers",
                [
                    "medium GPU and CPU stores and removals, locality LOCAL",
                    "the CPU offloading placeholder (no token ids, block_size 0) of a block stored "
                    "on the GPU with its tokens: mapped on the host tier through its engine hash",
                ],
                [Prompt(P1, 3), Prompt(P2, 1, tier="host"), Prompt(P1, 1, tier="host")],
                mediums=[gpu, cpu, cpu, cpu],
            ),
            v.batch(
                v.stored(P1, 0, 3, plain),
                v.stored(P2, 0, 2, plain, medium=cpu, locality="LOCAL"),
                v.placeholder(p1_hashes[0]),
                v.removed([p2_hashes[1]], medium=cpu),
            ),
        ),
        (
            frame(
                "tier_removal",
                [
                    "a block offloaded to CPU (self-describing store with tokens) stays there when "
                    "the GPU evicts it: each removal acts on its own tier"
                ],
                [Prompt(P1, 2), Prompt(P1, 3, tier="host")],
                mediums=[gpu, cpu, gpu],
            ),
            v.batch(
                v.stored(P1, 0, 3, plain),
                v.stored(P1, 0, 3, plain, medium=cpu, locality="LOCAL"),
                v.removed([p1_hashes[2]]),
            ),
        ),
        (
            frame(
                "storage_remote",
                [
                    "medium STORAGE (offloading to storage): the disk tier",
                    "locality REMOTE (a copy away from the publisher): the external tier",
                ],
                [Prompt(P1, 3, tier="disk"), Prompt(P2, 2, tier="external")],
                mediums=[storage, cpu],
            ),
            v.batch(
                v.stored(P1, 0, 3, plain, medium=storage, locality="LOCAL"),
                v.stored(P2, 0, 2, plain, medium=cpu, locality="REMOTE"),
            ),
        ),
        (
            frame(
                "placeholder_unknown",
                [
                    "a placeholder whose block was never stored with its tokens: skipped alone, "
                    "the store after it applies"
                ],
                [Prompt(P2, 2)],
                skipped=[{"index": 0, "reason": "no_token_ids"}],
                mediums=[cpu, gpu],
            ),
            v.batch(v.placeholder(p1_hashes[1]), v.stored(P2, 0, 2, plain)),
        ),
        (
            frame(
                "lookahead",
                ["lookahead hashing (EAGLE): lookahead_token_ids per block", "session_id"],
                [Prompt(P1[:8], 2)],
            ),
            v.batch(v.stored(P1[:9], 0, 2, plain, lookahead=1, session_id="session-1")),
        ),
    ]
    return out


def _vllm_bytes_scenario(v: _Vllm) -> tuple[Frame, Any]:
    """vLLM with VLLM_KV_EVENTS_USE_INT_BLOCK_HASHES=0: raw SHA-256 bytes as block hashes."""
    envs: Any = sys.modules["vllm.envs"]
    envs.VLLM_KV_EVENTS_USE_INT_BLOCK_HASHES = False
    try:
        req = _VllmRequest(salt=SALT)
        stored = v.stored(P1, 0, 3, req)
        removed = v.removed([stored.block_hashes[2]])
    finally:
        envs.VLLM_KV_EVENTS_USE_INT_BLOCK_HASHES = True
    f = Frame(
        "bytes_hashes",
        "vllm",
        VLLM,
        ["block hashes as 32-byte SHA-256 digests (VLLM_KV_EVENTS_USE_INT_BLOCK_HASHES=0)", "salted"],
        VLLM_BLOCK,
        prompts=[Prompt(P1, 2, cache_salt=SALT)],
    )
    return f, v.batch(stored, removed)


def _make_vllm(wheel: zipfile.ZipFile) -> tuple[list[Frame], list[int]]:
    events, utils, hashing = _load_vllm(wheel)
    v = _Vllm(events, utils, hashing)
    scenarios = [*_vllm_scenarios(v), _vllm_bytes_scenario(v)]
    frames: list[Frame] = []
    replies, _ = _publish(
        events.ZmqEventPublisher, "data_parallel_rank", 0, [b for _, b in scenarios], "vllm"
    )
    for (f, b), payload in zip(scenarios, _payloads(replies)):
        f.data = payload
        if not f.mediums:
            f.mediums = [getattr(e, "medium", None) for e in b.events]
        frames.append(f)

    dp = Frame(
        "dp_rank",
        "vllm",
        VLLM,
        ["data_parallel_rank stamped by the rank-1 publisher"],
        VLLM_BLOCK,
        rank=1,
        prompts=[Prompt(P1, 3, cache_salt=SALT)],
        mediums=[events.MEDIUM_GPU],
    )
    replies, _ = _publish(
        events.ZmqEventPublisher,
        "data_parallel_rank",
        1,
        [v.batch(v.stored(P1, 0, 3, _VllmRequest(salt=SALT)))],
        "vllm-dp",
    )
    dp.data = _payloads(replies)[0]
    frames.append(dp)

    plain = _VllmRequest()
    replies, live = _publish(
        events.ZmqEventPublisher,
        "data_parallel_rank",
        0,
        [v.batch(v.stored(P1, 0, 3, plain)), v.batch(v.removed([v.chain(P1, plain)[2][0]]))],
        "vllm-framing",
        live=True,
    )
    frames += _framing_frames("vllm", VLLM, replies, live, "topic_seq_payload")
    return frames, [h for h, _, _ in v.chain(P1, plain)]


def _make_vllm_old(wheel: zipfile.ZipFile, p1_hashes: list[int]) -> list[Frame]:
    ev = _load_vllm_events_only(wheel)
    stored = ev.BlockStored(
        block_hashes=p1_hashes,
        parent_block_hash=None,
        token_ids=P1,
        block_size=VLLM_BLOCK,
        lora_id=None,
        medium=ev.MEDIUM_GPU,
        lora_name=None,
    )
    removed = ev.BlockRemoved(block_hashes=[p1_hashes[2]], medium=ev.MEDIUM_GPU)
    batches = [ev.KVEventBatch(ts=TS, events=[stored]), ev.KVEventBatch(ts=TS, events=[removed])]
    replies, _ = _publish(ev.ZmqEventPublisher, "data_parallel_rank", 0, batches, "vllm-old")
    frames = _framing_frames("vllm", VLLM_OLD, replies, None, "seq_payload")
    payload = Frame(
        "plain",
        "vllm",
        VLLM_OLD,
        ["the tagged-map events of the release with the [seq, payload] replay framing"],
        VLLM_BLOCK,
        prompts=[Prompt(P1, 3)],
        mediums=[ev.MEDIUM_GPU],
        data=_payloads(replies)[0],
    )
    return [payload, *frames]


# --- SGLang ---------------------------------------------------------------------------------------


class _Key:
    """The attributes of SGLang's ``RadixKey`` that the event recorder and
    the page hash read: raw token ids (N+1 of them for N bigrams)."""

    def __init__(
        self, tokens: list[int], extra_key: str | None = None, salt: str | None = None, bigram: bool = False
    ) -> None:
        self.token_ids = array("q", tokens)
        self.extra_key = extra_key
        self.cache_salt = salt
        self.is_bigram = bigram
        self.limit = None

    def raw_token_ids(self) -> array[int]:
        return self.token_ids

    def __len__(self) -> int:
        n = len(self.token_ids)
        return max(0, n - 1) if self.is_bigram else n

    def __iter__(self) -> Iterator[Any]:
        t = self.token_ids
        if self.is_bigram:
            return iter([(t[i], t[i + 1]) for i in range(len(self))])
        return iter(t)


class _Node:
    """The attributes of SGLang's radix ``TreeNode`` that the recorder reads."""

    def __init__(self, key: _Key, parent: _Node | None) -> None:
        self.key = key
        self.parent = parent
        self.hash_value: list[str] | None = [] if parent is None else None
        self.event_hash_value: list[str] | None = None


def _sglang_path(
    tokens: list[int],
    cuts: list[int],
    extra_key: str | None = None,
    salt: str | None = None,
    bigram: bool = False,
) -> list[_Node]:
    """Radix nodes from the root along ``tokens``, split at ``cuts`` (logical positions)."""
    root = _Node(_Key([]), None)
    nodes: list[_Node] = []
    parent = root
    bounds = [0, *cuts, len(tokens) - (1 if bigram else 0)]
    for a, b in itertools.pairwise(bounds):
        raw = tokens[a : b + 1] if bigram else tokens[a:b]
        node = _Node(_Key(raw, extra_key, salt, bigram), parent)
        nodes.append(node)
        parent = node
    return nodes


class _Sglang:
    def __init__(self, kv_events: types.ModuleType, recorder_mod: types.ModuleType) -> None:
        self.ev = kv_events
        self.rec_mod = recorder_mod
        self.lora_id = hashlib.md5(LORA.encode()).hexdigest()  # a 32-hex LoRARef id

    def recorder(self, page_size: int = SGLANG_PAGE) -> Any:
        rec = self.rec_mod.KVCacheEventRecorder(enabled=True, page_size=page_size)
        # What the scheduler does when a LoRA request is admitted.
        rec.lora_names.register(types.SimpleNamespace(extra_key=self.lora_id, lora_id=self.lora_id), LORA)
        return rec

    def batch(self, events: list[Any]) -> Any:
        return self.ev.KVEventBatch(ts=TS, events=events)


def _sglang_scenarios(s: _Sglang) -> list[tuple[Frame, Any]]:
    cpu = s.ev.StorageMedium.CPU
    gpu = s.ev.StorageMedium.GPU

    def stores(
        tokens: list[int], cuts: list[int], page: int = SGLANG_PAGE, medium: Any = None, **kw: Any
    ) -> tuple[Any, list[_Node]]:
        rec = s.recorder(page)
        nodes = _sglang_path(tokens, cuts, **kw)
        for n in nodes:
            rec.record_store(n, medium)
        return rec, nodes

    def frame(name: str, exercises: list[str], prompts: list[Prompt], **kw: Any) -> Frame:
        kw.setdefault("block_size", SGLANG_PAGE)
        return Frame(name, "sglang", SGLANG, exercises, prompts=prompts, **kw)

    out: list[tuple[Frame, Any]] = []
    rec, _ = stores(P1, [8])
    out.append(
        (
            frame("plain", ["pages of two radix nodes, coalesced into one BlockStored"], [Prompt(P1, 3)]),
            s.batch(rec.take()),
        )
    )
    rec, _ = stores(P1, [8], salt=SALT)
    out.append(
        (
            frame("salted", ["cache_salt field on BlockStored"], [Prompt(P1, 3, cache_salt=SALT)]),
            s.batch(rec.take()),
        )
    )
    rec, _ = stores(P1, [8], extra_key=s.lora_id)
    out.append(
        (
            frame(
                "lora",
                ["lora_name of a registered adapter, hashes namespaced by it"],
                [Prompt(P1, 3, lora_name=LORA)],
            ),
            s.batch(rec.take()),
        )
    )
    rec, _ = stores(P1, [8], extra_key=s.lora_id, salt=SALT)
    out.append(
        (
            frame(
                "salted_lora", ["lora_name and cache_salt"], [Prompt(P1, 3, lora_name=LORA, cache_salt=SALT)]
            ),
            s.batch(rec.take()),
        )
    )
    rec, _ = stores(P1 + [7], [8], bigram=True)
    out.append(
        (
            frame(
                "bigram",
                ["EAGLE bigram keys: each token id is a pair (token, next token)"],
                [Prompt(P1, 3)],
            ),
            s.batch(rec.take()),
        )
    )
    rec, _ = stores(P2[:5], [3], page=1)
    out.append(
        (
            frame(
                "page1",
                ["page size 1 (SGLang's default): one-token pages, coalesced"],
                [Prompt(P2[:5], 5)],
                block_size=1,
            ),
            s.batch(rec.take()),
        )
    )
    rec, p1_nodes = stores(P1, [8])
    rec.record_store(_sglang_path(P2, [])[0], cpu)
    rec.record_remove(p1_nodes[1])  # the GPU copy of the child node goes
    out.append(
        (
            frame(
                "cpu_pinned",
                ["medium CPU_PINNED (host tier) store", "GPU removal"],
                [Prompt(P1, 2), Prompt(P2, 2, tier="host")],
                mediums=[gpu.value, cpu.value, gpu.value],
            ),
            s.batch(rec.take()),
        )
    )
    # HiCache: a node backed up to host memory, then evicted from the device.
    rec, p1_nodes = stores(P1, [8])
    for n in p1_nodes:
        rec.record_store(n, cpu)
    rec.record_remove(p1_nodes[1], gpu)
    out.append(
        (
            frame(
                "hicache_evicted",
                [
                    "HiCache write-back: a node stored on the host tier, then evicted from the GPU: "
                    "the removal acts on the GPU only, the host copy stays"
                ],
                [Prompt(P1, 2), Prompt(P1, 3, tier="host")],
                mediums=[gpu.value, cpu.value, gpu.value],
            ),
            s.batch(rec.take()),
        )
    )
    rec = s.recorder()
    for n in _sglang_path(P1, [8]):
        rec.record_store(n, s.ev.StorageMedium.DISK)
    for n in _sglang_path(P2, []):
        rec.record_store(n, s.ev.StorageMedium.EXTERNAL)
    out.append(
        (
            frame(
                "disk_external",
                ["medium DISK (HiCache L3) and EXTERNAL (a shared pool): the disk and external tiers"],
                [Prompt(P1, 3, tier="disk"), Prompt(P2, 2, tier="external")],
                mediums=["DISK", "EXTERNAL"],
            ),
            s.batch(rec.take()),
        )
    )
    # One batch of a scheduler serving both: bigram (EAGLE) pages and plain ones.
    bigram_rec, _ = stores(P1 + [7], [8], bigram=True)
    plain_rec, _ = stores(P2, [])
    out.append(
        (
            frame(
                "bigram_mixed",
                ["a batch of bigram-keyed and plain stores: the token pairs decode with the rest"],
                [Prompt(P1, 3), Prompt(P2, 2)],
                mediums=[gpu.value, gpu.value],
            ),
            s.batch(bigram_rec.take() + plain_rec.take()),
        )
    )
    rec, _ = stores(P1, [8])
    rec.record_all_cleared()
    for n in _sglang_path(P2, []):
        rec.record_store(n)
    out.append(
        (
            frame("cleared", ["AllBlocksCleared between two stores"], [Prompt(P2, 2)]),
            s.batch(rec.take()),
        )
    )
    return out


def _make_sglang(wheel: zipfile.ZipFile) -> list[Frame]:
    kv_events, recorder_mod = _load_sglang(wheel)
    s = _Sglang(kv_events, recorder_mod)
    scenarios = _sglang_scenarios(s)
    pub_cls = kv_events.ZmqEventPublisher
    replies, _ = _publish(pub_cls, "attn_dp_rank", 0, [b for _, b in scenarios], "sglang")
    frames: list[Frame] = []
    for (f, b), payload in zip(scenarios, _payloads(replies)):
        f.data = payload
        if not f.mediums:
            f.mediums = [_medium(e) for e in b.events]
        frames.append(f)

    rec = s.recorder()
    for n in _sglang_path(P1, [8], salt=SALT):
        rec.record_store(n)
    replies, _ = _publish(pub_cls, "attn_dp_rank", 2, [s.batch(rec.take())], "sglang-dp")
    frames.append(
        Frame(
            "attn_dp_rank",
            "sglang",
            SGLANG,
            ["attn_dp_rank stamped by the rank-2 publisher"],
            SGLANG_PAGE,
            rank=2,
            prompts=[Prompt(P1, 3, cache_salt=SALT)],
            mediums=["GPU"],
            data=_payloads(replies)[0],
        )
    )

    rec = s.recorder()
    nodes = _sglang_path(P1, [8])
    for n in nodes:
        rec.record_store(n)
    first = s.batch(rec.take())
    rec.record_remove(nodes[1])
    replies, live = _publish(
        pub_cls, "attn_dp_rank", 0, [first, s.batch(rec.take())], "sglang-framing", live=True
    )
    frames += _framing_frames("sglang", SGLANG, replies, live, "topic_seq_payload")
    return frames


def _medium(e: Any) -> str | None:
    m = getattr(e, "medium", None)
    return getattr(m, "value", m)


# --- the script -------------------------------------------------------------------------------------


# The Linux x86-64 CPython 3.11 wheels, whatever machine runs the script: the
# event modules are pure Python, and the same wheels make the same frames.
_WHEEL_TAGS = [
    "--only-binary=:all:",
    "--platform=manylinux_2_34_x86_64",
    "--platform=manylinux_2_28_x86_64",
    "--python-version=3.11",
    "--implementation=cp",
]


def _wheel(dest: Path, package: str, version: str) -> zipfile.ZipFile:
    """The wheel of ``package==version`` in ``dest``, downloaded with pip if absent."""
    stem = package.replace("-", "_")
    found = sorted(dest.glob(f"{stem}-{version}-*.whl"))
    if not found:
        print(f"downloading {package}=={version} (no deps) ...", file=sys.stderr)
        cmd = [sys.executable, "-m", "pip", "download", f"{package}=={version}", "--no-deps", "-d", str(dest)]
        subprocess.run(cmd + _WHEEL_TAGS, check=True)
        found = sorted(dest.glob(f"{stem}-{version}-*.whl"))
    if not found:
        raise SystemExit(f"no wheel of {package}=={version} in {dest}")
    return zipfile.ZipFile(found[0])


def _write(out: Path, frames: list[Frame]) -> None:
    for f in frames:
        path = out / f.file
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(f.data)
    manifest = {
        "about": (
            "KV-event frames made by the released engines' own structs, encoders and publishers "
            "(scripts/golden_frames.py). 'prompts' are what a correct reader holds afterwards: the "
            "first live_blocks full blocks of tokens, hashed under model, lora_name and cache_salt, "
            "live on cache tier 'tier' (kvmesh's names: gpu, host, disk, external). "
            "SGLang page hashes come from a Python stand-in for its C++ page hash."
        ),
        "model": MODEL,
        "frames": [f.manifest() for f in frames],
    }
    text = json.dumps(manifest, indent=1)
    # Token lists on one line each: the manifest stays readable.
    text = re.sub(r"\[[-\d,\s]+\]", lambda m: "[" + ", ".join(re.findall(r"-?\d+", m.group())) + "]", text)
    (out / "manifest.json").write_text(text + "\n")


def _build(wheels: Path) -> list[Frame]:
    frames, p1_hashes = _make_vllm(_wheel(wheels, "vllm", VLLM))
    frames += _make_vllm_old(_wheel(wheels, "vllm", VLLM_OLD), p1_hashes)
    frames += _make_sglang(_wheel(wheels, "sglang", SGLANG))
    return frames


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--wheels", type=Path, help="directory for the downloaded wheels (default: a temp dir)")
    p.add_argument("--out", type=Path, default=DEFAULT_OUT, help=f"output directory (default {DEFAULT_OUT})")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    if args.wheels is not None:
        args.wheels.mkdir(parents=True, exist_ok=True)
        frames = _build(args.wheels)
    else:
        with tempfile.TemporaryDirectory(prefix="kvmesh-wheels-") as tmp:
            frames = _build(Path(tmp))
    _write(args.out, frames)
    for f in frames:
        print(f"{f.engine} {f.version:7} {f.kind:7} {f.file}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
