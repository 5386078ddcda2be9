"""INT8 against fp32 on this CPU, for atto and Tiny trained on generated data: img/s at batch 1
and 64 of fp32 eager PyTorch, fp32 ONNX Runtime and INT8 ONNX Runtime (`export --int8`'s
file), held-out top-1 of each, file sizes; and which node types INT8 can take (each choice of
types kept in float: top-1, agreement with fp32, speed), the measurement behind
`--int8.float-ops`' default.

    python -m benchmarks.int8 --out benchmarks/results-int8-cpu-2core.json
    python -m benchmarks.int8 --quick          # a minute: checks the script runs

The data: benchmarks/distill.py's generated CIFAR-layout task (gratings under noise: a model
learns it partly in a few epochs, so accuracy can drop). Each model trains from scratch with
the smoke preset's recipe for `--atto-epochs` / `--tiny-epochs`. Every speed is measured in this
one process, one after the other, `--seconds` each after a warm-up pass.
"""

from __future__ import annotations

import json
import sys
import tempfile
from dataclasses import dataclass, replace
from pathlib import Path

import torch
import tyro

VARIANTS = {  # name -> node types kept in float (the rest of ORT's QDQ types are quantized)
    "everything ORT quantizes": (),
    "LayerNorm float": ("LayerNormalization",),
    "head (Gemm) float": ("Gemm",),
    "LayerNorm + head float (default)": ("LayerNormalization", "Gemm"),
    "only Conv quantized": "all but Conv",
}


@dataclass(frozen=True)
class Args:
    out: Path | None = None
    """Write the results here as JSON."""
    work: Path = Path("/tmp/convnext-cifar-int8-bench")
    """Folder for the data and the runs (reused when present with the same sizes)."""
    train_images: int = 8000
    """Generated training images."""
    val_images: int = 2000
    """Generated held-out images."""
    models: tuple[str, ...] = ("convnextv2_atto", "convnextv2_tiny")
    """timm variants to train and compare."""
    atto_epochs: int = 8
    """Training epochs of atto (and any model but Tiny)."""
    tiny_epochs: int = 3
    """Training epochs of Tiny."""
    seconds: float = 2.0
    """Timing per file, batch size and engine."""
    variants: bool = True
    """Also measure each choice of node types kept in float."""
    quick: bool = False
    """Tiny sizes: checks the script end to end in about a minute."""


def train(args: Args, root: Path, name: str) -> Path:
    from benchmarks.distill import train_args
    from convnext_cifar import cli

    work = args.work / name
    if not (work / "best.safetensors").is_file():
        epochs = args.tiny_epochs if name == "convnextv2_tiny" else args.atto_epochs
        code = cli.main(train_args(args, root, work, epochs, 0, "--model.name", name))
        if code != 0:
            sys.exit(code)
    return work / "best.safetensors"


def float_ops(variant) -> tuple[str, ...]:
    from convnext_cifar.config import QDQ_OP_TYPES

    return tuple(o for o in QDQ_OP_TYPES if o != "Conv") if variant == "all but Conv" else variant


def measure(args: Args, ckpt: Path) -> dict:
    from convnext_cifar.config import Int8Config
    from convnext_cifar.runtime import Runtime
    from convnext_cifar.use import quantize as q
    from convnext_cifar.use.evaluate import evaluate_checkpoint, load_model
    from convnext_cifar.use.export import export_checkpoint

    q.SPEED_SECONDS = args.seconds
    rt = Runtime(torch.device("cpu"), "fp32", compile=False, channels_last=True)
    loaded = load_model(ckpt, rt=rt)
    data = q.calibration_data(loaded, None)
    tmp = Path(tempfile.mkdtemp(dir=args.work))
    fp32 = tmp / "fp32.onnx"
    export_checkpoint(ckpt, fp32, "onnx")
    rows = {}
    for name, variant in (VARIANTS.items() if args.variants else
                          [("LayerNorm + head float (default)", VARIANTS[
                              "LayerNorm + head float (default)"])]):
        cfg = replace(Int8Config(), float_ops=float_ops(variant))
        out = tmp / ("int8-default.onnx" if "(default)" in name else f"int8-{len(rows)}.onnx")
        q.quantize(fp32, out, q.calibration_batches(data, loaded, cfg, False), cfg, tmp)
        report = q.parity(fp32, out, data, loaded, False, cfg)
        report["int8_bytes"] = out.stat().st_size
        rows[name] = report
        print(f"  {name}: INT8 top-1 {report['int8_top1']:.2f} (fp32 {report['fp32_top1']:.2f}),"
              f" agreement {report['agreement']:.2f}%, batch 64 "
              f"{report['int8_img_per_s_batch64']:,.0f} vs {report['fp32_img_per_s_batch64']:,.0f}"
              " img/s", flush=True)
    example = loaded.normalize(data.val.images[:64])
    shares = {kind: op_time_shares(path, example) for kind, path in
              (("fp32", fp32), ("int8", tmp / "int8-default.onnx"))}
    eager = {f"eager_img_per_s_batch{n}": q.images_per_second(
        lambda x: _eager(loaded.model, x), example, n) for n in q.SPEED_BATCHES}
    top1 = evaluate_checkpoint(ckpt, device="cpu", compile=False)["top1"]
    return {"eager_top1": top1, **eager, "variants": rows, "op_time_shares": shares}


def op_time_shares(path: Path, example: torch.Tensor, runs: int = 20) -> dict[str, float]:
    """Where ONNX Runtime spends a batch-64 forward of `path`: % of the nodes' time per
    operator type (its profiler, `runs` forwards after a warm-up)."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.enable_profiling = True
    options.profile_file_prefix = str(path.with_suffix(""))
    session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    feed = {session.get_inputs()[0].name: example.contiguous().numpy()}
    for _ in range(runs + 1):
        session.run(None, feed)
    trace = json.loads(Path(session.end_profiling()).read_text())
    totals: dict[str, float] = {}
    for event in trace:
        if event.get("cat") == "Node" and event.get("name", "").endswith("_kernel_time"):
            kind = event["args"]["op_name"]
            totals[kind] = totals.get(kind, 0.0) + event["dur"]
    whole = sum(totals.values()) or 1.0
    return {k: round(100.0 * v / whole, 1)
            for k, v in sorted(totals.items(), key=lambda kv: -kv[1])}


@torch.inference_mode()
def _eager(model: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    return model(x)


def main(args: Args) -> dict:
    from benchmarks.distill import write_data
    from convnext_cifar.runtime import cpu_name
    from convnext_cifar.use.quantize import cpu_isa

    if args.quick:
        args = replace(args, train_images=400, val_images=200, atto_epochs=1, tiny_epochs=1,
                       seconds=0.1, models=("convnextv2_atto",),
                       work=args.work.with_name(args.work.name + "-quick"))
    args.work.mkdir(parents=True, exist_ok=True)
    root = args.work / f"data-{args.train_images}-{args.val_images}"
    if not (root / "cifar-10-batches-py" / "test_batch").is_file():
        write_data(root, args.train_images, args.val_images)
    results = {"cpu": cpu_name(), "isa": cpu_isa(), "torch": torch.__version__,
               "threads": torch.get_num_threads(), "models": {}}
    for name in args.models:
        print(f"{name}:", flush=True)
        results["models"][name] = measure(args, train(args, root, name))
    if args.out:
        args.out.write_text(json.dumps(results, indent=2) + "\n")
    return results


if __name__ == "__main__":
    main(tyro.cli(Args))
