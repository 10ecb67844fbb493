"""The key tables of docs/configuration.md, rendered from the sections (`python -m jaxlora.config`)."""

from typing import Any

from jaxlora.config.sections import Config
from jaxlora.data.config import DataSource
from jaxlora.schema import Section, item_type, join, section_type, type_name

__all__ = ["default_text", "reference_markdown", "reference_tables"]

Row = tuple[str, str, str, str]


def default_text(value: Any) -> str:
    """A default as YAML writes it: `null`, `true`, `[a, b]`, `2.0e-4`."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, tuple):
        return "[" + ", ".join(default_text(v) for v in value) + "]"
    if isinstance(value, float) and value and abs(value) < 1e-3:  # 2.0e-4, not 0.0002
        mantissa, exponent = f"{value:e}".split("e")
        mantissa = mantissa.rstrip("0") + ("0" if mantissa.rstrip("0").endswith(".") else "")
        return f"{mantissa}e{int(exponent)}"
    return str(value)


def reference_tables() -> list[tuple[str, list[Row]]]:
    """(title, rows) per section; a row is (dotted key, type, default or 'required', meaning)."""
    tables: list[tuple[str, list[Row]]] = []

    def walk(cls: type[Section], where: str, title: str) -> None:
        rows: list[Row] = []
        nested: list[tuple[type[Section], str, str]] = []
        tables.append((title, rows))
        for name, info in cls.model_fields.items():
            key = join(where, name)
            section = section_type(info.annotation)
            if section is not None:
                nested.append((section, key, key))
                continue
            default = "required" if info.is_required() else f"`{default_text(info.default)}`"
            rows.append((key, type_name(info.annotation), default, info.description))
            if item_type(info.annotation) is DataSource and name == "train":
                nested.append((DataSource, f"{key}[i]", f"{key}[i] and data.validation[i] (DataSource)"))
        for section, key, sub_title in nested:
            walk(section, key, sub_title)

    walk(Config, "", "top level")
    return tables


def reference_markdown() -> str:
    """The key tables of docs/configuration.md."""
    out = []
    for title, rows in reference_tables():
        out += [f"### `{title}`" if title != "top level" else "### Top level", ""]
        out += ["| key | type | default | meaning |", "| --- | --- | --- | --- |"]
        for row in rows:
            key, tp, default, meaning = (cell.replace("|", "\\|") for cell in row)
            out.append(f"| `{key}` | {tp} | {default} | {meaning} |")
        out.append("")
    return "\n".join(out)
