"""End to end: `report` writes one self-contained page per run (or comparing several), also
opened in a real headless Chromium (slow)."""

import base64
import html
import io
import json
import os
import re
import sys

import pytest
from cifar_files import learnable_images, write_cifar100, write_image_folder
from PIL import Image
from support import FEW, small_run_args

from convnext_cifar import cli


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
    caption = next(alt for _, alt in shown if "as the model receives it" in alt)
    assert "RandAugment rand-m9-n2" in caption and "horizontal flip p 0.5" in caption
    assert "MixUp" not in caption and "erasing" not in caption  # only what the run did
    assert "Most frequent confusions" in text and re.search(r"<li>\w+ → \w+ \d+ % \(\d+ of "
                                                            r"\d+\)</li>", text)
    assert str(run_dir.parent.parent) not in text.split("Learning curves")[0]  # relative paths
    assert "EMA weights against" not in text  # no EMA in this run


def series_of(page_text):
    """{figure id: [(label, colour), ...]} from the comparison page's figures."""
    return {name: json.loads(html.unescape(series)) for name, series in re.findall(
        r"<figure id=\"([^\"]+)\" data-series='([^']+)'>", page_text)}


def test_a_report_compares_several_runs(run_dir, cifar_root, tmp_path, capsys):
    other = tmp_path / "other"
    assert cli.main(small_run_args(cifar_root, other, *FEW, "--seed", "3", "--ema.decay",
                                   "0.9")) == 0
    out = tmp_path / "cmp" / "both.html"
    assert cli.main(["report", str(run_dir), str(other), "--out", str(out)]) == 0
    text = out.read_text()
    assert "2 runs" in text and "seed" in text and "optim.lr" in text
    series = series_of(text)
    assert set(series) >= {"train_loss", "val_loss", "top1", "lr", "ema_top1"}
    assert len(images_of(text)) == len(series) and (tmp_path / "cmp" / "both-top1.png").exists()
    colours = {}
    for name, lines in series.items():  # one line a run, its label once, one colour throughout
        labels = [label for label, _ in lines]
        assert len(labels) == len(set(labels)), (name, labels)
        for label, hexcolour in lines:
            assert colours.setdefault(label, hexcolour) == hexcolour, (name, label)
    assert len(colours) == 2 and len(set(colours.values())) == 2
    assert [label.split(" (")[0] for label in colours] == ["run", "other"]  # by folder
    assert len(series["top1"]) == 2 and [lab for lab, _ in series["ema_top1"]] == [
        lab for lab in colours if lab.startswith("other")]  # only the run that had EMA
    assert "top1: final / best (epoch)" in text and "EMA weights against the raw weights" in text
    assert str(cifar_root) not in text  # paths as seen from the work dir


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
    assert "pip install '.[report]' from the project's clone" in err
    assert not (tmp_path / "r.html").exists()


@pytest.mark.slow
def test_the_report_opens_in_a_real_headless_chromium(run_dir, cifar_root, tmp_path):
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
        # the comparison page: each run one colour in every chart, named once per legend
        other = tmp_path / "other"
        assert cli.main(small_run_args(cifar_root, other, *FEW, "--seed", "3")) == 0
        assert cli.main(["report", str(run_dir), str(other), "--out",
                         str(tmp_path / "both.html")]) == 0
        browser.get((tmp_path / "both.html").as_uri())
        charts = browser.execute_script(
            "return Array.from(document.querySelectorAll('figure[data-series]')).map(f => "
            "[JSON.parse(f.dataset.series), f.querySelector('img').naturalWidth])")
        assert len(charts) >= 7 and all(width > 100 for _, width in charts)
        colours = {}
        for lines, _ in charts:
            assert len({label for label, _ in lines}) == len(lines) == 2
            for label, colour in lines:
                assert colours.setdefault(label, colour) == colour
        assert len(set(colours.values())) == 2
    finally:
        browser.quit()


def test_a_data_root_named_in_bytes_that_are_not_utf8_gets_its_report(tmp_path, capsys):
    """A folder unpacked from a Windows zip (`caf\\xe9`): the page shows the byte, not a crash."""
    root = tmp_path / os.fsdecode(b"caf\xe9")
    write_image_folder(root, {"train": {"a": 6, "b": 6}, "val": {"a": 2, "b": 2}})
    work = tmp_path / "run"
    assert cli.main(small_run_args(root, work, "--data.dataset", "folder", "--sched.epochs", "1",
                                   "--sched.warmup-epochs", "0", "--data.batch-size", "4")) == 0
    assert cli.main(["report", str(work)]) == 0
    assert "caf\\xe9" in (work / "report.html").read_text(encoding="utf-8")
