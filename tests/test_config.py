from pathlib import Path

import pytest

from pipeline.config import Config, ConfigError, load_config

REPO = Path(__file__).resolve().parent.parent


def test_default_yaml_matches_built_in_defaults():
    # configs/default.yaml documents every knob; it must not drift from pipeline/config.py
    assert load_config(REPO / "configs" / "default.yaml") == Config()


def test_overrides_are_typed():
    cfg = load_config(None, ["screen.max_distance=12", "decide.cosine_threshold=0.9", "tiers=verify",
                             "screen.dihedral=false", "dask.scheduler=tcp://127.0.0.1:8786"])
    assert cfg.screen.max_distance == 12 and cfg.decide.cosine_threshold == 0.9
    assert cfg.tiers == "verify" and cfg.screen.dihedral is False
    assert cfg.dask.scheduler == "tcp://127.0.0.1:8786"


@pytest.mark.parametrize("override, message", [
    ("screen.max_distanse=3", "unknown config key 'screen.max_distanse'"),
    ("nope=1", "unknown config key 'nope'"),
    ("screen.max_distance=abc", "expected a whole number"),
    ("screen.hash=md5", "not one of"),
    ("verify.method=surf", "not one of"),
    ("verify.pixel_check=maybe", "expected true/false"),
    ("tiers=everything", "not one of"),
    ("screen.max_distance=64", "screen.max_distance must be in"),
    ("verify.min_inlier_share=1", "verify.min_inlier_share must be in"),
    ("verify.chance_min_matches=0", "verify.chance_min_matches must be >= 1"),
    ("verify.semi_flat_share=0.8", "verify.semi_flat_share must be in"),
    ("verify.semi_flat_ssim=0.9", "verify.semi_flat_ssim must be in"),
    ("verify.region_mismatch=1.5", "verify.region_mismatch must be in"),
    ("screen.hash_size=5", "multiple of 8"),
    ("screen=3", "expected a mapping"),
    ("novalue", "expected key=value"),
])
def test_bad_overrides_say_what_to_fix(override, message):
    with pytest.raises(ConfigError, match=message.replace("(", r"\(")):
        load_config(None, [override])


def test_an_override_that_is_not_yaml_is_one_line():
    """(It was PyYAML's whole text: 5 lines, with a "<unicode string>" and a caret.)"""
    with pytest.raises(ConfigError, match=r"value is not valid YAML \(expected the node content") as exc:
        load_config(None, ["screen.max_distance=[1,"])
    assert "\n" not in str(exc.value) and "<unicode string>" not in str(exc.value)


def test_bad_files(tmp_path):
    with pytest.raises(ConfigError, match="not found"):
        load_config(tmp_path / "missing.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("screen: [unclosed\n")
    with pytest.raises(ConfigError, match="is not valid YAML at line"):
        load_config(bad)
    wrong = tmp_path / "wrong.yaml"
    wrong.write_text("screen:\n  max_candidates: 0\n")
    with pytest.raises(ConfigError, match="max_candidates"):
        load_config(wrong)


def test_default_yaml_documents_every_key():
    import dataclasses

    import yaml
    data = yaml.safe_load((REPO / "configs" / "default.yaml").read_text())
    missing = []

    def walk(obj, section, prefix=""):
        for f in dataclasses.fields(obj):
            value = getattr(obj, f.name)
            if f.name not in section:
                missing.append(prefix + f.name)
            elif dataclasses.is_dataclass(value):
                walk(value, section[f.name], f"{prefix}{f.name}.")

    walk(Config(), data)
    assert not missing, f"configs/default.yaml lacks {missing}"


@pytest.mark.parametrize("override, needle", [
    ("dask.memory_limit=lots", "dask.memory_limit"),
    ("dask.memory_limit=-4GB", "dask.memory_limit"),
    ("dask.scheduler=foo://bar:1", "not 'auto', 'local', 'sync' or a Dask scheduler address"),
    ("dask.scheduler=justahost", "Dask scheduler address"),
    ("verify.scale_factor=1.0", "verify.scale_factor"),
    ("scan.max_file_bytes=-1", "scan.max_file_bytes"),
    ("scan.max_file_bytes=0", "scan.max_file_bytes"),
    ("scan.image_extensions=[jpg]", "scan.image_extensions"),
    ("screen.border_tolerance=300", "screen.border_tolerance"),
    ("verify.min_good_matches=1", "verify.min_good_matches"),
    ("verify.ransac_threshold=0", "verify.ransac_threshold"),
    ("embed.alpha=0", "embed.alpha"),
    ("decide.accept_inliers=0", "accept_inliers"),
])
def test_meaningless_values_are_refused_with_the_key(override, needle):
    with pytest.raises(ConfigError, match=needle.replace(".", r"\.").replace("(", r"\(")):
        load_config(None, [override])


@pytest.mark.parametrize("value", ["auto", "4GB", "3.5GiB", "0", "2e9"])
def test_memory_limits_dask_accepts(value):
    assert load_config(None, [f"dask.memory_limit={value}"]).dask.memory_limit == value


def test_scheduler_addresses_accepted():
    for target in ("auto", "local", "sync", "tcp://127.0.0.1:8786", "tls://scheduler:8786", "10.0.0.5:8786"):
        load_config(None, [f"dask.scheduler={target}"])


def test_a_dotted_override_below_a_mapping_changes_one_entry(tmp_path):
    """`--set storage.options.endpoint_url=...` on top of a config file's options keeps the
    file's credentials (it used to replace the whole mapping); `storage.options={...}` replaces."""
    cfg_file = tmp_path / "nightly.yaml"
    cfg_file.write_text("storage:\n  options: {key: k, secret: s, config_kwargs: {s3: {addressing_style: path}}}\n")
    cfg = load_config(cfg_file, ["storage.options.endpoint_url=http://127.0.0.1:9000",
                                 "storage.options.config_kwargs.retries.max_attempts=3",
                                 "storage.options.secret=s2"])
    assert cfg.storage.options == {"key": "k", "secret": "s2", "endpoint_url": "http://127.0.0.1:9000",
                                   "config_kwargs": {"s3": {"addressing_style": "path"},
                                                     "retries": {"max_attempts": 3}}}
    assert load_config(cfg_file, ["storage.options={anon: true}"]).storage.options == {"anon": True}
    assert load_config(None, ["storage.options.anon=true"]).storage.options == {"anon": True}
    assert Config().storage.options == {}  # (the default is not changed in place)
    with pytest.raises(ConfigError, match="unknown config key 'screen.no_such'"):
        load_config(None, ["screen.no_such.x=1"])


@pytest.mark.parametrize("overrides, message", [
    (["catalog=[a, b]"], "catalog: expected text"),  # (str() of it made a folder named "['a', 'b']")
    (["work_dir={x: 1}"], "work_dir: expected text"),
    (["verify.seed=3000000000"], "verify.seed: 3000000000 is too large"),  # (OpenCV's C int, after the screen)
    (["screen.max_candidates=9223372036854775808"], "screen.max_candidates: .* is too large"),
    (["verify.n_features=2000000000", "verify.oversample=4"], "n_features x verify.oversample is too large"),
    (["dask.dashboard_address=notahost:xx"], "dask.dashboard_address"),
    (["dask.scheduler=tcp://127.0.0.1:99999"], "dask.scheduler"),
    (["dask.scheduler=127.0.0.1:0"], "dask.scheduler"),
    (["dask.scheduler=tcp://127.0.0.1"], "dask.scheduler"),  # (no port: the client failed on int())
    # (a true copy with 76 inliers was rejected as "no-match", under accept_inliers 25)
    (["verify.reject_inliers=200", "verify.match_inliers=200"],
     r"verify.reject_inliers \(200\) is above decide.accept_inliers \(25\)"),
    (["screen.mode=hash+embedding", "tiers=screen"], "use tiers verify or confirm"),
    # (every image failed "hash_size is not power of 2", exit 0)
    (["screen.hash=whash", "screen.hash_size=24"], "whash needs a power of 2 for screen.hash_size"),
    # (every photo "too few keypoints": every pair sent to the pixel check, duplicates lost)
    (["verify.n_features=10"], r"verify.n_features \(10\) is below verify.min_keypoints \(25\)"),
    (["verify.n_features=10", "verify.min_keypoints=5", "verify.min_good_matches=11"],
     r"verify.min_good_matches \(11\) is above verify.n_features \(10\)"),
])
def test_values_that_would_fail_late_are_refused_at_once(overrides, message):
    """Values the checks let through and a later step failed on, with a traceback after the
    screen's work (exit 1), or silently wasted: refused when the config is read (exit 2)."""
    with pytest.raises(ConfigError, match=message):
        load_config(None, overrides)


def test_byte_and_pixel_limits_may_be_64_bit():
    cfg = load_config(None, ["scan.max_file_bytes=5000000000", "screen.max_decode_bytes=8000000000",
                             "dask.dashboard_address=", "dask.scheduler=tcp://10.0.0.1:8786"])
    assert cfg.scan.max_file_bytes == 5_000_000_000


def test_a_config_file_that_is_no_mapping_is_refused_with_where(tmp_path):
    """A YAML error names the file, line and column in one line; a file of 0, false or [] is not
    an empty config (it read as one); a folder is a folder, not "not found"."""
    bad = tmp_path / "bad.yaml"
    bad.write_text("screen:\n  max_distance: [1,\n")
    with pytest.raises(ConfigError, match=r"bad.yaml' is not valid YAML at line 3, column 1") as exc:
        load_config(bad)
    assert "\n" not in str(exc.value) and "<unicode string>" not in str(exc.value)
    for text in ("0\n", "false\n", "[]\n"):
        (tmp_path / "odd.yaml").write_text(text)
        with pytest.raises(ConfigError, match="expected a mapping of settings"):
            load_config(tmp_path / "odd.yaml")
    with pytest.raises(ConfigError, match="is a folder"):
        load_config(tmp_path)
    (tmp_path / "empty.yaml").write_text("")
    assert load_config(tmp_path / "empty.yaml") == Config()
    # a key given twice: the later one won silently (a second screen: section dropped the first's)
    (tmp_path / "twice.yaml").write_text("screen:\n  max_distance: 12\ndecide:\n  accept_inliers: 30\n"
                                         "screen:\n  dihedral_max_distance: 2\n")
    with pytest.raises(ConfigError, match=r"twice.yaml' is not valid YAML at line 5, column 1: the key 'screen' is "
                                          "given twice"):
        load_config(tmp_path / "twice.yaml")
    (tmp_path / "twice.yaml").write_text("screen:\n  max_distance: 12\n  max_distance: 3\n")
    with pytest.raises(ConfigError, match="the key 'max_distance' is given twice"):
        load_config(tmp_path / "twice.yaml")
    # merge keys still work, an override of a merged key too (not a key given twice), also when
    # an anchored mapping that merged another is merged again
    (tmp_path / "merge.yaml").write_text("screen:\n  <<: {max_distance: 12, dihedral_max_distance: 2}\n"
                                         "  max_distance: 9\n")
    merged = load_config(tmp_path / "merge.yaml").screen
    assert (merged.max_distance, merged.dihedral_max_distance) == (9, 2)
    import yaml

    from pipeline.config import _StrictLoader
    nested = "b: &b {a: 1}\ntop:\n  c: &c\n    <<: *b\n    a: 2\ne:\n  <<: *c\n"
    assert yaml.load(nested, Loader=_StrictLoader) == yaml.safe_load(nested)


def test_a_section_left_with_every_key_commented_out_changes_nothing(tmp_path):
    """`screen:` whose keys are all commented out reads as null: a usual edit of a copied preset,
    refused before as "expected a mapping of keys"."""
    cfg_file = tmp_path / "c.yaml"
    cfg_file.write_text("screen:\n  # max_distance: 3\nverify:\n  ransac_threshold: 4.0\n")
    cfg = load_config(cfg_file)
    assert cfg.screen == Config().screen and cfg.verify.ransac_threshold == 4.0


def test_a_number_yaml_reads_as_text_is_refused_with_how_to_write_it(tmp_path):
    cfg_file = tmp_path / "c.yaml"
    cfg_file.write_text("verify:\n  ransac_threshold: 1e3\n")  # (YAML 1.1: text without a dot)
    with pytest.raises(ConfigError, match=r"ransac_threshold: expected a number, got '1e3' \(write it as 1000.0:"):
        load_config(cfg_file)
    cfg_file.write_text("verify:\n  ransac_threshold: 1.0e+03\n")
    assert load_config(cfg_file).verify.ransac_threshold == 1000.0
    cfg_file.write_text("screen:\n  max_pixels: 2e8\n")  # (a whole-number setting: 2.0e+08 is not one either)
    with pytest.raises(ConfigError, match=r"max_pixels: expected a whole number, got '2e8' \(write it as 200000000:"):
        load_config(cfg_file)
