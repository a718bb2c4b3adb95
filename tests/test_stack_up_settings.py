"""``python -m stack.up`` reads its STACK_… variables through photocore.settings: same rules as the services."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from photocore.settings import UserError
from stack import up
from tests.conftest import REPO


def test_variables_set_defaults_and_flags_win() -> None:
    env = {"STACK_ANTI_SUS_PORT": "8777", "STACK_GALLERY": "/srv/g", "STACK_SKIP_MODELS": "yes", "STACK_LOG_FORMAT": "json"}
    args = up.parser(env).parse_args([])
    assert (args.anti_sus_port, args.gallery, args.skip_models, args.log_format) == (8777, Path("/srv/g"), True, "json")
    args = up.parser(env).parse_args(["--anti-sus-port", "9777"])
    assert args.anti_sus_port == 9777
    assert up.parser({}).parse_args([]).skip_models is False
    # An empty variable counts as unset (compose passes ${X:-}).
    assert up.parser({"STACK_ANTI_SUS_PORT": ""}).parse_args([]).anti_sus_port == 7777


@pytest.mark.parametrize("env,named", [
    ({"STACK_ANTI_SUS_PORT": "seven"}, "STACK_ANTI_SUS_PORT"),
    ({"STACK_GALLERY_PORT": "70000"}, "STACK_GALLERY_PORT"),
    ({"STACK_SKIP_MODELS": "maybe"}, "STACK_SKIP_MODELS"),
    ({"STACK_LOG_FORMAT": "xml"}, "STACK_LOG_FORMAT"),
])
def test_a_bad_variable_is_one_line_and_exit_2(env: dict[str, str], named: str, tmp_path: Path) -> None:
    with pytest.raises(UserError, match=named):
        up.parser(env)
    out = subprocess.run([sys.executable, "-m", "stack.up"], capture_output=True, text=True, cwd=tmp_path, timeout=60,
                         env={"PATH": "/usr/bin:/bin", "PYTHONPATH": str(REPO), "HOME": str(tmp_path), **env})
    assert out.returncode == 2, out.stderr
    assert out.stderr.startswith("error: environment variable " + named) and out.stderr.count("\n") == 1, out.stderr
    assert not (tmp_path / "state").exists(), "nothing may start on a bad setting"


def test_help_names_each_variable_and_default() -> None:
    flat = " ".join(up.parser({}).format_help().split())
    for text in ("[env STACK_MODELS; default: var/models]", "[env STACK_ANTI_SUS_PORT; default: 7777]",
                 "[env STACK_SKIP_MODELS=1|0; default: off]", "[env STACK_STATE_DIR; default: state]"):
        assert text in flat, text
