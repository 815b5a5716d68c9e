"""Where weights live: the one module that reads and writes weight files.

Reading: a folder of safetensors (one file, or shards named by `model.safetensors.index.json`) is opened
by parsing each file's header; a tensor, or a flat range of its elements, is then read with `pread` into a
fresh tensor. Nothing is memory-mapped, so a process's resident memory holds only the tensors it asked for.
Writing: `PlannedWriter` (names, dtypes and shapes known up front: each header written first, data
following in order, so a tensor can arrive in chunks and is never held whole) and `BufferedWriter` (sizes
known only once computed) stream tensors into shards of at most `max_shard_bytes`, hashing each file as it
goes, on a thread of their own so that the caller computes the next tensor meanwhile.
`TensorCheckpoint` puts tensors in memory behind the same reading interface; `read_adapter` reads a PEFT
adapter folder (what its factors mean is sources.py's business).
"""

import hashlib
import json
import math
import mmap
import os
import shutil
import stat
import struct
import warnings
from collections import deque
from collections.abc import Iterable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import torch
from torch import Tensor


INDEX_FILE = "model.safetensors.index.json"
ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
    "BOOL": torch.bool, "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2,
}
DTYPE_NAMES = {dtype: name for name, dtype in DTYPES.items()}
_MAX_HEADER = 100_000_000


class CheckpointError(ValueError):
    """A weight file or folder that cannot be used as given; the message names the file or tensor."""


# ---- reading ----------------------------------------------------------------------------------------


class TensorInfo:
    __slots__ = ("file", "dtype", "shape", "start", "stop")

    def __init__(self, file: Path, dtype: torch.dtype, shape: tuple[int, ...], start: int, stop: int):
        self.file, self.dtype, self.shape, self.start, self.stop = file, dtype, shape, start, stop

    @property
    def numel(self) -> int:
        return math.prod(self.shape)


def read_header(path: Path, fd: int | None = None) -> tuple[dict, int]:
    """(header, data_start) of a safetensors file, validated as strictly as the safetensors library does,
    so a truncated, corrupt or crafted file fails here, naming itself and the tensor, instead of deep inside
    a merge (where, say, a negative offset would read header bytes as weights).

    The header must be a JSON object of 8 + length <= file size bytes (length at most 100 MB); `__metadata__`,
    if present, maps strings to strings; every other entry has a known `dtype`, a `shape` of non-negative
    integers and `data_offsets` [begin, end] of non-negative integers with begin <= end and end - begin =
    numel * itemsize. Sorted by offset, the tensors must tile the data section exactly: the first begins at
    0, each begins where the one before it ends (no gap, no two tensors sharing a byte), the last ends at the
    end of the file. Deliberately stricter than the library: a key that appears twice in one JSON object is
    refused (the library keeps the last of two equal tensor names), and only the dtypes in DTYPES are read.
    Given `fd` (the file opened for reading), the header is read through it, so that it describes the very
    file the caller goes on reading even if `path` is replaced or removed meanwhile.
    """
    path = Path(path)
    if fd is None:
        if not path.is_file():
            raise CheckpointError(f"missing weight file {path}")
        with open(path, "rb") as f:
            return read_header(path, f.fileno())
    size = os.fstat(fd).st_size
    raw = os.pread(fd, 8, 0)
    if len(raw) < 8:
        raise CheckpointError(f"{path}: not a safetensors file ({size} bytes, shorter than its 8-byte header length)")
    (length,) = struct.unpack("<Q", raw)
    if length > _MAX_HEADER:
        raise CheckpointError(f"{path}: corrupt safetensors header (claims {length} bytes, more than the "
                              f"{_MAX_HEADER} the format allows)")
    if length > size - 8:
        raise CheckpointError(f"{path}: corrupt or truncated safetensors header (claims {length} bytes, file has {size})")
    try:
        header = json.loads(os.pread(fd, length, 8).decode("utf-8"), object_pairs_hook=_unique_keys,
                            parse_constant=_no_constant)
    except ValueError as error:  # UnicodeDecodeError, JSONDecodeError, a duplicate key, NaN
        raise CheckpointError(f"{path}: corrupt safetensors header ({error})") from None
    if not isinstance(header, dict):
        raise CheckpointError(f"{path}: corrupt safetensors header (not a JSON object)")
    data_start = 8 + length
    _check_layout(path, header, size - data_start)
    return header, data_start


_USIZE = 1 << 64  # the library reads offsets and dimensions as u64


def _unique_keys(pairs: list) -> dict:
    keys = [key for key, _ in pairs]
    if len(set(keys)) != len(keys):
        twice = next(key for i, key in enumerate(keys) if key in keys[:i])
        raise ValueError(f"key '{twice}' appears twice in one JSON object")
    return dict(pairs)


def _no_constant(name: str):
    raise ValueError(f"{name} is not JSON")


def _is_index(value) -> bool:
    return type(value) is int and 0 <= value < _USIZE  # bool is an int subclass: excluded


def _short(value) -> str:
    text = repr(value)
    return text if len(text) <= 200 else text[:200] + "..."


def _check_layout(path: Path, header: dict, data_size: int) -> None:
    """Every entry of a parsed safetensors header well formed, and the tensors tiling [0, data_size)."""
    metadata = header.get("__metadata__")
    if "__metadata__" in header and not (
        isinstance(metadata, dict) and all(isinstance(k, str) and isinstance(v, str) for k, v in metadata.items())
    ):
        raise CheckpointError(f"{path}: corrupt safetensors header: '__metadata__' must map strings to strings, "
                              f"got {_short(metadata)}")
    spans = []
    for name, entry in header.items():
        if name == "__metadata__":
            continue
        where = f"{path}: tensor '{name}'"
        if not isinstance(entry, dict):
            raise CheckpointError(f"{where}: corrupt safetensors entry {_short(entry)} (not a JSON object)")
        missing = [key for key in ("dtype", "shape", "data_offsets") if key not in entry]
        if missing:
            raise CheckpointError(f"{where}: corrupt safetensors entry {_short(entry)} (no {', '.join(missing)})")
        dtype, shape, offsets = entry["dtype"], entry["shape"], entry["data_offsets"]
        if not isinstance(dtype, str) or dtype not in DTYPES:
            raise CheckpointError(f"{where}: unknown or unsupported dtype {_short(dtype)} "
                                  f"(this library reads {', '.join(DTYPES)})")
        if not isinstance(shape, list) or not all(_is_index(d) for d in shape):
            raise CheckpointError(f"{where}: shape must be a list of non-negative integers, got {_short(shape)}")
        if not isinstance(offsets, list) or len(offsets) != 2 or not all(_is_index(o) for o in offsets):
            raise CheckpointError(f"{where}: data_offsets must be two non-negative integers [begin, end], "
                                  f"got {_short(offsets)}")
        begin, end = offsets
        if begin > end:
            raise CheckpointError(f"{where}: data_offsets {offsets} end before they begin")
        needed = math.prod(shape) * DTYPES[dtype].itemsize
        if end - begin != needed:
            raise CheckpointError(f"{where} spans {end - begin} bytes, its shape {shape} of {dtype} needs {needed}")
        spans.append((begin, end, name))
    spans.sort()
    position, previous = 0, None  # end of the data covered so far, and the tensor that ends there
    for begin, end, name in spans:
        if begin < position:
            raise CheckpointError(f"{path}: tensor '{name}' (bytes [{begin}, {end}) of the data) overlaps tensor "
                                  f"'{previous[2]}' (bytes [{previous[0]}, {previous[1]})): tensors may not share bytes")
        if begin > position:
            before = f"tensor '{previous[2]}' ends at byte {position}" if previous else "the data begins at byte 0"
            raise CheckpointError(f"{path}: tensor '{name}' begins at byte {begin} of the data, but {before}: "
                                  f"a gap of {begin - position} bytes that no tensor owns")
        position, previous = end, (begin, end, name)
    if position > data_size:
        raise CheckpointError(f"{path}: truncated or corrupt safetensors file: tensor '{previous[2]}' ends at byte "
                              f"{position} of the data, the file holds {data_size} bytes of data")
    if position < data_size:
        owner = f"the last tensor '{previous[2]}' ends at byte {position}" if previous else "no tensor is in its header"
        raise CheckpointError(f"{path}: corrupt safetensors file: {owner}, but {data_size} bytes of data follow the "
                              f"header: {data_size - position} bytes that no tensor owns")


def _infos(path: Path, fd: int | None = None) -> dict[str, TensorInfo]:
    header, data_start = read_header(path, fd)
    return {
        name: TensorInfo(path, DTYPES[e["dtype"]], tuple(e["shape"]), data_start + e["data_offsets"][0],
                         data_start + e["data_offsets"][1])
        for name, e in header.items() if name != "__metadata__"
    }


def header_digest(path: Path, fd: int | None = None) -> str:
    """sha256 of a safetensors file's header and size: a cheap fingerprint of names, shapes, dtypes, layout
    (read through `fd` if given)."""
    header, data_start = read_header(path, fd)
    digest = hashlib.sha256(json.dumps(header, sort_keys=True).encode())
    digest.update(str(Path(path).stat().st_size if fd is None else os.fstat(fd).st_size).encode())
    return digest.hexdigest()


class Checkpoint:
    """Lazy view of safetensors weights: a transformers folder (single file or index + shards), or a list
    of files. `names` keeps the files' order; `read(name, start, stop)` reads flat elements [start, stop).

    Every file is opened when the checkpoint is (one descriptor per file, held until close()), and its header
    is read through that descriptor: a checkpoint reads the files as they were when it was opened, also after
    they are removed or replaced by rename (a fold collecting the generation a reader still uses). A file
    overwritten in place is another matter: its content is not a snapshot (`sha256` checks it)."""

    def __init__(self, source: str | Path | Iterable[Path]):
        self._fds: dict[Path, int] = {}
        self._mmaps: dict[Path, np.ndarray] = {}
        if isinstance(source, (str, Path)):
            self.folder = Path(source)
            files = weight_files(self.folder)
        else:
            files = [Path(p) for p in source]
            self.folder = files[0].parent if files else None
        self.files = files
        self.info: dict[str, TensorInfo] = {}
        try:
            for path in files:
                try:
                    fd = self._fds[path] = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
                except (FileNotFoundError, NotADirectoryError):
                    raise CheckpointError(f"missing weight file {path}") from None
                if not stat.S_ISREG(os.fstat(fd).st_mode):
                    raise CheckpointError(f"{path} is not a weight file (a folder or a device)")
                for name, info in _infos(path, fd).items():
                    if name in self.info:
                        raise CheckpointError(f"tensor '{name}' is stored twice: in {self.info[name].file} and {path}")
                    self.info[name] = info
        except BaseException:
            self.close()
            raise
        self.names = list(self.info)

    @property
    def config(self) -> dict:
        path = self.folder / "config.json" if self.folder else None
        return json.loads(path.read_text()) if path and path.is_file() else {}

    def __contains__(self, name: str) -> bool:
        return name in self.info

    def read(self, name: str, start: int = 0, stop: int | None = None, out: Tensor | None = None) -> Tensor:
        """The tensor `name` in its own shape, or, given a range, its flat elements [start, stop); into `out`
        (flat, contiguous, of its dtype) if given."""
        info = self.info.get(name)
        if info is None:
            raise CheckpointError(f"tensor '{name}' is not in {self.folder}")
        whole = start == 0 and stop is None and out is None
        stop = info.numel if stop is None else stop
        if out is None:
            out = torch.empty(stop - start, dtype=info.dtype)
        elif out.dtype != info.dtype or out.numel() != stop - start or not out.is_contiguous():
            raise CheckpointError(f"tensor '{name}': cannot read {stop - start} {info.dtype} elements into "
                                  f"{out.numel()} {out.dtype} ones")
        size = info.dtype.itemsize
        _pread_into(self._fd(info.file), out, info.start + start * size, info.file)
        return out.reshape(info.shape) if whole else out

    def view(self, name: str) -> Tensor:
        """A read-only tensor over the file's own bytes (memory-mapped, no copy): for random access to a few
        entries, as a task switch needs. Its pages count as this process's resident memory once touched.
        The map is made from the descriptor opened with the checkpoint: it shows that file, even removed."""
        info = self.info[name]
        array = self._mmaps.get(info.file)
        if array is None:
            mapped = mmap.mmap(self._fd(info.file), 0, access=mmap.ACCESS_READ)
            array = self._mmaps[info.file] = np.frombuffer(mapped, dtype=np.uint8)
        with warnings.catch_warnings():  # torch warns that the array is read-only; nothing writes to it
            warnings.simplefilter("ignore")
            raw = torch.from_numpy(array[info.start:info.stop])
        return raw.view(info.dtype).reshape(info.shape)

    def _fd(self, path: Path) -> int:
        fd = self._fds.get(path)
        if fd is None:
            if path not in self.files:
                raise CheckpointError(f"{path} is not one of this checkpoint's files")
            raise CheckpointError(f"{path}: read after the checkpoint was closed")
        return fd

    def sha256(self, path: Path, stop=None) -> str:
        """sha256 of one of the checkpoint's files, read through its open descriptor (the bytes `read`
        sees); `stop` (a threading.Event) abandons the work early, returning ''."""
        return sha256_fd(self._fd(Path(path)), stop)

    def size(self, path: Path) -> int:
        return os.fstat(self._fd(Path(path))).st_size

    def digests(self, stop=None) -> dict[str, str]:
        """{file name: sha256} of every weight file, through the open descriptors."""
        return {p.name: self.sha256(p, stop) for p in self.files}

    def close(self, _close=os.close) -> None:  # bound early: __del__ may run at exit, after `os` is torn down
        self._mmaps.clear()  # numpy arrays keep their mmap alive until the last view of it is gone
        for fd in self._fds.values():
            _close(fd)
        self._fds.clear()

    def __del__(self):
        if hasattr(self, "_fds"):
            self.close()

    @property
    def nbytes(self) -> int:
        return sum(info.stop - info.start for info in self.info.values())

    def fingerprint(self) -> dict:
        """{file name: header_digest}: names, shapes, dtypes and layout of every weight file."""
        return {p.name: header_digest(p, self._fd(p)) for p in self.files}


def _pread_into(fd: int, out: Tensor, offset: int, path: Path) -> None:
    if out.numel() == 0:
        return
    view = memoryview(out.view(-1).view(torch.uint8).numpy())
    done = 0
    while done < len(view):
        n = os.preadv(fd, [view[done:done + (1 << 30)]], offset + done)
        if n == 0:
            raise CheckpointError(f"{path}: unexpected end of file (truncated while reading)")
        done += n


def weight_files(folder: Path) -> list[Path]:
    """The safetensors files of a transformers folder: the shards its index names, else model.safetensors,
    else every *.safetensors. A shard named by the index but absent is an error naming it."""
    folder = Path(folder)
    if not folder.is_dir():
        raise CheckpointError(f"{folder} is not a folder of weights")
    index = folder / INDEX_FILE
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (json.JSONDecodeError, KeyError) as error:
            raise CheckpointError(f"{index}: not a safetensors index ({error})") from None
        files = [folder / name for name in dict.fromkeys(weight_map.values())]
        missing = [str(p) for p in files if not p.is_file()]
        if missing:
            raise CheckpointError(f"missing shard(s) named by {index}: {', '.join(missing)}")
        return files
    if (folder / "model.safetensors").is_file():
        return [folder / "model.safetensors"]
    files = sorted(folder.glob("*.safetensors"))
    if not files:
        raise CheckpointError(f"no safetensors weights in {folder}")
    return files


def is_lora_adapter(folder: Path) -> bool:
    return (Path(folder) / ADAPTER_CONFIG).is_file()


# ---- in memory, and adapters ---------------------------------------------------------------------


class TensorCheckpoint(Checkpoint):
    """Tensors in memory behind Checkpoint's reading interface, so that a model's state dict folds without
    being written out first. `fingerprint()` hashes the tensors' bytes."""

    def __init__(self, tensors, config: dict | None = None):
        self._fds, self._mmaps, self.folder, self.files, self._config = {}, {}, None, [], dict(config or {})
        self.tensors = {name: t.detach().contiguous().cpu() for name, t in tensors.items()}
        self.info = {name: TensorInfo(None, t.dtype, tuple(t.shape), 0, t.numel() * t.element_size())
                     for name, t in self.tensors.items()}
        self.names = list(self.info)

    @property
    def config(self) -> dict:
        return self._config

    def read(self, name: str, start: int = 0, stop: int | None = None, out: Tensor | None = None) -> Tensor:
        if name not in self.tensors:
            raise CheckpointError(f"tensor '{name}' is not among the {len(self.tensors)} tensors given")
        tensor = self.tensors[name]
        if start == 0 and stop is None and out is None:
            return tensor
        flat = tensor.reshape(-1)[start:stop]
        return flat.clone() if out is None else out.copy_(flat)

    def view(self, name: str) -> Tensor:
        return self.tensors[name]

    def fingerprint(self) -> dict:
        digest = hashlib.sha256()
        for name, tensor in self.tensors.items():
            digest.update(f"{name}:{tensor.dtype}:{tuple(tensor.shape)}".encode())
            digest.update(memoryview(tensor.reshape(-1).view(torch.uint8).numpy()))
        return {"<memory>": digest.hexdigest()}


def read_adapter(folder: Path) -> tuple[dict, dict[str, Tensor]]:
    """A PEFT adapter folder's adapter_config.json and weights (adapter_model.safetensors), read whole:
    adapters are small."""
    folder = Path(folder)
    path = folder / ADAPTER_CONFIG
    try:
        config = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise CheckpointError(f"{path}: not a readable adapter config ({error})") from None
    if not isinstance(config, dict):
        raise CheckpointError(f"{path}: not a readable adapter config (not a JSON object)")
    weights = Checkpoint([folder / ADAPTER_WEIGHTS])
    tensors = {name: weights.read(name) for name in weights.names}
    weights.close()
    return config, tensors


# ---- writing ----------------------------------------------------------------------------------------


def fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def sha256_fd(fd: int, stop=None) -> str:
    """sha256 of an open file's whole content, read with pread (the file position is left alone, so other
    threads may read the same descriptor meanwhile); '' if the threading.Event `stop` is set first."""
    digest, offset = hashlib.sha256(), 0
    view = memoryview(bytearray(max(1, min(os.fstat(fd).st_size, 1 << 24))))
    while True:
        if stop is not None and stop.is_set():
            return ""
        n = os.preadv(fd, [view], offset)
        if n == 0:
            return digest.hexdigest()
        digest.update(view[:n])
        offset += n


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 24):
            digest.update(chunk)
    return digest.hexdigest()


def _header_bytes(entries: list[tuple[str, torch.dtype, tuple[int, ...]]], metadata: dict | None) -> bytes:
    header: dict = {"__metadata__": {"format": "pt", **(metadata or {})}}
    offset = 0
    for name, dtype, shape in entries:
        size = math.prod(shape) * dtype.itemsize
        header[name] = {"dtype": DTYPE_NAMES[dtype], "shape": list(shape), "data_offsets": [offset, offset + size]}
        offset += size
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)  # the format allows space padding; keeps tensor data 8-byte aligned
    return struct.pack("<Q", len(raw)) + raw


def _write_and_hash(file, digest, data) -> None:
    file.write(data)
    digest.update(data)


class _ShardFiles:
    """What both writers share: shard files `<stem>-0000i-of-0000n.safetensors` (`<stem>.safetensors` when
    one is enough) written, hashed and fsynced in order on a thread of the writer's own, at most a few
    chunks behind, so the caller computes the next chunk meanwhile. Errors surface at the next write or at
    close(). `files` maps each file name to its sha256, `weight_map` each tensor to its file."""

    def __init__(self, folder: Path, stem: str, max_shard_bytes: int, metadata: dict | None = None):
        self.folder, self.stem, self.max_shard_bytes, self.metadata = Path(folder), stem, max_shard_bytes, metadata
        self.folder.mkdir(parents=True, exist_ok=True)
        self.files: dict[str, str] = {}
        self.sizes: dict[str, int] = {}
        self.weight_map: dict[str, str] = {}
        self._io: ThreadPoolExecutor | None = None
        self._jobs: deque = deque()
        self._file = None

    def _name(self, index: int, count: int) -> str:
        return f"{self.stem}.safetensors" if count == 1 else f"{self.stem}-{index + 1:05d}-of-{count:05d}.safetensors"

    def _open(self, name: str, entries) -> None:
        self._current = name
        self._file = open(self.folder / name, "wb")
        self._digest = hashlib.sha256()
        self._later(_write_and_hash, self._file, self._digest, _header_bytes(entries, self.metadata))

    def _append(self, tensor: Tensor) -> None:
        if tensor.numel():
            data = memoryview(tensor.detach().contiguous().reshape(-1).view(torch.uint8).numpy())
            self._later(_write_and_hash, self._file, self._digest, data)

    def _close_file(self) -> None:
        self._later(self._finish_file, self._file, self._digest, self._current)
        self._file = None

    def _finish_file(self, file, digest, name: str) -> None:
        file.flush()
        os.fsync(file.fileno())
        self.sizes[name] = file.tell()
        file.close()
        self.files[name] = digest.hexdigest()

    def _later(self, job, *args) -> None:
        if self._io is None:
            self._io = ThreadPoolExecutor(1, thread_name_prefix=f"write-{self.stem}")
        self._jobs.append(self._io.submit(job, *args))
        while self._jobs and (len(self._jobs) > 4 or self._jobs[0].done()):
            self._jobs.popleft().result()

    def _wait(self) -> None:
        while self._jobs:
            self._jobs.popleft().result()
        if self._io is not None:
            self._io.shutdown()
            self._io = None

    def write_index(self) -> None:
        """model.safetensors.index.json, as transformers writes it, when there is more than one shard."""
        if len(self.files) > 1:
            index = {"metadata": {"total_size": sum(self.sizes.values())}, "weight_map": self.weight_map}
            (self.folder / INDEX_FILE).write_text(json.dumps(index, indent=2))


class PlannedWriter(_ShardFiles):
    """Shards laid out up front from a plan [(name, dtype, shape), ...] of at most `max_shard_bytes` each:
    each header is written first and data follows, so `write(name, chunk)` may deliver a tensor in
    consecutive flat chunks, in plan order, and no tensor is ever held whole."""

    def __init__(self, folder: Path, stem: str, max_shard_bytes: int, plan, metadata: dict | None = None):
        super().__init__(folder, stem, max_shard_bytes, metadata)
        self._shards: list[list] = []
        for entry in plan:
            size = math.prod(entry[2]) * entry[1].itemsize
            if not self._shards or (self._shards[-1] and _entries_bytes(self._shards[-1]) + size > max_shard_bytes):
                self._shards.append([])
            self._shards[-1].append(entry)
        self._queue = [(i, entry) for i, shard in enumerate(self._shards) for entry in shard]
        self._position = 0  # index into _queue of the tensor being written
        self._written = 0  # elements of that tensor written so far
        self._shard = -1

    def write(self, name: str, tensor: Tensor) -> None:
        self._skip_empty()
        if self._position >= len(self._queue):
            raise CheckpointError(f"writer '{self.stem}': tensor '{name}' is not in its plan")
        shard, (planned, dtype, shape) = self._queue[self._position]
        if name != planned or tensor.dtype != dtype:
            raise CheckpointError(f"writer '{self.stem}': got '{name}' ({tensor.dtype}), the plan expects '{planned}' ({dtype})")
        if shard != self._shard:
            self._start(shard)
        self._append(tensor)
        self._written += tensor.numel()
        if self._written > math.prod(shape):
            raise CheckpointError(f"writer '{self.stem}': more than {math.prod(shape)} elements written to '{name}'")
        if self._written == math.prod(shape):
            self._advance(shard, name)

    def _start(self, shard: int) -> None:
        self._shard = shard
        self._open(self._name(shard, len(self._shards)), self._shards[shard])

    def _advance(self, shard: int, name: str) -> None:
        self.weight_map[name] = self._current
        self._position += 1
        self._written = 0
        if self._position == len(self._queue) or self._queue[self._position][0] != shard:
            self._close_file()

    def _skip_empty(self) -> None:
        """Tensors with no elements never arrive as chunks; record them as they come up in the plan."""
        while self._position < len(self._queue) and self._written == 0:
            shard, (name, _, shape) = self._queue[self._position]
            if math.prod(shape):
                return
            if shard != self._shard:
                self._start(shard)
            self._advance(shard, name)

    def close(self) -> dict[str, str]:
        """Finishes every shard; returns {file name: sha256}. Every planned tensor must have been written."""
        self._skip_empty()
        if self._position < len(self._queue):
            raise CheckpointError(f"writer '{self.stem}': tensor '{self._queue[self._position][1][0]}' was not written in full")
        self._wait()
        return self.files


class BufferedWriter(_ShardFiles):
    """Whole tensors whose sizes are known only once computed (sparse vectors), buffered until a shard is
    full; shards are named by index as they go and renamed `-of-n` at close."""

    def __init__(self, folder: Path, stem: str, max_shard_bytes: int, metadata: dict | None = None):
        super().__init__(folder, stem, max_shard_bytes, metadata)
        self._buffer: list[tuple[str, Tensor]] = []
        self._buffered = 0
        self._count = 0

    def write(self, name: str, tensor: Tensor) -> None:
        self._buffer.append((name, tensor.detach().contiguous().cpu()))
        self._buffered += tensor.numel() * tensor.element_size()
        if self._buffered >= self.max_shard_bytes:
            self._flush()

    def _flush(self) -> None:
        self._open(f"{self.stem}-{self._count:05d}.partial", [(n, t.dtype, tuple(t.shape)) for n, t in self._buffer])
        for name, tensor in self._buffer:
            self._append(tensor)
            self.weight_map[name] = self._current
        self._close_file()
        self._count += 1
        self._buffer, self._buffered = [], 0

    def close(self) -> dict[str, str]:
        """Writes what is buffered (an empty file if nothing ever was); returns {file name: sha256}."""
        if self._buffer or not self._count:
            self._flush()
        self._wait()
        final = {}
        for index, old in enumerate(sorted(self.files)):
            new = self._name(index, self._count)
            os.replace(self.folder / old, self.folder / new)
            final[new] = self.files[old]
            self.sizes[new] = self.sizes.pop(old)
            self.weight_map = {k: (new if v == old else v) for k, v in self.weight_map.items()}
        self.files = final
        return final


def _entries_bytes(entries) -> int:
    return sum(math.prod(shape) * dtype.itemsize for _, dtype, shape in entries)


def copy_small_files(source: Path, dest: Path, skip: Iterable[str] = ()) -> list[str]:
    """Copies a model folder's configuration and tokenizer files (everything but weights and indexes)."""
    skip = set(skip) | {INDEX_FILE, ADAPTER_CONFIG, ADAPTER_WEIGHTS}
    copied = []
    for path in sorted(Path(source).iterdir()):
        if path.is_file() and path.name not in skip and not path.name.endswith((".safetensors", ".bin", ".pt", ".pth")):
            shutil.copy2(path, dest / path.name)
            copied.append(path.name)
    return copied


def save(folder: Path, tensors, max_shard_bytes: int = 5 << 30) -> list[Path]:
    """Tensors {name: tensor} as a transformers-style folder: model.safetensors, or shards and their index."""
    folder = Path(folder)
    plan = [(name, t.dtype, tuple(t.shape)) for name, t in tensors.items()]
    writer = PlannedWriter(folder, "model", max_shard_bytes, plan)
    for name, tensor in tensors.items():
        writer.write(name, tensor.detach().cpu().reshape(-1))
    writer.close()
    writer.write_index()
    if len(writer.files) == 1 and next(iter(writer.files)) != "model.safetensors":
        (folder / next(iter(writer.files))).rename(folder / "model.safetensors")
    return [folder / name for name in (writer.files if len(writer.files) > 1 else ["model.safetensors"])]
