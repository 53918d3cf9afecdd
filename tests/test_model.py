"""The model: 8 outputs, dropout before the head, weights from a file / the HF cache / nowhere, and never the
network (the hub probe is replaced in every test; HF_HOME points at an empty or fake cache in tmp_path)."""
import socket
import time

import pytest
import timm
import torch
from safetensors.torch import save_file

from spinestream.engine import model as M
from spinestream.engine.config import ModelConfig
from spinestream.engine.model import PretrainedUnavailable, build_model, check_state_dict, data_config, model_fingerprint

TINY = "test_efficientnet"  # ~0.1 M params, builds in milliseconds
TINY_HUB = "timm/test_efficientnet.r160_in1k"  # its pretrained_cfg['hf_hub_id']
REAL_REACHABLE = M._reachable  # the autouse fixture replaces it in every test


@pytest.fixture(autouse=True)
def no_network(monkeypatch, tmp_path):
    """No test reaches the network: the hub probe and any non-loopback connect fail the test; HF_HOME is an
    empty cache in tmp_path."""

    def probe(host, port, timeout=M.HUB_PROBE_TIMEOUT_S):
        raise AssertionError(f"the hub probe ran ({host}:{port})")

    monkeypatch.setattr(M, "_reachable", probe)
    real_connect = socket.socket.connect

    def connect(sock, address):  # belt and braces: loopback only, whoever asks
        if sock.family in (socket.AF_INET, socket.AF_INET6) and address[0] not in ("127.0.0.1", "::1"):
            raise AssertionError(f"a test tried to connect to {address}")
        return real_connect(sock, address)

    monkeypatch.setattr(socket.socket, "connect", connect)
    for var in ("HF_HUB_CACHE", "HUGGINGFACE_HUB_CACHE", "HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HF_ENDPOINT",
                "HTTPS_PROXY", "https_proxy"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))


def cfg(**kw) -> ModelConfig:
    return ModelConfig(**{"name": TINY, "pretrained": False, **kw})


def imagenet_state(seed: int = 1) -> dict:
    """A 1000-class state dict for TINY, with weights unlike a fresh init."""
    torch.manual_seed(seed)
    m = timm.create_model(TINY, num_classes=1000)
    with torch.no_grad():
        for p in m.parameters():
            p.add_(torch.randn_like(p))
    return m.state_dict()


def assert_backbone_equal(model, state):
    own = model.state_dict()
    head = {"classifier.weight", "classifier.bias"}
    assert own["classifier.weight"].shape == (8, state["classifier.weight"].shape[1])
    for k, v in state.items():
        if k not in head:
            assert torch.equal(own[k], v), k


def test_output_shape_and_dropout():
    model = build_model(cfg()).eval()
    with torch.no_grad():
        assert model(torch.randn(2, 3, 32, 32)).shape == (2, 8)
    assert model.drop_rate == 0.2  # efficientnet applies F.dropout(drop_rate) right before the classifier
    assert build_model(cfg(drop_rate=0.0)).drop_rate == 0.0


def test_dropout_acts_in_train_mode_only():
    model = build_model(cfg(drop_rate=0.5))
    x = torch.randn(2, 3, 32, 32)
    model.eval()
    with torch.no_grad():
        assert torch.equal(model(x), model(x))
    model.train()
    torch.manual_seed(0)
    with torch.no_grad():
        assert not torch.equal(model(x), model(x))


def test_random_init_prints_nothing(capsys):
    build_model(cfg())
    assert capsys.readouterr() == ("", "")


@pytest.mark.parametrize("fmt", ["pth", "wrapped", "safetensors"])
def test_pretrained_path_drops_only_the_imagenet_head(tmp_path, fmt):
    state = imagenet_state()
    path = tmp_path / f"w.{'safetensors' if fmt == 'safetensors' else 'pth'}"
    if fmt == "safetensors":
        save_file(state, str(path))
    else:
        torch.save({"state_dict": state, "epoch": 3} if fmt == "wrapped" else state, path)
    model = build_model(cfg(pretrained_path=str(path)))
    assert_backbone_equal(model, state)


def test_pretrained_path_keeps_a_head_that_fits(tmp_path):
    src = build_model(cfg())
    with torch.no_grad():
        src.classifier.weight.fill_(0.5)
    torch.save({"model": src.state_dict()}, tmp_path / "w.pt")
    model = build_model(cfg(pretrained_path=str(tmp_path / "w.pt")))
    assert torch.equal(model.state_dict()["classifier.weight"], src.state_dict()["classifier.weight"])


def test_pretrained_path_of_another_architecture_fails(tmp_path):
    torch.save(timm.create_model("test_resnet", num_classes=1000).state_dict(), tmp_path / "resnet.pth")
    with pytest.raises(ValueError, match=r"resnet\.pth: weights do not fit model 'test_efficientnet'.*missing "
                                         r"\(\d+\): conv_stem\.weight.*unexpected \(\d+\): "):
        build_model(cfg(pretrained_path=str(tmp_path / "resnet.pth")))


def test_pretrained_path_with_a_changed_backbone_shape_fails(tmp_path):
    state = imagenet_state()
    state["conv_stem.weight"] = state["conv_stem.weight"][:, :1]  # a 1-channel stem
    torch.save(state, tmp_path / "w.pth")
    with pytest.raises(ValueError, match=r"shape mismatch \(1\): conv_stem\.weight \(\d+, 1, 3, 3\) vs model"):
        build_model(cfg(pretrained_path=str(tmp_path / "w.pth")))


def test_pretrained_path_missing_or_not_weights(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"model\.pretrained_path: no file .*nope\.pth"):
        build_model(cfg(pretrained_path=str(tmp_path / "nope.pth")))
    (tmp_path / "junk.pth").write_bytes(b"not a torch file")
    with pytest.raises(ValueError, match="not a loadable weights file"):
        build_model(cfg(pretrained_path=str(tmp_path / "junk.pth")))
    torch.save({"epoch": 3}, tmp_path / "meta.pth")
    with pytest.raises(ValueError, match="expected a state dict"):
        build_model(cfg(pretrained_path=str(tmp_path / "meta.pth")))


def test_pretrained_path_wins_over_the_hub(tmp_path):
    save_file(imagenet_state(), str(tmp_path / "w.safetensors"))
    build_model(cfg(pretrained=True, pretrained_path=str(tmp_path / "w.safetensors")))  # the probe would raise


def test_hub_offline_and_nothing_cached_raises_quickly(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    t0 = time.perf_counter()
    with pytest.raises(PretrainedUnavailable, match=r"\(no network\): download the weights.*pretrained_path"):
        build_model(cfg(pretrained=True))
    assert time.perf_counter() - t0 < 5


def test_hub_unreachable_raises(monkeypatch):
    calls = []
    monkeypatch.setattr(M, "_reachable", lambda host, port, timeout=3.0: calls.append((host, port)) or False)
    with pytest.raises(PretrainedUnavailable, match=r"huggingface\.co:443 does not answer \(no network\)"):
        build_model(cfg(pretrained=True))
    assert calls == [("huggingface.co", 443)]
    monkeypatch.setenv("HTTPS_PROXY", "http://proxy.local:3128")  # the probe goes where the download would
    with pytest.raises(PretrainedUnavailable):
        build_model(cfg(pretrained=True))
    assert calls[-1] == ("proxy.local", 3128)


def fake_hf_cache(root, repo: str, filename: str, write) -> None:
    """The layout huggingface_hub writes: models--ORG--NAME/{refs/main, snapshots/SHA/FILE}."""
    sha = "0" * 40
    d = root / "hub" / f"models--{repo.replace('/', '--')}"
    (d / "refs").mkdir(parents=True)
    (d / "refs" / "main").write_text(sha)
    (d / "snapshots" / sha).mkdir(parents=True)
    write(d / "snapshots" / sha / filename)


@pytest.mark.parametrize("offline", [True, False])
@pytest.mark.parametrize("filename", ["model.safetensors", "pytorch_model.bin"])
def test_hub_weights_in_the_cache_load_offline(monkeypatch, tmp_path, filename, offline):
    state = imagenet_state()
    write = (lambda p: save_file(state, str(p))) if filename.endswith("safetensors") else (
        lambda p: torch.save(state, p))
    fake_hf_cache(tmp_path / "hf", TINY_HUB, filename, write)
    if offline:
        monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    model = build_model(cfg(pretrained=True))  # a cached copy is used as is: no probe, no network either way
    assert_backbone_equal(model, state)


def test_reachable_probe_on_localhost():
    """The real probe, against 127.0.0.1 only (the fixture patches it out everywhere else)."""
    server = socket.create_server(("127.0.0.1", 0))
    port = server.getsockname()[1]
    try:
        assert REAL_REACHABLE("127.0.0.1", port, timeout=2.0)
    finally:
        server.close()
    assert not REAL_REACHABLE("127.0.0.1", port, timeout=2.0)  # closed now: refused


def test_probe_is_bounded_when_the_network_hangs(monkeypatch):
    """DNS without a network can block far past a socket timeout; the probe gives up on time anyway."""
    monkeypatch.setattr(M.socket, "create_connection", lambda *a, **k: time.sleep(30))
    t0 = time.perf_counter()
    assert not REAL_REACHABLE("huggingface.co", 443, timeout=0.2)
    assert time.perf_counter() - t0 < 1


def test_a_probe_that_fails_oddly_says_unreachable_without_a_thread_traceback(monkeypatch):
    """The probe thread outlives its caller: anything it raises surfaced later as an unhandled thread
    exception in whatever ran then (pytest blamed test_pseudo for the hang test's thread, 30 s later)."""
    import threading

    seen = []
    monkeypatch.setattr(threading, "excepthook", lambda args: seen.append(args.exc_type))
    monkeypatch.setattr(M.socket, "create_connection", lambda *a, **k: None)  # no socket: .close() fails
    assert not REAL_REACHABLE("huggingface.co", 443, timeout=1.0)
    monkeypatch.setattr(M.socket, "create_connection", lambda *a, **k: (_ for _ in ()).throw(ValueError("odd")))
    assert not REAL_REACHABLE("huggingface.co", 443, timeout=1.0)
    assert seen == []


def test_check_state_dict_and_fingerprint():
    a, b = build_model(cfg()), build_model(cfg())
    check_state_dict(a, b.state_dict(), source="same.pt")  # same architecture: fits
    fa = model_fingerprint(a)
    assert fa == model_fingerprint(b)
    assert fa["name"] == TINY and fa["n_params"] == sum(p.numel() for p in a.parameters())
    assert len(fa["keys_sha1"]) == 40

    other = timm.create_model("test_resnet", num_classes=8)
    assert model_fingerprint(other)["keys_sha1"] != fa["keys_sha1"]
    with pytest.raises(ValueError, match=r"ckpt\.pt: .*missing \(\d+\): conv_stem\.weight, .*, \.\.\."):
        check_state_dict(a, other.state_dict(), source="ckpt.pt")

    state = a.state_dict()
    extra = {**state, "extra.weight": torch.zeros(1)}
    with pytest.raises(ValueError, match=r"unexpected \(1\): extra\.weight"):
        check_state_dict(a, extra, source="x")
    del state["classifier.bias"]
    with pytest.raises(ValueError, match=r"missing \(1\): classifier\.bias$"):
        check_state_dict(a, state, source="x")


def test_fingerprint_and_check_see_through_torch_compile_wrapper():
    a = build_model(cfg())
    wrapped = torch.nn.Module()
    wrapped._orig_mod = a  # what torch.compile's OptimizedModule holds
    assert model_fingerprint(wrapped) == model_fingerprint(a)
    check_state_dict(wrapped, a.state_dict(), source="x")


def test_data_config_follows_image_size():
    model = build_model(cfg(), image_size=48)
    dc = data_config(model)
    assert dc == {"mean": (0.485, 0.456, 0.406), "std": (0.229, 0.224, 0.225), "input_size": (3, 48, 48)}
    assert data_config(build_model(cfg()))["input_size"] == (3, 160, 160)  # timm's default for the model


def test_unknown_model_name():
    with pytest.raises(ValueError, match="unknown timm model 'no_such_net'"):
        build_model(cfg(name="no_such_net"))


def test_tf_efficientnetv2_s_builds():
    model = build_model(ModelConfig(pretrained=False)).eval()  # the default name
    with torch.inference_mode():
        assert model(torch.randn(1, 3, 64, 64)).shape == (1, 8)
    assert model.drop_rate == 0.2
    assert data_config(model)["mean"] == (0.5, 0.5, 0.5)  # timm's tf_ ports normalise to [-1, 1]
