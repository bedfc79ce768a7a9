"""Configuration: defaults < TOML file < ANIM_* environment < overrides (command line)."""

from __future__ import annotations

import dataclasses
import os
import subprocess
import sys
from pathlib import Path

import pytest

from anim import ConfigError, load_config
from anim.config import parse_known_ae
from tests.conftest import ROOT


def write(tmp_path: Path, text: str, name: str = "anim.toml") -> Path:
    path = tmp_path / name
    path.write_text(text, encoding="utf-8")
    return path


def test_defaults_are_an_embedded_archive_on_loopback() -> None:
    cfg = load_config(env={})
    assert cfg.storage.data_dir == Path("anim-data")
    assert cfg.storage.blobs == Path("anim-data") / "blobs"
    assert cfg.index_url == f"sqlite:///{(Path('anim-data') / 'index.sqlite').resolve()}"
    assert (cfg.dimse.host, cfg.dimse.port, cfg.dimse.aet) == ("127.0.0.1", 11112, "ANIM")
    assert (cfg.web.host, cfg.web.port) == ("127.0.0.1", 8080)
    assert cfg.dimse.known_aes == ()


def test_config_is_frozen() -> None:
    cfg = load_config(env={})
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.dimse.port = 104  # type: ignore[misc]


def test_toml_file_sets_every_section(tmp_path: Path) -> None:
    path = write(tmp_path, f"""
[storage]
data_dir = "{tmp_path / 'data'}"
[index]
url = "postgresql://anim@db.example:5432/anim"
batch_max = 16
[dimse]
port = 11113
aet = "NATIONAL"
allow_unknown_callers = false
[dimse.known_aes.CT_LUX_1]
host = "10.1.0.5"
port = 104
institution = "CHL"
permissions = ["store"]
[web]
host = "0.0.0.0"
port = 8081
[log]
level = "DEBUG"
""")
    cfg = load_config(path, env={})
    assert cfg.storage.data_dir == tmp_path / "data"
    assert cfg.index_url == "postgresql://anim@db.example:5432/anim"
    assert cfg.index.batch_max == 16
    assert (cfg.dimse.port, cfg.dimse.aet, cfg.dimse.allow_unknown_callers) == (
        11113, "NATIONAL", False)
    assert (cfg.web.host, cfg.web.port, cfg.log.level) == ("0.0.0.0", 8081, "DEBUG")
    ae = cfg.dimse.find_ae("CT_LUX_1")
    assert ae is not None
    assert (ae.host, ae.port, ae.institution_name, ae.permissions) == (
        "10.1.0.5", 104, "CHL", frozenset({"store"}))
    assert cfg.dimse.find_ae("UNKNOWN") is None


def test_environment_beats_file(tmp_path: Path) -> None:
    path = write(tmp_path, '[dimse]\nport = 11113\naet = "FROMFILE"\n[web]\nport = 8081\n')
    cfg = load_config(path, env={"ANIM_DIMSE_PORT": "11114", "ANIM_DIMSE_MAX_PDU": "16384",
                                 "ANIM_DIMSE_ALLOW_UNKNOWN_CALLERS": "false"})
    assert cfg.dimse.port == 11114
    assert cfg.dimse.max_pdu == 16384
    assert cfg.dimse.allow_unknown_callers is False
    assert cfg.dimse.aet == "FROMFILE"  # not in the environment: the file's value stays
    assert cfg.web.port == 8081


def test_anim_config_variable_names_the_file(tmp_path: Path) -> None:
    path = write(tmp_path, "[web]\nport = 8082\n")
    assert load_config(env={"ANIM_CONFIG": str(path)}).web.port == 8082


def test_overrides_beat_environment(tmp_path: Path) -> None:
    path = write(tmp_path, "[dimse]\nport = 11113\n")
    cfg = load_config(path, env={"ANIM_DIMSE_PORT": "11114", "ANIM_WEB_PORT": "8083"},
                      overrides={"dimse": {"port": 0}})
    assert cfg.dimse.port == 0
    assert cfg.web.port == 8083


def test_unknown_key_in_file_is_named(tmp_path: Path) -> None:
    path = write(tmp_path, "[dimse]\nprot = 11113\n")
    with pytest.raises(ConfigError, match=r"unknown key 'prot' in \[dimse\]"):
        load_config(path, env={})


def test_unknown_section_in_file_is_named(tmp_path: Path) -> None:
    path = write(tmp_path, "[storrage]\ndata_dir = 'x'\n")
    with pytest.raises(ConfigError, match=r"unknown section \[storrage\]"):
        load_config(path, env={})


def test_unknown_key_of_known_ae_is_named(tmp_path: Path) -> None:
    path = write(tmp_path, '[dimse.known_aes.PACS]\nhost = "h"\nadress = "x"\n')
    with pytest.raises(ConfigError, match=r"known_aes\.PACS.*adress"):
        load_config(path, env={})


def test_unknown_key_in_environment_names_the_variable() -> None:
    with pytest.raises(ConfigError, match="ANIM_DIMSE_PROT"):
        load_config(env={"ANIM_DIMSE_PROT": "1"})


def test_unknown_override_section_is_named() -> None:
    with pytest.raises(ConfigError, match=r"\[dimze\]"):
        load_config(env={}, overrides={"dimze": {"port": 1}})


@pytest.mark.parametrize("title", ["A" * 17, "", "   ", "BACK\\SLASH", "NON-ASCIIÉ"])
def test_bad_ae_title_is_refused(title: str) -> None:
    with pytest.raises(ConfigError, match="AE title"):
        load_config(env={}, overrides={"dimse": {"aet": title}})


def test_sixteen_character_ae_title_is_accepted() -> None:
    assert load_config(env={}, overrides={"dimse": {"aet": "A" * 16}}).dimse.aet == "A" * 16


@pytest.mark.parametrize(("env", "match"), [
    ({"ANIM_DIMSE_PORT": "70000"}, "out of range"),
    ({"ANIM_WEB_PORT": "eighty"}, "integer"),
    ({"ANIM_DIMSE_ALLOW_UNKNOWN_CALLERS": "perhaps"}, "true/false"),
    ({"ANIM_LOG_LEVEL": "LOUD"}, "level"),
])
def test_bad_values_are_refused(env: dict[str, str], match: str) -> None:
    with pytest.raises(ConfigError, match=match):
        load_config(env=env)


def test_broken_toml_names_the_file(tmp_path: Path) -> None:
    path = write(tmp_path, "[dimse\nport = 1\n")
    with pytest.raises(ConfigError, match=str(path.name)):
        load_config(path, env={})


def test_missing_file_is_an_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="cannot read configuration file"):
        load_config(tmp_path / "nope.toml", env={})


# ---- --known-ae -----------------------------------------------------------------------------


@pytest.mark.parametrize(("spec", "title", "host", "port"), [
    ("PACS=10.0.0.5:104", "PACS", "10.0.0.5", 104),
    ("STORESCP=127.0.0.1:11113", "STORESCP", "127.0.0.1", 11113),
    ("VIEWER=viewer.example.lu:4242", "VIEWER", "viewer.example.lu", 4242),
])
def test_known_ae_flag_is_parsed(spec: str, title: str, host: str, port: int) -> None:
    ae = parse_known_ae(spec)
    assert (ae.title, ae.host, ae.port) == (title, host, port)
    assert ae.institution_name == title  # no institution given: the AE is its own


@pytest.mark.parametrize(("spec", "match"), [
    ("PACS", "TITLE=HOST:PORT"),
    ("PACS=10.0.0.5", "TITLE=HOST:PORT"),
    ("PACS=:104", "TITLE=HOST:PORT"),
    ("=10.0.0.5:104", "AE title"),
    ("PACS=10.0.0.5:port", "integer"),
    ("PACS=10.0.0.5:65536", "out of range"),
    ("A" * 17 + "=10.0.0.5:104", "AE title"),
])
def test_bad_known_ae_flag_is_refused(spec: str, match: str) -> None:
    with pytest.raises(ConfigError, match=match):
        parse_known_ae(spec)


# ---- the command line -------------------------------------------------------------------------


def run_anim(tmp_path: Path, *args: str) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("ANIM_")}
    # free ports and a private data dir: if the bad configuration were not caught, the
    # server would start (and the timeout below would fail the test) without clashing
    cmd = [sys.executable, "-m", "anim", "serve", "--data", str(tmp_path / "data"),
           "--dimse-port", "0", "--http-port", "0", *args]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=60, env=env, cwd=ROOT)


def test_serve_with_bad_config_file_exits_2(tmp_path: Path) -> None:
    path = write(tmp_path, "[dimse]\nprot = 11113\n", name="bad.toml")
    r = run_anim(tmp_path, "--config", str(path))
    assert r.returncode == 2, r.stdout + r.stderr
    assert "configuration error" in r.stderr
    assert "'prot'" in r.stderr
    assert "bad.toml" in r.stderr
    assert "Traceback" not in r.stderr
    assert not (tmp_path / "data").exists()  # nothing was opened


def test_serve_with_missing_config_file_exits_2(tmp_path: Path) -> None:
    r = run_anim(tmp_path, "--config", str(tmp_path / "missing.toml"))
    assert r.returncode == 2, r.stdout + r.stderr
    assert "cannot read configuration file" in r.stderr
    assert "missing.toml" in r.stderr


def test_serve_with_bad_known_ae_exits_2(tmp_path: Path) -> None:
    r = run_anim(tmp_path, "--known-ae", "PACS")
    assert r.returncode == 2, r.stdout + r.stderr
    assert "TITLE=HOST:PORT" in r.stderr
    assert "Traceback" not in r.stderr
