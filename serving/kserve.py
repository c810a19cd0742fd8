"""The KServe v2 (Open Inference Protocol) model `premier`: its metadata and tensor decoding.

Shared by the HTTP routes (JSON, with Triton's binary-data extension that `tritonclient.http`
uses by default) and the gRPC methods (`raw_input_contents` or typed `contents`, as
`tritonclient.grpc` sends them). Both turn tensors into the same generation parameters, so the
two protocols validate identically; a bad tensor raises InvalidRequestError naming it.
"""

from __future__ import annotations

import json
import struct
from dataclasses import dataclass
from typing import Any

import numpy as np
from tritonclient.utils import deserialize_bytes_tensor, serialize_byte_tensor, triton_to_np_dtype

from premier.errors import InvalidRequestError
from serving.config import MODEL_NAME

MODEL_VERSION = "1"
PLATFORM = "premier"


@dataclass(frozen=True)
class TensorSpec:
    name: str
    datatype: str
    shape: tuple[int, ...]
    param: str  # the generation parameter it sets
    required: bool = False


INPUTS: tuple[TensorSpec, ...] = (
    TensorSpec("PROMPT", "BYTES", (1,), "prompt", required=True),
    TensorSpec("USER_ID", "BYTES", (1,), "user_id"),
    TensorSpec("SEED", "INT64", (1,), "seed"),
    TensorSpec("STEPS", "INT32", (1,), "steps"),
    TensorSpec("HEIGHT", "INT32", (1,), "height"),
    TensorSpec("WIDTH", "INT32", (1,), "width"),
    TensorSpec("GUIDANCE", "FP32", (1,), "guidance"),
)
OUTPUT = TensorSpec("IMAGE", "UINT8", (-1, -1, 3), "image")
_BY_NAME = {s.name: s for s in INPUTS}
# gRPC typed contents field per datatype (when raw_input_contents is not used)
_CONTENTS_FIELD = {
    "BYTES": "bytes_contents",
    "INT64": "int64_contents",
    "INT32": "int_contents",
    "FP32": "fp32_contents",
}


def model_metadata() -> dict[str, Any]:
    """The v2 model metadata: exactly the tensors `parse_inputs` accepts and the one it returns."""

    def tensor(s: TensorSpec) -> dict[str, Any]:
        return {"name": s.name, "datatype": s.datatype, "shape": list(s.shape)}

    return {
        "name": MODEL_NAME,
        "versions": [MODEL_VERSION],
        "platform": PLATFORM,
        "inputs": [tensor(s) for s in INPUTS],
        "outputs": [tensor(OUTPUT)],
    }


def server_metadata() -> dict[str, Any]:
    return {"name": "premier-serve", "version": _version(), "extensions": ["binary_tensor_data"]}


def check_model(name: str, version: str = "") -> None:
    if name != MODEL_NAME:
        raise UnknownModelError(f"unknown model {name!r}; this server serves {MODEL_NAME!r}")
    if version not in ("", MODEL_VERSION):
        raise UnknownModelError(f"model {name!r} has no version {version!r}; it has {MODEL_VERSION!r}")


class UnknownModelError(LookupError):
    """A model name or version this server does not serve (404 / NOT_FOUND)."""


# ---------------------------------------------------------------------- decoding
def decode_tensor(
    name: str, datatype: str, shape: list[int], raw: bytes | None = None, values: list[Any] | None = None
) -> Any:
    """One input tensor (raw little-endian bytes or a list of values) -> the Python value it carries."""
    spec = _BY_NAME.get(name)
    if spec is None:
        known = ", ".join(s.name for s in INPUTS)
        raise InvalidRequestError(name or "inputs", f"unknown input tensor {name!r}; {MODEL_NAME} takes {known}")
    if datatype != spec.datatype:
        raise InvalidRequestError(name, f"datatype must be {spec.datatype}, got {datatype!r}")
    if [int(d) for d in shape] != list(spec.shape):
        raise InvalidRequestError(name, f"shape must be {list(spec.shape)}, got {list(shape)}")
    try:
        if raw is not None:
            if datatype == "BYTES":
                arr = deserialize_bytes_tensor(raw)
            else:
                arr = np.frombuffer(raw, dtype=np.dtype(triton_to_np_dtype(datatype)).newbyteorder("<"))
        else:
            flat = np.asarray(values if values is not None else [], dtype=object).reshape(-1).tolist()
            if datatype == "BYTES":
                arr = np.array([v.encode() if isinstance(v, str) else v for v in flat], dtype=object)
                if any(not isinstance(v, bytes) for v in arr):
                    raise ValueError("BYTES data must be strings")
            else:
                if any(isinstance(v, (bool, str, bytes)) or v is None for v in flat):
                    raise ValueError(f"{datatype} data must be numbers")
                arr = np.array(flat, dtype=np.dtype(triton_to_np_dtype(datatype)))
    except (ValueError, TypeError, OverflowError, IndexError, struct.error) as e:
        raise InvalidRequestError(name, f"cannot decode the {datatype} data: {e}") from None
    if arr.size != int(np.prod(spec.shape)):
        raise InvalidRequestError(
            name, f"shape {list(shape)} needs {int(np.prod(spec.shape))} element(s); the data has {arr.size}"
        )
    value = arr.reshape(-1)[0]
    if datatype == "BYTES":
        try:
            return bytes(value).decode("utf-8")
        except UnicodeDecodeError:
            raise InvalidRequestError(name, "is not valid UTF-8") from None
    if datatype == "FP32":
        return float(value)
    return int(value)


def parameters_from(decoded: dict[str, Any]) -> dict[str, Any]:
    """{tensor name: value} -> generation parameters (names as in the /v1 JSON body)."""
    missing = [s.name for s in INPUTS if s.required and s.name not in decoded]
    if missing:
        raise InvalidRequestError(missing[0], "required input tensor is missing")
    params = {_BY_NAME[n].param: v for n, v in decoded.items()}
    if params.get("user_id") == "":
        params["user_id"] = None
    return params


def parse_http_infer(body: bytes, header_length: int | None) -> tuple[dict[str, Any], bool, str | None]:
    """A v2 HTTP infer body -> (generation parameters, binary output wanted, request id)."""
    if header_length is not None:
        if not 0 <= header_length <= len(body):
            raise InvalidRequestError(
                "Inference-Header-Content-Length", f"{header_length} is outside the body's {len(body)} bytes"
            )
        head, tail = body[:header_length], body[header_length:]
    else:
        head, tail = body, b""
    try:
        req = json.loads(head)
    except (ValueError, RecursionError) as e:  # JSONDecodeError, bad UTF-8, over-long integers, deep nesting
        raise InvalidRequestError("body", f"is not valid JSON: {str(e)[:200]}") from None
    if not isinstance(req, dict) or not isinstance(req.get("inputs"), list):
        raise InvalidRequestError("inputs", "the request must be a JSON object with an 'inputs' list")
    if not isinstance(req.get("parameters") or {}, dict):
        raise InvalidRequestError("parameters", "must be a JSON object")
    if not isinstance(req.get("outputs") or [], list):
        raise InvalidRequestError("outputs", "must be a list")
    decoded: dict[str, Any] = {}
    offset = 0
    for i, t in enumerate(req["inputs"]):
        if not isinstance(t, dict):
            raise InvalidRequestError(f"inputs[{i}]", "must be an object")
        name, datatype, shape = t.get("name"), t.get("datatype"), t.get("shape")
        if (
            not isinstance(name, str)
            or not isinstance(datatype, str)
            or not isinstance(shape, list)
            or not all(isinstance(d, int) and not isinstance(d, bool) for d in shape)
        ):
            raise InvalidRequestError(
                str(name) if isinstance(name, str) else f"inputs[{i}]",
                "needs a string 'name', a string 'datatype' and an integer list 'shape'",
            )
        if name in decoded:
            raise InvalidRequestError(name, "is given twice")
        if not isinstance(t.get("parameters") or {}, dict):
            raise InvalidRequestError(name, "parameters must be a JSON object")
        size = (t.get("parameters") or {}).get("binary_data_size")
        if size is not None:
            if not isinstance(size, int) or size < 0 or offset + size > len(tail):
                raise InvalidRequestError(
                    name, f"binary_data_size {size!r} does not fit the {len(tail) - offset} binary bytes left"
                )
            decoded[name] = decode_tensor(name, datatype, shape, raw=tail[offset : offset + size])
            offset += size
        else:
            if "data" not in t:
                raise InvalidRequestError(name, "has neither 'data' nor a binary_data_size parameter")
            decoded[name] = decode_tensor(
                name, datatype, shape, values=t["data"] if isinstance(t["data"], list) else [t["data"]]
            )
    binary = bool((req.get("parameters") or {}).get("binary_data_output", False))
    for o in req.get("outputs") or []:
        if not isinstance(o, dict) or o.get("name") != OUTPUT.name:
            got = o.get("name") if isinstance(o, dict) else o
            raise InvalidRequestError(str(got), f"unknown output tensor {got!r}; {MODEL_NAME} returns {OUTPUT.name}")
        if not isinstance(o.get("parameters") or {}, dict):
            raise InvalidRequestError(OUTPUT.name, "parameters must be a JSON object")
        binary = bool((o.get("parameters") or {}).get("binary_data", binary))
    rid = req.get("id")
    return parameters_from(decoded), binary, rid if isinstance(rid, str) else None


def http_infer_response(
    image: np.ndarray, binary: bool, request_id: str | None, parameters: dict[str, Any]
) -> tuple[bytes, int | None]:
    """(body, JSON header length for Inference-Header-Content-Length or None)."""
    out: dict[str, Any] = {"name": OUTPUT.name, "datatype": OUTPUT.datatype, "shape": list(image.shape)}
    raw = np.ascontiguousarray(image, dtype=np.uint8).tobytes()
    if binary:
        out["parameters"] = {"binary_data_size": len(raw)}
    else:
        out["data"] = image.reshape(-1).tolist()
    resp: dict[str, Any] = {
        "model_name": MODEL_NAME,
        "model_version": MODEL_VERSION,
        "outputs": [out],
        "parameters": parameters,
    }
    if request_id is not None:
        resp["id"] = request_id
    head = json.dumps(resp).encode()
    return (head + raw, len(head)) if binary else (head, None)


def parse_grpc_infer(request: Any) -> dict[str, Any]:
    """A `ModelInferRequest` -> generation parameters."""
    check_model(request.model_name, request.model_version)
    raw = list(request.raw_input_contents)
    if raw and len(raw) != len(request.inputs):
        raise InvalidRequestError("raw_input_contents", f"has {len(raw)} entries for {len(request.inputs)} inputs")
    decoded: dict[str, Any] = {}
    for i, t in enumerate(request.inputs):
        if t.name in decoded:
            raise InvalidRequestError(t.name, "is given twice")
        if raw:
            decoded[t.name] = decode_tensor(t.name, t.datatype, list(t.shape), raw=raw[i])
        else:
            field = _CONTENTS_FIELD.get(t.datatype, "bytes_contents")
            decoded[t.name] = decode_tensor(t.name, t.datatype, list(t.shape), values=list(getattr(t.contents, field)))
    for o in request.outputs:
        if o.name != OUTPUT.name:
            raise InvalidRequestError(o.name, f"unknown output tensor {o.name!r}; {MODEL_NAME} returns {OUTPUT.name}")
    return parameters_from(decoded)


def grpc_infer_response(image: np.ndarray, request_id: str, parameters: dict[str, Any]) -> Any:
    from serving.grpc_stubs import service_pb2

    resp = service_pb2.ModelInferResponse(model_name=MODEL_NAME, model_version=MODEL_VERSION, id=request_id)
    out = resp.outputs.add()
    out.name, out.datatype = OUTPUT.name, OUTPUT.datatype
    out.shape.extend(image.shape)
    resp.raw_output_contents.append(np.ascontiguousarray(image, dtype=np.uint8).tobytes())
    for k, v in parameters.items():
        p = resp.parameters[k]
        if isinstance(v, bool):
            p.bool_param = v
        elif isinstance(v, int):
            p.int64_param = v
        else:
            p.string_param = str(v)
    return resp


def grpc_metadata_response() -> Any:
    from serving.grpc_stubs import service_pb2

    meta = model_metadata()
    resp = service_pb2.ModelMetadataResponse(name=meta["name"], versions=meta["versions"], platform=meta["platform"])
    for spec_list, target in ((meta["inputs"], resp.inputs), (meta["outputs"], resp.outputs)):
        for t in spec_list:
            target.add(name=t["name"], datatype=t["datatype"], shape=t["shape"])
    return resp


def _version() -> str:
    from premier import __version__

    return __version__


__all__ = [
    "INPUTS",
    "OUTPUT",
    "model_metadata",
    "server_metadata",
    "check_model",
    "UnknownModelError",
    "parse_http_infer",
    "http_infer_response",
    "parse_grpc_infer",
    "grpc_infer_response",
    "grpc_metadata_response",
    "serialize_byte_tensor",
]
