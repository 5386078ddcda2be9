"""network.py: a host that does not answer is given up on within the probe time."""



from convnext_cifar.model import build as model_build


def test_an_unanswering_hub_is_given_up_on_within_the_probe_time(monkeypatch):
    import socket
    import threading
    import time


    released = threading.Event()

    def hangs(address, timeout=None):  # a black-holed network: no answer, no refusal
        released.wait(30)
        raise OSError("timed out")

    monkeypatch.setattr(socket, "create_connection", hangs)
    start = time.monotonic()
    assert not model_build.reachable("https://huggingface.co", 0.5)
    assert time.monotonic() - start < 1.5
    released.set()


def test_credentials_come_out_of_a_uri_and_a_shown_one_is_masked():
    from convnext_cifar.network import credentials, masked

    assert credentials("http://alice:S3CRET@host:5000/x") == ("http://host:5000/x", "alice",
                                                               "S3CRET")
    assert credentials("sqlite://a:b@/tmp/m.db") == ("sqlite:///tmp/m.db", "a", "b")
    assert credentials("postgresql://u:p%40ss@db/x") == ("postgresql://db/x", "u", "p@ss")
    assert credentials("sqlite:///m.db") == ("sqlite:///m.db", "", "")
    assert masked("postgresql://u:p%40ss@db/x") == "postgresql://u:***@db/x"
    assert masked("https://token@host/x") == "https://token@host/x"  # a user only: nothing to hide
    assert masked("file:./mlruns") == "file:./mlruns"
