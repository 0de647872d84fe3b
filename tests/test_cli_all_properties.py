"""Every command's arguments, generated from the parser itself: any argv either parses or is a usage
error (exit 2) — no custom option type may crash — and the settings of `train`, `finetune` and `serve`
are validated into a one-line SdlabError, never another exception. (`generate` and the editing commands
run for real in test_cli_properties.py and test_cli_edit_properties.py.)"""

from __future__ import annotations

import argparse

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from sdlab.cli import build_parser, cmd_serve
from sdlab.errors import SdlabError
from tests.hostile import count

TEXT = st.sampled_from(["", "x", "-1", "0", "1", "2.5", "nan", "inf", "1e999", "64x64", "0x0", "-8x8", "a:b", "1,2,3,4",
                        "a,b", "/nonexistent/path", "../x", "shapes", "C:\\x.safetensors:0.5"]) | st.text(max_size=8)


def _commands() -> dict[str, argparse.ArgumentParser]:
    found = {}

    def walk(parser: argparse.ArgumentParser, path: tuple[str, ...]) -> None:
        subs = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
        if not subs:
            found[" ".join(path)] = parser
            return
        for name, sub in subs[0].choices.items():
            walk(sub, (*path, name))

    walk(build_parser(), ())
    return found


COMMANDS = _commands()


def _argv(parser: argparse.ArgumentParser, data: st.DataObject) -> list[str]:
    argv = []
    for action in parser._actions:
        if isinstance(action, argparse._HelpAction):
            continue
        if not action.option_strings:  # a positional
            for _ in range(1 if action.nargs in (None, "?") else data.draw(st.integers(0, 2))):
                argv.append(data.draw(TEXT))
            continue
        if not data.draw(st.booleans()):
            continue
        flag = data.draw(st.sampled_from(action.option_strings))
        if action.nargs == 0:
            argv.append(flag)
        else:
            value = data.draw(st.sampled_from(list(action.choices)) | TEXT) if action.choices else data.draw(TEXT)
            argv += [flag, str(value)]
    return argv


@pytest.mark.parametrize("command", sorted(COMMANDS))
@settings(max_examples=40, deadline=None, derandomize=True, suppress_health_check=list(HealthCheck))
@given(data=st.data())
def test_any_arguments_parse_or_are_a_usage_error(command, data, capsys):
    count("property: argument lists for every command")
    argv = [*command.split(), *_argv(COMMANDS[command], data)]
    try:
        args = build_parser().parse_args(argv)
    except SystemExit as e:
        assert e.code == 2
        assert "Traceback" not in capsys.readouterr().err
        return
    if command in ("train", "finetune"):
        from sdlab.train.cli import settings_from_args
        from sdlab.train.finetune import FinetuneSettings
        from sdlab.train.settings import TrainSettings

        try:
            settings_from_args(args, TrainSettings if command == "train" else FinetuneSettings,
                               "train.json" if command == "train" else "finetune.json")
        except SdlabError as e:
            assert "\n" not in str(e)
    elif command == "serve":
        import sdlab.server.app as app

        started = []
        original, app.serve = app.serve, lambda cfg, host, port: started.append(cfg)
        try:
            cmd_serve(args)
        except SdlabError as e:
            assert "\n" not in str(e)
        finally:
            app.serve = original
