"""`export --format hf`: a checkpoint as a model folder timm and the Hugging Face Hub read
(`model.safetensors`, `config.json` in timm's layout with the label names and the preprocessing
in `pretrained_cfg`, the project's own metadata), with a model card (`README.md`) built with
huggingface_hub's ModelCard: held-out metrics measured at export, the dataset's identity, the
training options that differ from the defaults, and the licence the weights inherit from the
pretrained weights they started from; never a default licence. `--push REPO` uploads it.
"""

from __future__ import annotations

import json
import shutil
import tempfile
from pathlib import Path
from typing import Any

import torch

from convnext_cifar.config import TrainConfig, flatten, to_dict
from convnext_cifar.data.kinds import hub_dataset
from convnext_cifar.errors import UserError
from convnext_cifar.files import file_hash
from convnext_cifar.presets import PRESETS
from convnext_cifar.runtime import Runtime
from convnext_cifar.use.evaluate import EvalResult, LoadedModel, evaluate, load_held_out, load_model

FILES = ("model.safetensors", "config.json", "README.md")


def inherited_licence(cfg: TrainConfig) -> tuple[str | None, str]:
    """(the licence of the weights training started from, or None when not known; where it
    comes from, in words)."""
    spec = cfg.model.pretrained
    if spec.lower() == "none":
        return None, "trained from random initialisation, so no licence is inherited"
    if Path(spec).suffix.lower() in (".safetensors", ".pth", ".pt", ".bin"):
        return None, f"started from the file {spec}, whose licence this tool cannot read"
    from timm.models import get_pretrained_cfg

    pretrained = get_pretrained_cfg(spec)
    licence = getattr(pretrained, "license", None) if pretrained is not None else None
    return licence, f"fine-tuned from timm's {spec}, published under {licence or 'no licence'}"


def choose_licence(cfg: TrainConfig, given: str | None) -> str:
    """The card's licence: the pretrained weights' own; `given` only where none is inherited,
    and required there; a `given` that contradicts the inherited one is refused."""
    inherited, why = inherited_licence(cfg)
    if inherited and given and given.lower() != inherited.lower():
        raise UserError(f"--license {given}: these weights were {why}, and derived weights keep "
                        f"its terms; leave --license out (the card says {inherited})")
    if inherited:
        return inherited
    if not given:
        raise UserError(f"the model card needs a licence and none is inherited (the weights were "
                        f"{why}); name the one you publish under: --license mit, apache-2.0, "
                        "cc-by-4.0, ... (the Hub's licence identifiers)")
    return given


def export_hf(ckpt_path: Path, out: Path, licence: str | None = None,
              data_root: Path | None = None, say=print) -> dict[str, Any]:
    """Write the folder `out` (new, or a folder of an earlier hf export); returns the card's
    metrics. Built in a temporary folder beside it, then renamed into place."""
    out = Path(out)
    if out.exists() and not (out.is_dir() and set(p.name for p in out.iterdir()) <= set(FILES)):
        raise UserError(f"{out} exists and is not a model folder written by `export --format hf`;"
                        " give a new folder name")
    loaded = load_model(ckpt_path, rt=Runtime(torch.device("cpu"), "fp32", compile=False,
                                              channels_last=False))
    chosen = choose_licence(loaded.checkpoint.config, licence)
    data, data_cfg = load_held_out(loaded, data_root)
    result = evaluate(loaded.forward, data.val.images, data.val.labels, data_cfg.eval_batch_size,
                      loaded.normalize, loaded.rt, data.num_classes, tta="none")
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        write_folder(loaded, tmp, chosen, loaded.path)
        card = model_card(loaded, result, chosen, data.identity)
        card.save(tmp / "README.md")
        if out.exists():
            shutil.rmtree(out)
        tmp.rename(out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return metrics_of(result)


def metrics_of(result: EvalResult) -> dict[str, float]:
    return {"top1": result.top1, "balanced_accuracy": result.balanced_accuracy,
            "macro_f1": result.macro_f1, "images": result.num_images}


def write_folder(loaded: LoadedModel, folder: Path, licence: str, ckpt_path: Path) -> None:
    """model.safetensors and config.json by timm's own save_for_hf, then config.json's
    pretrained_cfg corrected: the licence chosen, not the architecture's default tag's."""
    from timm.models import save_for_hf

    cfg, ckpt = loaded.cfg, loaded.checkpoint
    mean, std = loaded.normalisation
    size = cfg.data.image_size
    data_config = {"input_size": (3, size, size), "mean": tuple(m / 255 for m in mean),
                   "std": tuple(s / 255 for s in std), "interpolation": "bilinear",
                   "crop_pct": 1.0}
    own = {"checkpoint": ckpt_path.name, "checkpoint_sha256": file_hash(ckpt_path),
           "epoch": ckpt.epoch, "weights": ckpt.weights, "metrics": ckpt.metrics,
           "dataset": ckpt.identity, "stored_size": loaded.stored_size,
           "resize": cfg.data.resize, "config": to_dict(ckpt.config)}
    save_for_hf(loaded.model, str(folder), model_config={"label_names": list(ckpt.classes)},
                safe_serialization=True, data_config=data_config)
    path = folder / "config.json"
    config = json.loads(path.read_text())
    pretrained = config["pretrained_cfg"]
    pretrained.pop("tag", None)  # the architecture's default tag: not these weights
    pretrained["license"] = licence
    config["convnext_cifar"] = own
    path.write_text(json.dumps(config, indent=2) + "\n")


def differing_options(cfg: TrainConfig) -> dict[str, Any]:
    """The training options that differ from `convnext-cifar train`'s defaults (the reference
    experiment, its first preset), dotted."""
    reference = next(iter(PRESETS.values()))()
    ours, default = flatten(to_dict(cfg)), flatten(to_dict(reference))
    skip = ("work_dir", "name", "data.root")  # where it ran, not what it is
    return {k: v for k, v in ours.items() if default.get(k) != v and k not in skip}


def model_card(loaded: LoadedModel, result: EvalResult, licence: str, identity: dict[str, Any]):
    """The README.md: YAML metadata (licence, library, base model, datasets, model-index
    results) and a body saying what the model is, how to load it and how it was trained."""
    from huggingface_hub import EvalResult as HubResult
    from huggingface_hub import ModelCard, ModelCardData

    cfg = loaded.cfg
    name = f"{cfg.model.name}-{cfg.data.dataset}"
    dataset = hub_dataset(cfg.data)
    split = "test" if dataset else "val"  # the Hub's CIFAR splits: train, test
    results = [HubResult(task_type="image-classification", dataset_type=dataset or "imagefolder",
                         dataset_name=dataset or Path(str(cfg.data.root)).name,
                         dataset_split=split, metric_type=kind, metric_name=label,
                         metric_value=round(value, 2))
               for kind, label, value in (("accuracy", "top-1 accuracy", result.top1),
                                          ("balanced_accuracy", "balanced accuracy",
                                           result.balanced_accuracy),
                                          ("f1", "macro F1", result.macro_f1))]
    inherited, why = inherited_licence(cfg)
    base = cfg.model.pretrained if inherited else None
    data = ModelCardData(license=licence, library_name="timm", model_name=name,
                         tags=["image-classification", "timm", "convnext-cifar"],
                         datasets=[dataset] if dataset else None,
                         base_model=f"timm/{base}" if base else None, eval_results=results)
    return ModelCard(f"---\n{data.to_yaml()}\n---\n" + _card_body(loaded, result, licence, why,
                                                                   identity, name, split))


def _card_body(loaded: LoadedModel, result: EvalResult, licence: str, why: str,
               identity: dict[str, Any], name: str, split: str) -> str:
    cfg = loaded.cfg
    mean, std = loaded.normalisation
    options = differing_options(loaded.checkpoint.config)
    rows = "\n".join(f"| `--{k.replace('_', '-')}` | `{json.dumps(v)}` |"
                     for k, v in sorted(options.items()))
    sizes = (f"{loaded.stored_size} px" if loaded.stored_size == cfg.data.image_size else
             f"{loaded.stored_size} px, then to {cfg.data.image_size} px")
    return f"""
# {name}

A timm `{cfg.model.name}` image classifier of {len(loaded.classes)} classes, trained with
convnext-cifar (epoch {loaded.checkpoint.epoch}, {loaded.checkpoint.weights} weights).

```python
import timm
model = timm.create_model("hf-hub:<this repo>", pretrained=True)  # or "local-dir:<folder>"
```

Input: RGB images resized (bilinear) to {sizes},
normalised with mean {list(mean)} and std {list(std)} on 0-255 pixels (`pretrained_cfg`
holds the same on 0-1). Classes, in the order of the logits: {", ".join(loaded.classes)}.

## Results

Measured at export on the {split} split ({result.num_images:,} images) of `{cfg.data.dataset}`
(files fingerprint {identity.get("val")}):

| metric | value |
| --- | --- |
| top-1 accuracy | {result.top1:.2f} % |
| balanced accuracy | {result.balanced_accuracy:.2f} % |
| macro F1 | {result.macro_f1:.2f} % |

## Training

The options that differ from `convnext-cifar train`'s defaults:

| option | value |
| --- | --- |
{rows or "| (none) | |"}

## Licence

{licence}: the weights were {why}.
"""


def push(folder: Path, repo: str, private: bool = False) -> str:
    """Upload the folder to the Hub repository `repo` (created if missing); its URL. Any
    failure (offline, no token, refused) is one UserError."""
    from huggingface_hub import HfApi
    from huggingface_hub.errors import HfHubHTTPError, HFValidationError, OfflineModeIsEnabled

    api = HfApi()
    try:
        api.create_repo(repo, private=private, exist_ok=True)
        info = api.upload_folder(folder_path=str(folder), repo_id=repo,
                                 commit_message="convnext-cifar export --format hf")
    except OfflineModeIsEnabled:
        raise UserError(f"cannot push to {repo}: HF_HUB_OFFLINE is set; the folder {folder} is "
                        "written, push it later with --push or `hf upload`") from None
    except HFValidationError as e:
        raise UserError(f"--push {repo}: {str(e).splitlines()[0]}") from None
    except HfHubHTTPError as e:
        status = getattr(e.response, "status_code", None)
        hint = ("log in first (`hf auth login`, or set HF_TOKEN)" if status in (401, 403)
                else "check the repository name and your rights to it")
        raise UserError(f"the Hub refused the push to {repo} (HTTP {status}): {hint}; the folder "
                        f"{folder} is written") from None
    except Exception as e:  # no network: connection refused, DNS, timeouts
        if not _unreachable(e):
            raise
        raise UserError(f"cannot reach the Hub at {api.endpoint} to push to {repo} "
                        f"({type(e).__name__}: {str(e).splitlines()[0][:120]}); the folder "
                        f"{folder} is written, push it when online") from None
    return str(getattr(info, "commit_url", "") or f"https://huggingface.co/{repo}")


def _unreachable(e: BaseException) -> bool:
    """A failure to reach the server: an OSError, or the HTTP client's transport errors (its
    package is huggingface_hub's choice, so it is told by the class names)."""
    return isinstance(e, OSError) or any(c.__name__ in ("TransportError", "ConnectionError")
                                         for c in type(e).__mro__)
