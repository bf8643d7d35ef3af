"""The README's two set-up commands are the ones CI and users actually run."""
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def _readme_commands() -> list[str]:
    text = (ROOT / "README.md").read_text()
    block = re.search(r"## Quick start\n(.*?)\n## ", text, re.S).group(1)
    return [line.strip() for line in re.findall(r"```(?:bash|sh)\n(.*?)```", block, re.S)]


def test_readme_has_exactly_two_setup_commands():
    commands = _readme_commands()
    assert len(commands) == 2, commands
    main_job, tests = commands
    assert "dualbench run" in main_job and "pytest" in tests
    for command in commands:
        assert "-c constraints.txt" in command  # the known-good pins


def test_ci_runs_the_readme_test_command():
    ci = (ROOT / ".ci" / "run").read_text().splitlines()
    assert _readme_commands()[1] in [line.strip() for line in ci]
