"""Data pipeline: formats, label masking, sources, caching and bad input, on the real assets."""

import csv
import json
import logging
import re

import datasets
import numpy as np
import pytest
from transformers import AutoTokenizer

from jaxlora.data import BatchLoader, build_datasets, load_source
from jaxlora.data.config import DataConfig, DataSource
from jaxlora.errors import UserError

IGNORE = -100
# Written out here, independently of jaxlora.data.templates.
ALPACA_IN = (
    "Below is an instruction that describes a task, paired with an input that provides further context. "
    "Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:\n"
)
ALPACA_NO = (
    "Below is an instruction that describes a task. Write a response that appropriately completes the "
    "request.\n\n### Instruction:\n{instruction}\n\n### Response:\n"
)
CHATML_JINJA = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def data_cfg(*train, **kw):
    return DataConfig(**{"train": train, "validation_split": 0.0, **kw})


def source(path, fmt, **kw):
    return DataSource(path=str(path), format=fmt, **kw)


@pytest.fixture(scope="module")
def tok(stories_dir):
    return AutoTokenizer.from_pretrained(stories_dir)


@pytest.fixture(scope="module")
def chat_tok(stories_dir):
    t = AutoTokenizer.from_pretrained(stories_dir)
    t.chat_template = CHATML_JINJA
    return t


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    return str(tmp_path_factory.mktemp("data-cache"))


def pieces(tok, ids) -> bytes:
    """Exact bytes of sentencepiece tokens ('▁' is a space, <0xNN> a byte, specials as written)."""
    out = bytearray()
    for p in tok.convert_ids_to_tokens([int(i) for i in ids]):
        if re.fullmatch(r"<0x[0-9A-F]{2}>", p):
            out.append(int(p[3:5], 16))
        else:
            out += p.replace("\u2581", " ").encode()
    return bytes(out)


def runs(labels):
    """(start, end, trained) runs of the label mask."""
    mask = np.asarray(labels) != IGNORE
    cuts = [0, *np.flatnonzero(np.diff(mask.astype(int))) + 1, len(mask)]
    return [(a, b, bool(mask[a])) for a, b in zip(cuts[:-1], cuts[1:], strict=True)]


# --- formats and labels ---------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["alpaca_100.json", "alpaca_cleaned_1000.json"])
def test_alpaca_labels_only_on_response_ending_in_eos(assets, tok, cache, name):
    rows = json.loads((assets / "data" / name).read_text())
    train, val = build_datasets(
        data_cfg(source(assets / "data" / name, "alpaca"), seq_len=4096, cache_dir=cache), tok
    )
    assert val is None and len(train) == len(rows)
    with_input = 0
    for i, row in enumerate(rows):
        ex = train[i]
        ids, labels = ex["input_ids"], ex["labels"]
        prompt = (ALPACA_IN if row["input"].strip() else ALPACA_NO).format(**row)
        with_input += "### Input:" in prompt
        (a, b, first), (c, d, second) = runs(labels)  # exactly: prompt, then response
        assert (first, second) == (False, True) and d == len(ids)
        assert ids[0] == tok.bos_token_id and ids[-1] == tok.eos_token_id and labels[-1] == tok.eos_token_id
        assert pieces(tok, ids[a:b]) == ("<s> " + prompt).encode()
        assert pieces(tok, ids[c:d]) == (row["output"] + "</s>").encode()
        assert np.array_equal(labels[c:d], ids[c:d])
        assert tok.decode(ids, skip_special_tokens=True) == prompt + row["output"]
        if "text" in row:
            assert tok.decode(ids, skip_special_tokens=True) == row["text"]
    assert 0 < with_input < len(rows)  # both Alpaca variants are covered


def _expected_chat(conv):
    """Expected bytes per label run for ChatML: prompt parts masked, each reply + <|im_end|></s> trained."""
    roles = {"human": "user", "gpt": "assistant"}
    out, prompt = [], "<s> "
    for m in conv:
        role = roles[m["from"]]
        prompt += f"<|im_start|>{role}\n"
        if role == "assistant":
            out += [(prompt.encode(), False), ((m["value"] + "<|im_end|></s>").encode(), True)]
            prompt = "\n"
        else:
            prompt += m["value"] + "<|im_end|>\n"
    out.append((prompt.encode(), False))
    return out


def test_sharegpt_chat_labels_exactly_on_assistant_turns(assets, chat_tok, cache):
    rows = json.loads((assets / "data" / "sharegpt_500.json").read_text())
    cfg = data_cfg(source(assets / "data" / "sharegpt_500.json", "chat"), seq_len=2048, cache_dir=cache)
    train, _ = build_datasets(cfg, chat_tok)
    assert len(train) == len(rows)
    for i, row in enumerate(rows):
        ex = train[i]
        got = [(pieces(chat_tok, ex["input_ids"][a:b]), t) for a, b, t in runs(ex["labels"])]
        assert got == _expected_chat(row["conversations"]), f"row {i}"
        assert (ex["input_ids"] == chat_tok.bos_token_id).sum() == 1


def test_named_chatml_matches_tokenizer_template_and_openai_messages(assets, tok, chat_tok, tmp_path, cache):
    rows = json.loads((assets / "data" / "sharegpt_500.json").read_text())[:40]
    roles = {"human": "user", "gpt": "assistant"}
    openai = [
        {"messages": [{"role": roles[m["from"]], "content": m["value"]} for m in r["conversations"]]}
        for r in rows
    ]
    path = tmp_path / "openai.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in openai))
    a, _ = build_datasets(data_cfg(source(path, "chat"), seq_len=2048, cache_dir=cache), chat_tok)
    b, _ = build_datasets(
        data_cfg(source(path, "chat"), seq_len=2048, chat_template="chatml", cache_dir=cache), tok
    )
    c, _ = build_datasets(
        data_cfg(source(assets / "data" / "sharegpt_500.json", "chat"), seq_len=2048, cache_dir=cache),
        chat_tok,
    )
    for i in range(len(rows)):
        for other in (b, c):
            assert np.array_equal(a[i]["input_ids"], other[i]["input_ids"])
            assert np.array_equal(a[i]["labels"], other[i]["labels"])


def test_llama3_template_single_bos_and_header_masked(assets, tok, tmp_path, cache):
    path = tmp_path / "conv.json"
    conv = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Hi there"},
        {"role": "assistant", "content": "Hello!"},
    ]
    path.write_text(json.dumps([{"messages": conv}]))
    train, _ = build_datasets(data_cfg(source(path, "chat"), chat_template="llama3", cache_dir=cache), tok)
    ids, labels = train[0]["input_ids"], train[0]["labels"]
    assert ids[0] == tok.bos_token_id and (ids == tok.bos_token_id).sum() == 1  # template's BOS, not a second
    assert [t for *_, t in runs(labels)] == [False, True]
    (_, _, _), (c, d, _) = runs(labels)
    assert pieces(tok, ids[c:d]) == b"Hello!<|eot_id|></s>"
    assert pieces(tok, ids[:c]).endswith(b"<|start_header_id|>assistant<|end_header_id|>\n\n")


def test_empty_system_prompt_is_dropped(chat_tok, tmp_path, cache):
    turns = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"}]
    path = tmp_path / "sys.jsonl"
    path.write_text(json.dumps({"messages": [{"role": "system", "content": " "}, *turns]}) + "\n")
    path.write_text(path.read_text() + json.dumps({"messages": turns}) + "\n")
    train, _ = build_datasets(data_cfg(source(path, "chat"), cache_dir=cache), chat_tok)
    assert np.array_equal(train[0]["input_ids"], train[1]["input_ids"])


def test_train_on_inputs_trains_every_token_but_bos(assets, tok, chat_tok, cache):
    # ChatML ends every turn, the last included, with "\n" after the EOS.
    for path, fmt, t, end in [
        ("alpaca_100.json", "alpaca", tok, -1),
        ("sharegpt_500.json", "chat", chat_tok, -2),
    ]:
        cfg = data_cfg(
            source(assets / "data" / path, fmt), seq_len=4096, train_on_inputs=True, cache_dir=cache
        )
        train, _ = build_datasets(cfg, t)
        for i in range(20):
            ids, labels = train[i]["input_ids"], train[i]["labels"]
            assert labels[0] == IGNORE and np.array_equal(labels[1:], ids[1:])
            assert ids[end] == t.eos_token_id


def test_prompt_completion_format(tok, tmp_path, cache):
    path = tmp_path / "pc.jsonl"
    path.write_text(json.dumps({"q": "Once upon a time", "a": " there was a cat."}) + "\n")
    cfg = data_cfg(
        source(path, "prompt_completion", fields={"prompt": "q", "completion": "a"}), cache_dir=cache
    )
    train, _ = build_datasets(cfg, tok)
    ids, labels = train[0]["input_ids"], train[0]["labels"]
    (a, b, _), (c, d, _) = runs(labels)
    assert pieces(tok, ids[c:d]) == b" there was a cat.</s>"
    assert tok.decode(ids, skip_special_tokens=True) == "Once upon a time there was a cat."


def test_text_corpus_is_chunked_and_reads_back(assets, tok, cache):
    text = (assets / "data" / "tinyshakespeare.txt").read_text()
    train, _ = build_datasets(
        data_cfg(source(assets / "data" / "tinyshakespeare.txt", "text"), seq_len=512, cache_dir=cache), tok
    )
    lengths = train.lengths
    assert (lengths[:-1] == 512).all() and 2 <= lengths[-1] <= 512
    ids = np.concatenate([train[i]["input_ids"] for i in range(len(train))])
    labels = np.concatenate([train[i]["labels"] for i in range(len(train))])
    assert ids[0] == tok.bos_token_id and ids[-1] == tok.eos_token_id and (ids == tok.eos_token_id).sum() == 1
    assert labels[0] == IGNORE and np.array_equal(labels[1:], ids[1:])
    assert tok.decode(ids, skip_special_tokens=True) == text


def test_pad_equal_to_eos_never_masks_eos(assets, stories_dir, cache):
    t = AutoTokenizer.from_pretrained(stories_dir)
    t.pad_token = t.eos_token  # the classic setup behind the pad = eos bug
    cfg = data_cfg(
        source(assets / "data" / "alpaca_100.json", "alpaca"), seq_len=1024, truncation=True, cache_dir=cache
    )
    train, _ = build_datasets(cfg, t)
    for packing in (True, False):
        loader = BatchLoader(train, 4, 1024, packing=packing, pad_id=t.pad_token_id, drop_last=False)
        n_eos_targets = n_examples = 0
        for batch in loader:
            n_eos_targets += int((batch["targets"] == t.eos_token_id).sum())
            seg = batch["segment_ids"]
            n_examples += sum(len(set(row[row > 0].tolist())) for row in seg)
        truncated = int(sum(train[i]["input_ids"][-1] != t.eos_token_id for i in range(len(train))))
        assert n_examples == len(train) and n_eos_targets == len(train) - truncated


# --- sources, mixing, streaming, cache ------------------------------------------------------------


def test_local_file_types_give_the_same_examples(assets, tok, tmp_path, cache):
    rows = json.loads((assets / "data" / "alpaca_cleaned_1000.json").read_text())[:30]
    (tmp_path / "a.json").write_text(json.dumps(rows))
    (tmp_path / "a.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    with open(tmp_path / "a.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=["instruction", "input", "output"])
        w.writeheader()
        w.writerows(rows)
    datasets.Dataset.from_list(rows).to_parquet(str(tmp_path / "a.parquet"))
    folder = tmp_path / "hubstyle"  # a local dataset folder goes through the hub path (split by file name)
    folder.mkdir()
    (folder / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows[:10]))
    (folder / "test.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    results = []
    for name in ["a.json", "a.jsonl", "a.csv", "a.parquet"]:
        src = source(tmp_path / name, "alpaca")
        ex = load_source(src, data_cfg(src, seq_len=4096, cache_dir=cache), tok)
        results.append(ex)
    src = source(folder, "alpaca", split="test")
    results.append(load_source(src, data_cfg(src, seq_len=4096, cache_dir=cache), tok))
    for ex in results:
        assert len(ex) == 30
        for i in range(30):
            assert np.array_equal(ex[i]["input_ids"], results[0][i]["input_ids"])
            assert np.array_equal(ex[i]["labels"], results[0][i]["labels"])


def test_mixed_sources_and_validation_split(assets, chat_tok, tmp_path, cache):
    (tmp_path / "s.txt").write_text((assets / "data" / "tinyshakespeare.txt").read_text()[:20000])
    cfg = data_cfg(
        source(assets / "data" / "alpaca_100.json", "alpaca"),
        source(assets / "data" / "sharegpt_500.json", "chat"),
        source(tmp_path / "s.txt", "text"),
        seq_len=512,
        truncation=True,
        validation_split=0.1,
        cache_dir=cache,
    )
    train, val = build_datasets(cfg, chat_tok, seed=3)
    parts = [load_source(s, cfg, chat_tok) for s in cfg.train]
    total = sum(len(p) for p in parts)
    assert len(train) + len(val) == total and len(val) == round(total * 0.1)
    seen = {tuple(train[i]["input_ids"]) for i in range(len(train))} | {
        tuple(val[i]["input_ids"]) for i in range(len(val))
    }
    assert seen == {tuple(p[i]["input_ids"]) for p in parts for i in range(len(p))}
    train2, val2 = build_datasets(cfg, chat_tok, seed=3)
    assert [tuple(val2[i]["input_ids"]) for i in range(len(val2))] == [
        tuple(val[i]["input_ids"]) for i in range(len(val))
    ]


def test_streaming_gives_the_same_batches(assets, tok, tmp_path, cache):
    rows = json.loads((assets / "data" / "alpaca_cleaned_1000.json").read_text())[:120]
    path = tmp_path / "s.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    cfg = data_cfg(source(path, "alpaca", streaming=True), seq_len=512, truncation=True, cache_dir=cache)
    stream, val = build_datasets(cfg, tok)
    assert isinstance(stream, datasets.IterableDataset) and val is None
    mapped, _ = build_datasets(
        data_cfg(source(path, "alpaca"), seq_len=512, truncation=True, cache_dir=cache), tok
    )
    a = list(BatchLoader(stream, 4, 512, shuffle=False))
    b = list(BatchLoader(mapped, 4, 512, shuffle=False))
    assert len(a) == len(b) > 3
    for x, y in zip(a, b, strict=True):
        for k in x:
            assert np.array_equal(x[k], y[k])
    shuffled = list(BatchLoader(stream, 4, 512, seed=1, num_epochs=2))
    assert not np.array_equal(shuffled[0]["input_ids"], a[0]["input_ids"])
    resumed = BatchLoader(stream, 4, 512, seed=1, num_epochs=2, start_state={"epoch": 1, "step": 2})
    assert np.array_equal(next(resumed)["input_ids"], shuffled[len(shuffled) // 2 + 2]["input_ids"])
    resumed.close()


def test_streaming_chat_finds_sharegpt_columns(assets, chat_tok, cache):
    path = assets / "data" / "sharegpt_500.json"
    stream, _ = build_datasets(
        data_cfg(source(path, "chat", streaming=True), seq_len=2048, cache_dir=cache), chat_tok
    )
    mapped, _ = build_datasets(data_cfg(source(path, "chat"), seq_len=2048, cache_dir=cache), chat_tok)
    first = next(iter(stream))
    assert np.array_equal(first["input_ids"], mapped[0]["input_ids"])
    assert np.array_equal(first["labels"], mapped[0]["labels"])


def test_cache_hit_on_second_run_and_miss_when_content_changes(assets, tok, tmp_path, caplog):
    rows = json.loads((assets / "data" / "alpaca_100.json").read_text())
    path = tmp_path / "d.json"
    path.write_text(json.dumps(rows))
    cfg = data_cfg(source(path, "alpaca"), seq_len=2048, cache_dir=str(tmp_path / "cache"))
    with caplog.at_level(logging.INFO, logger="jaxlora.data"):
        first, _ = build_datasets(cfg, tok)
        assert "from cache" not in caplog.text
        caplog.clear()
        second, _ = build_datasets(cfg, tok)
        assert "from cache" in caplog.text
        assert all(np.array_equal(first[i]["input_ids"], second[i]["input_ids"]) for i in range(len(first)))
        caplog.clear()
        build_datasets(
            data_cfg(source(path, "alpaca"), seq_len=2048, train_on_inputs=True, cache_dir=cfg.cache_dir), tok
        )
        assert "from cache" not in caplog.text  # options are part of the key
        caplog.clear()
        path.write_text(json.dumps(rows[:50]))
        third, _ = build_datasets(cfg, tok)
        assert "from cache" not in caplog.text and len(third) == 50


# --- bad input ------------------------------------------------------------------------------------


def _write(tmp_path, rows, name="bad.json"):
    path = tmp_path / name
    path.write_text(json.dumps(rows))
    return path


GOOD = {"instruction": "Say hi.", "input": "", "output": "Hi!"}


@pytest.mark.parametrize(
    "bad, message",
    [
        ({"instruction": "Say hi.", "input": ""}, "row 2: missing field 'output'"),
        ({"instruction": "Say hi.", "output": 5}, "row 2: field 'output' must be a string, got int"),
        ({"instruction": " \n", "output": "Hi"}, "row 2: field 'instruction' is empty"),
        ({"instruction": "Say hi.", "output": "Hi " * 300}, "row 2: example is "),
    ],
)
def test_bad_alpaca_rows_name_file_row_and_field(tok, tmp_path, bad, message):
    path = _write(tmp_path, [GOOD, GOOD, bad, GOOD])
    with pytest.raises(UserError) as err:
        build_datasets(data_cfg(source(path, "alpaca"), seq_len=256, cache_dir=str(tmp_path)), tok)
    text = str(err.value)
    assert text.startswith(f"{path}: {message}") and "\n" not in text
    if "example is" in message:
        assert "longer than seq_len 256" in text and "data.truncation" in text


@pytest.mark.parametrize(
    "conv, message",
    [
        (
            [{"from": "human", "value": "Hi"}, {"from": "robot", "value": "Hello"}],
            "field 'conversations[1].from' has unknown role 'robot'",
        ),
        (
            [{"from": "human", "value": "Hi"}, {"from": "gpt", "value": ["Hello"]}],
            "field 'conversations[1].value' must be a string, got list",
        ),
        (
            [{"from": "human", "value": "Hi"}, {"from": "gpt", "value": ""}],
            "field 'conversations[1].value' is empty",
        ),
        ([{"from": "human", "value": "Hi"}], "field 'conversations' has no assistant message"),
    ],
)
def test_bad_chat_rows(chat_tok, tmp_path, conv, message):
    good = {"conversations": [{"from": "human", "value": "Hi"}, {"from": "gpt", "value": "Hello"}]}
    path = _write(tmp_path, [good, {"conversations": conv}])
    with pytest.raises(UserError, match=re.escape(f"{path}: row 1: {message}")):
        build_datasets(data_cfg(source(path, "chat"), cache_dir=str(tmp_path)), chat_tok)


def test_skip_invalid_skips_and_reports(tok, tmp_path, caplog):
    numeric_text = {"instruction": "What is 3 - 2?", "output": "1"}  # a string that is also valid JSON
    rows = [GOOD] * 6 + [
        numeric_text,
        {"instruction": "x"},
        {"instruction": "x", "output": 3},
        {"instruction": "", "output": "y"},
    ]
    path = _write(tmp_path, rows)
    with caplog.at_level(logging.WARNING, logger="jaxlora.data"):
        train, _ = build_datasets(
            data_cfg(source(path, "alpaca"), skip_invalid=True, cache_dir=str(tmp_path)), tok
        )
    assert len(train) == 7
    assert "skipped 3 of 10 rows" in caplog.text
    assert tok.decode(train[6]["input_ids"], skip_special_tokens=True).endswith("### Response:\n1")


def test_csv_cells_are_text(tok, tmp_path):
    path = tmp_path / "n.csv"
    path.write_text("prompt,completion\nWhat is 2+2? ,4\nEmpty,\n")
    with pytest.raises(UserError, match=re.escape(f"{path}: row 1: field 'completion' is empty")):
        build_datasets(data_cfg(source(path, "prompt_completion"), cache_dir=str(tmp_path)), tok)
    path.write_text("prompt,completion\nWhat is 2+2? ,4\n")
    train, _ = build_datasets(data_cfg(source(path, "prompt_completion"), cache_dir=str(tmp_path)), tok)
    assert tok.decode(train[0]["input_ids"], skip_special_tokens=True) == "What is 2+2? 4"


def test_truncation_cuts_instead_of_failing(tok, tmp_path):
    path = _write(tmp_path, [GOOD, {"instruction": "Say hi.", "output": "Hi " * 300}])
    train, _ = build_datasets(
        data_cfg(source(path, "alpaca"), seq_len=256, truncation=True, cache_dir=str(tmp_path)), tok
    )
    assert len(train) == 2 and train.lengths.tolist()[1] == 256


def test_empty_after_filtering_is_an_error(tok, tmp_path):
    path = _write(tmp_path, [{"instruction": "x"}, {"output": "y"}])
    with pytest.raises(UserError, match=re.escape(f"{path}: no examples left after skipping invalid rows")):
        build_datasets(data_cfg(source(path, "alpaca"), skip_invalid=True, cache_dir=str(tmp_path)), tok)


def test_bad_format_missing_file_and_missing_template(tok, tmp_path, assets):
    with pytest.raises(
        UserError, match="unknown data format 'alpacca'.*valid formats: alpaca, chat, prompt_completion, text"
    ):
        build_datasets(data_cfg(source(assets / "data" / "alpaca_100.json", "alpacca")), tok)
    missing = tmp_path / "nope" / "train.jsonl"
    with pytest.raises(UserError, match=re.escape(f"data file not found: {missing}")):
        build_datasets(data_cfg(source(missing, "alpaca")), tok)
    with pytest.raises(
        UserError, match="tokenizer has no chat template; set data.chat_template to one of: chatml"
    ):
        build_datasets(data_cfg(source(assets / "data" / "sharegpt_500.json", "chat")), tok)
    with pytest.raises(UserError, match="unknown data.chat_template 'chatlm'; valid: chatml, llama3"):
        build_datasets(
            data_cfg(source(assets / "data" / "sharegpt_500.json", "chat"), chat_template="chatlm"), tok
        )


def test_real_config_dataclasses(assets, tok, cache):
    from jaxlora import config

    cfg = config.DataConfig(
        train=(
            config.DataSource(
                path=str(assets / "data" / "sharegpt_500.json"),
                format="chat",
                fields={"messages": "conversations", "role": "from", "content": "value"},
            ),
        ),
        seq_len=2048,
        chat_template="chatml",
        cache_dir=cache,
    )
    train, val = build_datasets(cfg, tok, seed=0)
    assert len(train) + len(val) == 500 and len(val) == 25


# --- [runs] problems 1, 7 and 8: fields once dropped, load errors, jinja2 -------------------------


def test_glaive_tools_reach_the_template_and_labels_cover_calls_and_answers(assets, tok, tmp_path):
    """Problem 8: ShareGPT `tools` (once dropped) reach the chat template; function_call turns are the
    assistant's (trained), observations the tool's (not trained), as LLaMA-Factory maps them."""
    rows = json.loads((assets / "data" / "llamafactory_glaive_toolcall_zh_demo.json").read_text())[:12]
    rows = [r for r in rows if any(m["from"] == "function_call" for m in r["conversations"])][:4]
    path = _write(tmp_path, rows)
    cfg = data_cfg(source(path, "chat"), seq_len=16384, chat_template="chatml", cache_dir=str(tmp_path))
    train, _ = build_datasets(cfg, tok)
    assert len(train) == len(rows) >= 2
    for k, row in enumerate(rows):
        ids, labels = train[k]["input_ids"], train[k]["labels"]
        text = pieces(tok, ids).decode()
        for tool in json.loads(row["tools"]):
            assert json.dumps(tool["name"]) in text and tool["description"] in text
        trained = [pieces(tok, ids[a:b]).decode(errors="replace") for a, b, t in runs(labels) if t]
        want = [m["value"] for m in row["conversations"] if m["from"] in ("function_call", "gpt")]
        assert len(trained) == len(want)
        for got, value in zip(trained, want, strict=True):
            assert value.strip() in got and "<|im_start|>" not in got
        for m in row["conversations"]:
            if m["from"] == "observation":
                assert f"<|im_start|>tool\n{m['value']}" in text and not any(m["value"] in t for t in trained)


def test_alpaca_history_and_system_become_turns(tok, tmp_path):
    """Problem 8: Alpaca `history` (earlier turns) and `system` were dropped silently."""
    row = {
        "system": "You answer in one word.",
        "history": [["Name a color.", "Blue."], ["Name a fruit.", "Apple."]],
        "instruction": "Name an animal.",
        "input": "",
        "output": "Cat.",
    }
    path = _write(tmp_path, [row, GOOD])
    train, _ = build_datasets(data_cfg(source(path, "alpaca"), cache_dir=str(tmp_path)), tok)
    ids, labels = train[0]["input_ids"], train[0]["labels"]
    text = tok.decode(ids, skip_special_tokens=True)
    assert text.startswith("You answer in one word.\n\n### Instruction:\nName a color.")
    assert "Below is an instruction" not in text
    for q in ("Name a color.", "Name a fruit.", "Name an animal."):
        assert f"### Instruction:\n{q}\n\n### Response:\n" in text
    trained = [tok.decode(ids[a:b], skip_special_tokens=True) for a, b, t in runs(labels) if t]
    assert trained == ["Blue.", "Apple.", "Cat."]
    plain = tok.decode(train[1]["input_ids"], skip_special_tokens=True)  # no history/system: as before
    assert plain.startswith(ALPACA_NO.format(instruction=GOOD["instruction"])[:60])
    bad = _write(tmp_path, [{**row, "history": [["only a question"]]}])
    with pytest.raises(UserError, match=re.escape(f"{bad}: row 0: field 'history[0]' must be an")):
        build_datasets(data_cfg(source(bad, "alpaca"), cache_dir=str(tmp_path)), tok)


def test_truncation_drop_hint_is_correct(tok, tmp_path, caplog):
    """Problem 8: rows cut away by truncation were reported with a hint to set skip_invalid: false,
    which was already false."""
    long_prompt = {"instruction": "word " * 400, "output": "Hi"}
    path = _write(tmp_path, [GOOD, long_prompt])
    with caplog.at_level(logging.WARNING, logger="jaxlora.data"):
        train, _ = build_datasets(
            data_cfg(source(path, "alpaca"), seq_len=128, truncation=True, cache_dir=str(tmp_path)), tok
        )
    assert len(train) == 1
    assert "dropped 1 of 2 rows" in caplog.text and "raise data.seq_len" in caplog.text
    assert "skip_invalid" not in caplog.text


@pytest.mark.parametrize(
    ("name", "content", "needle"),
    [
        ("bad.jsonl", b'{"text": "a"}\n{"text": "b"}\n{"text": oops}\n', ", line 3: invalid JSON"),
        ("bad.json", b'[{"text": "a"},\n {"text": "b"\n]', ", line 3: invalid JSON"),
        ("latin1.jsonl", '{"text": "a"}\n{"text": "caf\u00e9"}\n'.encode("latin-1"), ", line 2: not UTF-8"),
        ("bad.csv", b'text\nfine\n"never closed\n', "bad CSV"),
        ("cols.csv", b"prompt,completion\na,b\nc,d,e\n", ", line 3: 3 fields but the header has 2"),
    ],
)
def test_load_errors_name_file_line_and_cause(tok, tmp_path, name, content, needle):
    """Problem 7: CSV, JSONL and non-UTF-8 load errors named neither the line nor the encoding."""
    path = tmp_path / name
    path.write_bytes(content)
    fmt = "prompt_completion" if name == "cols.csv" else "text"
    with pytest.raises(UserError) as err:
        build_datasets(data_cfg(source(path, fmt), cache_dir=str(tmp_path)), tok)
    assert str(err.value).startswith(f"{path}") and needle in str(err.value), err.value
    assert "\n" not in str(err.value)


def test_data_folder_with_mixed_types_is_an_error(tok, tmp_path):
    """Problem 7: a folder with .json and .txt silently used only the .json."""
    folder = tmp_path / "mixed"
    folder.mkdir()
    (folder / "a.json").write_text(json.dumps([GOOD]))
    (folder / "b.txt").write_text("some text")
    with pytest.raises(UserError, match=r"mixes file types \(\.json: 1, \.txt: 1 files\)"):
        build_datasets(data_cfg(source(folder, "alpaca"), cache_dir=str(tmp_path)), tok)


def test_chat_without_jinja2_says_so(chat_tok, tmp_path, monkeypatch):
    """Problem 1: jinja2 was no dependency, and its absence read as a data problem."""
    import tomllib
    from pathlib import Path

    from transformers.utils import chat_template_utils

    deps = tomllib.loads((Path(__file__).parents[1] / "pyproject.toml").read_text())["project"]
    assert any(d.startswith("jinja2") for d in deps["dependencies"])
    monkeypatch.setattr(chat_template_utils, "is_jinja_available", lambda: False)
    chat_template_utils._compile_jinja_template.cache_clear()
    conv = [{"from": "human", "value": "Hi"}, {"from": "gpt", "value": "Hello"}]
    path = _write(tmp_path, [{"conversations": conv}])
    with pytest.raises(UserError, match="^chat templates need jinja2") as err:
        build_datasets(data_cfg(source(path, "chat"), cache_dir=str(tmp_path)), chat_tok)
    assert "row 0" not in str(err.value)
    chat_template_utils._compile_jinja_template.cache_clear()
