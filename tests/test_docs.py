"""Run the documentation: every code block and command in `docs/**/*.md`, so the docs cannot rot.

Each page found under docs/ (pages are discovered, not listed) is one test. Its blocks run in document
order, in one subprocess per page whose working directory mirrors the project root (every top-level entry
symlinked, `runs/` fresh and empty, `../shared/assets` pointing at the test assets), so relative paths in
the docs work as written and outputs written under `runs/` vanish with the test:

  ```python / ```py        executed; all Python blocks of a page share one namespace, like one session.
  ```bash / sh / shell / console
                           each command that runs a project script, `python scripts/...` or
                           `python -m jaxlora...` (after optional VAR=value assignments), runs with bash and
                           must exit 0. Other lines (pip install, tensorboard, ...) are shown, not run.
  ```yaml / yml            a block whose top-level keys include a config section (`model`, `lora`, ...) is
                           checked with `jaxlora.config.config_from_dict`: as is when it has `output_dir`,
                           else merged into a minimal config, so a misspelt or removed key fails.
  anything else            (```text, ```json, a bare fence) is shown only.

A block that cannot run on a CPU-only machine without network, or takes minutes, opts out with an HTML
comment on the line before its fence, giving the reason: `<!-- no-run: needs a GPU -->`. Prefer a cheap
variant that runs (`train.max_steps=2`, outputs under `runs/`) to opting out. Every `scripts/NAME.py` a
page mentions must exist, run or not. The Hugging Face hub is offline (HF_HUB_OFFLINE=1). Blocks that
predate this test and cannot run (placeholders, downloads) are listed in KNOWN_BROKEN below: skipped,
reported, and to be fixed or marked no-run in their page, which removes them from the list.

See which blocks ran, and how long each took: `python -m pytest tests/test_docs.py -rP`.

The other tests here check that the teaching pages (layers, concepts, and their Spanish versions) cover
every layer and concept with the expected headings, that the Spanish pages run the same code as the
English ones, and that the modules, config keys and files the docs name exist.
"""

import ast
import dataclasses
import importlib
import json
import os
import re
import subprocess
import sys
import time
import traceback
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs"
ASSETS = Path(os.environ.get("JAXLORA_ASSETS", ROOT.parent / "shared" / "assets")).resolve()
PAGE_TIMEOUT_S = 900
COMMAND_TIMEOUT_S = 600

FENCE = re.compile(r"^(?P<indent>\s*)(?P<fence>`{3,}|~{3,})\s*(?P<info>[^`\s]*)[^`]*$")
NO_RUN = re.compile(r"^\s*<!--\s*no-run:\s*(?P<reason>\S.*?)\s*-->\s*$")
NO_RUN_BAD = re.compile(r"<!--\s*no-?run\b", re.IGNORECASE)
KINDS = {
    **dict.fromkeys(("python", "py", "python3"), "python"),
    **dict.fromkeys(("bash", "sh", "shell", "console", "zsh"), "shell"),
    **dict.fromkeys(("yaml", "yml"), "yaml"),
}
COMMAND = re.compile(
    r"^(?:[A-Za-z_][A-Za-z0-9_]*=\S*\s+)*python3?\s+(?:scripts/\S+\.py|-m\s+jaxlora\S*)(?:\s|$)"
)
SCRIPT_REF = re.compile(r"(?<![\w/.])scripts/([\w-]+\.py)\b")

# Blocks of pages this file does not own that cannot run today (placeholders, downloads); they are skipped
# and reported. Fix the block or mark it no-run, then delete its entry: an entry whose text no longer occurs
# in its page fails the test. {page: {text in the block: why it cannot run}}
KNOWN_BROKEN: dict[str, dict[str, str]] = {}


HOW_TO_FIX = (
    "Fix the block (or the code it documents). A block that cannot run on a CPU-only machine without "
    "network, or takes minutes, opts out with <!-- no-run: reason --> on the line before its fence; see "
    "the docstring of tests/test_docs.py."
)


# --- parsing -------------------------------------------------------------------------------------------


@dataclasses.dataclass
class Block:
    line: int  # 1-based line of the first code line
    info: str  # the fence's language tag, lower case
    code: str
    no_run: str | None  # the reason given by a `<!-- no-run: ... -->` comment

    @property
    def kind(self) -> str:
        return KINDS.get(self.info, "shown")


def parse_blocks(text: str, page: str = "page") -> list[Block]:
    """The fenced code blocks of a markdown text, in order (indented fences, as in lists, included)."""
    lines = text.splitlines()
    blocks, i = [], 0
    while i < len(lines):
        m = FENCE.match(lines[i])
        if not m:
            i += 1
            continue
        indent, fence = len(m["indent"]), m["fence"]
        prev = next((lines[j] for j in range(i - 1, -1, -1) if lines[j].strip()), "")
        marker = NO_RUN.match(prev)
        if marker is None and NO_RUN_BAD.search(prev):
            raise ValueError(f"{page}:{i}: malformed opt-out {prev.strip()!r}; write <!-- no-run: reason -->")
        body, j = [], i + 1
        while j < len(lines):
            close = lines[j].strip()
            if close.startswith(fence[0] * len(fence)) and not close.strip(fence[0]):
                break
            raw = lines[j]
            body.append(raw[indent:] if raw[:indent].strip() == "" else raw.lstrip())
            j += 1
        else:
            raise ValueError(f"{page}:{i + 1}: code fence {fence} is never closed")
        blocks.append(Block(i + 2, m["info"].lower(), "\n".join(body) + "\n", marker and marker["reason"]))
        i = j + 1
    return blocks


def shell_lines(code: str) -> list[tuple[int, str]]:
    """(line offset, command) of a shell block: continuations joined, comments and `$ ` prompts dropped."""
    out, pending, start = [], "", 0
    for k, raw in enumerate(code.splitlines()):
        line = raw.strip()
        if not pending:
            start = k
            if line.startswith("$ "):
                line = line[2:]
        if line.endswith("\\"):
            pending += line[:-1] + " "
            continue
        line = (pending + line).strip()
        pending = ""
        if line and not line.startswith("#"):
            out.append((start, line))
    return out


def headings(text: str, level: int = 2) -> dict[str, str]:
    """{heading text: the section's text up to the next heading of the same or a higher level}."""
    found, current, body = {}, None, []
    in_code = False
    for line in text.splitlines():
        if FENCE.match(line):
            in_code = not in_code
        m = None if in_code else re.match(r"^(#{1,6})\s+(.*?)\s*#*\s*$", line)
        if m and len(m[1]) <= level:
            if current is not None:
                found[current] = "\n".join(body)
            current, body = (m[2] if len(m[1]) == level else None), []
        elif current is not None:
            body.append(line)
    if current is not None:
        found[current] = "\n".join(body)
    return found


def pages() -> list[Path]:
    return sorted(DOCS.rglob("*.md"))


def page_id(p: Path) -> str:
    return p.resolve().relative_to(ROOT).as_posix()


# --- running a page (the subprocess side) --------------------------------------------------------------


def _minimal_config() -> dict:
    return {
        "output_dir": "runs/docs-yaml",
        "model": {"path": "model"},
        "data": {"train": [{"path": "train.jsonl", "format": "text"}]},
    }


def _deep_merge(base: dict, extra: dict) -> dict:
    out = dict(base)
    for k, v in extra.items():
        out[k] = _deep_merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def _check_yaml(code: str) -> str:
    """Validate a config (or config fragment) block; returns what was done."""
    import yaml

    from jaxlora.config import Config, config_from_dict

    data = yaml.safe_load(code)
    sections = set(Config.model_fields)
    if not isinstance(data, dict) or not sections & set(data):
        return "shown (not a jaxlora config)"
    if "output_dir" in data:
        config_from_dict(data)
        return "validated as a full config"
    config_from_dict(_deep_merge(_minimal_config(), data))
    return "validated as a config fragment"


def _run_command(cmd: str) -> None:
    proc = subprocess.run(
        ["bash", "-c", cmd], capture_output=True, text=True, timeout=COMMAND_TIMEOUT_S, check=False
    )
    if proc.returncode != 0:
        tail = (proc.stdout + proc.stderr)[-4000:]
        raise RuntimeError(f"command exited with {proc.returncode}: {cmd}\n{tail}")


def run_page(plan_file: str) -> int:
    """Run one page's plan (written by `test_page`); one JSON report line per block on stdout."""
    plan = json.loads(Path(plan_file).read_text(encoding="utf-8"))
    namespace = {"__name__": "__docs__"}
    status = 0
    for step in plan["steps"]:
        start, error = time.perf_counter(), None
        note = ""
        try:
            if step["kind"] == "python":
                source = "\n" * (step["line"] - 1) + step["code"]  # tracebacks show the page's line numbers
                exec(compile(source, plan["page"], "exec"), namespace)
            elif step["kind"] == "shell":
                _run_command(step["code"])
            else:
                note = _check_yaml(step["code"])
        except BaseException as err:  # noqa: BLE001 - a block may raise anything, SystemExit included
            error = "".join(traceback.format_exception(err))[-6000:]
        result = "FAILED" if error else (note or "ran")
        seconds = time.perf_counter() - start
        print(
            "DOCS-BLOCK "
            + json.dumps({"line": step["line"], "kind": step["kind"], "result": result, "seconds": seconds}),
            flush=True,
        )
        if error:
            print(f"\n{plan['page']}:{step['line']}: {step['kind']} block failed:\n{error}", file=sys.stderr)
            status = 1
            break  # later blocks of the page build on this one
    return status


# --- the tests -----------------------------------------------------------------------------------------


def plan_page(text: str, page: str) -> tuple[list[dict], list[str]]:
    """(steps to run, report lines for blocks that are only shown or opted out) of a page's markdown."""
    known = dict(KNOWN_BROKEN.get(page, {}))
    steps, shown = [], []
    for b in parse_blocks(text, page):
        for name in SCRIPT_REF.findall(b.code):
            assert (ROOT / "scripts" / name).is_file(), f"{page}:{b.line}: scripts/{name} does not exist"
        where = f"{page}:{b.line} {b.info or 'plain'}"
        if b.no_run:
            shown.append(f"{where}: not run ({b.no_run})")
            continue
        hits = [k for k in known if k in b.code]
        for k in hits:
            reason = known.pop(k)
        if hits and b.kind != "shown":
            shown.append(f"{where}: not run (known broken, see KNOWN_BROKEN: {reason})")
        elif b.kind == "python" or b.kind == "yaml":
            steps.append({"line": b.line, "kind": b.kind, "code": b.code})
        elif b.kind == "shell":
            for offset, cmd in shell_lines(b.code):
                if COMMAND.match(cmd):
                    steps.append({"line": b.line + offset, "kind": "shell", "code": cmd})
                else:
                    shown.append(f"{page}:{b.line + offset} shell: shown, not run: {cmd[:70]}")
        else:
            shown.append(f"{where}: shown")
    assert not known, f"KNOWN_BROKEN entries of {page} match no block any more (delete them): {list(known)}"
    return steps, shown


def _scratch_root(tmp: Path) -> Path:
    """A mirror of the project root: symlinks to everything but `runs/`, and ../shared/assets."""
    root = tmp / "project"
    root.mkdir()
    for entry in ROOT.iterdir():
        if entry.name not in ("runs", ".git"):
            (root / entry.name).symlink_to(entry)
    (tmp / "shared").mkdir()
    (tmp / "shared" / "assets").symlink_to(ASSETS)
    return root


class _Env(dict):
    """The subprocess environment; a short repr keeps it out of failure reports."""

    def __repr__(self) -> str:
        return "<docs test environment>"


@pytest.fixture(scope="session")
def docs_env(tmp_path_factory) -> dict:
    if not ASSETS.is_dir():
        pytest.fail(f"test assets not found at {ASSETS}; set JAXLORA_ASSETS")
    shared = tmp_path_factory.mktemp("docs-cache")
    env = _Env(os.environ)
    env.update(
        HF_HUB_OFFLINE="1",
        HF_DATASETS_OFFLINE="1",
        MPLBACKEND="Agg",
        JAXLORA_DATA_CACHE=str(shared / "data"),
        JAX_COMPILATION_CACHE_DIR=str(shared / "jax"),
        JAXLORA_ASSETS=str(ASSETS),
        PYTHONPATH=os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")]).rstrip(os.pathsep),
    )
    return env


@pytest.mark.parametrize("path", pages(), ids=page_id)
def test_page(path, tmp_path, docs_env):
    """Every runnable block of the page runs without error (see the module docstring)."""
    steps, shown = plan_page(path.read_text(encoding="utf-8"), page_id(path))
    plan_file = tmp_path / "plan.json"
    plan_file.write_text(json.dumps({"page": page_id(path), "steps": steps}))
    root = _scratch_root(tmp_path)
    start = time.perf_counter()
    proc = subprocess.run(
        [sys.executable, str(Path(__file__).resolve()), plan_file],
        cwd=root,
        env=docs_env,
        capture_output=True,
        text=True,
        timeout=PAGE_TIMEOUT_S,
        check=False,
    )
    report = [
        json.loads(x[len("DOCS-BLOCK ") :]) for x in proc.stdout.splitlines() if x.startswith("DOCS-BLOCK ")
    ]
    lines = [f"{page_id(path)}:{r['line']} {r['kind']}: {r['result']} ({r['seconds']:.1f} s)" for r in report]
    print(
        "\n".join(
            lines
            + shown
            + [f"{page_id(path)}: {len(report)} blocks run in {time.perf_counter() - start:.1f} s"]
        )
    )
    other = "\n".join(x for x in proc.stdout.splitlines() if not x.startswith("DOCS-BLOCK "))
    rc = proc.returncode
    assert rc == 0, "\n".join([*lines, other[-3000:], proc.stderr[-8000:], HOW_TO_FIX])
    assert len(report) == len(steps), f"only {len(report)} of {len(steps)} blocks ran:\n{proc.stderr[-8000:]}"


# --- the teaching pages: coverage, Spanish parity, names that exist --------------------------------------

CONCEPTS = {
    "docs/concepts.md": {
        "Dataset": [],
        "Token": [],
        "Tokenizer": [],
        "Embedding": [],
        "Loss and loss function": ["cross-entropy"],
        "Backward pass": [],
        "Gradient": [],
        "Optimizer": ["Adam", "AdamW", "SGD"],
        "Learning rate": ["warmup"],
        "Epoch": [],
        "Batch": [],
        "Step / iteration": [],
        "LoRA": ["`r`", "`alpha`", "frozen", "rank"],
        "Reward and GRPO": ["reward", "advantage", "group"],
    },
    "docs/es/conceptos.md": {
        "Conjunto de datos (dataset)": [],
        "Token": [],
        "Tokenizador": [],
        "Embedding": [],
        "Pérdida y función de pérdida": ["entropía cruzada"],
        "Paso hacia atrás (backward pass)": [],
        "Gradiente": [],
        "Optimizador": ["Adam", "AdamW", "SGD"],
        "Tasa de aprendizaje": ["calentamiento"],
        "Época": [],
        "Lote (batch)": [],
        "Paso / iteración": [],
        "LoRA": ["`r`", "`alpha`", "congelad", "rango"],
        "Recompensa y GRPO": ["recompensa", "ventaja", "grupo"],
    },
}
# Each layer: the library a PyTorch user knows, its JAX counterpart(s), named in the layer's section.
LAYER_LIBRARIES = [
    ["NumPy", "jax.numpy"],
    ["CUDA", "cuDNN", "XLA"],
    ["PyTorch", "JAX", "Flax", "optax"],
    ["Transformers", "safetensors"],
    ["Datasets"],
    ["Accelerate", "jax.sharding"],
    ["PEFT"],
    ["Unsloth", "jax.checkpoint"],
    ["bitsandbytes"],
    ["Trainer", "orbax"],
]
LAYERS = {
    "docs/layers.md": [
        "Numerical computing",
        "GPU acceleration",
        "The deep learning framework",
        "Pretrained models",
        "Datasets",
        "Scaling across devices",
        "Parameter-efficient fine-tuning",
        "Fast fine-tuning",
        "Quantization",
        "The trainer",
    ],
    "docs/es/capas.md": [
        "Cálculo numérico",
        "Aceleración en GPU",
        "El framework de deep learning",
        "Modelos preentrenados",
        "Conjuntos de datos (datasets)",
        "Escalado a varios dispositivos",
        "Ajuste fino eficiente en parámetros (PEFT)",
        "Ajuste fino rápido",
        "Cuantización",
        "El entrenador (trainer)",
    ],
}
TRANSLATIONS = {"docs/es/conceptos.md": "docs/concepts.md", "docs/es/capas.md": "docs/layers.md"}
IN_JAXLORA = {"docs/concepts.md": "**In jaxlora:**", "docs/es/conceptos.md": "**En jaxlora:**"}
# The pages whose every backticked module, config key and path is checked against the code.
NAMED_PAGES = [
    "docs/concepts.md",
    "docs/layers.md",
    "docs/es/conceptos.md",
    "docs/es/capas.md",
    "docs/quickstart.md",
]
SECTIONS = ("model", "quant", "lora", "data", "train", "checkpoint", "logging", "parallel")
CONFIG_KEY = re.compile(rf"^(?:{'|'.join(SECTIONS)})(?:\.[a-z_0-9]+|\[i\])+$")
PATH_REF = re.compile(r"^(?:scripts|configs|docs|jaxlora|tests)/[\w./-]*$")


def _read(page: str) -> str:
    return (ROOT / page).read_text(encoding="utf-8")


def test_pages_are_discovered():
    found = {page_id(p) for p in pages()}
    mine = set(CONCEPTS) | set(LAYERS) | {"docs/quickstart.md", "docs/configuration.md"}
    assert mine <= found, f"docs pages not discovered: {sorted(mine - found)}"


@pytest.mark.parametrize("page", sorted(CONCEPTS), ids=str)
def test_concept_pages_cover_every_concept(page):
    sections = headings(_read(page))
    missing = [h for h in CONCEPTS[page] if h not in sections]
    assert not missing, f"{page}: missing '## ' headings {missing}; found {list(sections)}"
    for heading, terms in CONCEPTS[page].items():
        body = sections[heading]
        absent = [t for t in terms if t not in body]
        assert not absent, f"{page}: section '{heading}' does not mention {absent}"
        assert "```python" in body, f"{page}: section '{heading}' has no runnable ```python block"
        assert IN_JAXLORA[page] in body, f"{page}: section '{heading}' does not say where it lives in jaxlora"


@pytest.mark.parametrize("page", sorted(LAYERS), ids=str)
def test_layer_pages_cover_every_layer(page):
    sections = headings(_read(page))
    for heading, libraries in zip(LAYERS[page], LAYER_LIBRARIES, strict=True):
        assert heading in sections, f"{page}: missing heading '## {heading}'; found {list(sections)}"
        body = sections[heading]
        absent = [lib for lib in libraries if not re.search(rf"(?<![\w.]){re.escape(lib)}(?![\w])", body)]
        assert not absent, f"{page}: section '{heading}' does not name {absent}"
        assert re.search(r"`jaxlora[./]\w", body), f"{page}: section '{heading}' names no jaxlora module"
        keys = [k for k in re.findall(r"`([^`\n]+)`", body) if CONFIG_KEY.match(_key(k))]
        assert keys, f"{page}: section '{heading}' names no config key"


@pytest.mark.parametrize("page", sorted(TRANSLATIONS), ids=str)
def test_spanish_pages_run_the_same_code(page):
    """Comments may be translated; the programs must be the same (compared as Python syntax trees)."""
    english = TRANSLATIONS[page]
    mine = [b for b in parse_blocks(_read(page), page) if b.kind in ("python", "shell")]
    theirs = [b for b in parse_blocks(_read(english), english) if b.kind in ("python", "shell")]
    assert len(mine) == len(theirs), f"{page} has {len(mine)} code blocks, {english} has {len(theirs)}"
    for a, b in zip(mine, theirs, strict=True):
        if a.kind == "python" and b.kind == "python":
            same = ast.dump(ast.parse(a.code)) == ast.dump(ast.parse(b.code))
        else:
            same = shell_lines(a.code) == shell_lines(b.code)
        assert same, f"{page}:{a.line} differs from {english}:{b.line}"


def _key(span: str) -> str:
    """`train.max_steps=2` or `model.attention: cudnn` -> the key alone, list indices as `[i]`."""
    return re.sub(r"\[\d+\]", "[i]", re.split(r"[=:]", span, maxsplit=1)[0].strip())


def config_keys() -> set[str]:
    from jaxlora.config import Config
    from jaxlora.schema import item_type, section_type

    keys: set[str] = set()

    def walk(cls, prefix: str) -> None:
        for name, f in cls.model_fields.items():
            key, tp = prefix + name, f.annotation
            keys.add(key)
            if section_type(tp) is not None:
                walk(section_type(tp), key + ".")
            elif section_type(item_type(tp)) is not None:
                walk(section_type(item_type(tp)), key + "[i].")

    walk(Config, "")
    return keys


def resolve(name: str):
    """Import `jaxlora.a.b` as a module, or the longest module prefix and then attributes."""
    parts = name.removesuffix("()").split(".")
    for n in range(len(parts), 0, -1):
        try:
            obj = importlib.import_module(".".join(parts[:n]))
        except ModuleNotFoundError:
            continue
        for attr in parts[n:]:
            obj = getattr(obj, attr)
        return obj
    raise ModuleNotFoundError(name)


@pytest.mark.parametrize("page", NAMED_PAGES, ids=str)
def test_named_modules_keys_and_files_exist(page):
    keys = config_keys()
    problems = []
    for span in re.findall(r"`([^`\n]+)`", _read(page)):
        span = span.strip()
        if re.fullmatch(r"jaxlora(\.\w+)+(\(\))?", span):
            try:
                resolve(span)
            except (ImportError, AttributeError) as err:
                problems.append(f"`{span}` does not resolve ({err})")
        elif CONFIG_KEY.match(_key(span)) and _key(span) not in keys:
            problems.append(f"`{span}` is not a config key")
        elif PATH_REF.match(span) and "*" not in span and not (ROOT / span.rstrip("/")).exists():
            problems.append(f"`{span}` does not exist")
    assert not problems, f"{page}:\n" + "\n".join(problems)


def slug(heading: str) -> str:
    """GitHub's anchor for a heading."""
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


@pytest.mark.parametrize("path", [*pages(), ROOT / "README.md"], ids=page_id)
def test_links_resolve(path):
    """Relative links (and #anchors) in docs pages and README point at files and headings that exist."""
    text = path.read_text(encoding="utf-8")
    bad = []
    for target in re.findall(r"\]\(([^)\s]+)\)", text):
        if re.match(r"^[a-z]+:", target):
            continue
        file, _, anchor = target.partition("#")
        dest = (path.parent / file).resolve() if file else path
        rel = dest.relative_to(ROOT).as_posix() if dest.is_relative_to(ROOT) else str(dest)
        if not dest.exists():
            bad.append(f"{target}: {rel} does not exist")
            continue
        if anchor and dest.suffix == ".md":
            anchors = {
                slug(h) for h in re.findall(r"^#{1,6}\s+(.*?)\s*$", dest.read_text(encoding="utf-8"), re.M)
            }
            if anchor not in anchors:
                bad.append(f"{target}: no heading with anchor #{anchor} in {rel}")
    assert not bad, f"{page_id(path)}: broken links:\n" + "\n".join(bad)


# --- the harness itself can fail --------------------------------------------------------------------------

SELF_TEST_PAGE = """
```python
x = 1
```

<!-- no-run: shows how to opt out -->
```python
raise SystemExit("an opted-out block must not run")
```

```bash
pip install nothing-at-all
python scripts/train.py --config configs/quickstart.yaml lora.rank=4
```

```python
assert x == 2, "x is not 2"
```
"""


def test_harness_reports_a_failing_block(tmp_path, capsys):
    steps, shown = plan_page(SELF_TEST_PAGE, "self-test.md")
    assert [(s["kind"], s["line"]) for s in steps] == [("python", 3), ("shell", 13), ("python", 17)]
    assert any("not run (shows how to opt out)" in x for x in shown)
    assert any("shown, not run: pip install" in x for x in shown)
    plan = tmp_path / "plan.json"
    plan.write_text(json.dumps({"page": "self-test.md", "steps": [steps[0], steps[2]]}))
    assert run_page(str(plan)) == 1
    out = capsys.readouterr()
    assert '"line": 3, "kind": "python", "result": "ran"' in out.out
    assert '"line": 17, "kind": "python", "result": "FAILED"' in out.out
    assert 'File "self-test.md", line 17' in out.err and "x is not 2" in out.err


def test_harness_runs_commands_and_checks_configs(tmp_path, capsys):
    steps, _ = plan_page(SELF_TEST_PAGE, "self-test.md")
    plan = tmp_path / "plan.json"
    plan.write_text(json.dumps({"page": "self-test.md", "steps": [steps[1]]}))
    assert run_page(str(plan)) == 1  # an unknown override key: train.py exits with code 2
    assert "unknown key 'lora.rank'" in capsys.readouterr().err
    with pytest.raises(ValueError, match="lora.rank"):
        _check_yaml("lora:\n  rank: 4\n")
    assert _check_yaml("lora:\n  r: 4\n") == "validated as a config fragment"
    assert _check_yaml("services:\n  web: {}\n").startswith("shown")
    with pytest.raises(AssertionError, match="scripts/nope.py does not exist"):
        plan_page("```bash\npython scripts/nope.py\n```\n", "self-test.md")
    with pytest.raises(ValueError, match="never closed"):
        parse_blocks("```python\nx = 1\n", "self-test.md")
    with pytest.raises(ValueError, match="malformed opt-out"):
        parse_blocks("<!-- norun -->\n```python\nx = 1\n```\n", "self-test.md")


def test_known_broken_blocks_are_skipped_until_their_text_goes():
    KNOWN_BROKEN["self-test.md"] = {"assert x == 2": "pretend it needs a download"}
    try:
        steps, shown = plan_page(SELF_TEST_PAGE, "self-test.md")
    finally:
        del KNOWN_BROKEN["self-test.md"]
    assert [s["line"] for s in steps] == [3, 13]
    assert any("not run (known broken, see KNOWN_BROKEN: pretend" in x for x in shown)
    KNOWN_BROKEN["self-test.md"] = {"text in no block": "stale"}
    try:
        with pytest.raises(AssertionError, match="match no block"):
            plan_page(SELF_TEST_PAGE, "self-test.md")
    finally:
        del KNOWN_BROKEN["self-test.md"]


# --- scripts/plot_metrics.py --------------------------------------------------------------------------------


def test_plot_metrics_draws_a_run(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    rows = [{"step": 0, "eval/loss": 4.0}]
    rows += [
        {"step": s, "train/loss": 4 - s / 10, "train/loss_avg": 4.1 - s / 10, "lr": 1e-3} for s in (1, 2, 3)
    ]
    rows += [{"step": 3, "eval/loss": 3.5}, {"step": 3, "eval/loss": 3.25}]  # a resumed run logs a step twice
    (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    script = [sys.executable, str(ROOT / "scripts" / "plot_metrics.py")]
    proc = subprocess.run([*script, str(run)], capture_output=True, text=True, check=False)
    assert proc.returncode == 0, proc.stderr
    assert "eval/loss 3.2500 at step 3" in proc.stdout and "train/loss 3.7000 at step 3" in proc.stdout
    assert (run / "loss.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    out = tmp_path / "figures" / "curve.png"
    proc = subprocess.run([*script, str(run), "--out", str(out)], capture_output=True, text=True, check=False)
    assert proc.returncode == 0 and out.stat().st_size > 10_000, proc.stderr
    (run / "metrics.jsonl").write_text('{"step": 1, "lr": 0.001}\n')
    proc = subprocess.run([*script, str(run)], capture_output=True, text=True, check=False)
    assert proc.returncode == 2 and "no train/loss or eval/loss" in proc.stderr
    proc = subprocess.run([*script, str(tmp_path)], capture_output=True, text=True, check=False)
    assert proc.returncode == 2 and "no metrics.jsonl" in proc.stderr


if __name__ == "__main__":
    sys.exit(run_page(sys.argv[1]))
