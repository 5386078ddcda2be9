"""use/hub.py: `export --format hf` writes a folder timm loads with the checkpoint's logits, a
model card with the measured metrics and the licence the weights inherit (never a default), and
`--push` uploads it (against a local fake of the Hub's HTTP API) or fails in one line."""

import base64
import dataclasses
import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import huggingface_hub
import pytest
import timm
import torch
from huggingface_hub import ModelCard

from convnext_cifar import cli
from convnext_cifar.errors import UserError
from convnext_cifar.model.checkpoints import load_weights, save_weights
from convnext_cifar.use.evaluate import evaluate_checkpoint, load_held_out, load_model
from convnext_cifar.use.hub import choose_licence, differing_options, export_hf, push


def with_pretrained(src, dst, pretrained):
    """A copy of a checkpoint whose config says it started from `pretrained`."""
    ckpt = load_weights(src)
    cfg = dataclasses.replace(ckpt.config, model=dataclasses.replace(ckpt.config.model,
                                                                     pretrained=pretrained))
    save_weights(dst, ckpt.state_dict, cfg, ckpt.classes, ckpt.epoch, ckpt.metrics,
                 {"device": "cpu"}, ckpt.weights, ckpt.identity)
    return dst


@pytest.fixture(scope="module")
def fcmae(trained, tmp_path_factory):
    """The trained run's weights, as if fine-tuned from timm's FCMAE atto (cc-by-nc-4.0)."""
    return with_pretrained(trained / "best.safetensors",
                           tmp_path_factory.mktemp("fcmae") / "best.safetensors",
                           "convnextv2_atto.fcmae")


@pytest.fixture(scope="module")
def folder(fcmae, tmp_path_factory):
    out = tmp_path_factory.mktemp("hf") / "model"
    metrics = export_hf(fcmae, out)
    return out, metrics


def test_timm_loads_the_folder_with_the_checkpoints_logits(fcmae, folder):
    out, _ = folder
    assert sorted(p.name for p in out.iterdir()) == ["README.md", "config.json",
                                                     "model.safetensors"]
    model = timm.create_model(f"local-dir:{out}", pretrained=True).eval()
    loaded = load_model(fcmae, "cpu", compile=False)
    data, _ = load_held_out(loaded)
    x = loaded.normalize(data.val.images[:64])
    with torch.inference_mode():
        assert (model(x) - loaded.model.float()(x)).abs().max() <= 1e-5
    cfg = model.pretrained_cfg
    assert cfg["label_names"] == loaded.classes and cfg["input_size"] == (3, 32, 32)
    mean, std = loaded.normalisation
    assert cfg["mean"] == pytest.approx([m / 255 for m in mean])
    assert cfg["std"] == pytest.approx([s / 255 for s in std])
    assert cfg["license"] == "cc-by-nc-4.0" and "tag" not in cfg
    own = json.loads((out / "config.json").read_text())["convnext_cifar"]
    assert own["epoch"] == loaded.checkpoint.epoch and own["dataset"] == loaded.checkpoint.identity


def test_the_card_carries_the_inherited_licence_and_the_measured_metrics(fcmae, folder):
    out, metrics = folder
    card = ModelCard.load(out / "README.md")
    assert card.data.license == "cc-by-nc-4.0" and card.data.library_name == "timm"
    assert card.data.base_model == "timm/convnextv2_atto.fcmae"
    assert card.data.datasets == ["uoft-cs/cifar10"]
    expected = evaluate_checkpoint(fcmae, device="cpu", compile=False)
    from convnext_cifar.use.evaluate import EvalResult

    result = EvalResult(300, 0, 0, 0, expected["confusion"])
    values = {r.metric_type: r.metric_value for r in card.data.eval_results}
    assert values == {"accuracy": round(expected["top1"], 2),
                      "balanced_accuracy": round(result.balanced_accuracy, 2),
                      "f1": round(result.macro_f1, 2)}
    assert metrics["top1"] == pytest.approx(expected["top1"])
    assert all(r.dataset_split == "test" for r in card.data.eval_results)
    assert "fine-tuned from timm's convnextv2_atto.fcmae, published under cc-by-nc-4.0" in card.text
    assert "| `--model.name` | `\"convnextv2_atto\"` |" in card.text
    assert "| `--data.limit-train` | `300` |" in card.text


def test_the_licence_is_inherited_or_given_never_defaulted(trained, fcmae, tmp_path):
    scratch = load_weights(trained / "best.safetensors").config
    with pytest.raises(UserError, match="needs a licence and none is inherited .*random init"):
        choose_licence(scratch, None)
    assert choose_licence(scratch, "mit") == "mit"
    fine_tuned = load_weights(fcmae).config
    assert choose_licence(fine_tuned, None) == "cc-by-nc-4.0"
    with pytest.raises(UserError, match="--license mit: these weights were fine-tuned from"):
        choose_licence(fine_tuned, "mit")
    from_file = dataclasses.replace(scratch, model=dataclasses.replace(
        scratch.model, pretrained="/somewhere/weights.pth"))
    with pytest.raises(UserError, match="started from the file /somewhere/weights.pth"):
        choose_licence(from_file, None)
    out = tmp_path / "scratch"
    export_hf(trained, out, "apache-2.0")
    assert ModelCard.load(out / "README.md").data.license == "apache-2.0"
    assert "base_model" not in (out / "README.md").read_text().split("---")[1]


def test_the_options_listed_are_those_that_differ_from_the_defaults(trained):
    options = differing_options(load_weights(trained / "best.safetensors").config)
    assert options["model.name"] == "convnextv2_atto" and options["sched.epochs"] == 2
    assert "optim.lr" not in options and "work_dir" not in options
    assert "data.root" not in options  # where it ran, not what it is


def test_a_folder_that_is_not_an_export_is_not_replaced(fcmae, tmp_path):
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("keep me")
    with pytest.raises(UserError, match="is not a model folder written by `export --format hf`"):
        export_hf(fcmae, tmp_path / "mine")
    assert (tmp_path / "mine" / "notes.txt").read_text() == "keep me"


# ---- push, against a local fake of the Hub's HTTP API ------------------------------------------

class FakeHub(BaseHTTPRequestHandler):
    """create_repo, preupload (every file inline) and commit, as the Hub answers them; the
    committed files are kept in `files`. `status`: answer every request with it instead."""

    files: dict = {}
    status = 200

    def log_message(self, *args):
        pass

    def _reply(self, obj, code=200):
        body = json.dumps(obj).encode()
        self.send_response(code)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def _body(self):
        return self.rfile.read(int(self.headers.get("Content-Length") or 0))

    def do_GET(self):
        if self.status != 200:
            return self._reply({"error": "Invalid credentials"}, self.status)
        self._reply({})

    def do_POST(self):
        body, base = self._body(), f"http://127.0.0.1:{self.server.server_port}"
        if self.status != 200:
            return self._reply({"error": "Invalid credentials"}, self.status)
        if self.path.endswith("/preupload/main"):
            return self._reply({"files": [{"path": f["path"], "uploadMode": "regular",
                                           "shouldIgnore": False}
                                          for f in json.loads(body)["files"]]})
        if "/commit/" in self.path:
            for line in body.splitlines():
                item = json.loads(line)
                if item["key"] == "file":
                    value = item["value"]
                    FakeHub.files[value["path"]] = base64.b64decode(value["content"])
            return self._reply({"commitUrl": f"{base}/user/model/commit/{'a' * 40}",
                                "commitOid": "a" * 40})
        self._reply({"url": f"{base}/user/model", "name": "user/model"})


@pytest.fixture
def hub(monkeypatch):
    server = ThreadingHTTPServer(("127.0.0.1", 0), FakeHub)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    monkeypatch.setattr(huggingface_hub.constants, "ENDPOINT",
                        f"http://127.0.0.1:{server.server_port}")
    monkeypatch.setenv("HF_TOKEN", "hf_test_token")
    FakeHub.files, FakeHub.status = {}, 200
    yield FakeHub
    server.shutdown()


def test_push_uploads_the_folder_as_written(folder, hub):
    out, _ = folder
    url = push(out, "user/model")
    assert url.endswith("/user/model/commit/" + "a" * 40)
    assert hub.files == {p.name: p.read_bytes() for p in out.iterdir()}


def test_the_command_writes_and_pushes(fcmae, hub, tmp_path, capsys):
    out = tmp_path / "model"
    assert cli.main(["export", str(fcmae), str(out), "--format", "hf", "--push",
                     "user/model"]) == 0
    said = capsys.readouterr().out
    assert "model.safetensors, config.json, README.md (held-out top-1" in said
    assert "pushed to http://127.0.0.1" in said and set(hub.files) == set(FILES_WRITTEN)


FILES_WRITTEN = ("README.md", "config.json", "model.safetensors")


def test_a_refused_push_is_one_line_and_the_folder_stays(folder, hub):
    out, _ = folder
    hub.status = 401
    with pytest.raises(UserError, match=r"the Hub refused the push to user/model \(HTTP 401\): "
                                        "log in first"):
        push(out, "user/model")
    assert (out / "model.safetensors").is_file()


def test_a_push_without_network_is_one_line(folder, monkeypatch, capsys, tmp_path):
    out, _ = folder
    monkeypatch.setattr(huggingface_hub.constants, "ENDPOINT", "http://127.0.0.1:9")
    monkeypatch.setenv("HF_TOKEN", "hf_test_token")
    with pytest.raises(UserError, match="cannot reach the Hub at http://127.0.0.1:9 to push to "
                                        "user/model .*push it when online"):
        push(out, "user/model")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(UserError, match="HF_HUB_OFFLINE is set"):
        push(out, "user/model")


def test_options_of_another_format_are_one_line(fcmae, tmp_path, capsys):
    for args, says in ((["x.pt2", "--int8"], "--int8 writes an ONNX file, not pt2"),
                       (["x.onnx", "--license", "mit"], "--license belongs to --format hf"),
                       (["x.onnx", "--push", "u/m"], "--push belongs to --format hf"),
                       (["x.bin"], "cannot tell the export format from 'x.bin'")):
        assert cli.main(["export", str(fcmae), str(tmp_path / args[0]), *args[1:]]) == 2
        assert says in capsys.readouterr().err
    assert list(tmp_path.iterdir()) == []
