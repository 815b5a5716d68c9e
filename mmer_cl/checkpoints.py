"""Where weights live: the one module that reads and writes weight files.

Reading: a folder of safetensors (one file, or shards named by `model.safetensors.index.json`) is opened
by parsing each file's header; a tensor, or a flat range of its elements, is then read with `pread` into a
fresh tensor. Nothing is memory-mapped, so a process's resident memory holds only the tensors it asked for.
Writing: `ShardWriter` streams tensors into shards of at most `max_shard_bytes`, hashing each file as it
goes, on a thread of its own so that the caller computes the next tensor meanwhile; with a plan (names,
dtypes, shapes known up front) the header is written first and data follows in order, so a tensor can
arrive in chunks and is never held whole.
A PEFT LoRA adapter folder reads as dense task vectors `scaling * B @ A` keyed by the base's names.
"""

import hashlib
import json
import math
import os
import re
import shutil
import struct
import warnings
from collections import deque
from collections.abc import Iterable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from mmer_cl import merging

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


def read_header(path: Path) -> tuple[dict, int]:
    """(header, data_start) of a safetensors file, checked against the file's size so a truncated or
    corrupt file fails here, naming itself, instead of deep inside a merge."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"missing weight file {path}")
    size = path.stat().st_size
    with open(path, "rb") as f:
        raw = f.read(8)
        if len(raw) < 8:
            raise CheckpointError(f"{path}: not a safetensors file ({size} bytes, shorter than its 8-byte header length)")
        (length,) = struct.unpack("<Q", raw)
        if length > min(size - 8, _MAX_HEADER):
            raise CheckpointError(f"{path}: corrupt or truncated safetensors header (claims {length} bytes, file has {size})")
        try:
            header = json.loads(f.read(length))
        except (UnicodeDecodeError, json.JSONDecodeError) as error:
            raise CheckpointError(f"{path}: corrupt safetensors header ({error})") from None
    if not isinstance(header, dict):
        raise CheckpointError(f"{path}: corrupt safetensors header (not a JSON object)")
    data_start = 8 + length
    end = 0
    for name, entry in header.items():
        if name == "__metadata__":
            continue
        try:
            dtype = DTYPES[entry["dtype"]]
            begin, stop = entry["data_offsets"]
            expected = math.prod(entry["shape"]) * dtype.itemsize
        except (KeyError, TypeError, ValueError):
            raise CheckpointError(f"{path}: corrupt safetensors entry for tensor '{name}': {entry}") from None
        if stop - begin != expected:
            raise CheckpointError(f"{path}: tensor '{name}' spans {stop - begin} bytes, its shape needs {expected}")
        end = max(end, stop)
    if data_start + end != size:
        raise CheckpointError(
            f"{path}: truncated or corrupt safetensors file: its header needs {data_start + end} bytes, it has {size}"
        )
    return header, data_start


def _infos(path: Path) -> dict[str, TensorInfo]:
    header, data_start = read_header(path)
    return {
        name: TensorInfo(path, DTYPES[e["dtype"]], tuple(e["shape"]), data_start + e["data_offsets"][0],
                         data_start + e["data_offsets"][1])
        for name, e in header.items() if name != "__metadata__"
    }


def header_digest(path: Path) -> str:
    """sha256 of a safetensors file's header and size: a cheap fingerprint of names, shapes, dtypes, layout."""
    header, data_start = read_header(path)
    digest = hashlib.sha256(json.dumps(header, sort_keys=True).encode())
    digest.update(str(Path(path).stat().st_size).encode())
    return digest.hexdigest()


class Checkpoint:
    """Lazy view of safetensors weights: a transformers folder (single file or index + shards), or a list
    of files. `names` keeps the files' order; `read(name, start, stop)` reads flat elements [start, stop)."""

    def __init__(self, source: str | Path | Iterable[Path]):
        self._fds: dict[Path, int] = {}
        self._mmaps: dict[Path, np.memmap] = {}
        if isinstance(source, (str, Path)):
            self.folder = Path(source)
            files = weight_files(self.folder)
        else:
            files = [Path(p) for p in source]
            self.folder = files[0].parent if files else None
        self.files = files
        self.info: dict[str, TensorInfo] = {}
        for path in files:
            for name, info in _infos(path).items():
                if name in self.info:
                    raise CheckpointError(f"tensor '{name}' is stored twice: in {self.info[name].file} and {path}")
                self.info[name] = info
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
        entries, as a task switch needs. Its pages count as this process's resident memory once touched."""
        info = self.info[name]
        array = self._mmaps.get(info.file)
        if array is None:
            array = self._mmaps[info.file] = np.memmap(info.file, dtype=np.uint8, mode="r")
        with warnings.catch_warnings():  # torch warns that the array is read-only; nothing writes to it
            warnings.simplefilter("ignore")
            raw = torch.from_numpy(array[info.start:info.stop])
        return raw.view(info.dtype).reshape(info.shape)

    def _fd(self, path: Path) -> int:
        fd = self._fds.get(path)
        if fd is None:
            fd = self._fds[path] = os.open(path, os.O_RDONLY)
        return fd

    def close(self) -> None:
        for fd in self._fds.values():
            os.close(fd)
        self._fds.clear()
        self._mmaps.clear()

    def __del__(self):
        self.close()

    @property
    def nbytes(self) -> int:
        return sum(info.stop - info.start for info in self.info.values())


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


# ---- LoRA adapters --------------------------------------------------------------------------------


class LoraAdapter:
    """A PEFT LoRA adapter folder as dense task vectors over a base: tau[n] = scaling * B @ A for every
    adapted weight n of the base (zeros elsewhere); `modules_to_save` copies of base weights give
    tau = w - theta0; weights the base lacks are this task's private parameters.

    PEFT names a factor `base_model.model.<module>.lora_A.weight`; its base weight is `<module>.weight`.
    """

    _FACTOR = re.compile(r"^(?:base_model\.model\.)?(.+)\.(lora_A|lora_B|lora_embedding_A|lora_embedding_B)(?:\.[^.]+)?(?:\.weight)?$")

    def __init__(self, folder: str | Path, base: Checkpoint):
        self.folder = Path(folder)
        self.config = json.loads((self.folder / ADAPTER_CONFIG).read_text())
        if self.config.get("peft_type", "LORA") != "LORA":
            raise CheckpointError(f"{self.folder}: a {self.config.get('peft_type')} adapter, only LoRA is supported")
        if self.config.get("use_dora"):
            raise CheckpointError(f"{self.folder}: DoRA adapters have no plain B @ A delta; not supported")
        weights = Checkpoint([self.folder / ADAPTER_WEIGHTS])
        factors: dict[str, dict[str, Tensor]] = {}
        self.full: dict[str, Tensor] = {}  # base weights replaced whole (modules_to_save), by base name
        self.private: dict[str, Tensor] = {}
        for name in weights.names:
            match = self._FACTOR.match(name)
            if match:
                module, kind = match.groups()
                factors.setdefault(module, {})[kind] = weights.read(name)
                continue
            plain = name.removeprefix("base_model.model.").replace(".modules_to_save.default", "")
            (self.full if plain in base else self.private)[plain] = weights.read(name)
        weights.close()
        self.deltas: dict[str, tuple[Tensor, Tensor, float, bool]] = {}
        for module, pair in factors.items():
            embedding = "lora_embedding_A" in pair
            a = pair.get("lora_embedding_A" if embedding else "lora_A")
            b = pair.get("lora_embedding_B" if embedding else "lora_B")
            if a is None or b is None:
                raise CheckpointError(f"{self.folder}: module '{module}' has only one of its LoRA factors")
            target = f"{module}.weight"
            if target not in base:
                raise CheckpointError(
                    f"{self.folder}: LoRA adapter for another base: it adapts '{target}', "
                    f"which the base {base.folder} does not have"
                )
            # PEFT's Embedding layer computes (B @ A)^T, as a fan_in_fan_out Linear does.
            fan_in_fan_out = embedding or bool(self.config.get("fan_in_fan_out"))
            shape = tuple(a.shape[1:2]) + tuple(b.shape[:1]) if fan_in_fan_out else (b.shape[0], a.shape[1])
            if shape != base.info[target].shape:
                raise CheckpointError(
                    f"{self.folder}: LoRA adapter for another base: '{target}' gets a delta of shape {shape}, "
                    f"the base's is {base.info[target].shape}"
                )
            self.deltas[target] = (a, b, self._scaling(module, a.shape[0]), fan_in_fan_out)
        for name, tensor in self.full.items():
            if tensor.shape != base.info[name].shape:
                raise CheckpointError(
                    f"{self.folder}: LoRA adapter for another base: '{name}' has shape {tuple(tensor.shape)}, "
                    f"the base's is {base.info[name].shape}"
                )
        if not self.deltas and not self.full:
            raise CheckpointError(f"{self.folder}: the adapter changes no weight of the base")
        self._cache: tuple[str, Tensor] | None = None

    def _scaling(self, module: str, rank: int) -> float:
        """PEFT's scaling: lora_alpha / r, or lora_alpha / sqrt(r) with rsLoRA; per-module patterns win."""
        alpha = self.config.get("lora_alpha", 8)
        for key, value in (self.config.get("rank_pattern") or {}).items():
            if module == key or module.endswith("." + key):
                rank = value
        for key, value in (self.config.get("alpha_pattern") or {}).items():
            if module == key or module.endswith("." + key):
                alpha = value
        return alpha / math.sqrt(rank) if self.config.get("use_rslora") else alpha / rank

    def tau(self, name: str, base: Checkpoint, start: int, stop: int) -> Tensor:
        """Flat float32 task vector of base tensor `name`, elements [start, stop)."""
        if name in self.deltas:
            cached = self._cache  # one local reference: worker threads may replace the cache meanwhile
            if cached is None or cached[0] != name:
                a, b, scaling, fan_in_fan_out = self.deltas[name]
                cached = self._cache = (name, merging.lora_delta(a, b, scaling, fan_in_fan_out).contiguous().view(-1))
            return cached[1][start:stop]
        if name in self.full:
            theta0 = base.read(name, start, stop)
            return merging.task_vector(theta0, self.full[name].reshape(-1)[start:stop].to(theta0.dtype), name)
        return torch.zeros(stop - start)


# ---- writing ----------------------------------------------------------------------------------------


def fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


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


class ShardWriter:
    """Writes tensors into `<stem>-0000i-of-0000n.safetensors` (or `<stem>.safetensors` when one shard
    is enough) of at most `max_shard_bytes` each, fsyncs them and records each file's sha256.

    With `plan` [(name, dtype, shape), ...] the shards are laid out up front and `write` may deliver a
    tensor in consecutive flat chunks, in plan order. Without a plan, whole tensors are buffered until a
    shard is full (used for sparse vectors, whose sizes are known only once computed).
    """

    def __init__(self, folder: Path, stem: str, max_shard_bytes: int, plan=None, metadata: dict | None = None):
        self.folder, self.stem, self.max_shard_bytes, self.metadata = Path(folder), stem, max_shard_bytes, metadata
        self.folder.mkdir(parents=True, exist_ok=True)
        self.files: dict[str, str] = {}  # file name -> sha256
        self.weight_map: dict[str, str] = {}
        self.sizes: dict[str, int] = {}
        self.planned = plan is not None
        self._buffer: list[tuple[str, Tensor]] = []
        self._buffered = 0
        self._io: ThreadPoolExecutor | None = None
        self._jobs: deque = deque()
        self._shards: list[list[tuple[str, torch.dtype, tuple[int, ...]]]] = []
        if self.planned:
            for entry in plan:
                size = math.prod(entry[2]) * entry[1].itemsize
                if not self._shards or (self._shard_bytes(self._shards[-1]) + size > max_shard_bytes and self._shards[-1]):
                    self._shards.append([])
                self._shards[-1].append(entry)
            self._queue = [(i, e) for i, shard in enumerate(self._shards) for e in shard]
            self._position = 0  # index into _queue of the tensor being written
            self._written = 0  # elements of that tensor written so far
            self._file = None
            self._shard = -1

    @staticmethod
    def _shard_bytes(shard) -> int:
        return sum(math.prod(shape) * dtype.itemsize for _, dtype, shape in shard)

    def _name(self, index: int, count: int) -> str:
        return f"{self.stem}.safetensors" if count == 1 else f"{self.stem}-{index + 1:05d}-of-{count:05d}.safetensors"

    def write(self, name: str, tensor: Tensor) -> None:
        if not self.planned:
            self._buffer.append((name, tensor.detach().contiguous().cpu()))
            self._buffered += tensor.numel() * tensor.element_size()
            if self._buffered >= self.max_shard_bytes:
                self._flush_buffer()
            return
        self._skip_empty()
        if self._position >= len(self._queue):
            raise CheckpointError(f"writer '{self.stem}': tensor '{name}' is not in its plan")
        shard, (planned, dtype, shape) = self._queue[self._position]
        if name != planned or tensor.dtype != dtype:
            raise CheckpointError(
                f"writer '{self.stem}': got '{name}' ({tensor.dtype}), the plan expects '{planned}' ({dtype})"
            )
        if shard != self._shard:
            self._open(shard)
        self._append(tensor)
        self._written += tensor.numel()
        numel = math.prod(shape)
        if self._written > numel:
            raise CheckpointError(f"writer '{self.stem}': more than {numel} elements written to '{name}'")
        if self._written == numel:
            self.weight_map[name] = self._current
            self._position += 1
            self._written = 0
            if self._position == len(self._queue) or self._queue[self._position][0] != shard:
                self._close_file()

    def _skip_empty(self) -> None:
        """Tensors with no elements never arrive as chunks; record them as they come up in the plan."""
        while self._position < len(self._queue) and self._written == 0:
            shard, (name, dtype, shape) = self._queue[self._position]
            if math.prod(shape):
                return
            if shard != self._shard:
                self._open(shard)
            self.weight_map[name] = self._current
            self._position += 1
            if self._position == len(self._queue) or self._queue[self._position][0] != shard:
                self._close_file()

    def _open(self, shard: int) -> None:
        self._shard = shard
        self._current = self._name(shard, len(self._shards))
        self._file = open(self.folder / self._current, "wb")
        self._digest = hashlib.sha256()
        self._append_bytes(_header_bytes(self._shards[shard], self.metadata))

    def _append(self, tensor: Tensor) -> None:
        if tensor.numel():
            self._append_bytes(memoryview(tensor.detach().contiguous().reshape(-1).view(torch.uint8).numpy()))

    def _append_bytes(self, data) -> None:
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
        """Runs file work (write, hash, fsync) in order on this writer's thread, at most a few jobs behind
        (each holds its chunk in memory); a job's error is raised here on a later call, or by close()."""
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

    def _flush_buffer(self) -> None:
        if not self._buffer:
            return
        self._shards.append([(n, t.dtype, tuple(t.shape)) for n, t in self._buffer])
        # the final count of shards is unknown while buffering: name by index, renamed in close()
        self._open(len(self._shards) - 1)
        for name, tensor in self._buffer:
            self._append(tensor)
            self.weight_map[name] = self._current
        self._close_file()
        self._buffer, self._buffered = [], 0

    def close(self) -> dict[str, str]:
        """Finish every shard; returns {file name: sha256}. Fills a planned writer's empty tensors."""
        if self.planned:
            self._skip_empty()
            if self._position < len(self._queue):
                name = self._queue[self._position][1][0]
                raise CheckpointError(f"writer '{self.stem}': tensor '{name}' was not written in full")
            self._wait()
            return self.files
        self._flush_buffer()
        if not self._shards:  # nothing to store still makes a valid, empty file
            self._shards.append([])
            self._open(0)
            self._close_file()
        self._wait()
        count = len(self._shards)
        if count > 1:  # shards were named as if each were the last one; give them their final names
            renamed = {}
            for index, old in enumerate(list(self.files)):
                new = self._name(index, count)
                os.replace(self.folder / old, self.folder / new)
                renamed[new] = self.files[old]
                self.sizes[new] = self.sizes.pop(old)
                self.weight_map = {k: (new if v == old else v) for k, v in self.weight_map.items()}
            self.files = renamed
        return self.files

    def write_index(self) -> None:
        """model.safetensors.index.json, as transformers writes it, when there is more than one shard."""
        if len(self.files) > 1:
            index = {"metadata": {"total_size": sum(self.sizes.values())}, "weight_map": self.weight_map}
            (self.folder / INDEX_FILE).write_text(json.dumps(index, indent=2))


def copy_small_files(source: Path, dest: Path, skip: Iterable[str] = ()) -> list[str]:
    """Copies a model folder's configuration and tokenizer files (everything but weights and indexes)."""
    skip = set(skip) | {INDEX_FILE, ADAPTER_CONFIG, ADAPTER_WEIGHTS}
    copied = []
    for path in sorted(Path(source).iterdir()):
        if path.is_file() and path.name not in skip and not path.name.endswith((".safetensors", ".bin", ".pt", ".pth")):
            shutil.copy2(path, dest / path.name)
            copied.append(path.name)
    return copied
