"""Resolving, checking and seeding the MobileNet weights (no TensorFlow needed, fast)."""
from __future__ import annotations

import shutil
import time
from pathlib import Path

import pytest

from pipeline import weights
from pipeline.config import ConfigError, EmbedConfig
from pipeline.weights import WeightsError

V2_05 = "mobilenet_v2_weights_tf_dim_ordering_tf_kernels_0.5_224_no_top.h5"
V2_035 = "mobilenet_v2_weights_tf_dim_ordering_tf_kernels_0.35_224_no_top.h5"
V1_025 = "mobilenet_2_5_224_tf_no_top.h5"


@pytest.fixture
def empty_home(tmp_path, monkeypatch) -> Path:
    home = tmp_path / "keras_home"
    home.mkdir()
    monkeypatch.setenv("KERAS_HOME", str(home))
    monkeypatch.delenv(weights.OFFLINE_ENV, raising=False)
    return home


def test_keras_file_names():
    assert weights.weights_file_name(EmbedConfig()) == V2_05
    assert weights.weights_file_name(EmbedConfig(alpha=1.0, input_size=160)) == \
        "mobilenet_v2_weights_tf_dim_ordering_tf_kernels_1.0_160_no_top.h5"
    # sizes without their own file load the 224 weights, as Keras does
    assert weights.weights_file_name(EmbedConfig(alpha=0.35, input_size=200)) == V2_035
    assert weights.weights_file_name(EmbedConfig(backbone="MobileNet", alpha=0.25)) == V1_025
    assert weights.weights_file_name(EmbedConfig(backbone="MobileNet", alpha=1.0, input_size=128)) == \
        "mobilenet_1_0_128_tf_no_top.h5"
    with pytest.raises(WeightsError, match="alpha"):
        weights.weights_file_name(EmbedConfig(alpha=0.6))
    assert issubclass(WeightsError, ConfigError)
    # the MobileNet v1/v2 files by name, plus the 5 ConvNeXt files whose sha256 Keras pins
    assert len(weights.PINNED_SHA256) == 6 * 5 + 4 * 4 + 5


def test_pinned_table_matches_shared_sums(models_dir):
    sums = dict(reversed(line.split()) for line in (models_dir / "SHA256SUMS").read_text().splitlines()
                if line.strip())
    assert set(sums) == {V2_05, V2_035, V1_025}
    for name, sha in sums.items():
        assert weights.PINNED_SHA256[name] == sha
        assert weights.sha256_file(models_dir / name) == sha


def test_path_weights_checked(models_dir, tmp_path):
    path = weights.resolve_weights(EmbedConfig(weights=str(models_dir / V2_05)), allow_download=False)
    assert path.name == V2_05
    # a folder works too (the expected name is looked up in it)
    assert weights.resolve_weights(EmbedConfig(weights=str(models_dir)), allow_download=False).name == V2_05
    # the file of another alpha is refused, even renamed (identified by its sha256)
    with pytest.raises(WeightsError, match="needs " + V2_05.replace(".", r"\.")):
        weights.resolve_weights(EmbedConfig(weights=str(models_dir / V2_035)), allow_download=False)
    renamed = tmp_path / "my_weights.h5"
    shutil.copyfile(models_dir / V2_035, renamed)
    with pytest.raises(WeightsError, match="needs"):
        weights.resolve_weights(EmbedConfig(weights=str(renamed)), allow_download=False)
    assert weights.resolve_weights(EmbedConfig(alpha=0.35, weights=str(renamed)), allow_download=False)
    # corrupt content under the pinned name -> sha256 mismatch
    bad = tmp_path / "bad" / V2_05
    bad.parent.mkdir()
    bad.write_bytes((models_dir / V2_05).read_bytes()[:-100] + b"\0" * 100)
    with pytest.raises(WeightsError, match="sha256"):
        weights.resolve_weights(EmbedConfig(weights=str(bad)), allow_download=False)
    with pytest.raises(WeightsError, match="no such file"):
        weights.resolve_weights(EmbedConfig(weights=str(tmp_path / "nope.h5")), allow_download=False)


def test_unknown_file_accepted_with_warning(tmp_path, caplog):
    own = tmp_path / "fine_tuned.h5"
    own.write_bytes(b"not really weights")
    assert weights.resolve_weights(EmbedConfig(weights=str(own)), allow_download=False) == own.resolve()
    assert "unchecked" in caplog.text


def _assert_instructive(exc: WeightsError, home: Path):
    text = str(exc)
    assert V2_05 in text
    assert str(home / "models") in text
    assert "weights --from" in text and "embed.weights" in text
    assert "$(" not in text  # no Make syntax for people who installed with pip


def test_empty_cache_offline_fails_fast(empty_home, monkeypatch):
    monkeypatch.setenv(weights.OFFLINE_ENV, "1")
    probed = []
    monkeypatch.setattr(weights, "network_available", lambda *a, **k: probed.append(1) or True)
    t0 = time.monotonic()
    with pytest.raises(WeightsError) as info:
        weights.check_weights_available(EmbedConfig())
    assert time.monotonic() - t0 < 3
    assert not probed  # the offline switch never touches the network
    _assert_instructive(info.value, empty_home)


def test_empty_cache_download_off_in_config(empty_home, monkeypatch):
    monkeypatch.setattr(weights, "network_available", lambda *a, **k: pytest.fail("probed"))
    with pytest.raises(WeightsError, match="downloading is off") as info:
        weights.check_weights_available(EmbedConfig(download=False))
    _assert_instructive(info.value, empty_home)


def test_empty_cache_no_network(empty_home, monkeypatch):
    monkeypatch.setattr(weights, "network_available", lambda *a, **k: False)
    with pytest.raises(WeightsError, match="unreachable") as info:
        weights.check_weights_available(EmbedConfig())
    _assert_instructive(info.value, empty_home)


def test_network_probe_does_not_hang():
    t0 = time.monotonic()
    # a non-routable address (some sandboxes accept any TCP connect, then fail or stall at TLS)
    assert weights.network_available("https://10.255.255.1/", timeout=0.5) is False
    assert weights.network_available("https://name.invalid/", timeout=0.5) is False
    assert time.monotonic() - t0 < 2


def test_seed_cache_then_imagenet_resolves(models_dir, empty_home, tmp_path, capsys):
    assert weights.weights_command(models_dir) == 0
    cached = sorted(p.name for p in (empty_home / "models").iterdir())
    assert cached == sorted([V2_05, V2_035, V1_025])
    assert "3 weight file(s)" in capsys.readouterr().out
    info = weights.check_weights_available(EmbedConfig())
    assert info == {"path": str(empty_home / "models" / V2_05), "file": V2_05,
                    "sha256": weights.PINNED_SHA256[V2_05], "pinned": True}
    assert weights.resolve_weights(EmbedConfig(backbone="MobileNet", alpha=0.25), False).name == V1_025
    # idempotent; an explicit keras_home works too
    assert len(weights.seed_cache(models_dir)) == 3
    other = tmp_path / "other_home"
    assert {p.parent for p in weights.seed_cache(models_dir, other)} == {other / "models"}
    # a corrupt file in the cache is refused
    (empty_home / "models" / V2_05).write_bytes(b"truncated")
    with pytest.raises(WeightsError, match="sha256"):
        weights.check_weights_available(EmbedConfig())


def test_seed_cache_errors(tmp_path, empty_home, models_dir):
    assert weights.weights_command(tmp_path / "missing") == 2
    (tmp_path / "empty").mkdir()
    with pytest.raises(WeightsError, match="no known"):
        weights.seed_cache(tmp_path / "empty")
    src = tmp_path / "src"
    src.mkdir()
    (src / V2_05).write_bytes(b"garbage")
    with pytest.raises(WeightsError, match="sha256"):
        weights.seed_cache(src)
    assert not (empty_home / "models" / V2_05).exists()


def test_instructions_speak_the_command_the_user_ran(monkeypatch, empty_home):
    monkeypatch.setenv(weights.OFFLINE_ENV, "1")
    for prog, expected in (("dedupe", "`dedupe weights --from FOLDER`"),
                           ("python -m pipeline", "`python -m pipeline weights --from FOLDER`"),
                           ("make", "`make weights WEIGHTS_DIR=FOLDER`")):
        monkeypatch.setenv("DEDUPE_PROG", prog)
        with pytest.raises(WeightsError) as info:
            weights.resolve_weights(EmbedConfig(), allow_download=True)
        assert expected in str(info.value)


# -- the other keras.applications backbones

def test_backbone_lists_agree():
    from pipeline import config
    assert set(config.BACKBONES) == set(weights.BACKBONES) == set(weights.PREPROCESS)
    for name in weights.BACKBONES:  # every backbone has a file name, a URL and a hash Keras pins
        cfg = EmbedConfig(backbone=name, alpha=1.0 if name.startswith("MobileNetV3") else 0.5,
                          input_size=weights.FIXED_INPUT.get(name, 224))
        file = weights.weights_file_name(cfg)
        assert weights.weights_url(cfg).startswith("https://storage.googleapis.com/")
        if not name.startswith("MobileNet") or name.startswith("MobileNetV3"):
            assert weights.PINNED_SHA256.get(file) or weights.PINNED_MD5.get(file), name


@pytest.mark.parametrize("name", ["MobileNetV3Small", "EfficientNetB0", "ResNet50V2", "DenseNet121",
                                  "ConvNeXtTiny", "NASNetMobile"])
def test_table_matches_what_keras_fetches(name, monkeypatch):
    # build the model with weights="imagenet" but catch Keras's download request: the file name,
    # URL and hash must be the ones pinned here
    keras = pytest.importorskip("keras")
    from keras.src.utils import file_utils

    class Asked(Exception):
        pass

    def fake_get_file(fname, origin=None, file_hash=None, **kw):
        raise Asked(fname, origin, file_hash)

    monkeypatch.setattr(file_utils, "get_file", fake_get_file)
    cfg = EmbedConfig(backbone=name, alpha=1.0 if name.startswith("MobileNetV3") else 0.5)
    with pytest.raises(Asked) as asked:
        getattr(keras.applications, name)(include_top=False, weights="imagenet", pooling="avg",
                                          input_shape=(224, 224, 3))
    fname, origin, file_hash = asked.value.args
    assert fname == weights.weights_file_name(cfg) and origin == weights.weights_url(cfg)
    assert file_hash in (weights.PINNED_SHA256.get(fname), weights.PINNED_MD5.get(fname))


@pytest.mark.parametrize("name", [b for b in weights.BACKBONES if b not in ("MobileNetV2", "MobileNet")])
def test_missing_backbone_weights_fail_clearly_offline(name, empty_home, monkeypatch):
    monkeypatch.setenv(weights.OFFLINE_ENV, "1")
    cfg = EmbedConfig(backbone=name, alpha=1.0 if name.startswith("MobileNetV3") else 0.5,
                      input_size=weights.FIXED_INPUT.get(name, 224))
    with pytest.raises(WeightsError) as info:
        weights.check_weights_available(cfg)
    text = str(info.value)
    assert weights.weights_file_name(cfg) in text and str(empty_home / "models") in text
    with pytest.raises(WeightsError, match="downloading is off"):
        weights.check_weights_available(EmbedConfig(backbone=name, download=False,
                                                    alpha=cfg.alpha, input_size=cfg.input_size))


def test_md5_pinned_file_is_checked(tmp_path, empty_home):
    name = weights.KERAS_BACKBONES["ResNet50"][0]
    fake = tmp_path / name
    fake.write_bytes(b"not the resnet weights")
    with pytest.raises(WeightsError, match="md5"):
        weights.resolve_weights(EmbedConfig(backbone="ResNet50", weights=str(fake)), allow_download=False)


def test_backbone_input_size_limits():
    with pytest.raises(WeightsError, match="331"):
        weights.weights_file_name(EmbedConfig(backbone="NASNetLarge", input_size=224))
    with pytest.raises(WeightsError, match="alpha"):
        weights.weights_file_name(EmbedConfig(backbone="MobileNetV3Large", alpha=0.5))
