"""The disk tier of the prefix cache: one file per KV block, written by a background thread.

    DIR/<identity>/manifest.json          the settings the blocks were made under (cache_identity.py)
    DIR/<identity>/<k[:2]>/<k>.kv         one block, k = its chained key in hex:

        "Q1MKVBLK" | u32 format version | u32 header length | header JSON | payload
        header: key, key scale (YaRN m), shape, dtype, fp8, payload bytes, crc32 of the payload
        payload: [num_layers, 2, block_size, num_kv_heads, head_dim] values, then (FP8) their
                 [num_layers, 2, block_size, num_kv_heads] float32 scales

Writes go to a temporary name in the same folder, then ``os.replace``: a reader (this process or
another sharing DIR) sees a whole file or none. A read checks the magic, the header against this
cache's layout, the file size and the crc32; a file failing any check is counted, deleted and its
block recomputed. Files vanishing under a reader (another process evicting) are plain misses.

Size cap: after a write pushes the folder past ``max_bytes``, the writer rescans DIR (every
identity: other processes and settings share the cap) and deletes the least recently accessed
files (mtime, which a read refreshes) down to 90% of the cap.

Failure: a folder that cannot be written at start (read-only), or a write that fails later (a full
disk), logs one warning and turns the tier off; the engine carries on with the tiers above.

Threads: ``read`` runs on the engine's reader threads (several blocks at once), ``submit`` and
``take_done`` on the engine's thread; the writer thread only writes files, evicts, and reports each
finished item through a deque the engine thread drains.
"""

from __future__ import annotations

import collections
import json
import logging
import os
import queue
import struct
import threading
import zlib
from dataclasses import dataclass
from pathlib import Path

import torch

from qwen1m.cache.cache_identity import FORMAT_VERSION, differing, identity

logger = logging.getLogger(__name__)

MAGIC = b"Q1MKVBLK"
_PREFIX = struct.Struct("<8sII")  # magic, format version, header length
_MAX_HEADER = 1 << 16
WRITE_QUEUE_JOBS = 64  # requests' worth of writes waiting; beyond that a write is dropped, never waited for
EVICT_TO = 0.9  # eviction frees down to this share of the cap, so that not every write rescans


@dataclass(slots=True)
class WriteItem:
    key: bytes
    scale: float
    data: torch.Tensor  # [num_layers, 2, block_size, num_kv_heads, head_dim] on the host
    scales: torch.Tensor | None  # [num_layers, 2, block_size, num_kv_heads] float32 (FP8)
    slot: int | None  # the host slot it reads (pinned until done), or None for a private copy
    ready: object | None = None  # a CUDA event the data's copy to the host records


def _bytes(t: torch.Tensor) -> memoryview:
    return memoryview(t.contiguous().view(torch.uint8).reshape(-1).numpy())


class DiskTier:
    def __init__(self, root: str | Path, settings: dict, max_bytes: int | None, shape: tuple[int, ...],
                 dtype: torch.dtype, scale_shape: tuple[int, ...] | None):
        self.root = Path(root)
        self.settings = settings
        self.max_bytes = max_bytes
        self.shape, self.dtype, self.scale_shape = tuple(shape), dtype, scale_shape
        elem = torch.empty((), dtype=dtype).element_size()
        self.payload_bytes = elem * _numel(shape) + (4 * _numel(scale_shape) if scale_shape else 0)
        self.namespace = self.root / identity(settings)
        self.enabled = True
        self.corrupt_files = 0  # the engine's reader threads
        self._count_lock = threading.Lock()
        self.dropped_writes = 0  # either thread (a dropped job, a failed write)
        self.written_bytes = 0  # writer thread
        self.evicted_files = 0  # writer thread
        self._done: collections.deque = collections.deque()  # (slot, key, scale, ok) from the writer
        self._queue: queue.Queue = queue.Queue(maxsize=WRITE_QUEUE_JOBS)
        self._total_bytes: int | None = None  # the whole DIR's .kv bytes, scanned by the writer
        try:
            self.namespace.mkdir(parents=True, exist_ok=True)
            self._write_manifest()
        except OSError as e:
            self._disable(f"the prefix cache folder {self.root} cannot be written ({e.strerror or e})")
            return
        self._log_other_settings()
        self._thread = threading.Thread(target=self._writer, name="qwen1m-kv-writer", daemon=True)
        self._thread.start()

    # ---- engine thread ----------------------------------------------------------------------------
    def path(self, key: bytes) -> Path:
        h = key.hex()
        return self.namespace / h[:2] / f"{h}.kv"

    def read(self, key: bytes, scale: float, tolerance: float, data: torch.Tensor,
             scales: torch.Tensor | None) -> tuple[str, float]:
        """Read the block of ``key`` into ``data`` (and ``scales``), host tensors of this cache's block
        layout. Returns ("hit", the file's key scale), ("miss", 0) (no file, or one made at another
        key scale) or ("corrupt", 0) (counted and deleted)."""
        if not self.enabled:
            return "miss", 0.0
        path = self.path(key)
        found = [0.0]
        try:
            with open(path, "rb") as f:
                problem = self._read_into(f, key, scale, tolerance, data, scales, found)
        except FileNotFoundError:
            return "miss", 0.0
        except OSError as e:
            logger.warning("prefix cache: could not read %s (%s); computing the block instead", path, e)
            return "miss", 0.0
        if problem == "scale":
            return "miss", 0.0
        if problem is not None:
            with self._count_lock:  # reads run on several threads (kv_tiers.READ_THREADS)
                self.corrupt_files += 1
            logger.warning("prefix cache: %s is corrupt (%s); deleting it and computing the block", path, problem)
            try:
                path.unlink()
            except OSError:
                pass
            return "corrupt", 0.0
        try:
            os.utime(path)  # the access time the size cap's LRU goes by
        except OSError:
            pass
        return "hit", found[0]

    def _read_into(self, f, key, scale, tolerance, data, scales, found: list[float]) -> str | None:
        """None when the block was read whole and sound; else what is wrong ("scale": a sound file
        made at another YaRN temperature)."""
        raw = f.read(_PREFIX.size)
        if len(raw) < _PREFIX.size:
            return "truncated header"
        magic, version, header_len = _PREFIX.unpack(raw)
        if magic != MAGIC or version != FORMAT_VERSION or header_len > _MAX_HEADER:
            return "bad magic or format version"
        try:
            header = json.loads(f.read(header_len))
        except ValueError:
            return "unreadable header"
        want = {"key": key.hex(), "shape": list(self.shape), "dtype": str(self.dtype),
                "scale_shape": list(self.scale_shape) if self.scale_shape else None,
                "payload_bytes": self.payload_bytes}
        if any(header.get(k) != v for k, v in want.items()):
            return "header does not match this cache"
        if os.fstat(f.fileno()).st_size != _PREFIX.size + header_len + self.payload_bytes:
            return "truncated or padded payload"
        found[0] = float(header.get("scale", 0.0))
        if abs(found[0] / scale - 1.0) > tolerance:
            return "scale"
        crc = 0
        for t in (data, scales) if scales is not None else (data,):
            buf = t.view(torch.uint8).reshape(-1).numpy()
            if f.readinto(buf) != buf.nbytes:
                return "truncated payload"
            crc = zlib.crc32(buf, crc)
        if crc != header.get("crc32"):
            return "checksum mismatch"
        return None

    def submit(self, items: list[WriteItem]) -> bool:
        """Queue blocks to write; False (nothing queued, the caller unpins) when the queue is full
        or the tier is off: a write is dropped rather than waited for."""
        if not items:
            return True
        if not self.enabled:
            return False
        try:
            self._queue.put_nowait(items)
        except queue.Full:
            self.dropped_writes += len(items)
            return False
        return True

    def take_done(self) -> list[tuple[int | None, bytes, float, bool]]:
        out = []
        while self._done:
            out.append(self._done.popleft())
        return out

    def writing(self) -> bool:
        """Whether writes are queued or in progress."""
        return self._queue.unfinished_tasks > 0

    def flush(self) -> None:
        """Wait until every queued write is on disk (or failed)."""
        if getattr(self, "_thread", None) is not None:
            self._queue.join()

    def close(self) -> None:
        """Finish the queued writes and stop the thread (also run at interpreter exit)."""
        thread = getattr(self, "_thread", None)
        if thread is not None and thread.is_alive():
            self._queue.put(None)
            thread.join()

    # ---- writer thread ----------------------------------------------------------------------------
    def _writer(self) -> None:
        while True:
            items = self._queue.get()
            try:
                if items is None:
                    return
                for item in items:
                    ok = self.enabled and self._write(item)
                    self._done.append((item.slot, item.key, item.scale, ok))
                if self.enabled and self.max_bytes is not None:
                    self._evict()
            except Exception:  # a bug must not kill the thread (flush would wait forever)
                logger.exception("prefix cache writer failed")
            finally:
                self._queue.task_done()

    def _write(self, item: WriteItem) -> bool:
        if item.ready is not None:
            item.ready.synchronize()  # the copy from the GPU into host memory has landed
        parts = [_bytes(item.data)] + ([_bytes(item.scales)] if item.scales is not None else [])
        crc = 0
        for p in parts:
            crc = zlib.crc32(p, crc)  # zlib releases the GIL on large buffers: decode goes on
        header = json.dumps({"key": item.key.hex(), "scale": item.scale, "shape": list(self.shape),
                             "dtype": str(self.dtype), "scale_shape": list(self.scale_shape) if self.scale_shape
                             else None, "payload_bytes": self.payload_bytes, "crc32": crc}).encode()
        path = self.path(item.key)
        tmp = path.with_name(f".{path.name}.{os.getpid()}.{threading.get_ident()}.tmp")
        try:
            path.parent.mkdir(exist_ok=True)
            with open(tmp, "wb") as f:
                f.write(_PREFIX.pack(MAGIC, FORMAT_VERSION, len(header)))
                f.write(header)
                for p in parts:
                    f.write(p)
            os.replace(tmp, path)  # atomic: readers see the old file, the new one, or none
        except OSError as e:
            try:
                tmp.unlink()
            except OSError:
                pass
            self.dropped_writes += 1
            self._disable(f"writing {path} failed ({e.strerror or e})")
            return False
        size = _PREFIX.size + len(header) + self.payload_bytes
        self.written_bytes += size
        if self._total_bytes is not None:
            self._total_bytes += size
        return True

    def _evict(self) -> None:
        if self._total_bytes is not None and self._total_bytes <= self.max_bytes:
            return
        files = []
        for path in self.root.glob("*/??/*.kv"):  # every identity: they share the cap
            try:
                st = path.stat()
            except OSError:  # gone meanwhile (another process evicted it)
                continue
            files.append((st.st_mtime, st.st_size, path))
        total = sum(size for _, size, _ in files)
        if total > self.max_bytes:
            for _, size, path in sorted(files, key=lambda t: t[0]):
                if total <= EVICT_TO * self.max_bytes:
                    break
                try:
                    path.unlink()
                    self.evicted_files += 1
                except FileNotFoundError:  # another process took it first: it is gone either way
                    pass
                except OSError:
                    continue
                total -= size
                if path.parent.parent == self.namespace:
                    self._done.append((None, bytes.fromhex(path.stem), 0.0, False))  # no longer on disk
        self._total_bytes = total

    # ---- setup ------------------------------------------------------------------------------------
    def _write_manifest(self) -> None:
        manifest = self.namespace / "manifest.json"
        tmp = manifest.with_name(f".manifest.{os.getpid()}.{threading.get_ident()}.tmp")
        try:
            tmp.write_text(json.dumps(self.settings, indent=2, sort_keys=True))
            os.replace(tmp, manifest)
        except OSError:
            tmp.unlink(missing_ok=True)
            raise

    def _log_other_settings(self) -> None:
        try:
            others = [p for p in self.root.iterdir() if p.is_dir() and p != self.namespace]
        except OSError:
            return
        for other in others:
            try:
                theirs = json.loads((other / "manifest.json").read_text())
            except (OSError, ValueError):
                continue
            logger.info("prefix cache: ignoring %s, made under other settings (%s differ)", other,
                        ", ".join(differing(self.settings, theirs)) or "format")

    def _disable(self, why: str) -> None:
        if self.enabled:
            self.enabled = False
            logger.warning("prefix cache: %s; carrying on without the disk tier", why)


def _numel(shape) -> int:
    n = 1
    for s in shape:
        n *= s
    return n
