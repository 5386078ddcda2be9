"""End to end: a new dataset kind is one class and one registry entry."""

import json
import subprocess
import sys
import textwrap

from support import ROOT


def test_a_new_dataset_kind_is_one_class_and_one_registry_entry(tmp_path):
    """A kind registered before the command line is imported trains, evaluates and names its
    runs with nothing else changed."""
    script = textwrap.dedent(f"""
        import torch
        from convnext_cifar.data import kinds
        from convnext_cifar.data.dataset import Dataset, DatasetKind, Split, identity_of

        class Noise(DatasetKind):
            title = "noise"
            def run_label(self, cfg): return "noise"
            def stored_size(self, cfg): return 32
            def standard_normalisation(self): return (127.5,) * 3, (64.0,) * 3
            def prepare(self, cfg): pass
            def load(self, cfg, train, host_share):
                g = torch.Generator().manual_seed(0)
                def split(n):
                    return Split(torch.randint(0, 256, (n, 3, 32, 32), dtype=torch.uint8,
                                               generator=g), torch.arange(n) % 3)
                return Dataset(split(12), ["a", "b", "c"], (127.5,) * 3, (64.0,) * 3,
                               identity_of(["a", "b", "c"], ["noise"], ["noise"]),
                               train=split(24) if train else None)

        kinds.DATASETS["noise"] = Noise()
        from convnext_cifar import cli
        work = {str(tmp_path / "run")!r}
        assert cli.main(["train", "--preset", "smoke", "--data.dataset", "noise",
                         "--sched.epochs", "1", "--sched.warmup-epochs", "0",
                         "--data.batch-size", "8", "--work-dir", work, "--device", "cpu",
                         "--compile", "off"]) == 0
        assert cli.main(["eval", work + "/best.safetensors", "--json"]) == 0
    """)
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                         cwd=ROOT, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    result = json.loads(out.stdout.splitlines()[-1])
    assert result["num_images"] == 12 and len(result["confusion"]) == 3
    assert json.loads((tmp_path / "run" / "config.json").read_text())["name"] == (
        "convnextv2-atto_noise-smoke")
