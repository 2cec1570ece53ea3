"""The README's commands as a newcomer copies them, in order: the demo makes the run every later
example uses, no example writes over an earlier one's output without --overwrite, and every
option the README shows exists."""

import re
import shlex
import shutil
import subprocess
from pathlib import Path

import pytest
import typer

from rotnet_cli.cli import app

ROOT = Path(__file__).resolve().parents[1]
DEMO = "runs/demo"


def readme_pages() -> list[Path]:
    """The README, then every docs/ page it links to, in the order of their first links: the README
    shows one example per command, the pages the rest, and a reader follows the links in that order."""
    text = (ROOT / "README.md").read_text()
    linked = [ROOT / link for link in re.findall(r"\]\((docs/[^)#]+\.md)[^)]*\)", text)]
    return [ROOT / "README.md", *dict.fromkeys(page for page in linked if page.is_file())]


def readme_commands() -> list[list[str]]:
    """Every `rotnet ...` line of the bash blocks of the README and the pages it links to, in order, as
    argv (comments dropped); a page's copy of an example the reader has already run counts once."""
    commands: list[list[str]] = []
    for page in readme_pages():
        for block in re.findall(r"```bash\n(.*?)```", page.read_text(), flags=re.S):
            for line in block.splitlines():
                for part in line.split("  #")[0].split("&&"):  # the quick start chains install && demo
                    part = part.strip()
                    if part.startswith("rotnet ") and shlex.split(part)[1:] not in commands:
                        commands.append(shlex.split(part)[1:])
    return commands


def test_every_moved_section_is_one_click_from_the_readme():
    pages = {page.name for page in readme_pages()}
    for name in ("pretrain", "probe", "export", "viz", "predict", "embed", "paper", "performance", "reliability"):
        assert f"{name}.md" in pages, f"docs/{name}.md is not linked from the README"
    assert len((ROOT / "README.md").read_text().splitlines()) <= 320  # a newcomer's page, the depth in docs/


def click_command(argv: list[str]):
    """The click command an argv runs, and the rest of the argv."""
    command = typer.main.get_command(app)
    while hasattr(command, "commands") and argv and argv[0] in command.commands:
        command, argv = command.commands[argv[0]], argv[1:]
    return command, argv


def written_folder(argv: list[str]) -> str | None:
    if "--out" in argv and argv[0] in ("pretrain", "export", "predict"):
        return argv[argv.index("--out") + 1].rstrip("/")
    return None


def test_the_demo_makes_the_run_that_every_later_example_uses():
    commands = readme_commands()
    first = next(argv for argv in commands if DEMO in argv)
    assert first[0] == "pretrain" and written_folder(first) == DEMO  # the quick start's demo, named
    writers = [argv for argv in commands if written_folder(argv) == DEMO]
    assert writers == [first]  # nothing later writes the demo's folder again
    python = "\n".join(
        code for page in readme_pages() for code in re.findall(r"```python\n(.*?)```", page.read_text(), flags=re.S)
    )
    assert f'out="{DEMO}"' not in python  # the Python example makes a run of its own


def test_no_example_writes_over_an_earlier_ones_output_without_overwrite():
    written: set[str] = set()
    for argv in readme_commands():
        folder = written_folder(argv)
        if folder is None:
            continue
        assert folder not in written or "--overwrite" in argv, f"`rotnet {shlex.join(argv)}` fails: {folder} exists"
        written.add(folder)


def test_every_option_the_readme_shows_exists():
    for argv in readme_commands():
        command, rest = click_command(argv)
        with typer.Context(command) as ctx:
            known = {opt for p in command.get_params(ctx) for opt in (*p.opts, *p.secondary_opts)}
        given = {token.split("=")[0] for token in rest if token.startswith("-") and not re.fullmatch(r"-\d.*", token)}
        assert given <= known, f"`rotnet {shlex.join(argv)}`: {sorted(given - known)} not options of that command"


@pytest.mark.skipif(shutil.which("git") is None or not (ROOT / ".git").exists(), reason="needs a git checkout")
def test_no_tracked_file_is_ignored_by_gitignore():
    # docs/*.png are tracked and shown in the README: a .gitignore that lists them would drop new ones
    ignored = subprocess.run(
        ["git", "ls-files", "--cached", "--ignored", "--exclude-standard"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        check=True,
    ).stdout.split()
    assert ignored == []
