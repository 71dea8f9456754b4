"""Which torchvision and timm classifiers the ONNX importer runs, and what the incremental
evaluator saves on them at full size.

For one architecture (random weights, eval mode, the smallest image size it
accepts from `SIZES`), `measure_architecture` exports the module with each
exporter of `EXPORTS`, loads the bytes with `onnx_import.load_onnx_model`,
and compares the logits with onnxruntime's on the same random images. Each
row says whether it loads, the largest logit difference relative to the
largest logit, how much the logits depend on the image (random weights can
leave only the classifier's bias), and the operators the graph holds that the
importer lacks.
`render_table` writes the rows as Markdown, `render_summary` one line per
architecture. Names of the form "timm:NAME" are timm's
models (`TIMM_MODELS`: one of each of its common families). `flop_row` exports an
architecture at its full input size and gives XLA's FLOPs per query of the full and
the incremental evaluator, and `auto`'s choice (`render_flops` as Markdown). Needs
torch, torchvision and onnxruntime (onnxscript for the dynamo exporter, timm for
timm's models).
"""

from __future__ import annotations

import time

import numpy as np

from opa_jax.errors import InputError
from opa_jax.models import onnx_import, torch_export, torch_fixtures
from opa_jax.models.convention import InputConvention

SIZES = (32, 64, 96, 128, 160, 224, 299, 384, 518)  # tried in order; the first that runs
EXPORTS = (("torchscript", 17), ("torchscript", None), ("dynamo", None))  # None: the default
MAX_BYTES = 2**31 - 1  # protobuf's limit on one serialized ModelProto
NUM_IMAGES = 2


# One architecture of each family first, so that a partial run covers them all.
FIRST = (
    "resnet18",
    "mobilenet_v2",
    "mobilenet_v3_small",
    "efficientnet_b0",
    "efficientnet_v2_s",
    "googlenet",
    "inception_v3",
    "mnasnet0_5",
    "regnet_x_400mf",
    "regnet_y_400mf",
    "shufflenet_v2_x0_5",
    "squeezenet1_0",
    "vgg11",
    "vit_b_32",
    "swin_t",
    "swin_v2_t",
    "maxvit_t",
    "densenet121",
    "resnext50_32x4d",
    "wide_resnet50_2",
    "alexnet",
    "convnext_tiny",
)
# timm's common families, one model of each (random weights); `architectures` lists them
# after torchvision's when timm is installed.
TIMM_MODELS = (
    "vit_tiny_patch16_224",
    "deit_tiny_patch16_224",
    "deit_tiny_distilled_patch16_224",
    "swin_tiny_patch4_window7_224",
    "convnext_atto",
    "efficientnet_b0",
    "mobilenetv2_100",
    "mobilenetv3_small_100",
    "regnety_004",
    "resnet18",
    "resnext50_32x4d",
    "densenet121",
)
# Full-size FLOP ratios: one architecture of each family of torchvision and of timm.
FLOP_MODELS = (
    "alexnet",
    "vgg16",
    "squeezenet1_1",
    "googlenet",
    "inception_v3",
    "resnet18",
    "resnet50",
    "resnext50_32x4d",
    "wide_resnet50_2",
    "densenet121",
    "mobilenet_v2",
    "mobilenet_v3_large",
    "mnasnet1_0",
    "shufflenet_v2_x1_0",
    "efficientnet_b0",
    "efficientnet_v2_s",
    "regnet_x_400mf",
    "regnet_y_400mf",
    "convnext_tiny",
    "vit_b_16",
    "swin_t",
    "swin_v2_t",
    "maxvit_t",
) + tuple(f"timm:{name}" for name in TIMM_MODELS)
LARGE = ("large", "_l", "_h_", "b5", "b6", "b7", "16gf", "32gf", "128gf", "161", "152", "101")


def architectures() -> list[str]:
    """torchvision's classification models (those of `torchvision.models` itself): one of
    each family, then the rest, the largest last."""
    import torchvision

    names = torchvision.models.list_models(module=torchvision.models)
    try:
        import timm  # noqa: F401

        timm_names = [f"timm:{name}" for name in TIMM_MODELS]
    except ImportError:
        timm_names = []
    return timm_names + sorted(
        names,
        key=lambda name: (
            name not in FIRST,
            FIRST.index(name) if name in FIRST else 0,
            any(part in name for part in LARGE),
        ),
    )


def build(name: str):
    """The architecture with random weights (seed 0; an all-zero head, as ViT's, random),
    in eval mode; "timm:NAME" is timm's."""
    import torch

    torch.manual_seed(0)
    if name.startswith("timm:"):
        import timm

        module = timm.create_model(name[len("timm:") :], pretrained=False)
    else:
        import torchvision

        module = torchvision.models.get_model(name, weights=None)
    return torch_fixtures.nonzero_heads(module).eval()


def full_size(name: str, module) -> int:
    """The input size the architecture was designed for: timm's pretrained config, or
    torchvision's default weights' crop (224 where it has none)."""
    if name.startswith("timm:"):
        return int(module.pretrained_cfg["input_size"][-1])
    import torchvision

    weights = torchvision.models.get_model_weights(name).DEFAULT
    return int(weights.transforms().crop_size[0])


def flop_row(name: str, num_pixels: int = 1) -> dict:
    """XLA's FLOPs per query of the full and the incremental evaluator on the architecture
    at its full size (TorchScript export at opset 17), their ratio and `auto`'s choice."""
    from opa_jax import incremental

    torch_threads()
    module = build(name)
    size = full_size(name, module)
    row = {"model": name, "size": size, "pixels": num_pixels}
    row["params_m"] = round(sum(p.numel() for p in module.parameters()) / 1e6, 1)
    onnx_bytes = torch_export.export_onnx(module, (size, size, 3), exporter="torchscript", opset=17)
    model = onnx_import.load_onnx_model(onnx_bytes, InputConvention(scale=1 / 255))
    start = time.perf_counter()
    flops = incremental.flops_per_query(model, num_pixels)
    return row | {
        "gflops_full": flops["full"] / 1e9,
        "gflops_incremental": flops["incremental"] / 1e9,
        "ratio": flops["full"] / flops["incremental"],
        "auto": incremental.make_evaluator("auto", model, num_pixels).name,
        "seconds": round(time.perf_counter() - start, 1),
    }


def render_summary(rows: list[dict]) -> str:
    """One line per architecture: for each of `EXPORTS`, whether the export loads and
    its largest logit difference relative to the largest logit, else why not."""
    by_model: dict[str, dict] = {}
    for row in rows:
        by_model.setdefault(row["model"], {})[(row["exporter"], row.get("opset_asked"))] = row
    heads = [f"{exporter} {opset or 'default'}" for exporter, opset in EXPORTS]
    lines = [
        "| model | parameters (M) | size | " + " | ".join(heads) + " |",
        "| --- | --- | --- | " + " | ".join("---" for _ in heads) + " |",
    ]
    for model, measured in by_model.items():
        cells = []
        for key in EXPORTS:
            row = measured.get(key, {})
            if "rel_diff" in row:
                cells.append(f"opset {row.get('opset')}: {row['rel_diff']:.1e}")
            elif row.get("missing"):
                cells.append("lacks " + ", ".join(row["missing"]))
            else:
                cells.append(row.get("error", "-").replace("|", "/")[:70])
        first = next(iter(measured.values()))
        lines.append(
            f"| {model} | {first.get('params_m', '-')} | {first.get('size', '-')} | "
            + " | ".join(cells)
            + " |"
        )
    return "\n".join(lines) + "\n"


def render_flops(rows: list[dict]) -> str:
    """`flop_row`s as a Markdown table."""
    lines = [
        "| model | size | parameters (M) | GFLOPs per query, full | incremental | ratio | `auto` |",
        "| --- | --- | --- | --- | --- | --- | --- |",
    ]
    for row in rows:
        if "ratio" not in row:
            lines.append(f"| {row['model']} | - | - | {row.get('error', '-')[:90]} | - | - | - |")
            continue
        lines.append(
            f"| {row['model']} | {row['size']} | {row['params_m']} | {row['gflops_full']:.3g} | "
            f"{row['gflops_incremental']:.3g} | {row['ratio']:.2f} | {row['auto']} |"
        )
    return "\n".join(lines) + "\n"


def torch_threads() -> None:
    """One torch thread: the measurements run beside other work."""
    import torch

    torch.set_num_threads(1)


def smallest_size(module) -> int:
    """The first of `SIZES` at which the module runs on one image."""
    import torch

    errors = []
    for size in SIZES:
        try:
            with torch.no_grad():
                module(torch.zeros(1, 3, size, size))
            return size
        except (RuntimeError, ValueError, AssertionError, IndexError) as err:
            errors.append(f"{size}: {str(err).splitlines()[0][:120]}")
    raise ValueError(f"runs at none of {SIZES} ({'; '.join(errors[-2:])})")


def calibrate_batch_norm(module, size: int, images: int = 8) -> None:
    """Sets every batch norm's running statistics to those of random images at `size`.

    At initialisation they are 0 and 1, and through a deep network of small random
    weights (GoogLeNet's, ShuffleNet's) the features then shrink until the logits are
    the classifier's bias whatever the image, which a comparison hardly tests.
    """
    import torch

    norms = [m for m in module.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)]
    if not norms:
        return
    for norm in norms:
        norm.reset_running_stats()
        norm.momentum = None  # a cumulative average over the batches seen
    module.train()
    # Train mode can run more than eval mode (Inception's auxiliary head needs 299 pixels):
    # the first size from `size` on at which it runs.
    for calibration_size in [s for s in SIZES if s >= size]:
        pixels = torch.rand(images, 3, calibration_size, calibration_size)
        try:
            with torch.no_grad():
                module(pixels)
            break
        except (RuntimeError, ValueError, AssertionError):
            for norm in norms:
                norm.reset_running_stats()
    module.eval()


def missing_operators(model_proto) -> list[str]:
    """The graph's operators that `onnx_import.OPERATORS` lacks (domain-qualified if not ONNX)."""
    missing = set()
    for node in model_proto.graph.node:
        if node.domain not in ("", "ai.onnx"):
            missing.add(f"{node.domain}.{node.op_type}")
        elif node.op_type not in onnx_import.OPERATORS:
            missing.add(node.op_type)
    return sorted(missing)


def compare(onnx_bytes: bytes, size: int, seed: int = 0) -> dict:
    """Loads the graph with opa_jax and onnxruntime and compares their logits.

    Both get the same [0, 1] images (the module's own input); opa_jax through the
    "unit" input convention from pixels 0-255.
    """
    import onnx
    import onnxruntime

    proto = onnx.load_model_from_string(onnx_bytes)
    row = {
        "opset": next((e.version for e in proto.opset_import if e.domain in ("", "ai.onnx")), None),
        "missing": missing_operators(proto),
        "mbytes": round(len(onnx_bytes) / 2**20, 2),
    }
    pixels = np.random.default_rng(seed).integers(0, 256, (NUM_IMAGES, size, size, 3))
    pixels = pixels.astype(np.float32)
    options = onnxruntime.SessionOptions()
    options.intra_op_num_threads = 1
    runtime = onnxruntime.InferenceSession(onnx_bytes, options, providers=["CPUExecutionProvider"])
    inputs = {runtime.get_inputs()[0].name: (pixels / 255).transpose(0, 3, 1, 2)}
    expected = runtime.run(None, inputs)[0]
    start = time.perf_counter()
    try:
        model = onnx_import.load_onnx_model(onnx_bytes, InputConvention(scale=1 / 255))
        logits = np.asarray(model.apply_fn(model.params, pixels))
    except InputError as err:
        return row | {"loads": False, "error": str(err)[:300]}
    scale = max(float(np.abs(expected).max()), 1e-12)
    return row | {
        "loads": True,
        "rel_diff": float(np.abs(logits - expected).max()) / scale,
        # How much the logits depend on the image: near 0 when random weights leave the
        # features near zero and the logits are the classifier's bias, which a diff
        # then hardly tests.
        "spread": float(np.abs(expected[0] - expected[1]).max()) / scale,
        "load_seconds": round(time.perf_counter() - start, 1),
    }


def measure_architecture(name: str, exports=EXPORTS) -> list[dict]:
    """One row per (exporter, opset) of `exports` for torchvision's `name`."""
    return list(iter_rows(name, exports))


def iter_rows(name: str, exports=EXPORTS):
    """`measure_architecture`'s rows, each as soon as it is measured."""
    torch_threads()
    module = build(name)
    params = sum(p.numel() for p in module.parameters())
    base = {"model": name, "params_m": round(params / 1e6, 1)}
    try:
        size = smallest_size(module)
    except ValueError as err:
        for exporter, opset in exports:
            yield base | {
                "exporter": exporter,
                "opset_asked": opset,
                "loads": False,
                "error": str(err),
            }
        return
    base["size"] = size
    calibrate_batch_norm(module, size)
    for exporter, opset in exports:
        row = base | {"exporter": exporter, "opset_asked": opset, "opset": opset}
        if 4 * params > MAX_BYTES:
            yield row | {"loads": False, "error": "over 2 GB: no in-memory ONNX"}
            continue
        start = time.perf_counter()
        try:
            export_size, onnx_bytes = _export(module, size, exporter, opset)
        except Exception as err:  # noqa: BLE001 - any exporter failure is a result here
            message = str(err).strip().splitlines()[0] if str(err).strip() else ""
            error = f"export: {type(err).__name__}: {message}"[:300]
            yield row | {"loads": False, "error": error}
            continue
        row |= {"size": export_size, "export_seconds": round(time.perf_counter() - start, 1)}
        yield row | compare(onnx_bytes, export_size)


def _export(module, size: int, exporter: str, opset: int | None) -> tuple[int, bytes]:
    """(size, bytes) at the first size from `size` on at which the export succeeds, up to
    224: the TorchScript exporter takes an adaptive pooling only when its output size
    divides the input's (e.g. VGG's 7x7 needs 224)."""
    sizes = [s for s in SIZES if size <= s <= max(size, 224)]
    for number, export_size in enumerate(sizes, 1):
        try:
            onnx_bytes = torch_export.export_onnx(
                module, (export_size, export_size, 3), exporter=exporter, opset=opset
            )
            return export_size, onnx_bytes
        except Exception as err:  # noqa: BLE001 - retried at the next size
            if number == len(sizes) or "adaptive" not in str(err):
                raise
    raise AssertionError("unreachable")


def render_table(rows: list[dict]) -> str:
    """The rows as a Markdown table: model, exporter, opset, loads, max rel diff, spread
    (how much the logits differ between the two images, relative), missing operators."""
    lines = [
        "| model | size | exporter | opset | loads | max rel diff | spread | missing operators |",
        "| --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for row in rows:
        if "rel_diff" in row:
            diff = f"{row['rel_diff']:.1e}"
        elif row.get("missing"):
            diff = "-"
        else:
            diff = row.get("error", "-").replace("|", "/")[:90]
        lines.append(
            f"| {row['model']} | {row.get('size', '-')} | {row['exporter']} | "
            f"{row.get('opset') or 'default'} | {'yes' if row.get('loads') else 'no'} | {diff} | "
            f"{format(row['spread'], '.1e') if 'spread' in row else '-'} | "
            f"{', '.join(row.get('missing', [])) or '-'} |"
        )
    return "\n".join(lines) + "\n"
