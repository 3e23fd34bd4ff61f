"""`python -m bench.fix`: see bench.fix.runner."""
from .runner import main

main()
