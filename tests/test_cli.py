"""The `pad` command line: flags generated from the settings classes,
--help on every sub-command, --version."""

from __future__ import annotations

import argparse
import subprocess
import sys

import pytest

from pad_core.cli_flags import add_settings_flags, settings_overrides
from pad_core.settings import EngineSettings
from server.cli import main, serve_parser
from server.settings import ServerSettings


def parse(*argv: str) -> ServerSettings:
    return ServerSettings(**settings_overrides(serve_parser().parse_args(list(argv)), ServerSettings))


def test_every_setting_has_a_documented_flag():
    parser = serve_parser()
    actions = {action.dest: action for action in parser._actions}
    for name in ServerSettings.model_fields:
        action = actions.get(name)
        assert action is not None, f"no flag for {name}"
        assert "env PAD_" in action.help and action.help.split(";")[0].strip(), name
        assert "default" in action.help, name
    help_text = parser.format_help()
    assert "--default-max-tokens" in help_text and "default: 1024" in help_text


def test_flags_become_settings_and_absent_flags_leave_the_environment_alone(monkeypatch):
    monkeypatch.setenv("PAD_DEFAULT_WEIGHT", "2.5")
    monkeypatch.setenv("PAD_PORT", "9001")
    settings = parse(
        "--port", "9100", "--dtype", "float32", "--default-max-tokens", "7",
        "--reward-adapter", "a=/tmp/a", "--reward-adapter", "b=/tmp/b",
        "--api-key", "sk-1:alice,bob", "--api-key", "sk-2", "--cors-origin", "http://x",
    )
    assert settings.port == 9100 and settings.default_weight == 2.5  # a flag wins; no flag: the variable
    assert settings.dtype == "float32" and settings.default_max_tokens == 7
    assert {k: str(v) for k, v in settings.reward_adapters.items()} == {"a": "/tmp/a", "b": "/tmp/b"}
    assert settings.api_keys == ["sk-1:alice,bob", "sk-2"] and settings.cors_origins == ["http://x"]
    with pytest.raises(SystemExit):
        serve_parser().parse_args(["--dtype", "float8"])


def test_vllm_names_of_the_same_settings():
    """A `vllm serve` line's scheduling flags carry over."""
    settings = parse("--max-num-seqs", "8", "--max-num-batched-tokens", "256", "--no-enable-chunked-prefill",
                     "--max-model-len", "1024")
    assert (settings.max_running_requests, settings.max_prefill_tokens) == (8, 256)
    assert settings.chunked_prefill is False and settings.max_model_len == 1024
    assert parse("--enable-chunked-prefill").chunked_prefill is True


def test_a_malformed_pair_is_a_usage_error(capsys):
    with pytest.raises(SystemExit) as exit_:
        main(["serve", "--reward-model", "nopath"])
    assert exit_.value.code == 2 and "NAME=VALUE" in capsys.readouterr().err


def test_version(capsys):
    assert main(["--version"]) == 0
    assert capsys.readouterr().out.startswith("pad ")


@pytest.mark.parametrize(
    ("argv", "expected"),
    [
        (["serve", "--help"], "pad serve"),
        (["chat", "--help"], "pad chat"),
        (["train", "--help"], "pad train"),
        (["data", "synth", "--help"], "pad data synth"),
        (["eval", "--help"], "pad eval"),
        (["bench", "--help"], "pad bench"),
        (["feedback", "--help"], "pad feedback"),
        (["feedback", "export", "--help"], "--out"),
    ],
)
def test_help_reaches_every_command(argv, expected, capsys):
    with pytest.raises(SystemExit) as exit_:
        main(argv)
    assert exit_.value.code == 0
    assert expected in capsys.readouterr().out


def test_data_help_and_unknown_commands(capsys):
    assert main(["data", "--help"]) == 0
    assert "synth" in capsys.readouterr().out
    assert main(["data", "nope"]) == 2
    assert main(["nope"]) == 2
    assert "unknown command" in capsys.readouterr().err


def test_serve_help_does_not_import_torch():
    code = (
        "import sys\nfrom server.cli import main\n"
        "try:\n    main(['serve', '--help'])\nexcept SystemExit:\n    pass\n"
        "assert 'torch' not in sys.modules, 'torch imported'\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, capture_output=True, timeout=120)


def test_engine_settings_flags_round_trip():  # as `python -m pad_core.worker` builds them
    parser = argparse.ArgumentParser()
    add_settings_flags(parser, EngineSettings)
    args = parser.parse_args(["--model", "/m.gguf", "--max-batch-rows", "12", "--reward-model", "r=/r"])
    settings = EngineSettings(**settings_overrides(args, EngineSettings))
    assert settings.model == "/m.gguf" and settings.max_batch_rows == 12 and settings.reward_models == {"r": "/r"}
