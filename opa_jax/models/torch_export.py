"""PyTorch modules as attack models: exported to ONNX in memory, then run by `onnx_import`.

`export_onnx(module, image_shape)` writes the module with `torch.onnx.export`
into an `io.BytesIO` (a dynamic batch axis, eval mode, no gradients), and
`load_torch_model` hands those bytes to `onnx_import.load_onnx_model`, so a
torch module and the same module exported to a file by hand give one model.

Two exporters: "torchscript" (`dynamo=False`, opset 17 unless `opset` says
otherwise), which needs only torch; and "dynamo" (`torch.export`, at the
exporter's default opset unless `opset` is given), which also needs onnxscript.
torch is an optional dependency: `pip install 'opa_jax[torch]'`.
"""

from __future__ import annotations

import dataclasses
import io
import warnings

from opa_jax.errors import InputError
from opa_jax.models import convention as convention_lib
from opa_jax.models import onnx_import
from opa_jax.models.base import LoadedModel
from opa_jax.models.convention import InputConvention

EXPORTERS = ("torchscript", "dynamo")
TORCHSCRIPT_OPSET = 17  # the TorchScript exporter's opset unless `opset` says otherwise


def import_torch():
    """The torch module, or an ImportError that names the extra to install."""
    try:
        import torch
    except ImportError as err:
        raise ImportError(
            "Model.from_torch needs PyTorch: pip install 'opa_jax[torch]' (torch>=2.1; "
            "for exporter='dynamo' also onnxscript)"
        ) from err
    return torch


def chw(image_shape) -> tuple[int, int, int]:
    """(C, H, W) of an image shape given as (H, W, C), or as torch's (C, H, W); C is 1 to
    4 (grayscale, RGB, ...)."""
    shape = tuple(int(d) for d in image_shape)
    if len(shape) == 3 and 1 <= shape[2] <= 4:
        return (shape[2], shape[0], shape[1])
    if len(shape) == 3 and 1 <= shape[0] <= 4:
        return shape
    raise InputError(
        f"image_shape={list(shape)}: expected (H, W, C) or (C, H, W), e.g. (32, 32, 3)"
    )


def export_onnx(
    module, image_shape, *, exporter: str = "torchscript", opset: int | None = None
) -> bytes:
    """The module as a serialized ONNX model: input `input` [batch, C, H, W], output `logits`.

    `opset` None: the exporter's own default (`load_torch_model` asks for 17 from
    "torchscript").
    The module is exported in eval mode (dropout off, batch-norm running statistics)
    and left in the mode it was in.
    """
    if exporter not in EXPORTERS:
        raise InputError(f"exporter={exporter!r}: expected one of {EXPORTERS}")
    torch = import_torch()
    if not isinstance(module, torch.nn.Module):
        raise InputError(f"got a {type(module).__name__}; expected a torch.nn.Module")
    if exporter == "dynamo":
        try:
            import onnxscript  # noqa: F401 - the dynamo exporter's dependency
        except ImportError as err:
            raise ImportError(
                "exporter='dynamo' needs onnxscript: pip install onnxscript (or use "
                "exporter='torchscript', which needs only torch)"
            ) from err
    # Batch 2, not 1: torch.export specialises a batch of 1 to a constant.
    example = torch.zeros((2, *chw(image_shape)), dtype=torch.float32)
    names = {"input_names": ["input"], "output_names": ["logits"]}
    training = module.training
    module.eval()
    # nn.MultiheadAttention's inference fast path is one fused op that the TorchScript
    # exporter cannot write; without it attention exports as MatMul and Softmax.
    mha = getattr(torch.backends, "mha", None)
    fastpath = mha.get_fastpath_enabled() if mha else None
    if mha:
        mha.set_fastpath_enabled(False)
    try:
        with torch.no_grad(), warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)  # TorchScript's notice
            warnings.simplefilter("ignore", torch.jit.TracerWarning)  # shape checks as constants
            if exporter == "torchscript":
                buffer = io.BytesIO()
                torch.onnx.export(
                    module,
                    (example,),
                    buffer,
                    dynamo=False,
                    opset_version=opset,
                    dynamic_axes={"input": {0: "batch"}, "logits": {0: "batch"}},
                    **names,
                )
                return buffer.getvalue()
            program = torch.onnx.export(
                module,
                (example,),
                dynamo=True,
                opset_version=opset,
                dynamic_shapes=({0: torch.export.Dim("batch")},),
                verbose=False,
                **names,
            )
            return program.model_proto.SerializeToString()
    finally:
        module.train(training)
        if mha:
            mha.set_fastpath_enabled(fastpath)


def load_torch_model(
    module,
    image_shape,
    *,
    input_convention: InputConvention | str | None = None,
    exporter: str = "torchscript",
    opset: int | None = None,
    name: str | None = None,
) -> LoadedModel:
    """The module as a `LoadedModel` named `name` (default `torch:ClassName`).

    `opset` None: 17 for "torchscript", the exporter's own default for "dynamo".
    `input_convention`: what the module takes, as an `InputConvention` or a name of
    `convention.NAMED` ("unit" for [0, 1] pixels, "imagenet", "cifar10", ...);
    None gives it float pixels 0-255 as they are.
    """
    if isinstance(input_convention, str):
        input_convention = convention_lib.named(input_convention)
    if opset is None and exporter == "torchscript":
        opset = TORCHSCRIPT_OPSET
    onnx_bytes = export_onnx(module, image_shape, exporter=exporter, opset=opset)
    loaded = onnx_import.load_onnx_model(onnx_bytes, input_convention)
    channels, height, width = chw(image_shape)
    if tuple(loaded.image_shape) != (height, width, channels):
        raise InputError(
            f"the exported graph takes {list(loaded.image_shape)} images; "
            f"image_shape={list(image_shape)}"
        )
    name = name or f"torch:{type(module).__name__}"
    meta = dict(loaded.meta) | {"source": name, "exporter": exporter}
    return dataclasses.replace(loaded, name=name, meta=meta)
