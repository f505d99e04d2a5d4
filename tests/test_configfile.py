"""``bidder serve --config FILE``: every serve option is a key (from the parser, nothing to keep in step), the
command line overrides the file, unknown keys and secrets are refused naming the file and the key, and
``bidder config --print`` writes a file that configures the same server."""
from __future__ import annotations

import argparse
import json
import os
import secrets
from pathlib import Path

import pytest

from bidder.__main__ import NOTICE_KEYS_ENV, _command_parser, _parser, main, notice_settings, parse
from bidder.configfile import ConfigError, option_keys, read_config, render_config

ROOT = Path(__file__).resolve().parents[1]


def write(tmp_path: Path, text: str, name: str = "bidder.toml") -> Path:
    path = tmp_path / name
    path.write_text(text, encoding="utf-8")
    return path


def serve_parser() -> argparse.ArgumentParser:
    return _command_parser(_parser(), "serve")


def test_every_serve_option_is_a_key_and_only_those():
    serve = serve_parser()
    options = {max(a.option_strings, key=len).lstrip("-") for a in serve._actions if a.option_strings} - {"help"}
    assert set(option_keys(serve)) == options - {"config"}
    assert {"max-batch", "notice-url", "no-pin", "events", "clock-speed", "retrieve-k", "log-format",
            "metrics-port", "drain-timeout"} <= set(option_keys(serve))


def test_an_option_added_to_the_parser_is_a_key_with_no_other_change(tmp_path):
    parser = argparse.ArgumentParser()
    parser.add_argument("--budget-refill", type=float, default=1.0)
    parser.add_argument("--ledger", type=Path, default=None)
    parser.add_argument("--no-ledger-sync", action="store_true")
    (tmp_path / "conf").mkdir()
    path = write(tmp_path / "conf", 'budget-refill = 2\nledger = "ledger.db"\nno-ledger-sync = true\n')
    assert read_config(path, parser) == {"budget_refill": 2.0, "ledger": tmp_path / "conf" / "ledger.db",
                                         "no_ledger_sync": True}


def test_the_config_and_ready_commands_take_every_serve_option():
    """A serve option added after the commands copied serve's options would be missing from them."""
    parser = _parser()
    serve = set(option_keys(_command_parser(parser, "serve")))
    for command in ("config", "ready"):
        assert set(option_keys(_command_parser(parser, command))) - {"print"} == serve, command


def test_the_command_line_overrides_the_file(tmp_path):
    path = write(tmp_path, 'port = 9000\nmax-batch = 32\nno-pin = true\nlog-format = "json"\nworkers = "auto"\n')
    _, args = parse(["serve", "--config", str(path), "--port", "9100", "--log-format", "text"])
    assert (args.port, args.max_batch, args.no_pin, args.log_format, args.workers) == (9100, 32, True, "text", "auto")
    _, defaults = parse(["serve"])
    assert (defaults.port, defaults.max_batch, defaults.no_pin, defaults.workers) == (8080, 256, False, 1)


def test_values_are_converted_as_the_option_converts_its_argument(tmp_path):
    path = write(tmp_path, 'now = 2026-11-25T14:00:00Z\nclock-anchor = "2026-11-25T14:00:00Z"\n'
                           'utc-offset = 8\nevents = "events"\nmodel = "/srv/bundle"\naccess-log-sample = 0.25\n')
    _, args = parse(["serve", "--config", str(path)])
    assert args.now == args.clock_anchor == 1795615200.0
    assert args.utc_offset == 8.0 and isinstance(args.utc_offset, float)
    assert args.events == tmp_path / "events"  # relative to the file's directory
    assert args.model == Path("/srv/bundle") and args.access_log_sample == 0.25


@pytest.mark.parametrize("text, message", [
    ("max_batch = 3\n", "unknown key 'max_batch': not a bidder serve option; did you mean 'max-batch'?"),
    ('[notices]\nurl = "http://x"\n', "unknown key 'notices.url'"),
    ('config = "other.toml"\n', "unknown key 'config'"),
    ('port = "eighty"\n', "port: invalid int value"),
    ("no-pin = 1\n", "no-pin: expected true or false, got 1"),
    ("port = true\n", "port: expected a value for --port, got True"),
    ('log-format = "xml"\n', "log-format: expected one of text, json, got 'xml'"),
    ("access-log-sample = 2\n", "access-log-sample: expected a fraction from 0 to 1"),
    ("now = 2026-11-25T14:00:00\n", "now: a time needs its offset"),
    ("port = [1, 2]\n", "port: expected a single value"),
    ("port = \n", "invalid TOML"),
])
def test_a_bad_file_is_refused_naming_the_file_and_the_key(tmp_path, text, message, capsys):
    path = write(tmp_path, text)
    assert main(["serve", "--config", str(path)]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: {path}: ") and message in err and err.count("\n") == 1, err


def test_a_missing_file_is_one_error_line(tmp_path, capsys):
    assert main(["config", "--print", "--config", str(tmp_path / "none.toml")]) == 2
    assert capsys.readouterr().err == f"error: {tmp_path / 'none.toml'}: no such config file\n"


@pytest.mark.parametrize("text", [
    'redis-password = "hunter2"\n', 'notice-secret = "abc"\n', 'api-token = "t"\n',
    'notice-url = "https://user:hunter2@bidder.example.com"\n',
])
def test_secrets_are_refused_in_the_file(tmp_path, text, capsys):
    path = write(tmp_path, text)
    assert main(["serve", "--config", str(path)]) == 2
    err = capsys.readouterr().err
    assert "secrets never live in the config file" in err and "hunter2" not in err, err


def test_a_secret_file_option_is_not_a_secret(tmp_path):
    parser = argparse.ArgumentParser()
    parser.add_argument("--redis-password-file", type=Path)
    assert read_config(write(tmp_path, 'redis-password-file = "/run/secrets/redis"\n'), parser) == {
        "redis_password_file": Path("/run/secrets/redis")}


def test_the_printed_configuration_configures_the_same_server(tmp_path, capsys):
    source = write(tmp_path, 'port = 9000\nno-pin = true\nnow = 2026-11-25T14:00:00Z\nevents = "ev"\n'
                             'workers = "auto"\n', "source.toml")
    argv = ["--config", str(source), "--max-batch", "64", "--host", "0.0.0.0", "--clock-speed", "2.5"]
    assert main(["config", "--print", *argv]) == 0
    printed = capsys.readouterr().out
    assert "port = 9000\n" in printed and "max-batch = 64\n" in printed and "# notice-url =  (not set)" in printed
    _, expected = parse(["serve", *argv])
    _, again = parse(["serve", "--config", str(write(tmp_path, printed, "printed.toml"))])
    assert vars(again) | {"config": None} == vars(expected) | {"config": None}


def test_render_covers_every_option():
    serve = serve_parser()
    _, args = parse(["serve"])
    lines = render_config(serve, args).splitlines()
    assert len(lines) == len(option_keys(serve))


def keyring_json() -> str:
    return json.dumps({"keys": [{"id": "k1", "secret": secrets.token_hex(32), "created": "2026-12-01T00:00:00Z"}]})


def test_notice_keys_come_from_the_environment(tmp_path, monkeypatch):
    monkeypatch.setenv(NOTICE_KEYS_ENV, keyring_json())
    _, args = parse(["serve", "--notice-url", "http://127.0.0.1:1", "--state-dir", str(tmp_path / "state")])
    settings = notice_settings(args)
    assert list(settings.keyring.keys) == ["k1"] and settings.keyring.origin == NOTICE_KEYS_ENV


def test_notice_keys_from_the_environment_are_checked_like_a_key_file(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv(NOTICE_KEYS_ENV, '{"keys": []}')
    assert main(["serve", "--notice-url", "http://127.0.0.1:1", "--state-dir", str(tmp_path)]) == 2
    assert capsys.readouterr().err.startswith(f"error: {NOTICE_KEYS_ENV}: expected")


def test_notice_keys_from_two_places_are_refused(tmp_path, monkeypatch, capsys):
    keys = tmp_path / "keys.json"
    keys.write_text(keyring_json())
    os.chmod(keys, 0o600)
    monkeypatch.setenv(NOTICE_KEYS_ENV, keyring_json())
    assert main(["serve", "--notice-url", "http://127.0.0.1:1", "--notice-keys", str(keys)]) == 2
    assert "not both" in capsys.readouterr().err
    assert main(["serve"]) == 2  # keys without notices: a mistake, not ignored
    assert f"{NOTICE_KEYS_ENV} and --state-dir need --notice-url" in capsys.readouterr().err


def test_the_shipped_config_files_load_and_hold_no_secret(tmp_path):
    import yaml

    serve = serve_parser()
    shipped = read_config(ROOT / "deploy" / "bidder.toml", serve)
    assert shipped["workers"] == "auto" and shipped["log_format"] == "json" and shipped["metrics_port"]
    configmap = yaml.safe_load((ROOT / "deploy" / "k8s" / "configmap.yaml").read_text())
    path = write(tmp_path, configmap["data"]["bidder.toml"])
    from_configmap = read_config(path, serve)
    # the ConfigMap is the shipped file plus this deployment's notices
    assert {k: v for k, v in from_configmap.items() if k in shipped} == shipped


def test_an_option_given_several_times_is_an_array(tmp_path, capsys):
    parser = argparse.ArgumentParser()
    parser.add_argument("--budget", action="append", default=None)
    parser.add_argument("--shards", type=int, nargs="+", default=None)
    path = write(tmp_path, 'budget = ["c1=100", "c2=50"]\nshards = [1, 2]\n')
    settings = read_config(path, parser)
    assert settings == {"budget": ["c1=100", "c2=50"], "shards": [1, 2]}
    printed = render_config(parser, argparse.Namespace(**settings))
    assert read_config(write(tmp_path, printed, "printed.toml"), parser) == settings
    with pytest.raises(ConfigError, match=r"budget: expected an array"):
        read_config(write(tmp_path, 'budget = "c1=100"\n'), parser)
    with pytest.raises(ConfigError, match=r"shards\[1\]: invalid int value"):
        read_config(write(tmp_path, 'shards = [1, "x"]\n'), parser)
