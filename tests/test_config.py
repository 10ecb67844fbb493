"""Config: YAML to frozen pydantic sections, overrides, error messages, round trips, the docs' key tables."""

import pickle
import re
from pathlib import Path
from typing import Annotated

import pytest
import yaml
from pydantic import TypeAdapter, ValidationError

from jaxlora import config as C
from jaxlora.config import (
    Config,
    DataConfig,
    DataSource,
    FrozenDict,
    TrainSection,
    apply_overrides,
    config_from_dict,
    load_config,
    save_config,
)
from jaxlora.errors import UserError
from jaxlora.schema import section_type, type_name

DOC = Path(__file__).resolve().parents[1] / "docs" / "configuration.md"

MINIMAL = {
    "output_dir": "/tmp/run",
    "model": {"path": "org/model"},
    "data": {"train": [{"path": "train.jsonl", "format": "alpaca"}]},
}


def _write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "run.yaml"
    path.write_text(text)
    return path


def _example_yaml() -> str:
    match = re.search(r"## Complete example.*?```yaml\n(.*?)```", DOC.read_text(), re.S)
    assert match, "docs/configuration.md has no '## Complete example' yaml block"
    return match.group(1)


# ---------------------------------------------------------------------------------------------------
# Loading, defaults, coercion


def test_minimal_config_gets_defaults():
    cfg = config_from_dict(MINIMAL)
    assert cfg.output_dir == "/tmp/run" and cfg.seed == 0 and cfg.overwrite is False
    assert cfg.model == C.ModelSection(path="org/model")
    assert cfg.data.train == (DataSource(path="train.jsonl", format="alpaca"),)
    assert cfg.data.validation == () and cfg.data.seq_len == 512
    assert cfg.lora.r == 8 and cfg.lora.alpha == 16.0 and cfg.lora.target_modules == "all-linear"
    assert cfg.quant.skip == ("lm_head", "embed_tokens")
    assert cfg.train.max_steps == 200 and cfg.train.learning_rate == 2e-4
    assert cfg.parallel.mesh.data == -1 and cfg.parallel.distributed.enabled is None


def test_yaml_exponent_strings_and_numeric_coercion(tmp_path):
    text = yaml.safe_dump(MINIMAL) + "train: {learning_rate: 1e-4, adam_eps: 1E-8, max_steps: 1e3}\n"
    text += "lora: {alpha: 32, dropout: 0}\n"
    assert yaml.safe_load(text)["train"]["learning_rate"] == "1e-4"  # the PyYAML quirk this guards against
    cfg = load_config(_write(tmp_path, text))
    assert cfg.train.learning_rate == 1e-4 and type(cfg.train.learning_rate) is float
    assert cfg.train.adam_eps == 1e-8
    assert cfg.train.max_steps == 1000 and type(cfg.train.max_steps) is int
    assert cfg.lora.alpha == 32.0 and type(cfg.lora.alpha) is float
    assert type(cfg.lora.dropout) is float


def test_lists_become_tuples_and_sections_are_frozen_and_hashable():
    cfg = config_from_dict(
        MINIMAL,
        ["lora.layers_to_transform=[0, 1]", "data.train[0].fields={instruction: question}"],
    )
    assert cfg.lora.layers_to_transform == (0, 1)
    assert isinstance(cfg.data.train, tuple)
    assert cfg.data.train[0].fields == {"instruction": "question"}
    assert isinstance(cfg.data.train[0].fields, FrozenDict)
    with pytest.raises(TypeError):
        cfg.data.train[0].fields["output"] = "x"
    with pytest.raises(ValidationError):  # frozen
        cfg.train.max_steps = 3
    assert hash(cfg) == hash(config_from_dict(cfg.to_dict()))
    assert pickle.loads(pickle.dumps(cfg)) == cfg


def test_sections_built_in_code_are_coerced_and_validated():
    data = DataConfig(train=[DataSource(path="a.jsonl", format="text")], validation=[])
    assert data.train == (DataSource(path="a.jsonl", format="text"),) and data.validation == ()
    assert TrainSection(learning_rate="3e-4").learning_rate == 3e-4
    with pytest.raises(UserError, match=r"^train\.batch_size must be >= 1, got 0$"):
        TrainSection(batch_size=0)
    cfg = Config(output_dir="o", model={"path": "m"}, data={"train": {"path": "p", "format": "chat"}})
    assert cfg == config_from_dict(
        {
            **MINIMAL,
            "output_dir": "o",
            "model": {"path": "m"},
            "data": {"train": [{"path": "p", "format": "chat"}]},
        }
    )


def test_single_item_lists_and_empty_sections(tmp_path):
    text = (
        "output_dir: out\nmodel: {path: m}\nlora:\nquant: {skip: lm_head}\n"
        "data:\n  train: {path: t.jsonl, format: text}\n"
    )
    cfg = load_config(_write(tmp_path, text))
    assert cfg.lora == C.LoraConfig()
    assert cfg.quant.skip == ("lm_head",)
    assert cfg.data.train == (DataSource(path="t.jsonl", format="text"),)


def test_chat_fields_take_a_roles_mapping():
    source = DataSource(
        path="c.jsonl",
        format="chat",
        fields={"messages": "conversations", "content": 1, "roles": {"human": "user", "gpt": "assistant"}},
    )
    assert source.fields == {
        "messages": "conversations",
        "content": "1",
        "roles": {"human": "user", "gpt": "assistant"},
    }
    assert isinstance(source.fields["roles"], FrozenDict)
    assert (
        DataSource(
            **config_from_dict({**MINIMAL, "data": {"train": [source.to_dict()]}}).data.train[0].to_dict()
        )
        == source
    )
    with pytest.raises(UserError, match=r"^DataSource.fields.roles must map dataset role names to roles"):
        DataSource(path="c.jsonl", format="chat", fields={"roles": "user"})
    with pytest.raises(UserError, match=r"^DataSource.fields: unknown field 'roles' for format alpaca"):
        DataSource(path="c.jsonl", format="alpaca", fields={"roles": {"a": "b"}})


def test_override_indexes_a_list_written_as_one_mapping(tmp_path):
    text = "output_dir: o\nmodel: {path: m}\ndata:\n  train: {path: t.jsonl, format: text}\n"
    cfg = load_config(
        _write(tmp_path, text), ["data.train[0].split=train[:10]", "data.train[1]={path: u, format: text}"]
    )
    assert [(s.path, s.split) for s in cfg.data.train] == [("t.jsonl", "train[:10]"), ("u", None)]


def test_num_epochs_without_max_steps_trains_by_epochs():
    assert config_from_dict(MINIMAL, ["train.num_epochs=2"]).train.max_steps is None
    both = config_from_dict(MINIMAL, ["train.num_epochs=2", "train.max_steps=50"]).train
    assert (both.num_epochs, both.max_steps) == (2.0, 50)


# ---------------------------------------------------------------------------------------------------
# Round trips


def test_round_trip_through_yaml_file(tmp_path):
    cfg = load_config(_write(tmp_path, _example_yaml()))
    saved = save_config(cfg, tmp_path / "run" / "config.yaml")
    again = load_config(saved)
    assert again == cfg
    assert again.to_dict() == cfg.to_dict()
    assert config_from_dict(yaml.safe_load(cfg.to_yaml())) == cfg
    assert yaml.safe_load(saved.read_text()) == cfg.to_dict()


def test_round_trip_keeps_overridden_types():
    cfg = config_from_dict(
        MINIMAL, ["lora.target_modules=[q_proj,v_proj]", "train.num_epochs=1.5", "data.train[0].split=7"]
    )
    assert config_from_dict(cfg.to_dict()) == cfg
    assert cfg.lora.target_modules == ("q_proj", "v_proj")
    assert cfg.data.train[0].split == "7"


# ---------------------------------------------------------------------------------------------------
# Overrides


def test_overrides_nested_scalars_lists_and_null(tmp_path):
    path = _write(tmp_path, yaml.safe_dump(MINIMAL))
    cfg = load_config(
        path,
        [
            "train.max_steps=3",
            "output_dir=/tmp/other",
            "lora.target_modules=[q_proj,v_proj]",
            "model.revision=main",
            "train.max_grad_norm=null",
            "parallel.mesh.fsdp=2",
            "train.learning_rate=1e-4",
            "quant.weights=nf4",
        ],
    )
    assert cfg.train.max_steps == 3 and cfg.output_dir == "/tmp/other"
    assert cfg.lora.target_modules == ("q_proj", "v_proj")
    assert cfg.model.revision == "main" and cfg.train.max_grad_norm is None
    assert cfg.parallel.mesh.fsdp == 2 and cfg.train.learning_rate == 1e-4
    assert cfg.quant.weights == "nf4"


def test_override_changes_value_type_both_ways():
    listed = config_from_dict(MINIMAL, ["lora.target_modules=[q_proj]"])
    assert config_from_dict(listed.to_dict(), [r"lora.target_modules=.*\.v_proj"]).lora.target_modules == (
        r".*\.v_proj"
    )


def test_override_mapping_merges_and_list_items_append():
    raw = {**MINIMAL, "lora": {"r": 16, "dropout": 0.1}}
    cfg = config_from_dict(
        raw,
        [
            "lora={alpha: 8}",
            "data.train[0].streaming=true",
            "data.train[1]={path: extra.jsonl, format: text}",
            "data.validation=[{path: v.jsonl, format: alpaca}]",
        ],
    )
    assert (cfg.lora.r, cfg.lora.dropout, cfg.lora.alpha) == (16, 0.1, 8.0)
    assert [s.path for s in cfg.data.train] == ["train.jsonl", "extra.jsonl"]
    assert cfg.data.train[0].streaming is True
    assert cfg.data.validation == (DataSource(path="v.jsonl", format="alpaca"),)
    assert raw["lora"] == {"r": 16, "dropout": 0.1}  # the input mapping is not modified


def test_apply_overrides_returns_a_changed_copy():
    cfg = config_from_dict(MINIMAL)
    changed = apply_overrides(cfg, ["train.batch_size=2"])
    assert changed.train.batch_size == 2 and cfg.train.batch_size == 8
    assert changed.model_copy(update={"train": cfg.train}) == cfg


# ---------------------------------------------------------------------------------------------------
# Error messages: one line, naming the key


BAD_OVERRIDES = [
    ("lora.rank=16", "override 'lora.rank=16': unknown key 'lora.rank'; did you mean 'lora.r'?"),
    ("train.batchsize=4", "unknown key 'train.batchsize'; did you mean 'train.batch_size'?"),
    ("lr=1e-4", "unknown key 'lr'; did you mean 'train.learning_rate'?"),
    ("max_steps=5", "unknown key 'max_steps'; did you mean 'train.max_steps'?"),
    ("data.train[0].type=chat", "unknown key 'data.train[0].type'; did you mean 'data.train[0].format'?"),
    ("lora.xyz=1", "unknown key 'lora.xyz'; valid keys in 'lora': r, alpha, dropout,"),
    ("train.batch_size=0", "train.batch_size must be >= 1, got 0"),
    ("train.batch_size=eight", "train.batch_size: expected int, got 'eight' (str)"),
    ("train.batch_size=2.5", "train.batch_size: expected int, got 2.5 (float)"),
    ("lora.alpha=[1]", "lora.alpha: expected float, got [1] (list)"),
    ("data.packing=yes please", "data.packing: expected bool, got 'yes please' (str)"),
    ("train.learning_rate=-1e-4", "train.learning_rate must be > 0, got -0.0001"),
    ("train.learning_rate=.nan", "train.learning_rate must be a finite number"),
    ("lora.r=0", "lora.r must be >= 1, got 0"),
    ("lora.dropout=1.0", "lora.dropout must be in [0, 1), got 1.0"),
    ("train.warmup_ratio=1", "train.warmup_ratio must be in [0, 1), got 1.0"),
    ("train.warmup_ratio=-0.1", "train.warmup_ratio must be in [0, 1), got -0.1"),
    (
        "train.lr_schedule=cosin",
        "train.lr_schedule must be one of cosine, linear, constant; got 'cosin' (str) "
        "(did you mean 'cosine'?)",
    ),
    ("model.dtype=fp16", "model.dtype must be one of float32, bfloat16; got 'fp16' (str)"),
    ("quant.weights=null", "quant.weights must not be null; expected none | int8 | nf4"),
    ("model.path=null", "model.path must not be null; expected str"),
    ("train.max_steps=null", "train.max_steps and train.num_epochs are both null; set one"),
    ("data.train=[]", "data.train must list at least one dataset"),
    ("data.seq_len=1", "data.seq_len must be >= 2, got 1"),
    ("parallel.mesh.data=0", "parallel.mesh.data must be -1 (all remaining devices) or >= 1, got 0"),
    ("lora.target_modules=(", "lora.target_modules is not a valid regex"),
    ("lora.layers_to_transform=[-1]", "lora.layers_to_transform must be null (all layers) or a non-empty"),
    ("data.train[0].fields={instrution: q}", "data.train[0].fields: unknown field 'instrution' for format"),
    ("data.validation_split=0", "train.eval_every_steps is set but there is no validation data"),
    ("seed=-1", "seed must be in [0, 2**32), got -1"),
    ("train", "override 'train' must look like key=value"),
    ("model.path.x=1", "'model.path' is a value, not a section with keys"),
    ("data.train[3].path=x", "'data.train' has 1 item(s), no index 3"),
    ("data.train[3]={path: x, format: text}", "'data.train' has 1 item(s); use index 1 to add one"),
    ("lora.r=[1", "override 'lora.r=[1': the value is not valid YAML"),
]


@pytest.mark.parametrize(("override", "message"), BAD_OVERRIDES, ids=[o for o, _ in BAD_OVERRIDES])
def test_bad_values_name_the_key(override, message):
    with pytest.raises(UserError) as err:
        config_from_dict(MINIMAL, [override])
    text = str(err.value)
    assert message in text
    assert "\n" not in text


@pytest.mark.parametrize(
    ("raw", "message"),
    [
        ({}, "missing required key 'output_dir' (run folder"),
        ({"output_dir": "o"}, "missing required key 'model.path'"),
        ({"output_dir": "o", "model": {"path": "m"}}, "missing required key 'data.train'"),
        ({**MINIMAL, "data": {"train": [{"path": "p"}]}}, "missing required key 'data.train[0].format'"),
        ({**MINIMAL, "model": "org/model"}, "'model': expected a mapping of keys, got 'org/model' (str)"),
        ({**MINIMAL, "lora": {"rank": 4}}, "unknown key 'lora.rank'; did you mean 'lora.r'?"),
        ({**MINIMAL, "sequence_len": 4}, "unknown key 'sequence_len'; did you mean 'data.seq_len'?"),
        ({**MINIMAL, "train": {"batch_size": 0}}, "train.batch_size must be >= 1, got 0"),
    ],
)
def test_bad_mappings_name_the_key(raw, message):
    with pytest.raises(UserError, match=re.escape(message)):
        config_from_dict(raw)


def test_file_errors(tmp_path):
    with pytest.raises(UserError, match="config file not found: "):
        load_config(tmp_path / "missing.yaml")
    with pytest.raises(UserError, match=r"invalid YAML at line 2, column 12: mapping values are not allowed"):
        load_config(_write(tmp_path, "output_dir: o\nmodel: path: m\n"))
    with pytest.raises(UserError, match="the top level must be a mapping of keys, got"):
        load_config(_write(tmp_path, "- a\n- b\n"))
    with pytest.raises(UserError, match=r"duplicate key 'lora' at line 3"):
        load_config(_write(tmp_path, "lora: {r: 4}\noutput_dir: o\nlora: {r: 8}\n"))
    with pytest.raises(UserError, match=r"missing required key 'output_dir'"):
        load_config(_write(tmp_path, ""))
    with pytest.raises(UserError, match=r"unknown key 'lora.rank'; did you mean 'lora.r'\?"):
        load_config(_write(tmp_path, yaml.safe_dump({**MINIMAL, "lora": {"rank": 16}})))


def test_overrides_must_be_a_list():
    with pytest.raises(TypeError):
        config_from_dict(MINIMAL, "train.max_steps=3")


# ---------------------------------------------------------------------------------------------------
# docs/configuration.md stays in step with the sections


def _doc_rows() -> dict[str, tuple[str, str, str]]:
    """key -> (type, default, meaning) from every table row of the committed doc."""
    rows = {}
    for line in DOC.read_text().splitlines():
        if not line.startswith("| `"):
            continue
        cells = [c.strip().replace("\\|", "|") for c in re.split(r"(?<!\\)\|", line.strip())[1:-1]]
        assert len(cells) == 4, f"bad table row in {DOC.name}: {line}"
        key = cells[0].strip("`")
        assert key not in rows, f"{key} listed twice in {DOC.name}"
        rows[key] = tuple(cells[1:])
    return rows


def _schema_fields(cls=Config, where=""):
    """(dotted key, field, type) for every leaf key; DataSource keys as data.train[i].<name>."""
    for name, f in cls.model_fields.items():
        key, tp = f"{where}.{name}" if where else name, f.annotation
        if section_type(tp) is not None:
            yield from _schema_fields(section_type(tp), key)
            continue
        yield key, f, tp
        if key == "data.train":
            yield from _schema_fields(DataSource, "data.train[i]")


def test_doc_tables_match_dataclasses():
    rows = _doc_rows()
    schema = {key: (f, tp) for key, f, tp in _schema_fields()}
    fix = "update docs/configuration.md (python -m jaxlora.config prints the tables)"
    assert set(rows) == set(schema), f"keys differ: {set(rows) ^ set(schema)}; {fix}"
    for key, (f, tp) in schema.items():
        doc_type, doc_default, doc_meaning = rows[key]
        assert doc_type == type_name(tp), f"{key}: type {doc_type!r} in the doc; {fix}"
        assert doc_meaning == f.description, f"{key}: meaning differs; {fix}"
        if f.is_required():
            assert doc_default == "required", f"{key} is required; {fix}"
        else:
            declared = TypeAdapter(Annotated[(tp, *f.metadata)] if f.metadata else tp)
            value = declared.validate_python(yaml.safe_load(doc_default.strip("`")))
            assert value == f.default and type(value) is type(f.default), f"{key}: default differs; {fix}"
    assert C.reference_markdown() in DOC.read_text(), f"tables are not exactly as rendered; {fix}"


def test_doc_example_is_complete_and_loads():
    raw = yaml.safe_load(_example_yaml())
    config_from_dict(raw)

    leaves = {key for key, _, _ in _schema_fields()}

    def keys(d, where=""):
        for k, v in d.items():
            key = f"{where}.{k}" if where else k
            if isinstance(v, dict) and key not in leaves:  # a section; dict-valued keys are leaves
                yield from keys(v, key)
            else:
                yield key
            if key == "data.train":
                yield from keys(v[0], "data.train[i]")

    assert set(keys(raw)) == leaves


def test_format_fields_cover_every_format():
    assert set(C.FORMAT_FIELDS) == set(DataSource.model_fields["format"].annotation.__args__)
