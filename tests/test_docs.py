"""Every command shown in README.md and docs/*.md still parses as written: the file or module exists and
its parser accepts the flags (a renamed flag, file or subcommand fails here). Fast: nothing runs."""
import re
import shlex

import pytest

import train
from bench import speed
from conftest import ROOT
from demos import cli
from toy import __main__ as toy_main
from toy import diagnose, drag_bench, search, tables

DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]


def shell_commands(text):
    """The commands of the ```bash blocks, of indented `python ...` lines and of inline `python ...` code
    (but the `python sampler.py COMMAND` pattern), continuation lines joined."""
    blocks = re.findall(r"```bash\n(.*?)```", text, flags=re.S)
    blocks += re.findall(r"^    ((?:python|torchrun) .*)$", text, flags=re.M)
    blocks += [s for s in re.findall(r"`((?:python|torchrun) [^`]+)`", text) if "COMMAND" not in s]  # inline
    commands = []
    for block in blocks:
        for line in block.replace("\\\n", " ").splitlines():
            for part in re.split(r"\s&&\s", line):
                words = shlex.split(part, comments=True)
                if words:
                    commands.append(words)
    return commands


def python_argv(words):
    """-> (program, argv) for a python / torchrun command, or None for other commands (make, pip)."""
    if words[0].endswith("torchrun"):  # torchrun's own options come before the script
        scripts = [i for i, w in enumerate(words) if w.endswith(".py")]
        words = ["python"] + words[scripts[0]:] if scripts else ["python", "train.py"]  # bare: train.py's
    if not re.search(r"(^|/)python3?$", words[0]):
        return None
    if words[1:3] in (["-m", "venv"], ["-m", "pytest"]):
        return None
    if words[1] == "-m":
        return words[2], words[3:]
    return words[1], words[2:]


def parse(program, argv):
    if program == "train.py":
        return train.build_parser().parse_args(argv)
    if program == "sampler.py":
        return cli.build_parser().parse_args(argv) if argv else None  # no arguments: the toy demo
    if program == "toy":
        return tables.parse_args(argv[1:]) if argv[:1] == ["tables"] else toy_main.build_parser().parse_args(argv)
    if program == "toy.diagnose":
        return diagnose.build_parser().parse_args(argv)
    if program == "bench":
        return speed.build_parser().parse_args(argv)
    if program == "toy.search":
        return search.build_parser().parse_args(argv)
    if program == "toy.drag_bench":
        return drag_bench.build_parser().parse_args(argv)
    raise AssertionError(f"a command of an unknown program: {program} {' '.join(argv)}")


def every_command():
    for doc in DOCS:
        for words in shell_commands(doc.read_text()):
            found = python_argv(words)
            if found is not None:
                yield pytest.param(*found, id=f"{doc.name}: {' '.join(words)[:60]}")


@pytest.mark.parametrize("program, argv", list(every_command()))
def test_documented_command_parses(program, argv):
    if program.endswith(".py"):
        assert (ROOT / program).is_file(), program
    if "--help" in argv:
        with pytest.raises(SystemExit) as stop:
            parse(program, argv)
        assert stop.value.code == 0
    else:
        parse(program, argv)


def test_the_readme_shows_the_two_commands_and_links_every_docs_page():
    readme = (ROOT / "README.md").read_text()
    assert "make run" in readme and "make test" in readme
    for page in sorted((ROOT / "docs").glob("*.md")):
        assert f"docs/{page.name}" in readme, page.name
    assert len(readme.splitlines()) <= 250


def test_a_renamed_flag_would_fail():
    with pytest.raises(SystemExit):
        parse("train.py", ["--no-such-flag"])
    commands = list(shell_commands("```bash\npython sampler.py interpolate --frames 3 \\\n    --fps 2  # x\n```"))
    assert commands == [["python", "sampler.py", "interpolate", "--frames", "3", "--fps", "2"]]
