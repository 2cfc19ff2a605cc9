"""The README's command blocks, read from README.md itself, so tests run what users read."""
import re
import shlex

from tests.conftest import ROOT

README = (ROOT / "README.md").read_text()


def sh_block_after(marker):
    """The commands of the first ```sh block after `marker`, as argv lists, comments removed."""
    tail = README[README.index(marker):]
    block = re.search(r"```sh\n(.*?)```", tail, re.S).group(1)
    commands = [line.split("#", 1)[0].strip() for line in block.splitlines()]
    return [shlex.split(command) for command in commands if command]


def manage_args(argv):
    """`python manage.py X ...` as the arguments of manage.py."""
    assert argv[:2] == ["python", "manage.py"], argv
    return tuple(argv[2:])


def runbook():
    return sh_block_after("## The runbook")


def adoption():
    """The adoption block, then the runbook from phase 2 (as the README says)."""
    return sh_block_after("## Adopting an existing") + runbook()[1:]


def undo():
    return sh_block_after("**Undo.**")


def switching_again():
    return sh_block_after("## Switching again")
