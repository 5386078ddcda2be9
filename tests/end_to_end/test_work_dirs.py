"""End to end: where runs go: the next free work dir, --work-dir as given, never over results."""

import json

from support import NAME, quick_train

from convnext_cifar import cli
from convnext_cifar.config import load_config_file


def test_a_second_run_gets_the_next_free_work_dir(cifar_root, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    assert cli.main(quick_train(cifar_root)) == 0
    first = capsys.readouterr()
    assert f"-> work_dirs/{NAME}: " in first.out and "holds another run" not in first.err
    assert cli.main(quick_train(cifar_root, "--optim.lr", "1e-3")) == 0
    second = capsys.readouterr()
    assert (f"note: work_dirs/{NAME} holds another run; this one goes to work_dirs/{NAME}-2"
            in second.err)
    runs = tmp_path / "work_dirs"
    assert load_config_file(runs / NAME / "config.json").optim.lr == 4e-3
    assert load_config_file(runs / f"{NAME}-2" / "config.json").optim.lr == 1e-3
    assert (runs / NAME / "best.safetensors").exists()
    assert (runs / f"{NAME}-2" / "best.safetensors").exists()
    # --resume auto continues the newest version; `runs` alone lists work_dirs
    assert cli.main(quick_train(cifar_root, "--optim.lr", "1e-3", "--resume", "auto")) == 0
    assert f"work_dirs/{NAME}-2 is already finished: epoch 1 of 1" in capsys.readouterr().out
    assert cli.main(["runs", "--json"]) == 0
    listed = json.loads(capsys.readouterr().out)["runs"]
    assert sorted(r["name"] for r in listed) == [NAME, f"{NAME}-2"]
    assert not (runs / f"{NAME}-3").exists()


def test_an_explicit_work_dir_is_used_as_given_and_never_over_results(cifar_root, tmp_path,
                                                                      capsys):
    work = tmp_path / "mine"
    assert cli.main(quick_train(cifar_root, "--work-dir", str(work))) == 0
    capsys.readouterr()
    assert cli.main(quick_train(cifar_root, "--work-dir", str(work), "--seed", "1")) == 2
    err = capsys.readouterr().err
    assert f"work dir {work} holds the results of an earlier run" in err
    assert f"--resume {work}" in err
