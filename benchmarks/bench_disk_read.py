"""The disk's own read rate for prefix-cache-shaped files: the floor under the disk tier's follow-up.

The disk tier keeps one file per KV block (a 64-token block of Qwen2.5-7B-1M in bf16 is 3.5 MiB) and
reads a prompt's blocks on ``kv_tiers.READ_THREADS`` threads with ``readinto`` and a crc32 check. This
writes --gib GiB of such files into --dir, drops them from the page cache (posix_fadvise DONTNEED, as
bench_prefix_cache does), then reads them back:
    - with 1, 8 and 16 threads, plain ``readinto`` (what the disk gives);
    - with 8 threads, ``readinto`` + ``zlib.crc32`` (what the disk tier does, less the copy to the GPU).
Each row is GiB/s and the seconds a 256K-token 7B document (14.5 GiB in bf16) would take at that rate.

    PYTHONPATH=src python benchmarks/bench_disk_read.py --dir /tmp/diskbench --gib 8

Prints the rows and saves JSON (``disk_read_<date>.json``) under $OUT or benchmarks/results/.
"""

from __future__ import annotations

import argparse
import os
import shutil
import time
import zlib
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from common import save

BLOCK_BYTES = 64 * 28 * 2 * 4 * 128 * 2  # tokens x layers x (k, v) x KV heads x head_dim x bf16 bytes
DOC_256K_GIB = 262144 // 64 * BLOCK_BYTES / 2**30


def write_files(folder: Path, count: int) -> list[Path]:
    payload = os.urandom(BLOCK_BYTES)
    paths = []
    for i in range(count):
        path = folder / f"block_{i:06d}.bin"
        with open(path, "wb") as f:
            f.write(payload)
            f.flush()
            os.fsync(f.fileno())
        paths.append(path)
    return paths


def drop_cache(paths: list[Path]) -> None:
    os.sync()
    for path in paths:
        fd = os.open(path, os.O_RDONLY)
        try:
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


def read_all(paths: list[Path], threads: int, crc: bool) -> float:
    """Seconds to read every file once, ``threads`` files at a time, each into its own buffer."""

    def read_one(path: Path) -> int:
        buf = bytearray(BLOCK_BYTES)
        with open(path, "rb", buffering=0) as f:
            n = f.readinto(buf)
        if crc:
            zlib.crc32(buf)
        return n

    start = time.perf_counter()
    with ThreadPoolExecutor(threads) as pool:
        total = sum(pool.map(read_one, paths))
    seconds = time.perf_counter() - start
    assert total == len(paths) * BLOCK_BYTES, "short read"
    return seconds


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dir", default="/tmp/qwen1m-diskbench", help="a folder on the disk to measure (removed after)")
    ap.add_argument("--gib", type=float, default=8.0, help="GiB of block files to write and read back")
    args = ap.parse_args()
    folder = Path(args.dir)
    folder.mkdir(parents=True, exist_ok=True)
    count = max(1, int(args.gib * 2**30 // BLOCK_BYTES))
    try:
        start = time.perf_counter()
        paths = write_files(folder, count)
        write_s = time.perf_counter() - start
        gib = count * BLOCK_BYTES / 2**30
        print(f"{count} files of {BLOCK_BYTES / 2**20:.2f} MiB ({gib:.2f} GiB) written in {write_s:.1f} s "
              f"({gib / write_s:.2f} GiB/s, each file fsynced)")
        rows = []
        for threads, crc in [(1, False), (8, False), (16, False), (8, True)]:
            drop_cache(paths)
            seconds = read_all(paths, threads, crc)
            rate = gib / seconds
            row = {"threads": threads, "crc32": crc, "seconds": round(seconds, 3), "gib_per_s": round(rate, 3),
                   "seconds_for_256k_7b_bf16": round(DOC_256K_GIB / rate, 2)}
            rows.append(row)
            print(f"threads {threads:2d} crc32 {str(crc):5s}  {rate:6.2f} GiB/s  "
                  f"-> a 256K-token 7B document ({DOC_256K_GIB:.1f} GiB) in {DOC_256K_GIB / rate:5.1f} s")
    finally:
        shutil.rmtree(folder, ignore_errors=True)
    save("disk_read", {"args": vars(args), "block_bytes": BLOCK_BYTES, "files": count,
                       "write_gib_per_s": round(gib / write_s, 3), "rows": rows})


if __name__ == "__main__":
    main()
