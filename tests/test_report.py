"""See the run (issue 20): the HTML report and its figures, the runs table's layout, MLflow
against a real SQLite store across a SIGTERM and resume, TensorBoard images and hparams."""

import base64
import io
import json
import re
import sys

import pytest
import torch
from cifar_files import learnable_images, write_cifar100, write_image_folder
from conftest import signal_at_step, small_run_args
from PIL import Image

from convnext_cifar import cli, run_report
from convnext_cifar.checkpoints import load_weights
from convnext_cifar.config import TrainConfig, load_config_file, to_dict
from convnext_cifar.evaluate import evaluate_checkpoint

FEW = ("--sched.epochs", "2", "--sched.warmup-epochs", "0", "--data.limit-train", "150",
       "--data.limit-val", "120", "--log-interval", "1")


@pytest.fixture(scope="module")
def run_dir(cifar_root, tmp_path_factory):
    """A finished 2-epoch atto run on the generated CIFAR-10, barely trained (mistakes)."""
    work = tmp_path_factory.mktemp("report") / "run"
    assert cli.main(small_run_args(cifar_root, work, *FEW, "--optim.lr", "1e-4",
                                   "--aug.randaugment", "rand-m9-n2")) == 0
    return work


def images_of(page_text):
    return re.findall(r'<img src="data:image/png;base64,([^"]+)" alt="([^"]+)">', page_text)


def test_the_report_of_a_run_is_one_page_with_every_figure_inline_and_beside(run_dir, capsys):
    assert cli.main(["report", str(run_dir)]) == 0
    page = run_dir / "report.html"
    assert capsys.readouterr().out.strip() == f"report: {page}"
    text = page.read_text()
    assert "http://" not in text and "https://" not in text  # nothing fetched: opens offline
    shown = images_of(text)
    alts = " | ".join(alt for _, alt in shown)
    for needed in ("training loss", "validation loss", "accuracy per epoch (top-1, top-5, "
                   "balanced accuracy, macro F1)", "learning rate", "gradient norm",
                   "throughput", "confusion matrix", "per-class", "most confident mistakes",
                   "as the model receives it"):
        assert needed in alts, needed
    beside = sorted(p.name for p in run_dir.glob("report-*.png"))
    assert len(beside) == len(shown) == 9
    for data, _ in shown:  # every inline image is a PNG, the same bytes as a file beside
        png = base64.b64decode(data)
        assert Image.open(io.BytesIO(png)).format == "PNG"
        assert any((run_dir / name).read_bytes() == png for name in beside)
    assert "optim.lr" in text and "aug.randaugment" in text  # options changed from defaults
    assert "finished" in text


def test_the_held_out_figures_are_right(run_dir):
    run = run_report.read_run(run_dir)
    held, data = run_report.held_out(run, "cpu", None, None)
    counts = held.confusion()
    assert int(counts.sum()) == len(data.val.images) == 120
    recorded = evaluate_checkpoint(run_dir / "best.safetensors", compile=False)
    assert counts.tolist() == recorded["confusion"]
    assert 100.0 * int(counts.diag().sum()) / 120 == pytest.approx(recorded["top1"])
    ckpt = load_weights(run_dir / "best.safetensors")
    assert held.about == (f"best.safetensors: epoch {ckpt.epoch}, chosen by top1 "
                          f"{ckpt.metrics['top1']:.2f}")
    picked = held.mistakes()
    wrong = int((held.predicted != held.labels).sum())
    assert len(picked) == min(run_report.GALLERY, wrong) and wrong > 0
    confidence = [float(held.probs[i].max()) for i in picked]
    assert all(held.predicted[i] != held.labels[i] for i in picked)
    assert confidence == sorted(confidence, reverse=True)
    others = set(range(120)) - set(picked)  # nothing left out is a more confident mistake
    assert all(held.predicted[i] == held.labels[i] or float(held.probs[i].max())
               <= confidence[-1] for i in others)


def test_the_preview_is_the_loaders_first_batch(cifar_root, tmp_path):
    from convnext_cifar.datasets import load_dataset
    from convnext_cifar.engine import build_run
    from convnext_cifar.runtime import resolve_runtime

    cfg = load_config_file_from_args(cifar_root, tmp_path, "--preset", "cifar10-official-recipe")
    data = load_dataset(cfg.data, "cpu")
    x, y = run_report.augmentation_preview(cfg, data)
    run = build_run(cfg, resolve_runtime(cfg), data=data, pretrained=False)
    real_x, real_y, _ = next(iter(run.loader.epoch(0)))
    assert torch.equal(x, real_x[:32])
    assert torch.equal(y, real_y[:32]) and y.ndim == 2  # MixUp/CutMix: soft targets
    assert cfg.aug.randaugment and cfg.aug.erasing_prob > 0  # the recipe's augmentation


def load_config_file_from_args(root, tmp_path, *preset):
    """The config `train` would run with these options (through --print-config)."""
    import contextlib

    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        assert cli.main(["train", *preset, "--data.root", str(root), "--data.no-download",
                         "--device", "cpu", "--compile", "off", "--model.name",
                         "convnextv2_atto", "--model.pretrained", "none", "--work-dir",
                         str(tmp_path / "w"), "--print-config"]) == 0
    path = tmp_path / "config.json"
    path.write_text(buf.getvalue())
    return load_config_file(path)


def test_a_report_compares_several_runs(run_dir, cifar_root, tmp_path, capsys):
    other = tmp_path / "other"
    assert cli.main(small_run_args(cifar_root, other, *FEW, "--seed", "3")) == 0
    out = tmp_path / "cmp" / "both.html"
    assert cli.main(["report", str(run_dir), str(other), "--out", str(out)]) == 0
    text = out.read_text()
    assert "2 runs" in text and "seed" in text and "optim.lr" in text
    assert len(images_of(text)) == 5 and (tmp_path / "cmp" / "both-loss.png").exists()


@pytest.mark.slow  # a training each; the CIFAR-10 report runs in the fast suite
@pytest.mark.parametrize("kind", ["cifar100", "folder"])
def test_the_report_works_on_cifar100_and_folder_runs(kind, tmp_path, capsys):
    if kind == "cifar100":
        root = tmp_path / "c100"
        write_cifar100(root, learnable_images(300, seed=0, num_classes=100),
                       learnable_images(200, seed=1, num_classes=100))
        extra = ["--data.dataset", "cifar100"]
    else:
        root = write_image_folder(tmp_path / "photos", {
            "train": {"ant": 30, "bee": 30, "cat": 30}, "val": {"ant": 8, "bee": 8, "cat": 8}})
        extra = ["--data.dataset", "folder", "--data.decode-processes", "1"]
    work = tmp_path / "run"
    assert cli.main(small_run_args(root, work, "--sched.epochs", "1", "--sched.warmup-epochs",
                                   "0", "--data.batch-size", "30", *extra)) == 0
    assert cli.main(["report", str(work)]) == 0
    text = (work / "report.html").read_text()
    classes = 100 if kind == "cifar100" else 3
    assert f"over {classes} classes" in text and "as the model receives it" in text


def test_report_errors_are_one_line(tmp_path, run_dir, monkeypatch, capsys):
    assert cli.main(["report", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "is not a run's work dir" in err
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # as if the extra were missing
    assert cli.main(["report", str(run_dir), "--out", str(tmp_path / "r.html")]) == 2
    err = capsys.readouterr().err
    assert "pip install 'convnext-cifar[report]'" in err and not (tmp_path / "r.html").exists()


def test_the_runs_table_keeps_names_and_results_whole(tmp_path, monkeypatch, capsys):
    for i in range(3):  # a dozen differing options, long run names
        work = tmp_path / f"a-rather-long-run-name-number-{i}"
        work.mkdir()
        config = to_dict(TrainConfig())
        config["name"] = work.name
        for j, key in enumerate(("lr", "weight_decay", "eps", "layer_decay")):
            config["optim"][key] = 0.1 * (i + 1) + j
        for key in ("mixup_alpha", "cutmix_alpha", "mix_prob", "switch_prob"):
            config["aug"][key] = 0.1 * i
        config["seed"], config["sched"]["epochs"] = i, 10 + i
        config["data"]["padding"], config["data"]["flip_prob"] = i, 0.1 * i
        (work / "config.json").write_text(json.dumps(config))
        (work / "metrics.jsonl").write_text(json.dumps(
            {"epoch": 1, "val_loss": 1.0, "top1": 91.25 + i, "top5": 99.0}) + "\n")
    monkeypatch.setenv("COLUMNS", "160")
    assert cli.main(["runs", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    for i in range(3):
        assert f"a-rather-long-run-name-number-{i}" in out
        assert f"{91.25 + i:.2f} (1)" in out
    assert "optim.lr=" in out and "…" not in out.split("differing")[0]
    assert max(len(line) for line in out.splitlines()) <= 160


# ---- tracking -----------------------------------------------------------------------------------

def test_mlflow_gets_params_metrics_and_artifacts_across_a_sigterm(cifar_root, tmp_path,
                                                                   monkeypatch, capsys):
    from mlflow import MlflowClient

    monkeypatch.chdir(tmp_path)  # MLflow keeps a SQLite store's artifacts in ./mlruns
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    work = tmp_path / "run"
    args = small_run_args(cifar_root, work, "--sched.epochs", "2", "--sched.warmup-epochs", "0",
                          "--data.limit-train", "100", "--data.limit-val", "60",
                          "--log-interval", "1", "--log.mlflow", uri)
    restore = signal_at_step(monkeypatch, 3)  # mid-epoch 2 of 2-step epochs: after a state
    assert cli.main(args) == 143
    restore()
    client = MlflowClient(tracking_uri=uri)
    (run,) = client.search_runs([client.get_experiment_by_name("convnext-cifar").experiment_id])
    assert run.info.status == "KILLED"
    assert cli.main(args + ["--resume", "auto"]) == 0
    (run,) = client.search_runs([run.info.experiment_id])  # the same MLflow run, continued
    assert run.info.status == "FINISHED" and run.info.run_name == "convnextv2-atto_cifar10-smoke"
    assert run.data.params["optim.lr"] == "0.004" and run.data.params["data.batch_size"] == "50"
    records = [json.loads(x) for x in (work / "metrics.jsonl").read_text().splitlines()]
    for name, key, kind in (("train/loss", "loss", "loss"), ("val/top1", "top1", "top1")):
        history = sorted((m.step, m.value) for m in client.get_metric_history(run.info.run_id,
                                                                            name))
        steps = [s for s, _ in history]
        assert steps == sorted(set(steps)), f"{name}: a point twice"
        expected = [r[key] for r in records if kind in r]
        assert [v for _, v in history] == pytest.approx(expected), f"{name}: missing points"
    artifacts = {a.path for a in client.list_artifacts(run.info.run_id)}
    assert {"best.safetensors", "report.html", "report-confusion.png"} <= artifacts
    assert (tmp_path / "mlruns").is_dir()  # where the artifacts went, not the repository


def test_an_unreachable_tracking_server_is_one_line_and_the_run_goes_on(cifar_root, tmp_path,
                                                                        capsys):
    work = tmp_path / "run"
    assert cli.main(small_run_args(cifar_root, work, "--sched.epochs", "1", "--data.limit-train",
                                   "50", "--data.limit-val", "50", "--sched.warmup-epochs", "0",
                                   "--log.mlflow", "http://127.0.0.1:9")) == 0
    err = capsys.readouterr().err
    assert err.count("MLflow") == 1 and "cannot be reached" in err
    assert (work / "best.safetensors").exists()


def test_tensorboard_gets_the_report_images_and_the_hparams(cifar_root, tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    work = tmp_path / "run"
    assert cli.main(small_run_args(cifar_root, work, "--sched.epochs", "1", "--data.limit-train",
                                   "50", "--data.limit-val", "50", "--sched.warmup-epochs", "0",
                                   "--log.tensorboard")) == 0
    acc = EventAccumulator(str(work / "tb"), size_guidance={"images": 0})
    acc.Reload()
    assert {"report/confusion", "report/augmentation"} <= set(acc.Tags()["images"])
    (image,) = acc.Images("report/confusion")
    png = (work / "report-confusion.png").read_bytes()
    assert Image.open(io.BytesIO(image.encoded_image_string)).size == Image.open(
        io.BytesIO(png)).size
    hparams = EventAccumulator(str(work / "tb" / "hparams"))
    hparams.Reload()
    assert "hparam/best_top1" in hparams.Tags()["scalars"]
    assert hparams.Scalars("hparam/best_top1")[0].value == pytest.approx(
        max(json.loads(x).get("top1", 0) for x in (work / "metrics.jsonl").read_text()
            .splitlines()))


@pytest.mark.slow
def test_the_report_opens_in_a_real_headless_chromium(run_dir, tmp_path):
    """Every image loads and the console stays clean, in a system Chromium (selenium)."""
    import shutil

    webdriver = pytest.importorskip("selenium.webdriver")
    binary = shutil.which("chromium") or shutil.which("chromium-browser")
    driver_path = shutil.which("chromedriver")
    if not (binary and driver_path):
        pytest.skip("no system Chromium (apt-get install chromium chromium-driver)")
    assert cli.main(["report", str(run_dir), "--out", str(tmp_path / "page.html")]) == 0
    options = webdriver.ChromeOptions()
    options.binary_location = binary
    for flag in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage"):
        options.add_argument(flag)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    from selenium.webdriver.chrome.service import Service

    browser = webdriver.Chrome(options=options, service=Service(driver_path))
    try:
        browser.get((tmp_path / "page.html").as_uri())
        loaded = browser.execute_script(
            "return Array.from(document.images).map(i => [i.alt, i.complete, i.naturalWidth])")
        assert len(loaded) == 9
        assert all(done and width > 100 for _, done, width in loaded), loaded
        assert all(alt for alt, _, _ in loaded)
        errors = [e for e in browser.get_log("browser") if e["level"] == "SEVERE"]
        assert errors == []
    finally:
        browser.quit()
