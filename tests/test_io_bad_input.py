"""hadakron.io reading bad files: each case raises AdapterFileError (or reports a problem) naming file and key."""
from __future__ import annotations

import json
import struct

import pytest
import torch

from hadakron.io import HEADER_LIMIT_BYTES, AdapterFileError, read_adapter

M = "lora_unet_input_blocks_4_1_transformer_blocks_0_attn1_to_q"


def _raw_file(path, header: dict, data: bytes, *, length: int | None = None) -> None:
    """Write a safetensors-shaped file by hand (independent of hadakron's writer)."""
    raw = json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(raw) if length is None else length) + raw + data)


def _f32(*values: float) -> bytes:
    return struct.pack(f"<{len(values)}f", *values)


def _good(path, tensors: dict[str, torch.Tensor]) -> None:
    """A valid file: tensors as float32 (or int64) laid out one after another."""
    header, data = {}, b""
    for name, t in tensors.items():
        if t.dtype == torch.int64:
            b, dt = struct.pack(f"<{t.numel()}q", *t.reshape(-1).tolist()), "I64"
        else:
            b, dt = _f32(*t.reshape(-1).tolist()), "F32"
        header[name] = {"dtype": dt, "shape": list(t.shape), "data_offsets": [len(data), len(data) + len(b)]}
        data += b
    _raw_file(path, header, data)


def _error(path) -> AdapterFileError:
    with pytest.raises(AdapterFileError) as info:
        read_adapter(path)
    assert str(path) in str(info.value)
    return info.value


def test_not_a_safetensors_file(tmp_path):
    p = tmp_path / "notes.safetensors"
    p.write_text("this is a text file, not tensors\n")
    e = _error(p)
    assert "not a safetensors file" in str(e) and "byte 8" in str(e)
    tiny = tmp_path / "tiny.safetensors"
    tiny.write_bytes(b"\x01\x02")
    e = _error(tiny)
    assert "not a safetensors file" in str(e) and "2-byte file" in str(e)
    pickle_zip = tmp_path / "model.ckpt"
    pickle_zip.write_bytes(b"PK\x03\x04" + b"\x00" * 200)
    assert "not a safetensors file" in str(_error(pickle_zip))


def test_missing_file_and_directory(tmp_path):
    assert "no such file" in str(_error(tmp_path / "absent.safetensors"))
    assert "not a regular file" in str(_error(tmp_path))


def test_header_too_large(tmp_path):
    p = tmp_path / "huge.safetensors"
    p.write_bytes(struct.pack("<Q", HEADER_LIMIT_BYTES + 1) + b"{" + b" " * 100)
    e = _error(p)
    assert "header too large" in str(e) and str(HEADER_LIMIT_BYTES + 1) in str(e)


def test_truncated_header(tmp_path):
    p = tmp_path / "cut.safetensors"
    _raw_file(p, {f"{M}.alpha": {"dtype": "F32", "shape": [], "data_offsets": [0, 4]}}, _f32(1.0))
    full = p.read_bytes()
    p.write_bytes(full[:30])
    e = _error(p)
    assert "truncated" in str(e) and "30 bytes" in str(e)


def test_truncated_data_names_the_key(tmp_path):
    p = tmp_path / "cut.safetensors"
    _good(p, {f"{M}.alpha": torch.tensor(1.0), f"{M}.hada_w1_a": torch.ones(4, 2)})
    p.write_bytes(p.read_bytes()[:-5])
    e = _error(p)
    assert "out of range" in str(e) and e.key == f"{M}.hada_w1_a"
    assert "data end 36" in str(e) and "<= 31" in str(e)


def test_header_json_invalid(tmp_path):
    p = tmp_path / "badjson.safetensors"
    raw = b'{"a": {"dtype": "F32", '
    p.write_bytes(struct.pack("<Q", len(raw)) + raw)
    assert "not valid JSON" in str(_error(p))
    q = tmp_path / "list.safetensors"
    raw = b"{}"
    q.write_bytes(struct.pack("<Q", 2) + raw)
    assert read_adapter(q).tensors == {}  # an empty header is a valid (empty) file


def test_offsets_out_of_range_and_overlapping(tmp_path):
    p = tmp_path / "range.safetensors"
    _raw_file(p, {f"{M}.alpha": {"dtype": "F32", "shape": [], "data_offsets": [8, 12]}}, _f32(1.0))
    e = _error(p)
    assert e.key == f"{M}.alpha" and "out of range" in str(e)
    q = tmp_path / "overlap.safetensors"
    _raw_file(q, {"a.alpha": {"dtype": "F32", "shape": [], "data_offsets": [0, 4]},
                  "b.alpha": {"dtype": "F32", "shape": [], "data_offsets": [0, 4]}}, _f32(1.0, 2.0))
    e = _error(q)
    assert "overlaps" in str(e) and e.key in ("a.alpha", "b.alpha")
    gap = tmp_path / "gap.safetensors"
    _raw_file(gap, {"a.alpha": {"dtype": "F32", "shape": [], "data_offsets": [4, 8]}}, _f32(1.0, 2.0))
    assert "gap" in str(_error(gap))


def test_size_dtype_and_metadata_mismatches(tmp_path):
    p = tmp_path / "size.safetensors"
    _raw_file(p, {f"{M}.hada_w1_a": {"dtype": "F32", "shape": [2, 2], "data_offsets": [0, 8]}}, _f32(1, 2))
    e = _error(p)
    assert e.key == f"{M}.hada_w1_a" and "16 bytes" in e.expected and "8 bytes" in e.found
    q = tmp_path / "dtype.safetensors"
    _raw_file(q, {"x.alpha": {"dtype": "F7", "shape": [], "data_offsets": [0, 4]}}, _f32(1))
    assert "unsupported tensor dtype" in str(_error(q))
    r = tmp_path / "meta.safetensors"
    _raw_file(r, {"__metadata__": {"ss_network_dim": 8}, "x.alpha": {"dtype": "F32", "shape": [], "data_offsets": [0, 4]}},
              _f32(1))
    e = _error(r)
    assert e.key == "__metadata__.ss_network_dim" and "metadata value is not a string" in str(e)


def test_nan_and_inf_are_problems_naming_the_key(tmp_path):
    p = tmp_path / "nan.safetensors"
    w = torch.ones(4, 2)
    w[0, 0], w[1, 1], w[2, 0] = float("nan"), float("inf"), float("-inf")
    _good(p, {f"{M}.alpha": torch.tensor(2.0), f"{M}.hada_w1_a": w, f"{M}.hada_w1_b": torch.ones(2, 3),
              f"{M}.hada_w2_a": torch.ones(4, 2), f"{M}.hada_w2_b": torch.ones(2, 3)})
    f = read_adapter(p)
    assert f.problems == [f"{M}.hada_w1_a: 1 NaN and 2 Inf values out of 8"]


def _loha(r1=2, r2=2, out=4, inn=3):
    return {"alpha": torch.tensor(2.0), "hada_w1_a": torch.ones(out, r1), "hada_w1_b": torch.ones(r1, inn),
            "hada_w2_a": torch.ones(out, r2), "hada_w2_b": torch.ones(r2, inn)}


def _problems(tmp_path, params: dict[str, torch.Tensor], module: str = M) -> list[str]:
    p = tmp_path / "m.safetensors"
    _good(p, {f"{module}.{k}": v for k, v in params.items()})
    return read_adapter(p).problems


def test_good_modules_have_no_problems(tmp_path):
    assert _problems(tmp_path, _loha()) == []
    tucker = {"alpha": torch.tensor(1.0), "hada_w1_a": torch.ones(2, 5), "hada_w1_b": torch.ones(2, 6),
              "hada_t1": torch.ones(2, 2, 3, 3), "hada_w2_a": torch.ones(3, 5), "hada_w2_b": torch.ones(3, 6),
              "hada_t2": torch.ones(3, 3, 3, 3)}
    assert _problems(tmp_path, tucker) == []
    lokr = {"alpha": torch.tensor(4, dtype=torch.int64), "lokr_w1": torch.ones(4, 8),
            "lokr_w2_a": torch.ones(10, 2), "lokr_w2_b": torch.ones(2, 20)}
    assert _problems(tmp_path, lokr) == []
    lora = {"alpha": torch.tensor(1.0), "lora_up.weight": torch.ones(6, 2), "lora_down.weight": torch.ones(2, 5)}
    assert _problems(tmp_path, lora) == []


def test_missing_tensor_is_named(tmp_path):
    params = _loha()
    del params["hada_w1_b"]
    assert _problems(tmp_path, params) == [
        f"{M}: missing hada_w1_b (present: alpha, hada_w1_a, hada_w2_a, hada_w2_b)"]
    lokr = {"alpha": torch.tensor(1.0), "lokr_w1": torch.ones(2, 2), "lokr_w2_a": torch.ones(3, 2)}
    (problem,) = _problems(tmp_path, lokr)
    assert problem.startswith(f"{M}: missing lokr_w2 (or lokr_w2_a and lokr_w2_b)")
    tucker = _loha()
    tucker["hada_t1"] = torch.ones(2, 2, 3, 3)
    assert f"{M}: has hada_t1 without hada_t2" in _problems(tmp_path, tucker)


def test_shapes_that_do_not_multiply_out(tmp_path):
    params = _loha()
    params["hada_w2_b"] = torch.ones(3, 3)  # rank 3 against hada_w2_a's 2 columns
    assert _problems(tmp_path, params) == [
        f"{M}: hada_w2_a [4, 2] does not multiply with hada_w2_b [3, 3]: "
        "expected hada_w2_a.shape[1] == hada_w2_b.shape[0], found 2 vs 3"]
    params = _loha()
    params["hada_w2_b"] = torch.ones(2, 7)
    assert _problems(tmp_path, params) == [
        f"{M}: Hadamard factors differ in shape: (w1_a@w1_b) is [4, 3], (w2_a@w2_b) is [4, 7]"]
    lora = {"alpha": torch.tensor(1.0), "lora_up.weight": torch.ones(6, 4), "lora_down.weight": torch.ones(2, 5)}
    (problem,) = _problems(tmp_path, lora)
    assert "lora_up.weight [6, 4] does not multiply with lora_down.weight [2, 5]" in problem
    lokr = {"alpha": torch.tensor(1.0), "lokr_w1": torch.ones(2, 2), "lokr_w1_a": torch.ones(2, 1),
            "lokr_w2": torch.ones(3, 3)}
    assert _problems(tmp_path, lokr) == [f"{M}: has both lokr_w1 and lokr_w1_a; expected one form of W1"]


def test_unknown_names_missing_alpha_and_mixed_algorithms(tmp_path):
    params = _loha()
    params["hada_w3_a"] = torch.ones(1)
    assert _problems(tmp_path, params) == [f"{M}.hada_w3_a: unknown parameter name (not LoHa, LoKr or LoRA)"]
    params = _loha()
    del params["alpha"]
    assert _problems(tmp_path, params) == [f"{M}.alpha: missing (loaders then use scale 1.0)"]
    params["alpha"] = torch.ones(2)
    assert _problems(tmp_path, params) == [f"{M}.alpha: expected one value (0-d), found shape [2]"]
    params = _loha()
    params["lokr_w1"] = torch.ones(2, 2)
    (problem,) = _problems(tmp_path, params)
    assert problem.startswith(f"{M}: mixes parameters of loha and lokr")
    p = tmp_path / "noparam.safetensors"
    _good(p, {"loose_tensor": torch.ones(2), **{f"{M}.{k}": v for k, v in _loha().items()}})
    assert read_adapter(p).problems == ["loose_tensor: key has no '.<parameter>' suffix"]


def test_factor_dimensions_checked_by_ops(tmp_path):
    lokr = {"alpha": torch.tensor(1.0), "lokr_w1": torch.ones(2, 2, 3, 3), "lokr_w2": torch.ones(3, 3)}
    (problem,) = _problems(tmp_path, lokr)
    assert problem.startswith(f"{M}: ") and "lokr_w1" in problem and "[2, 2, 3, 3]" in problem.replace("(", "[").replace(")", "]")


def test_large_finite_values_are_not_reported(tmp_path):
    params = _loha()
    params["hada_w1_a"] = torch.full((4, 2), 3.0e38)  # finite, but their float32 sum overflows
    assert _problems(tmp_path, params) == []


def test_checkpoint_is_not_an_adapter(tmp_path):
    p = tmp_path / "sd_xl_base.safetensors"
    _good(p, {"model.diffusion_model.input_blocks.0.0.weight": torch.ones(4, 2),
              "model.diffusion_model.input_blocks.0.0.bias": torch.ones(4)})
    e = _error(p)
    assert "not an adapter file" in str(e) and "2 tensors such as 'model.diffusion_model.input_blocks.0.0.bias'" in str(e)
