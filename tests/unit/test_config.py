"""load_config / resolve_config_path / served_modes, always with explicit environ dicts (never os.environ)."""

from __future__ import annotations

from pathlib import Path

import pytest

from genserve.config import Config, ConfigError, load_config, resolve_config_path
from genserve.messages import ALL_MODES

REPO_CONFIG = Path(__file__).parents[2] / "config.yaml"


def write_yaml(tmp_path: Path, text: str, name: str = "config.yaml") -> Path:
    path = tmp_path / name
    path.write_text(text, encoding="utf-8")
    return path


# --- defaults ----


def test_defaults_without_file_or_environment() -> None:
    config = load_config(None, {})
    assert config.server.port == 12411
    assert config.server.host == "127.0.0.1"
    assert config.model.id == "flux1-dev"
    assert config.model.name == "FLUX.1-dev"
    assert config.model.path == ""
    assert config.model.modes == list(ALL_MODES)
    assert config.queue.max_size == 100


def test_request_defaults_match_genserve() -> None:
    defaults = load_config(None, {}).defaults
    assert (defaults.width, defaults.height) == (1024, 1024)
    assert defaults.num_inference_steps == 50
    assert defaults.cfg == 3.5
    assert defaults.seed == 42
    assert defaults.strength == 0.8
    assert defaults.fill_cfg == 30
    assert defaults.priority == 0
    assert defaults.controlnet_type == "canny"


def test_repo_config_yaml_equals_the_built_in_defaults() -> None:
    assert REPO_CONFIG.is_file(), REPO_CONFIG
    assert load_config(REPO_CONFIG, {}) == Config()


def test_empty_yaml_file_gives_the_defaults(tmp_path: Path) -> None:
    assert load_config(write_yaml(tmp_path, ""), {}) == Config()
    assert load_config(write_yaml(tmp_path, "# only a comment\n"), {}) == Config()


def test_yaml_values_are_applied(tmp_path: Path) -> None:
    path = write_yaml(tmp_path, "server:\n  port: 8080\nqueue:\n  max_size: 3\nworkers:\n  devices: [cuda:0, cpu]\n")
    config = load_config(path, {})
    assert config.server.port == 8080
    assert config.queue.max_size == 3
    assert config.workers.devices == ["cuda:0", "cpu"]
    assert config.server.host == "127.0.0.1"  # untouched fields keep their defaults


def test_duplicate_modes_are_collapsed_in_order(tmp_path: Path) -> None:
    path = write_yaml(tmp_path, "model:\n  modes: [img2img, text2img, img2img]\n")
    assert load_config(path, {}).model.modes == ["img2img", "text2img"]


# --- file errors ----


def test_unknown_key_in_file_is_an_error_naming_it(tmp_path: Path) -> None:
    path = write_yaml(tmp_path, "server:\n  prot: 8080\n")
    with pytest.raises(ConfigError, match=r"server\.prot") as info:
        load_config(path, {})
    assert "unknown key" in str(info.value)


def test_unknown_section_in_file_is_an_error_naming_it(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="sever"):
        load_config(write_yaml(tmp_path, "sever:\n  port: 8080\n"), {})


@pytest.mark.parametrize(
    ("yaml_text", "key"),
    [
        ("server:\n  port: 70000\n", "server.port"),
        ("server:\n  port: 0\n", "server.port"),
        ("server:\n  log_level: verbose\n", "server.log_level"),
        ("workers:\n  cpu_workers: -1\n", "workers.cpu_workers"),
        ("workers:\n  devices: [gpu0]\n", "workers.devices"),
        ("workers:\n  devices: []\n", "workers.devices"),
        ("queue:\n  max_size: 0\n", "queue.max_size"),
        ("model:\n  dtype: float8\n", "model.dtype"),
        ("model:\n  modes: [text2img, upscale]\n", "model.modes"),
        ("defaults:\n  strength: 1.5\n", "defaults.strength"),
        ("controlnet:\n  conditioning_scale: 3\n", "controlnet.conditioning_scale"),
    ],
)
def test_bad_value_in_file_is_an_error_naming_the_key(tmp_path: Path, yaml_text: str, key: str) -> None:
    with pytest.raises(ConfigError) as info:
        load_config(write_yaml(tmp_path, yaml_text), {})
    assert key in str(info.value)


def test_bad_device_message_names_the_device(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="gpu0"):
        load_config(write_yaml(tmp_path, "workers:\n  devices: [cuda:0, gpu0]\n"), {})


@pytest.mark.parametrize("yaml_text", ["- server\n- model\n", "just a string\n", "42\n"])
def test_file_that_is_not_a_mapping_is_an_error(tmp_path: Path, yaml_text: str) -> None:
    with pytest.raises(ConfigError, match="must hold a mapping"):
        load_config(write_yaml(tmp_path, yaml_text), {})


def test_section_that_is_not_a_mapping_is_an_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="server"):
        load_config(write_yaml(tmp_path, "server: 8080\n"), {})


def test_invalid_yaml_is_an_error(tmp_path: Path) -> None:
    path = write_yaml(tmp_path, "server:\n  port: [8080\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(path, {})


def test_missing_file_is_an_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="cannot read config file"):
        load_config(tmp_path / "nope.yaml", {})


def test_limits_must_be_ordered(tmp_path: Path) -> None:
    path = write_yaml(tmp_path, "limits:\n  min_size: 512\n  max_size: 256\n")
    with pytest.raises(ConfigError, match="min_size"):
        load_config(path, {})


@pytest.mark.parametrize(
    ("yaml_text", "key"),
    [
        ("defaults:\n  width: 4000\n", "defaults.width"),
        ("defaults:\n  height: 32\n", "defaults.height"),
        ("limits:\n  max_size: 512\n", "defaults.width"),  # the 1024 default no longer fits
        ("defaults:\n  num_inference_steps: 500\n", "defaults.num_inference_steps"),
    ],
)
def test_defaults_outside_limits_are_an_error(tmp_path: Path, yaml_text: str, key: str) -> None:
    with pytest.raises(ConfigError) as info:
        load_config(write_yaml(tmp_path, yaml_text), {})
    assert key in str(info.value)


# --- environment ----


def test_env_shortcuts_override_fields() -> None:
    config = load_config(
        None,
        {
            "GENSERVE_HOST": "0.0.0.0",
            "GENSERVE_PORT": "9000",
            "GENSERVE_MODEL_PATH": "/models/flux",
            "GENSERVE_CPU_WORKERS": "3",
            "GENSERVE_LOG_LEVEL": "debug",
            "GENSERVE_FILL_PATH": "/models/fill",
            "GENSERVE_CONTROLNET_PATH": "/models/cn",
            "GENSERVE_DEVICES": "[cuda:0, cuda:1]",
        },
    )
    assert config.server.host == "0.0.0.0"
    assert config.server.port == 9000
    assert config.model.path == "/models/flux"
    assert config.workers.cpu_workers == 3
    assert config.server.log_level == "debug"
    assert config.fill.path == "/models/fill"
    assert config.controlnet.path == "/models/cn"
    assert config.workers.devices == ["cuda:0", "cuda:1"]


def test_generic_section_field_variables() -> None:
    config = load_config(None, {"GENSERVE_QUEUE__MAX_SIZE": "7", "GENSERVE_DEFAULTS__CFG": "4.5"})
    assert config.queue.max_size == 7
    assert config.defaults.cfg == 4.5


def test_env_list_value() -> None:
    config = load_config(None, {"GENSERVE_MODEL__MODES": "[text2img, img2img]"})
    assert config.model.modes == ["text2img", "img2img"]


def test_env_beats_file(tmp_path: Path) -> None:
    path = write_yaml(tmp_path, "server:\n  port: 8080\n  host: 10.0.0.1\nqueue:\n  max_size: 3\n")
    config = load_config(path, {"GENSERVE_PORT": "9000", "GENSERVE_QUEUE__MAX_SIZE": "4"})
    assert config.server.port == 9000
    assert config.queue.max_size == 4
    assert config.server.host == "10.0.0.1"  # fields the environment does not set come from the file


def test_variables_without_the_prefix_and_genserve_config_are_ignored() -> None:
    config = load_config(None, {"PORT": "1", "HOME": "/root", "GENSERVE_CONFIG": "/does/not/matter.yaml"})
    assert config == Config()


@pytest.mark.parametrize(
    "name",
    ["GENSERVE_FOO", "GENSERVE_QUEUE__NOPE", "GENSERVE_NOSECTION__MAX_SIZE", "GENSERVE_QUEUE_MAX_SIZE"],
)
def test_unknown_variable_is_an_error_naming_it(name: str) -> None:
    with pytest.raises(ConfigError) as info:
        load_config(None, {name: "1"})
    assert name in str(info.value)


def test_bad_env_value_is_an_error_naming_the_key() -> None:
    with pytest.raises(ConfigError, match=r"server\.port"):
        load_config(None, {"GENSERVE_PORT": "70000"})
    with pytest.raises(ConfigError, match=r"server\.port"):
        load_config(None, {"GENSERVE_PORT": "eighty"})


@pytest.mark.parametrize("value", ["123", "1.5", "007"])
def test_numeric_looking_string_field_stays_the_string(value: str) -> None:
    config = load_config(None, {"GENSERVE_MODEL_PATH": value})
    assert config.model.path == value


def test_empty_env_value_clears_a_string_field(tmp_path: Path) -> None:
    path = write_yaml(tmp_path, "model:\n  path: /models/flux\n")
    assert load_config(path, {"GENSERVE_MODEL_PATH": ""}).model.path == ""


def test_ipv6_any_host_from_env() -> None:
    assert load_config(None, {"GENSERVE_HOST": "::"}).server.host == "::"


def test_string_env_value_with_hash_is_kept_whole() -> None:
    assert load_config(None, {"GENSERVE_MODEL__NAME": "FLUX #1"}).model.name == "FLUX #1"


# --- served_modes ----


def test_embedded_model_serves_every_mode() -> None:
    config = load_config(None, {})
    assert config.uses_embedded_model
    modes, notes = config.served_modes()
    assert modes == ALL_MODES
    assert notes == []


def test_real_model_without_fill_controlnet_or_redux_weights_drops_those_modes() -> None:
    config = load_config(None, {"GENSERVE_MODEL_PATH": "/models/flux"})
    assert not config.uses_embedded_model
    modes, notes = config.served_modes()
    assert modes == ("text2img", "img2img")
    assert len(notes) == 3
    assert any("fill" in note and "fill.path" in note for note in notes)
    assert any("controlnet" in note and "controlnet.path" in note for note in notes)
    assert any("redux" in note and "redux.path" in note for note in notes)


def test_real_model_with_fill_and_controlnet_weights_serves_every_mode() -> None:
    config = load_config(
        None,
        {
            "GENSERVE_MODEL_PATH": "/m/flux",
            "GENSERVE_FILL_PATH": "/m/fill",
            "GENSERVE_CONTROLNET_PATH": "/m/cn",
            "GENSERVE_REDUX_PATH": "/m/redux",
        },
    )
    assert config.served_modes() == (ALL_MODES, [])


def test_served_modes_only_lists_configured_modes() -> None:
    config = load_config(None, {"GENSERVE_MODEL_PATH": "/m/flux", "GENSERVE_MODEL__MODES": "[text2img, fill]"})
    modes, notes = config.served_modes()
    assert modes == ("text2img",)
    assert len(notes) == 1 and "fill" in notes[0]


# --- resolve_config_path ----


def test_resolve_config_path_precedence(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    write_yaml(tmp_path, "server:\n  port: 1111\n")
    env = {"GENSERVE_CONFIG": str(tmp_path / "from-env.yaml")}

    assert resolve_config_path("cli.yaml", env) == Path("cli.yaml")  # --config beats GENSERVE_CONFIG
    assert resolve_config_path(None, env) == tmp_path / "from-env.yaml"  # GENSERVE_CONFIG beats ./config.yaml
    found = resolve_config_path(None, {})
    assert found == Path("config.yaml")  # ./config.yaml when present
    assert load_config(found, {}).server.port == 1111


def test_resolve_config_path_without_any_source_is_none(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    assert resolve_config_path(None, {}) is None
    assert resolve_config_path(None, {"GENSERVE_CONFIG": ""}) is None
    assert resolve_config_path("", {}) is None


def test_resolve_config_path_ignores_a_config_yaml_directory(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    (tmp_path / "config.yaml").mkdir()
    assert resolve_config_path(None, {}) is None


@pytest.mark.parametrize(
    ("yaml_text", "key"),
    [
        ("defaults:\n  cfg: 100\n", "defaults.cfg"),  # > limits.max_cfg: every request without cfg gets 400
        ("defaults:\n  fill_cfg: -1\n", "defaults.fill_cfg"),  # every fill request without cfg gets 400
        ("defaults:\n  seed: -5\n", "defaults.seed"),  # reaches the worker as JobRequest.seed=-5
        (
            "defaults:\n  controlnet_type: sketch\n",
            "defaults.controlnet_type",
        ),  # every controlnet request: 400
    ],
    ids=["cfg", "fill_cfg", "seed", "controlnet_type"],
)
def test_other_defaults_outside_limits_are_an_error(tmp_path: Path, yaml_text: str, key: str) -> None:
    with pytest.raises(ConfigError) as info:
        load_config(write_yaml(tmp_path, yaml_text), {})
    assert key in str(info.value)
