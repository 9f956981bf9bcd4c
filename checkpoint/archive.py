"""The zip archive torch.save writes, checked the way torch.load will read it.

torch.load reads the archive with miniz, and miniz trusts fields that Python's zipfile ignores:
- the MS-DOS directory bit (0x10 of a central entry's external attributes): miniz then takes the
  record for a directory and returns its tensor's memory unread (uninitialised), while zipfile reads
  the bytes and finds the CRC right;
- the local header's name and extra lengths (where the data starts), and the zip64 locator's offset
  (where the zip64 end record is), where zipfile assumes or cross-checks other fields;
- names are looked up case-insensitively.
So a CRC check through zipfile alone passes files that load garbage. verify_archive parses the
structure itself and accepts a file only where every reader must find the same records: each central
entry agrees with its local header and data descriptor, records lie inside the file without
overlapping, the end records agree with each other, and each record's bytes match their CRC-32.
Anything else is refused, even when it would happen to load: a damaged structure means a damaged file.

The file is mapped, not read: the checks run over the page cache, with no copy. verify_archive checks a
whole file; load_checkpoint (checkpoint/io.py) runs check_structure and check_crcs itself, the tensors'
records over the memory torch.load(mmap=True) returns.
"""
from __future__ import annotations

import functools
import mmap
import struct
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import BinaryIO

try:  # ISA-L's CRC-32 (carry-less multiplication) runs at memory speed, about 6x zlib's; the same checksum
    from isal.isal_zlib import crc32
except ImportError:
    from zlib import crc32

ZIP_MAGIC = b"PK\x03\x04"  # torch.load's own test for the zip format (else: the legacy pickle format)
LOCAL = struct.Struct("<4sHHHHHIIIHH")  # signature, version, flags, method, time, date, crc, sizes, name/extra length
CENTRAL = struct.Struct("<4sHHHHHHIIIHHHHHII")
END = struct.Struct("<4sHHHHIIH")
ZIP64_END = struct.Struct("<4sQHHIIQQQQ")
ZIP64_LOCATOR = struct.Struct("<4sIQI")
DESCRIPTOR_SIG = b"PK\x07\x08"
ENCRYPTED_OR_PATCHED = 0x0001 | 0x0020 | 0x0040  # flag bits miniz and zipfile refuse or treat specially
HAS_DESCRIPTOR = 0x0008
DOS_DIRECTORY = 0x10
THREADS = 2  # crc32 releases the GIL on buffers over 5 KiB (zlib and isal alike)
PIECE = 4 * 2**20  # the least work worth handing to another thread


class ArchiveError(Exception):
    """What is wrong with the archive's structure, in a few words."""


class ChecksumMismatch(ArchiveError):
    """A record's bytes do not match their CRC-32."""


@dataclass
class Record:
    name: bytes
    header: int  # offset of the local header
    start: int  # offset of the data
    size: int
    crc: int
    flags: int
    end: int = 0  # after the data and its descriptor


def _unpack(layout: struct.Struct, data: bytes, offset: int, what: str) -> tuple:
    if offset < 0 or offset + layout.size > len(data):
        raise ArchiveError(f"{what} lies outside the file")
    return layout.unpack_from(data, offset)


def _end_records(data: mmap.mmap, file_size: int) -> tuple[int, int, int]:
    """(number of entries, offset, size) of the central directory, from the end records."""
    tail_start = max(0, file_size - (END.size + 0xFFFF + ZIP64_LOCATOR.size + ZIP64_END.size))
    tail = data[tail_start:file_size]
    at = tail.rfind(b"PK\x05\x06")
    if at < 0:
        raise ArchiveError("no end-of-central-directory record")
    _, disk, cd_disk, count_here, count, cd_size, cd_offset, comment = _unpack(END, tail, at, "end record")
    if at + END.size + comment != len(tail):
        raise ArchiveError("end record does not end the file")
    if disk or cd_disk or count_here != count:
        raise ArchiveError("end record names other disks")
    end_offset = tail_start + at
    locator = at - ZIP64_LOCATOR.size
    if locator >= 0 and tail[locator:locator + 4] == b"PK\x06\x07":
        # miniz follows the locator's offset; zipfile assumes the zip64 record right before the locator.
        _, disk, record_offset, disks = _unpack(ZIP64_LOCATOR, tail, locator, "zip64 locator")
        record = locator - ZIP64_END.size
        if disk != 0 or disks != 1 or record_offset != tail_start + record:
            raise ArchiveError("zip64 locator does not point at the zip64 end record")
        sig, length, _, _, disk, cd_disk, count64_here, count64, cd_size64, cd_offset64 = \
            _unpack(ZIP64_END, tail, record, "zip64 end record")
        if sig != b"PK\x06\x06" or length != ZIP64_END.size - 12 or disk or cd_disk or count64_here != count64:
            raise ArchiveError("damaged zip64 end record")
        # The 32-bit fields hold the value, or all ones where it needs the zip64 record.
        for short, full, ones in ((count, count64, 0xFFFF), (cd_size, cd_size64, 0xFFFFFFFF),
                                  (cd_offset, cd_offset64, 0xFFFFFFFF)):
            if short not in (full, ones):
                raise ArchiveError("end record and zip64 end record disagree")
        count, cd_size, cd_offset, end_offset = count64, cd_size64, cd_offset64, tail_start + record
    if cd_offset + cd_size != end_offset:
        raise ArchiveError("central directory does not end where the end records start")
    return count, cd_offset, cd_size


def _zip64_values(extra: bytes, fields: list[int]) -> list[int]:
    """Replace the all-ones fields (uncompressed size, compressed size, offset: in this order) by their
    64-bit values from the zip64 extra field."""
    if 0xFFFFFFFF not in fields:
        return fields
    at = 0
    while at + 4 <= len(extra):
        tag, length = struct.unpack_from("<HH", extra, at)
        if at + 4 + length > len(extra):
            break
        if tag == 1:
            values = iter(struct.unpack_from(f"<{length // 8}Q", extra, at + 4))
            try:
                return [next(values) if field == 0xFFFFFFFF else field for field in fields]
            except StopIteration:
                break
        at += 4 + length
    raise ArchiveError("missing zip64 sizes")


def _central_directory(file: mmap.mmap, count: int, offset: int, size: int) -> list[Record]:
    data = file[offset:offset + size]
    if len(data) != size:
        raise ArchiveError("central directory lies outside the file")
    records, seen, at = [], set(), 0
    for _ in range(count):
        (sig, _, _, flags, method, _, _, crc, compressed, uncompressed, name_len, extra_len, comment_len,
         disk, _, attributes, header) = _unpack(CENTRAL, data, at, "central directory entry")
        name = data[at + CENTRAL.size: at + CENTRAL.size + name_len]
        extra = data[at + CENTRAL.size + name_len: at + CENTRAL.size + name_len + extra_len]
        at += CENTRAL.size + name_len + extra_len + comment_len
        if sig != b"PK\x01\x02" or at > size:
            raise ArchiveError("damaged central directory")
        uncompressed, compressed, header = _zip64_values(extra, [uncompressed, compressed, header])
        if method != 0 or compressed != uncompressed or flags & ENCRYPTED_OR_PATCHED:
            raise ArchiveError(f"record {name!r} is compressed or encrypted (torch.save stores records)")
        # miniz reads a record with the directory bit, or a name ending in '/', as an empty directory.
        if attributes & DOS_DIRECTORY or name.endswith(b"/") or not name or disk != 0:
            raise ArchiveError(f"record {name!r} is marked as a directory or another disk")
        if name.lower() in seen:  # miniz looks names up case-insensitively
            raise ArchiveError(f"record {name!r} appears twice")
        seen.add(name.lower())
        records.append(Record(name, header, 0, compressed, crc, flags))
    if at != size:
        raise ArchiveError("central directory size disagrees with its entries")
    return records


def _check_local(data: mmap.mmap, record: Record, limit: int) -> None:
    """The local header and data descriptor must repeat what the central directory says."""
    head = data[record.header:record.header + LOCAL.size + len(record.name)]
    (sig, _, flags, method, _, _, crc, compressed, uncompressed, name_len, extra_len) = \
        _unpack(LOCAL, head, 0, f"local header of {record.name!r}")
    name = head[LOCAL.size:LOCAL.size + name_len]
    if sig != ZIP_MAGIC or name != record.name or flags != record.flags or method != 0:
        raise ArchiveError(f"local header of {record.name!r} disagrees with the central directory")
    deferred = flags & HAS_DESCRIPTOR and (crc, compressed, uncompressed) == (0, 0, 0)
    if not deferred and (crc != record.crc or {compressed, uncompressed} - {record.size, 0xFFFFFFFF}):
        raise ArchiveError(f"local header of {record.name!r} disagrees with the central directory")
    record.start = record.header + LOCAL.size + name_len + extra_len
    record.end = record.start + record.size
    if flags & HAS_DESCRIPTOR:
        descriptor = data[record.end:record.end + 24]
        short = struct.unpack_from("<4sIII", descriptor) if len(descriptor) >= 16 else None
        long = struct.unpack_from("<4sIQQ", descriptor) if len(descriptor) >= 24 else None
        if short == (DESCRIPTOR_SIG, record.crc, record.size, record.size):
            record.end += 16
        elif long == (DESCRIPTOR_SIG, record.crc, record.size, record.size):
            record.end += 24
        else:
            raise ArchiveError(f"data descriptor of {record.name!r} disagrees with the central directory")
    if record.end > limit:
        raise ArchiveError(f"record {record.name!r} runs into the central directory")


def check_structure(data: mmap.mmap) -> list[Record]:
    """The records of the mapped archive, in file order; ArchiveError unless its structure is consistent
    (everything verify_archive checks but the CRC-32s)."""
    count, cd_offset, cd_size = _end_records(data, len(data))
    records = sorted(_central_directory(data, count, cd_offset, cd_size), key=lambda r: r.header)
    previous_end = 0
    for record in records:
        if record.header < previous_end:
            raise ArchiveError(f"record {record.name!r} overlaps the one before it")
        _check_local(data, record, cd_offset)
        previous_end = record.end
    return records


def has_checksums(records: list[Record]) -> bool:
    """False for a file written with torch's CRC option off (not by this project): no checksum to verify."""
    return any(record.crc for record in records if record.size)


def check_crcs(records: list[Record], views: list[memoryview]) -> None:
    """Raise ChecksumMismatch unless each record's bytes (views[i] holds those of records[i]) match its CRC-32."""
    try:
        crcs = _crcs(views)
    finally:
        views.clear()  # a view kept alive by a traceback would keep the mapping under it from closing
    for record, crc in zip(records, crcs):
        if crc != record.crc:
            raise ChecksumMismatch(f"bad CRC-32 of record {record.name.decode(errors='replace')}")


def verify_archive(handle: BinaryIO) -> None:
    """Raise ArchiveError unless the structure is consistent and every record matches its CRC-32."""
    if not handle.seek(0, 2):
        raise ArchiveError("empty file")
    with mmap.mmap(handle.fileno(), 0, access=mmap.ACCESS_READ) as data:
        records = check_structure(data)
        if has_checksums(records):
            with memoryview(data) as view:
                check_crcs(records, [view[r.start:r.start + r.size] for r in records])


def _crcs(views: list[memoryview]) -> list[int]:
    """The CRC-32 of each buffer, computed in pieces spread over THREADS threads and then joined."""
    total = sum(len(view) for view in views)
    piece = max(PIECE, -(-total // (8 * THREADS)))  # 8 tasks a thread: a busy core delays the end little
    tasks, task, task_bytes = [], [], 0  # a task: consecutive pieces (buffer index, start, end) of ~piece bytes
    for index, view in enumerate(views):
        for start in range(0, len(view), piece):
            end = min(start + piece, len(view))
            task.append((index, start, end))
            task_bytes += end - start
            if task_bytes >= piece:
                tasks.append(task)
                task, task_bytes = [], 0
    tasks.append(task)

    def run(task: list[tuple[int, int, int]]) -> list[int]:
        return [crc32(views[index][start:end]) for index, start, end in task]

    if len(tasks) > 2:
        with ThreadPoolExecutor(THREADS) as pool:
            results = list(pool.map(run, tasks))
    else:
        results = [run(task) for task in tasks]
    crcs = [0] * len(views)
    for task, values in zip(tasks, results):
        for (index, start, end), value in zip(task, values):
            crcs[index] = value if start == 0 else crc32_combine(crcs[index], value, end - start)
    return crcs


def _multiply(a: int, b: int) -> int:
    """a * b modulo the CRC-32 polynomial, in its bit-reflected form (zlib's multmodp); a is not 0."""
    product, bit = 0, 1 << 31
    while True:
        if a & bit:
            product ^= b
            if not a & (bit - 1):
                return product
        bit >>= 1
        b = (b >> 1) ^ 0xEDB88320 if b & 1 else b >> 1


_POWERS = [1 << 30]  # x^(2^k) modulo the polynomial, k = 0..31
for _ in range(31):
    _POWERS.append(_multiply(_POWERS[-1], _POWERS[-1]))


@functools.lru_cache(maxsize=64)  # the pieces of a file mostly have one length
def _shift(length: int) -> int:
    """x^(8 * length) modulo the polynomial: what moves a CRC past `length` bytes."""
    power, k = 1 << 31, 3
    while length:
        if length & 1:
            power = _multiply(_POWERS[k & 31], power)
        length >>= 1
        k += 1
    return power


def crc32_combine(crc_a: int, crc_b: int, length_b: int) -> int:
    """The CRC-32 of A followed by B, from the CRC-32 of each and the length of B (zlib's crc32_combine,
    which Python's zlib does not offer)."""
    return _multiply(_shift(length_b), crc_a) ^ crc_b
