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
