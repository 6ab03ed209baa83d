"""`python -m rt_base ...`: the correct base engine (no flaw)."""

from rt_base.cli import main
from rt_base.flaws import Flaws

main(Flaws())
