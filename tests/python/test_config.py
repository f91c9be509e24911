"""aimass.config: the platform's config.yml as documented, the extended sections, and errors
that name the key, its line and the closest valid key."""
import hashlib
import os

import pytest

from aimass import config

PLATFORM = """\
data_path: ./data
download: false
splitting:
  train: 70
  valid: 15
  test: 15
"""


def test_the_platforms_documented_config_is_valid_as_written(tmp_path):
    p = tmp_path / "config.yml"
    p.write_text(PLATFORM)
    cfg = config.load(p)
    assert cfg.data_path == "./data" and cfg.download is False
    assert (cfg.splitting.train, cfg.splitting.valid, cfg.splitting.test) == (70, 15, 15)
    assert cfg.resolve(cfg.data_path) == str(tmp_path / "data")
    # every extended section is there with its defaults
    assert cfg.train.epochs >= 1 and cfg.model.kind == "mlp" and cfg.compress.prune is None


def test_extended_sections_are_typed():
    cfg = config.loads(PLATFORM + """\
model: {kind: cnn, hidden: [64], channels: [4, 8]}
train: {epochs: 3, batch_size: 16, optimizer: adamw, lr: 1e-3, schedule: cosine, seed: 7, checkpoint_dir: ck}
compress:
  prune: {method: magnitude, sparsity: 0.3}
  quantize: {bits: 4, group_size: 32}
  distill: {teacher: t.pt, temperature: 2, alpha: 0.25}
eval: {kfold: 5}
registry: {store: reg, name: m, label: stable}
serve: {port: 9000, tokens: tokens.yml}
search:
  trials: 4
  params:
    lr: {type: log_uniform, low: 0.0001, high: 0.1}
    hidden: {type: choice, choices: [[32], [64, 32]]}
""")
    assert cfg.model.channels == [4, 8] and cfg.train.lr == 1e-3 and isinstance(cfg.train.lr, float)
    assert cfg.compress.prune.sparsity == 0.3 and cfg.compress.quantize.bits == 4
    assert cfg.compress.distill.temperature == 2.0 and cfg.compress.distill.alpha == 0.25
    assert cfg.search.params["hidden"].choices == [[32], [64, 32]]
    assert cfg.serve.port == 9000 and cfg.registry.label == "stable"


@pytest.mark.parametrize("text,line,key,suggestion", [
    (PLATFORM + "trian:\n  epochs: 3\n", 7, "trian", "train"),
    (PLATFORM + "train:\n  epochs: 3\n  bach_size: 8\n", 9, "train.bach_size", "train.batch_size"),
    ("data_pth: x\n" + PLATFORM, 1, "data_pth", "data_path"),
    (PLATFORM.replace("valid", "vaild"), 5, "splitting.vaild", "splitting.valid"),
    (PLATFORM + "compress:\n  quantise: {bits: 8}\n", 8, "compress.quantise", "compress.quantize"),
])
def test_unknown_key_names_key_line_and_closest_valid_key(text, line, key, suggestion):
    with pytest.raises(config.ConfigError) as e:
        config.loads(text, "c.yml")
    msg = str(e.value)
    assert msg.startswith(f"c.yml:{line}: unknown key '{key}'"), msg
    assert f"did you mean '{suggestion}'" in msg


@pytest.mark.parametrize("text,key,expected", [
    (PLATFORM + "train: {epochs: three}\n", "train.epochs", "an integer"),
    (PLATFORM + "train: {lr: fast}\n", "train.lr", "a number"),
    ("download: yes please\n" + PLATFORM.replace("download: false\n", ""), "download", "true or false"),
    (PLATFORM + "model: {hidden: 128}\n", "model.hidden", "a list of an integer"),
    (PLATFORM + "train: 5\n", "train", "a mapping"),
    (PLATFORM + "train: {epochs: 2.5}\n", "train.epochs", "an integer"),
])
def test_wrong_type_names_key_and_expected_type(text, key, expected):
    with pytest.raises(config.ConfigError) as e:
        config.loads(text, "c.yml")
    assert f"'{key}' must be {expected}" in str(e.value)


@pytest.mark.parametrize("text,what", [
    (PLATFORM.replace("train: 70", "train: 80"), "sum to 100"),
    (PLATFORM + "model: {kind: transformer}\n", "must be one of logreg, mlp, cnn"),
    (PLATFORM + "compress: {distill: {alpha: 2}}\n", "alpha"),
    (PLATFORM + "train: {epochs: 0}\n", "train.epochs"),
    ("", "empty"),
    ("- a\n- b\n", "top level must be a mapping"),
    ("a: [\n", "not valid YAML"),
    (PLATFORM + "search: {params: {lr: {type: log_uniform, low: 0, high: 1}}}\n", "low > 0"),
])
def test_bad_values_are_config_errors(text, what):
    with pytest.raises(config.ConfigError, match=what):
        config.loads(text, "c.yml")


def test_load_missing_file():
    with pytest.raises(FileNotFoundError, match="does not exist"):
        config.load("/nonexistent/config.yml")


def test_fetch_file_url_checks_sha256_and_caches(tmp_path):
    src = tmp_path / "d.csv"
    src.write_bytes(b"a,label\n1,0\n")
    digest = hashlib.sha256(src.read_bytes()).hexdigest()
    cache = tmp_path / "cache"
    got = config.fetch(src.as_uri(), sha256=digest, cache_dir=str(cache), progress=False)
    assert open(got, "rb").read() == src.read_bytes()
    src.unlink()  # the cached copy with the right hash is reused without reading the URL
    assert config.fetch(src.as_uri(), sha256=digest, cache_dir=str(cache), progress=False) == got
    import aimass
    bad = tmp_path / "e.csv"
    bad.write_bytes(b"x")
    with pytest.raises(aimass.CorruptDataError, match="sha256"):
        config.fetch(bad.as_uri(), sha256="0" * 64, cache_dir=str(cache), progress=False)
    assert not [f for f in os.listdir(cache) if "e.csv" in f]  # nothing half-kept


def test_fetch_without_network_is_a_clear_error(tmp_path):
    with pytest.raises(ConnectionError, match="cannot download"):
        config.fetch("http://127.0.0.1:9/data.csv", cache_dir=str(tmp_path), progress=False)
    with pytest.raises(ValueError, match="http"):
        config.fetch("ftp://example/x", cache_dir=str(tmp_path))


def test_download_true_fetches_data_url_before_converting(tmp_path, monkeypatch):
    import numpy as np

    from aimass.train import pipeline
    monkeypatch.setenv("AIMASS_HOME", str(tmp_path / "home"))
    src = tmp_path / "remote" / "d.npz"
    src.parent.mkdir()
    x = np.arange(40, dtype=np.float32).reshape(20, 2)
    np.savez(src, x=x, label=(x[:, 0] > 20).astype(np.int64))
    digest = hashlib.sha256(src.read_bytes()).hexdigest()
    (tmp_path / "c.yml").write_text(f"data_path: ./data\ndownload: true\ndata_url: {src.as_uri()}\nsha256: {digest}\n"
                                    "splitting: {train: 70, valid: 15, test: 15}\n")
    ds = pipeline.prepare_data(config.load(tmp_path / "c.yml"), log=lambda *a: None)
    assert ds.startswith(str(tmp_path / "home" / "cache"))
    from aimass import data
    assert len(data.open(ds)) == 20 and len(data.open_split(ds, "train")) == 14
    (tmp_path / "c2.yml").write_text("data_path: ./nothing-here\ndownload: true\n"
                                     "splitting: {train: 70, valid: 15, test: 15}\n")
    with pytest.raises(ValueError, match="data_url"):
        pipeline.prepare_data(config.load(tmp_path / "c2.yml"))
