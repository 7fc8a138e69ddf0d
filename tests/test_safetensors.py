"""minidiff.safetensors against the reference `safetensors` package, plus laziness, atomicity and fuzzing."""

import json
import os
import random

import pytest
import torch
from helpers import assert_same_tensors

from minidiff.loading.safetensors import DTYPES, SafetensorsError, SafetensorsFile, load_file, save_file


def random_tensor(gen: torch.Generator, dtype: torch.dtype, shape: tuple) -> torch.Tensor:
    """Random bits (every float pattern, NaNs included); bool gets valid 0/1 bytes."""
    if dtype == torch.bool:
        return torch.randint(0, 2, shape, generator=gen).bool()
    n = torch.Size(shape).numel() * dtype.itemsize
    return torch.randint(0, 256, (n,), dtype=torch.uint8, generator=gen).view(dtype).reshape(shape)


def every_dtype_and_shape() -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(0)
    shapes = [(), (0,), (3, 0, 2), (1,), (3, 5, 7), (2, 1, 1, 3)]
    return {
        f"{code.lower()}.{i}": random_tensor(gen, dtype, shape)
        for code, dtype in DTYPES.items()
        for i, shape in enumerate(shapes)
    }


def raw_file(header: dict | bytes, data: bytes = b"", length: int | None = None) -> bytes:
    """Assemble a file by hand: [u64 header length][header][data]."""
    if isinstance(header, dict):
        header = json.dumps(header).encode()
    return (len(header) if length is None else length).to_bytes(8, "little") + header + data


# --- Interoperability with the reference package -----------------------------------------------------------


def test_reads_files_written_by_the_reference(tmp_path):
    reference = pytest.importorskip("safetensors.torch")
    tensors = every_dtype_and_shape()
    metadata = {"format": "pt", "note": 'é \n \x01 "quoted"'}
    reference.save_file(tensors, tmp_path / "ref.safetensors", metadata=metadata)

    assert_same_tensors(load_file(tmp_path / "ref.safetensors"), tensors)
    with SafetensorsFile(tmp_path / "ref.safetensors") as f:
        assert f.metadata == metadata
        assert f.keys() == sorted(tensors)
        assert f.shape("f32.4") == (3, 5, 7) and f.dtype("bf16.0") == torch.bfloat16


def test_reference_reads_our_files_and_bytes_match(tmp_path):
    reference = pytest.importorskip("safetensors.torch")
    from safetensors import safe_open

    tensors = every_dtype_and_shape()
    tensors['é\n\x01"\\/ name'] = torch.arange(3.0)  # JSON escaping must match serde_json's
    for metadata in [None, {"format": "pt"}]:
        save_file(tensors, tmp_path / "ours.safetensors", metadata=metadata)
        reference.save_file(tensors, tmp_path / "ref.safetensors", metadata=metadata)
        # Same tensor order, same JSON, same padding: the files are byte-identical.
        assert (tmp_path / "ours.safetensors").read_bytes() == (tmp_path / "ref.safetensors").read_bytes()

    # The reference writes metadata in hash order, so with several keys only the parsed values can agree.
    metadata = {f"key{i}": f"value {i}" for i in range(10)}
    save_file(tensors, tmp_path / "ours.safetensors", metadata=metadata)
    assert_same_tensors(reference.load_file(tmp_path / "ours.safetensors"), tensors)
    with safe_open(tmp_path / "ours.safetensors", "pt") as f:
        assert f.metadata() == metadata


def test_saves_views_and_shared_storage_as_copies(tmp_path):
    base = torch.arange(24.0).reshape(4, 6)
    tensors = {"transposed": base.t(), "column": base[:, 1], "same": base, "alias": base}
    save_file(tensors, tmp_path / "views.safetensors")
    assert_same_tensors(load_file(tmp_path / "views.safetensors"), {k: v.contiguous() for k, v in tensors.items()})


def test_save_rejects_bad_inputs(tmp_path):
    with pytest.raises(ValueError, match="complex64"):
        save_file({"z": torch.zeros(2, dtype=torch.complex64)}, tmp_path / "a.safetensors")
    with pytest.raises(ValueError, match="metadata must map str to str"):
        save_file({"x": torch.zeros(2)}, tmp_path / "a.safetensors", metadata={"step": 3})
    with pytest.raises(ValueError, match="__metadata__"):
        save_file({"__metadata__": torch.zeros(2)}, tmp_path / "a.safetensors")
    assert list(tmp_path.iterdir()) == []


# --- Reading rules -----------------------------------------------------------------------------------------


def test_tensors_outlive_the_file_and_writes_stay_private(tmp_path):
    save_file({"x": torch.arange(4.0)}, tmp_path / "x.safetensors")
    before = (tmp_path / "x.safetensors").read_bytes()
    with SafetensorsFile(tmp_path / "x.safetensors") as f:
        x = f.get("x")
    x.add_(1)  # copy-on-write: the file must not change
    assert x.tolist() == [1.0, 2.0, 3.0, 4.0]
    assert (tmp_path / "x.safetensors").read_bytes() == before


def test_accepts_what_the_reference_accepts(tmp_path):
    """Unpadded header, misaligned tensor, null metadata, empty tensors sharing an offset, no tensors."""
    u8 = {"dtype": "U8", "shape": [1], "data_offsets": [0, 1]}
    f32 = {"dtype": "F32", "shape": [], "data_offsets": [1, 5]}
    empty = {"dtype": "F32", "shape": [0, 2], "data_offsets": [1, 1]}
    header = {"a": u8, "b": f32, "c": empty, "d": empty, "__metadata__": None}
    path = tmp_path / "odd.safetensors"
    path.write_bytes(raw_file(header, b"\x07" + torch.tensor(1.5).numpy().tobytes()))
    loaded = load_file(path)
    assert loaded["a"].tolist() == [7] and loaded["b"].item() == 1.5 and loaded["c"].shape == (0, 2)
    assert loaded["b"].data_ptr() % 4 == 0  # the misaligned float was copied to aligned memory
    path.write_bytes(raw_file({}))
    assert load_file(path) == {}


def test_opening_is_lazy(tmp_path):
    """A 4 GiB sparse file opens, and even maps its big tensor, without reading it."""
    big = 2**30  # float32 elements: 4 GiB
    header = json.dumps(
        {"big": {"dtype": "F32", "shape": [big], "data_offsets": [0, 4 * big]},
         "small": {"dtype": "U8", "shape": [8], "data_offsets": [4 * big, 4 * big + 8]}}
    ).encode()  # fmt: skip
    header = raw_file(header + b" " * (-len(header) % 8))  # aligned, else `get` must copy "big"
    path = tmp_path / "sparse.safetensors"
    with open(path, "wb") as f:
        f.write(header)
        f.truncate(len(header) + 4 * big)  # a hole: no disk blocks, reads as zeros
        f.seek(0, os.SEEK_END)
        f.write(bytes(range(8)))

    rss_before = rss_bytes()
    with SafetensorsFile(path) as f:
        assert f.shape("big") == (big,)
        assert f.get("small").tolist() == list(range(8))
        big_tensor = f.get("big")
    assert big_tensor[-1].item() == 0.0  # touches one page
    tensors = load_file(path)
    assert tensors["big"].shape == (big,)
    assert rss_bytes() - rss_before < 64 * 2**20  # far below the 4 GiB file


def rss_bytes() -> int:
    with open("/proc/self/status") as f:
        line = next(line for line in f if line.startswith("VmRSS:"))
    return int(line.split()[1]) * 1024


# --- Atomic save -------------------------------------------------------------------------------------------


def test_failed_save_keeps_the_old_file(tmp_path, monkeypatch):
    path = tmp_path / "model.safetensors"
    save_file({"old": torch.ones(3)}, path)
    old_bytes = path.read_bytes()

    with pytest.raises(ValueError):  # rejected before any file is created
        save_file({"new": torch.ones(3), "bad": torch.zeros(1, dtype=torch.complex64)}, path)

    def broken_fsync(fd):
        raise OSError("disk full")

    monkeypatch.setattr(os, "fsync", broken_fsync)  # fails after every byte was written to the temp file
    with pytest.raises(OSError, match="disk full"):
        save_file({"new": torch.ones(3)}, path)
    monkeypatch.undo()

    assert path.read_bytes() == old_bytes
    assert list(tmp_path.iterdir()) == [path]  # no temp file left behind
    save_file({"new": torch.ones(3)}, path)
    assert list(load_file(path)) == ["new"] and list(tmp_path.iterdir()) == [path]


# --- Corrupt files -----------------------------------------------------------------------------------------

TENSOR = {"dtype": "F32", "shape": [2, 2], "data_offsets": [0, 16]}

# (file bytes, words the message must contain)
BAD_FILES = [
    (b"\x01\x02\x03", "3 bytes, too short"),
    (raw_file(b"", length=0), "header length 0 is not in 1..100000000"),
    (raw_file(b"{}", length=100_000_001), "header length 100000001 is not in"),
    (raw_file(b"{}", length=9), "header length 9 runs past the end of the file (10 bytes)"),
    (raw_file(b"{\xff}"), "header is not valid UTF-8"),
    (raw_file(b"{'a': 1}"), "header is not valid JSON"),
    (raw_file(b"[]"), "header is a JSON list, not an object"),
    (raw_file(b"[" * 100_000), "header is not valid JSON: maximum recursion depth"),
    (raw_file(b'{"a": {}, "a": {}}'), "duplicate key 'a'"),
    (raw_file({"a.weight": {**TENSOR, "data_offsets": [0, 12]}}, bytes(12)),
     "tensor 'a.weight' data_offsets [0, 12] do not match shape [2, 2] x 4 bytes"),
    (raw_file({"a": {**TENSOR, "dtype": "F8_E4M3"}}, bytes(16)), "tensor 'a' has unsupported dtype 'F8_E4M3'"),
    (raw_file({"a": {**TENSOR, "shape": [-2, -2]}}, bytes(16)), "shape [-2, -2] is not a list of non-negative"),
    (raw_file({"a": {**TENSOR, "shape": [True, 4]}}, bytes(16)), "shape [True, 4] is not a list of non-negative"),
    (raw_file({"a": {**TENSOR, "shape": [0, 2**64]}}), "shape [0, 18446744073709551616] is not a list of"),
    (raw_file({"a": {**TENSOR, "shape": [2**62, 2**62]}}, bytes(16)), "has over 2**64 elements"),
    (raw_file({"a": {**TENSOR, "data_offsets": [16, 0]}}, bytes(16)), "[16, 0] are not 0 <= begin <= end <= 16"),
    (raw_file({"a": {**TENSOR, "data_offsets": [-16, 0]}}, bytes(16)), "[-16, 0] are not 0 <= begin"),
    (raw_file({"a": {**TENSOR, "data_offsets": [False, 16]}}, bytes(16)), "[False, 16] are not two integers"),
    (raw_file({"a": {**TENSOR, "extra": 1}}, bytes(16)), "tensor 'a' must be an object with exactly dtype"),
    (raw_file({"a": TENSOR, "b": TENSOR}, bytes(16)), "starts at byte 0 of the data buffer, expected 16"),
    (raw_file({"a": TENSOR}, bytes(17)), "tensors cover 16 bytes but the data buffer has 17"),
    (raw_file({"__metadata__": {"step": 3}}), "__metadata__ {'step': 3} is not an object of str -> str"),
]  # fmt: skip


@pytest.mark.parametrize("data, words", BAD_FILES, ids=[words for _, words in BAD_FILES])
def test_error_messages_name_the_file_and_defect(tmp_path, data, words):
    path = tmp_path / "weights.safetensors"
    path.write_bytes(data)
    with pytest.raises(SafetensorsError) as error:
        SafetensorsFile(path)
    message = str(error.value)
    assert message.startswith(f"{path}: ") and words in message and "\n" not in message


def mutate_header(rng: random.Random, header: dict) -> bytes:
    """One structured edit of a header: wrong types, bad numbers, unknown dtypes, duplicates."""
    names = [k for k in header if k != "__metadata__"]
    name = rng.choice(names) if names else "x"
    entry = dict(header.get(name, TENSOR))
    begin, end = entry["data_offsets"]
    edit = rng.randrange(7)
    if edit == 0:
        shape = entry["shape"]
        bad = [[-1], [2**62], [2**62, 2**62, 2], [2**64], [0, 2**64], [2**64 - 1, 0], [1.5], ["2"], [True], None, {}]
        entry["shape"] = rng.choice([*bad, shape + [1], shape[:-1]])
    elif edit == 1:
        bad = [[begin], [begin, end, end], [end, begin], [-4, end], [begin, 2**64], [begin, 10**30], None, [True, end]]
        shifted = [[begin, end + 1], [begin - 1, end - 1], [begin + 1, end + 1], [0, end - begin]]
        entry["data_offsets"] = rng.choice(bad + shifted)
    elif edit == 2:
        entry["dtype"] = rng.choice(["F8_E4M3", "f32", "U16", 5, None, "", "F32 ", "BOOL", "I64", "U8"])
    elif edit == 3 and rng.random() < 0.5:
        del entry[rng.choice(sorted(entry))]
    elif edit == 3:
        entry["extra"] = 1
    elif edit == 4:
        entry = rng.choice([[], "x", 1, None, {}])
    elif edit == 5:
        header["__metadata__"] = rng.choice([{"k": 1}, ["a"], "x", {"k": None}, None, {}, {"k": "v"}])
    header[name] = entry
    pairs = list(header.items())
    if edit == 6:  # a duplicate key, which a dict cannot hold: write the JSON text by hand
        pairs.append((name, entry))
    text = "{" + ",".join(f"{json.dumps(k)}:{json.dumps(v)}" for k, v in pairs) + "}"
    return rng.choice(["", "  "]) + text + rng.choice(["", "   ", "\n"])


def mutate(rng: random.Random, data: bytes) -> bytes:
    """A randomly damaged copy of a valid file."""
    data = bytearray(data)
    n = int.from_bytes(data[:8], "little")
    kind = rng.randrange(8)
    if kind == 0:  # a wrong header length
        length = rng.choice([0, 1, n - 1, n + 1, len(data), 2**63, 2**64 - 1, 100_000_001, rng.randrange(2**64)])
        data[:8] = length.to_bytes(8, "little")
    elif kind in (1, 2):  # random bytes anywhere (kind 1) or in the header JSON (kind 2)
        low = 8 if kind == 2 else 0
        high = 8 + n if kind == 2 else len(data)
        for _ in range(rng.randint(1, 4)):
            data[rng.randrange(low, high)] = rng.randrange(256)
    elif kind == 3 and len(data) > 8 + n:  # data bytes: the file stays valid
        data[rng.randrange(8 + n, len(data))] = rng.randrange(256)
    elif kind == 4:
        del data[rng.randrange(len(data)) :]
    elif kind == 5:  # splice in garbage
        at = rng.randrange(len(data) + 1)
        data[at:at] = rng.randbytes(rng.randint(1, 16))
    elif kind == 6:  # cut out a span
        at = rng.randrange(len(data))
        del data[at : at + rng.randint(1, 16)]
    else:  # a structured edit of the header, re-encoded with a correct length
        header = mutate_header(rng, json.loads(data[8 : 8 + n])).encode()
        data = bytearray(raw_file(header, bytes(data[8 + n :])))
    return bytes(data)


def test_fuzzed_files_load_or_raise_safetensors_error(tmp_path):
    try:
        import safetensors.torch as reference
        from safetensors import safe_open
    except ImportError:
        reference = None
    gen = torch.Generator().manual_seed(0)
    valid = []
    for i, (tensors, metadata) in enumerate([
        ({"a": random_tensor(gen, torch.float32, (2, 3)), "b": random_tensor(gen, torch.int64, ()),
          "c": random_tensor(gen, torch.bool, (5,)), "d": torch.zeros(0, 3, dtype=torch.bfloat16),
          "e": random_tensor(gen, torch.uint8, (7,))}, {"format": "pt"}),
        ({"w": random_tensor(gen, torch.float16, (4,))}, None),
        ({}, None),
    ]):  # fmt: skip
        save_file(tensors, tmp_path / f"valid{i}.safetensors", metadata=metadata)
        valid.append((tmp_path / f"valid{i}.safetensors").read_bytes())

    rng = random.Random(0)
    path = tmp_path / "fuzz.safetensors"
    outcomes = {"loaded": 0, "rejected": 0}
    for case in range(1500):
        data = mutate(rng, rng.choice(valid))
        path.write_bytes(data)
        try:
            with SafetensorsFile(path) as f:
                loaded, metadata = {name: f.get(name) for name in f.keys()}, f.metadata
        except SafetensorsError:
            outcomes["rejected"] += 1
            continue
        except Exception as e:
            pytest.fail(f"case {case}: {type(e).__name__}: {e} for file {data[:200]!r}")
        outcomes["loaded"] += 1
        # We are at least as strict as the reference, so it must read the same tensors.
        if reference is not None:
            assert_same_tensors(loaded, reference.load_file(path))
            with safe_open(path, "pt") as f:
                assert (f.metadata() or {}) == metadata
    assert outcomes["loaded"] > 50 and outcomes["rejected"] > 1000, outcomes
