"""`python -m jaxlora.cli COMMAND ...`: the `jaxlora` console script without installing it."""

from jaxlora.cli.main import main

main()
