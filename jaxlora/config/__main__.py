"""`python -m jaxlora.config` prints the key tables of docs/configuration.md."""

from jaxlora.config.reference import reference_markdown

print(reference_markdown())
