"""Configuration: shipped files load, bad keys and values are rejected with the key named."""

from __future__ import annotations

from pathlib import Path

import pytest

from daemon.config import ConfigError, load_settings, reference_markdown
from tests.conftest import REPO

SHIPPED = sorted(REPO.glob("*.toml")) + sorted((REPO / "systemd").glob("*.toml"))
SHIPPED = [path for path in SHIPPED if path.name != "pyproject.toml"]


@pytest.fixture(autouse=True)
def _clean_env(monkeypatch: pytest.MonkeyPatch) -> None:
    import os

    for key in list(os.environ):
        if key.startswith("CLD_"):
            monkeypatch.delenv(key)


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "config.toml"
    path.write_text(text)
    return path


@pytest.mark.parametrize("path", SHIPPED, ids=lambda p: p.name)
def test_every_shipped_config_loads(path: Path) -> None:
    settings = load_settings(path)
    assert settings.state.dir.is_absolute()


def test_shipped_config_matches_defaults() -> None:
    settings = load_settings(REPO / "config.toml")
    assert (settings.serve.host, settings.serve.port, settings.serve.model_name) == ("127.0.0.1", 8000, "cld")
    assert settings.serve.vllm_port == 8001 and settings.serve.vllm_url == ""
    assert settings.state.dir == REPO / "var"


def test_relative_paths_are_relative_to_the_config_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = write(tmp_path, '[state]\ndir = "here"\n')
    monkeypatch.chdir("/")
    settings = load_settings(path)
    assert settings.state.dir == tmp_path / "here"
    assert settings.watch.inbox == tmp_path / "here" / "inbox"


def test_unknown_key_is_named_with_the_valid_ones(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as error:
        load_settings(write(tmp_path, "[serve]\nprot = 9000\n"))
    message = str(error.value)
    assert "serve.prot: unknown key" in message
    assert "port" in message.split("valid keys here:")[1]


def test_unknown_section_is_named(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"servr: unknown key; valid keys here: .*serve"):
        load_settings(write(tmp_path, "[servr]\nport = 1\n"))


@pytest.mark.parametrize(
    ("text", "key"),
    [
        ('[serve]\nport = "eighty"\n', "serve.port"),
        ("[serve]\nport = 70000\n", "serve.port"),
        ('[serve]\nmodel_name = "has space"\n', "serve.model_name"),
        ('[serve]\nvllm_url = "localhost:8001"\n', "serve.vllm_url"),
        ("[serve]\nmax_loras = 1\n", "serve.max_loras"),
        ("[train]\nrank = 0\n", "train.rank"),
        ('[recall]\ndocuments = "some"\n', "recall.documents"),
        ("[recall]\nk = 0\n", "recall.k"),
    ],
)
def test_invalid_value_names_the_key_and_the_value(tmp_path: Path, text: str, key: str) -> None:
    with pytest.raises(ConfigError) as error:
        load_settings(write(tmp_path, text))
    assert f"  {key}: " in str(error.value)
    assert "(got " in str(error.value)


def test_toml_syntax_error_names_the_file(tmp_path: Path) -> None:
    path = write(tmp_path, "[serve\nport = 1\n")
    with pytest.raises(ConfigError, match=str(path)):
        load_settings(path)


def test_missing_config_file_is_an_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="config file not found"):
        load_settings(tmp_path / "nope.toml")


def test_environment_overrides_the_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CLD_SERVE__PORT", "9123")
    settings = load_settings(write(tmp_path, "[serve]\nport = 9000\n"))
    assert settings.serve.port == 9123


def test_unknown_environment_key_is_named(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CLD_SERVE__PROT", "1")
    with pytest.raises(ConfigError, match="unknown environment variable CLD_SERVE__PROT "
                                          r"\(did you mean CLD_SERVE__PORT\?\)"):
        load_settings(write(tmp_path, ""))


@pytest.mark.parametrize("name, suggestion", [
    ("CLD_SECURTY__API_KEY", "CLD_SECURITY__API_KEY"),  # a misspelled section: the key would be lost
    ("CLD_SECURITY_API_KEY", "CLD_SECURITY__API_KEY"),  # one underscore where two belong
    ("cld_serve__prot", "CLD_SERVE__PORT"),             # the prefix in any case, as pydantic-settings reads it
    ("CLD_NOTHING_LIKE_IT", None),
])
def test_an_environment_variable_that_sets_nothing_stops_cld(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                             name: str, suggestion: str | None) -> None:
    monkeypatch.setenv(name, "secret-value-that-would-be-ignored")
    with pytest.raises(ConfigError, match=f"unknown environment variable {name}") as raised:
        load_settings(write(tmp_path, ""))
    assert (f"did you mean {suggestion}?" in str(raised.value)) if suggestion else "did you mean" not in str(raised.value)
    assert "secret-value" not in str(raised.value), "the value may be a key: never print it"


def test_variables_that_are_not_settings_are_allowed(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CLD_CONFIG", str(tmp_path / "config.toml"))
    monkeypatch.setenv("CLD_TEST_START_TIMEOUT_S", "60")
    monkeypatch.setenv("CLD_LOG__LEVEL", "debug")
    assert load_settings(write(tmp_path, "")).log.level == "DEBUG"


def test_public_bind_without_api_key_refuses(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="set security.api_key"):
        load_settings(write(tmp_path, '[serve]\nhost = "0.0.0.0"\n'))
    with pytest.raises(ConfigError, match="security.api_key is 1 characters: use at least 16"):
        load_settings(write(tmp_path, '[serve]\nhost = "0.0.0.0"\n[security]\napi_key = "k"\n'))
    settings = load_settings(write(tmp_path, '[serve]\nhost = "0.0.0.0"\n[security]\napi_key = "a-key-of-22-characters"\n'))
    assert not settings.serve.is_loopback


def test_a_short_key_is_fine_on_loopback(tmp_path: Path) -> None:
    assert load_settings(write(tmp_path, '[security]\napi_key = "k"\n')).security.api_key == "k"


def test_an_old_config_setting_the_vllm_port_still_loads(tmp_path: Path) -> None:
    assert load_settings(write(tmp_path, "[serve]\nvllm_port = 8000\n")).serve.vllm_port == 8000  # not used


@pytest.mark.parametrize(("url", "error"), [("unix:/run/vllm.sock", None), ("unix:vllm.sock", "absolute path"),
                                            ("http://gpu:8000/", None), ("gpu:8000", "http://")])
def test_an_external_vllm_is_a_url_or_a_socket(tmp_path: Path, url: str, error: str | None) -> None:
    config = write(tmp_path, f'[serve]\nvllm_url = "{url}"\n')
    if error is None:
        assert load_settings(config).serve.vllm_url == url.rstrip("/")
    else:
        with pytest.raises(ConfigError, match=f"serve.vllm_url.*{error}"):
            load_settings(config)


@pytest.mark.parametrize(("rank", "served"), [(1, 1), (4, 8), (16, 16), (17, 32), (300, 320)])
def test_vllm_max_lora_rank_covers_the_training_rank(tmp_path: Path, rank: int, served: int) -> None:
    settings = load_settings(write(tmp_path, f"[train]\nrank = {rank}\n"))
    assert settings.train.vllm_max_lora_rank == served


def test_reference_documents_every_key() -> None:
    table = reference_markdown()
    for key in ("state.dir", "model.base", "serve.host", "serve.port", "serve.model_name", "serve.vllm_port",
                "serve.vllm_url", "watch.inbox", "replay.corpus", "train.rank", "security.api_key"):
        assert f"`{key}`" in table
    assert "| None |" not in table


def test_recall_must_leave_the_request_its_room(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"recall.max_tokens \(3000\) must leave half of serve.max_model_len \(4096\)"):
        load_settings(write(tmp_path, "[recall]\nmax_tokens = 3000\n"))
