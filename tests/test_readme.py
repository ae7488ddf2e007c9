"""The README opens with the two commands, and CI runs the README's test command verbatim."""
import pathlib
import re

ROOT = pathlib.Path(__file__).resolve().parents[1]


def readme_commands():
    return re.findall(r"```bash\n(.+?)\n```", (ROOT / "README.md").read_text())


def test_readme_opens_with_demo_and_test_commands():
    demo, tests = readme_commands()[:2]
    assert "pip install torch==2.13.0" in demo and demo.endswith("python -m fastft.demo")
    assert "pip install torch==2.13.0" in tests and tests.endswith("pytest -q")
    for command in (demo, tests):  # the CPU torch is installed before anything that depends on torch
        assert command.index("torch==2.13.0") < command.index(".[")


def test_ci_runs_both_readme_commands_verbatim_demo_first():
    demo, tests = readme_commands()[:2]
    lines = (ROOT / ".ci" / "run").read_text().splitlines()
    assert demo in lines and tests in lines
    assert lines.index(demo) < lines.index(tests)
    for command in (demo, tests):  # a failure anywhere in the && chain fails CI, not only the last command
        assert lines[lines.index(command) + 1].startswith("check ")
