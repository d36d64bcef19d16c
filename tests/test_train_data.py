"""Training data: shards, record readers, SFT tokenization (masks equal TRL 1.16's), packing,
collate and the rank-sharded, resumable StepLoader."""
from __future__ import annotations

import gzip
import json
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np
import pytest
import torch

from qwenkit.data.readers import read_records
from qwenkit.data.shards import ShardReader, ShardWriter, TokenShards, write_dataset_manifest
from qwenkit.errors import DataError
from qwenkit.tokenizer import Tokenizer
from qwenkit.train.batch import IGNORE_INDEX
from qwenkit.train.dataloader import StepLoader, split_held_out
from qwenkit.train.packing import best_fit_decreasing, bucket_lengths, collate
from qwenkit.train.sft_data import Example, TokenizeStats, fit_length, tokenize_record, tokenize_records

# ---------------------------------------------------------------------------- shards


def _write_shard(folder: Path, name: str, docs: list[list[int]], vocab: int = 100) -> Path:
    with ShardWriter(folder, name, vocab_size=vocab, tokenizer="tiny") as w:
        w.extend(docs)
    return folder / f"{name}.json"


def test_shard_round_trip(tmp_path: Path) -> None:
    docs = [[1, 2, 3], [], [99], list(range(50))]
    _write_shard(tmp_path, "a", docs)
    _write_shard(tmp_path, "b", [[7, 8]])
    write_dataset_manifest(tmp_path)
    shards = TokenShards.open(tmp_path, verify=True)
    assert len(shards) == 5 and shards.num_tokens == 56 and shards.vocab_size == 100
    assert [d.tolist() for d in shards] == docs + [[7, 8]]
    assert shards[-1].tolist() == [7, 8]
    assert shards.lengths.tolist() == [3, 0, 1, 50, 2]
    manifest = json.loads((tmp_path / "a.json").read_text())
    assert manifest["num_docs"] == 4 and set(manifest["files"]) == {"a.bin", "a.idx"}
    with pytest.raises(ValueError, match="outside"):
        ShardWriter(tmp_path / "x", "x", vocab_size=10).append([10])


def test_shard_corruption_errors(tmp_path: Path) -> None:
    def fresh(name: str) -> Path:
        return _write_shard(tmp_path, name, [[1, 2, 3], [4, 5]])

    m = fresh("trunc")
    (tmp_path / "trunc.bin").write_bytes((tmp_path / "trunc.bin").read_bytes()[:-2])
    with pytest.raises(DataError, match=r"trunc\.bin.*not a multiple of 4"):
        ShardReader(m)

    m = fresh("magic")
    raw = bytearray((tmp_path / "magic.idx").read_bytes())
    raw[:4] = b"XXXX"
    (tmp_path / "magic.idx").write_bytes(bytes(raw))
    with pytest.raises(DataError, match=r"magic\.idx.*bad magic"):
        ShardReader(m)

    m = fresh("past")  # the last offset points beyond the token file
    raw = bytearray((tmp_path / "past.idx").read_bytes())
    raw[-8:] = np.array([9], dtype="<u8").tobytes()
    (tmp_path / "past.idx").write_bytes(bytes(raw))
    with pytest.raises(DataError, match=r"past\.idx.*past or before the end"):
        ShardReader(m)

    m = fresh("short")  # truncated index
    (tmp_path / "short.idx").write_bytes((tmp_path / "short.idx").read_bytes()[:-8])
    with pytest.raises(DataError, match=r"short\.idx.*truncated"):
        ShardReader(m)

    m = fresh("vocab")  # a token id >= vocab_size, same file size (sha256 no longer matches)
    raw = bytearray((tmp_path / "vocab.bin").read_bytes())
    raw[12:16] = np.array([500], dtype="<u4").tobytes()
    (tmp_path / "vocab.bin").write_bytes(bytes(raw))
    reader = ShardReader(m)
    with pytest.raises(DataError, match=r"vocab\.bin.*token id 500 .*document 1.*>= vocab_size 100"):
        reader[1]
    with pytest.raises(DataError, match=r"vocab\.bin: sha256 does not match"):
        ShardReader(m, verify=True)

    (tmp_path / "none").mkdir()
    with pytest.raises(DataError, match="no shard manifests"):
        TokenShards.open(tmp_path / "none")


# ---------------------------------------------------------------------------- readers


def test_readers_formats(tmp_path: Path) -> None:
    rows = [{"text": "a"}, {"messages": [{"role": "user", "content": "hi"}]}, {"prompt": "p", "completion": "c"}]
    (tmp_path / "d").mkdir()
    (tmp_path / "d" / "1.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n\n")
    with gzip.open(tmp_path / "d" / "2.jsonl.gz", "wt") as f:
        f.write(json.dumps(rows[0]) + "\n")
    (tmp_path / "d" / "3.json").write_text(json.dumps(rows))
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.Table.from_pylist([{"text": "x"}, {"text": "y"}]), tmp_path / "d" / "4.parquet")
    recs = list(read_records(tmp_path / "d"))
    assert [r.data for r in recs] == rows + rows[:1] + rows + [{"text": "x"}, {"text": "y"}]
    assert recs[-1].where.endswith("4.parquet row 2") and recs[4].where.endswith("3.json item 1")

    import datasets

    datasets.Dataset.from_list(rows[:1] * 3).save_to_disk(str(tmp_path / "hf"))
    assert [r.data for r in read_records(tmp_path / "hf")] == rows[:1] * 3


def test_reader_errors(tmp_path: Path) -> None:
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "ok"}\n\n{"text": oops}\n')
    with pytest.raises(DataError, match=r"bad\.jsonl line 3: invalid JSON"):
        list(read_records(bad))
    missing = tmp_path / "missing.jsonl"
    missing.write_text('{"text": "ok"}\n{"content": "x", "id": 1}\n')
    with pytest.raises(DataError, match=r"missing\.jsonl line 2: .*it has \['content', 'id'\]"):
        list(read_records(missing))
    (tmp_path / "empty.jsonl").write_text("\n")
    with pytest.raises(DataError, match="no records"):
        list(read_records(tmp_path / "empty.jsonl"))
    with pytest.raises(DataError, match="no such file"):
        list(read_records(tmp_path / "nope.jsonl"))
    (tmp_path / "list.json").write_text('[{"text": "a"},\n {"text": }]')
    with pytest.raises(DataError, match=r"list\.json line 2: invalid JSON"):
        list(read_records(tmp_path / "list.json"))


# ---------------------------------------------------------------------------- TRL mask equality

WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "Get the weather of a city",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}}  # fmt: skip

CONVERSATIONS: list[dict[str, Any]] = [
    {"messages": [{"role": "user", "content": "Hi there"}, {"role": "assistant", "content": "Hello! How can I help?"},
                  {"role": "user", "content": "What is 2+2?"}, {"role": "assistant", "content": "4, of course."},
                  {"role": "user", "content": "Thanks"}, {"role": "assistant", "content": "You're welcome.\n"}]},
    {"messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"},
                  {"role": "assistant", "content": "\nHey  "}, {"role": "user", "content": "Bye"},
                  {"role": "assistant", "content": "Bye!"}]},
    {"messages": [{"role": "user", "content": "Weather in Paris?"},
                  {"role": "assistant", "content": "", "tool_calls": [
                      {"type": "function", "function": {"name": "get_weather", "arguments": {"city": "Paris"}}}]},
                  {"role": "tool", "content": "sunny, 21C"},
                  {"role": "assistant", "content": "It is sunny in Paris."}], "tools": [WEATHER]},
    {"messages": [{"role": "system", "content": "You check the weather."}, {"role": "user", "content": "Rome?"},
                  {"role": "assistant", "content": "Checking.", "tool_calls": [
                      {"type": "function", "function": {"name": "get_weather", "arguments": {"city": "Rome"}}}]},
                  {"role": "tool", "content": "rain"}, {"role": "assistant", "content": "Rain in Rome."}],
     "tools": json.dumps([WEATHER])},
    {"prompt": "The capital of France is", "completion": " Paris."},
    {"prompt": "def add(a, b):\n", "completion": "    return a + b\n"},
    {"prompt": [{"role": "user", "content": "Say hi"}], "completion": [{"role": "assistant", "content": "hi!"}]},
    {"prompt": [{"role": "system", "content": "Pirate."}, {"role": "user", "content": "Hello"},
                {"role": "assistant", "content": "Arr."}, {"role": "user", "content": "Again"}],
     "completion": [{"role": "assistant", "content": "Arr arr!"}]},
    {"text": "Just some plain text to learn from."},
]  # fmt: skip


def trl_examples(tokenizer_dir: Path, examples: list[dict[str, Any]], max_length: int | None = None) -> list[Any]:
    """(input_ids, labels) per example from TRL's own SFTTrainer dataset preparation."""
    import datasets
    from transformers import AutoTokenizer
    from trl import SFTTrainer
    from trl.chat_template_utils import get_training_chat_template

    hf = AutoTokenizer.from_pretrained(tokenizer_dir)
    datasets.disable_progress_bars()
    out = []
    for ex in examples:  # one dataset each: Arrow would unify the schemas of different records
        assistant_only = "messages" in ex
        args = SimpleNamespace(dataset_num_proc=None, dataset_text_field="text", max_length=max_length,
                               truncation_mode="keep_start", assistant_only_loss=assistant_only,
                               shuffle_dataset=False)  # fmt: skip
        trainer = SimpleNamespace(_tokenizer=hf, completion_only_loss="prompt" in ex,
                                  chat_template=get_training_chat_template(hf) if assistant_only else None)
        ds = SFTTrainer._prepare_dataset(trainer, datasets.Dataset.from_list([ex]), hf, args, False, None, "t")
        out.append((ds[0]["input_ids"], ds[0]["labels"]) if len(ds) else None)
    return out


def _check_against_trl(tokenizer_dir: Path) -> None:
    tok = Tokenizer.from_hf_dir(tokenizer_dir)
    expected = trl_examples(tokenizer_dir, CONVERSATIONS)
    for ex, want in zip(CONVERSATIONS, expected):
        ours = tokenize_record(ex, tok)
        assert (list(ours.input_ids), list(ours.labels)) == (want[0], want[1]), ex
        assert IGNORE_INDEX in ours.labels or "text" in ex
        if "messages" in ex:  # every assistant turn is trained, through its <|im_end|>
            n_turns = sum(m["role"] == "assistant" for m in ex["messages"])
            im_end = tok.token_to_id("<|im_end|>")
            assert sum(lab == im_end for lab in ours.labels) == n_turns


def test_masks_equal_trl(qwen_tokenizer_dir: Path) -> None:
    """Tiny tokenizer (fast) and, marked slow by the fixture, the real Qwen2.5 tokenizer."""
    _check_against_trl(qwen_tokenizer_dir)


def test_truncation_equals_trl(tiny_tokenizer_dir: Path) -> None:
    tok = Tokenizer.from_hf_dir(tiny_tokenizer_dir)
    max_length = 40
    expected = trl_examples(tiny_tokenizer_dir, CONVERSATIONS, max_length=max_length)
    for ex, want in zip(CONVERSATIONS, expected):
        got = fit_length(tokenize_record(ex, tok), max_length, "truncate")
        if want is None:
            assert got == [], ex
        else:
            assert [(list(g.input_ids), list(g.labels)) for g in got] == [want], ex


def test_overflow_counts(tiny_tokenizer: Tokenizer) -> None:
    long_text = {"text": "word " * 60}
    long_chat = {"prompt": "x " * 60, "completion": " done"}
    recs = [long_text, long_chat, {"text": "short one"}]
    ex, stats = tokenize_records(recs, tiny_tokenizer, max_length=16, overflow="truncate")
    assert (stats.truncated, stats.dropped_no_loss, len(ex)) == (2, 1, 2)  # the prompt fills all 16 tokens
    assert all(len(e) <= 16 for e in ex) and stats.formats == {"text": 2, "prompt_completion": 1}
    ex, stats = tokenize_records(recs, tiny_tokenizer, max_length=16, overflow="drop")
    assert (stats.dropped_too_long, len(ex)) == (2, 1)

    full = tokenize_record(long_text, tiny_tokenizer)
    st = TokenizeStats()
    pieces = fit_length(full, 16, "split", st)
    assert st.split_documents == 1 and st.split_pieces == len(pieces) > 1
    assert all(len(p) <= 16 for p in pieces)
    # pieces overlap by one token: together they hold the document and every target exactly once
    ids = list(pieces[0].input_ids) + [t for p in pieces[1:] for t in list(p.input_ids)[1:]]
    assert ids == list(full.input_ids)
    assert sum(p.num_loss_tokens for p in pieces) == full.num_loss_tokens


# ---------------------------------------------------------------------------- packing / collate


def test_best_fit_decreasing() -> None:
    rng = np.random.default_rng(0)
    lengths = rng.integers(1, 100, size=500).tolist()
    rows = best_fit_decreasing(lengths, 128)
    assert sorted(i for r in rows for i in r) == list(range(500))
    assert all(sum(lengths[i] for i in r) <= 128 for r in rows)
    assert rows == best_fit_decreasing(lengths, 128)
    assert len(rows) <= int(np.ceil(sum(lengths) / 128 * 11 / 9)) + 1  # BFD's bound
    assert best_fit_decreasing([3, 5, 3, 2], 8) == [[1, 0], [2, 3]]  # longest first, ties by index
    with pytest.raises(ValueError, match="outside"):
        best_fit_decreasing([9], 8)
    assert bucket_lengths(8192) == [512, 1024, 2048, 4096, 8192]
    assert bucket_lengths(3000) == [512, 1024, 2048, 3000]


def test_collate() -> None:
    a = Example([10, 11, 12, 13], [-100, -100, 12, 13])
    b = Example([20, 21, 22], [20, 21, 22])
    c = Example([30, 31], [30, 31])
    batch = collate([[a, b], [c]], 8)
    assert batch.input_ids.tolist() == [[10, 11, 12, 13, 20, 21, 22, 0], [30, 31, 0, 0, 0, 0, 0, 0]]
    I = IGNORE_INDEX  # noqa: E741
    assert batch.targets.tolist() == [[I, 12, 13, I, 21, 22, I, I], [31, I, I, I, I, I, I, I]]
    assert batch.position_ids.tolist() == [[0, 1, 2, 3, 0, 1, 2, 0], [0, 1, 0, 0, 0, 0, 0, 0]]
    assert batch.document_ids.tolist() == [[0, 0, 0, 0, 1, 1, 1, -1], [0, 0, -1, -1, -1, -1, -1, -1]]
    assert batch.num_tokens == 9 and batch.num_target_tokens == 5
    assert collate([[a, b], [c]]).input_ids.shape == (2, 8)  # longest row (7) rounded up to 8
    assert collate([[]]).input_ids.shape == (1, 8)
    with pytest.raises(ValueError, match="more than row_length"):
        collate([[a, b]], 6)


# ---------------------------------------------------------------------------- StepLoader


def _docs(n: int = 37, seed: int = 0) -> list[Example]:
    rng = np.random.default_rng(seed)
    out = []
    for i in range(n):
        ids = rng.integers(1, 1000, size=int(rng.integers(2, 60))).tolist()
        labels = [IGNORE_INDEX] * (len(ids) // 3) + ids[len(ids) // 3 :]
        out.append(Example(ids, labels))
    return out


def _global_rows(loader_kw: dict[str, Any], world_size: int, micro: int, steps: int) -> list[Any]:
    """Per step: the multiset of non-empty rows over all ranks, plus the micro-batch counts."""
    loaders = [StepLoader(rank=r, world_size=world_size, micro_batch_size=micro, **loader_kw)
               for r in range(world_size)]  # fmt: skip
    out = []
    for per_rank in zip(*(iter(ld) for ld in loaders)):
        rows, counts = [], set()
        for mbs in per_rank:
            counts.add(len(mbs))
            for mb in mbs:
                for r in range(mb.input_ids.shape[0]):
                    keep = mb.document_ids[r] >= 0
                    if keep.any():
                        rows.append((tuple(mb.input_ids[r][keep].tolist()), tuple(mb.targets[r][keep].tolist())))
        assert len(counts) == 1  # every rank runs the same number of micro-batches
        out.append(sorted(rows))
        if len(out) == steps:
            break
    return out


@pytest.mark.parametrize("packing", [True, False])
def test_steploader_layout_invariant(packing: bool) -> None:
    docs = _docs()
    kw: dict[str, Any] = dict(source=docs, max_length=64, packing=packing, seed=3)
    if packing:
        kw["batch_size"] = 5
    else:
        kw.update(buckets=[16, 32, 64], token_budget=160)
    base = _global_rows(kw, 1, 1, 30)
    assert len(base) == 30  # spans several epochs
    assert _global_rows(kw, 2, 1, 30) == base
    assert _global_rows(kw, 2, 2, 30) == base
    assert _global_rows(kw, 3, 2, 30) == base
    # one epoch holds every document once
    ld = StepLoader(**kw)
    epoch = _global_rows(kw, 1, 1, ld.steps_per_epoch)
    n_tokens = sum(len(r[0]) for step in epoch for r in step)
    assert n_tokens == sum(len(d) for d in docs)


def test_steploader_resume_and_shapes() -> None:
    docs = _docs(50, seed=1)
    kw: dict[str, Any] = dict(source=docs, max_length=64, batch_size=4, micro_batch_size=2, seed=7)
    straight = [[mb.input_ids.clone() for mb in step] for step in StepLoader(max_steps=40, **kw)]
    first = StepLoader(max_steps=40, **kw)
    it = iter(first)
    for _ in range(17):
        next(it)
    state = first.state_dict()
    resumed = StepLoader(max_steps=40, **kw)
    resumed.load_state_dict(json.loads(json.dumps(state)))
    rest = [[mb.input_ids for mb in step] for step in resumed]
    assert len(rest) == 23
    for a, b in zip(straight[17:], rest):
        assert all(torch.equal(x, y) for x, y in zip(a, b))
    assert all(mb.shape == (2, 64) for step in straight for mb in step)
    with pytest.raises(ValueError, match="seed"):
        StepLoader(**{**kw, "seed": 8}).load_state_dict(state)


def test_steploader_shards_and_held_out(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    docs = [rng.integers(0, 100, size=int(n)).tolist() for n in [5, 300, 40, 7, 90, 1, 12]]
    _write_shard(tmp_path, "s", docs)
    shards = TokenShards.open(tmp_path)
    train, held = split_held_out(shards, n=2)
    assert len(train) == 5 and held[1].tolist() == docs[6]
    ld = StepLoader(train, max_length=64, packing=False, buckets=[16, 32, 64], token_budget=64, shuffle=False)
    seen = 0
    for step in ld:
        for mb in step:
            seen += int((mb.targets != IGNORE_INDEX).sum())
        if ld.step_in_epoch == ld.steps_per_epoch:
            break
    # every next-token target of the 5 training documents once, the 300-token one split in pieces
    assert seen == sum(len(d) - 1 for d in docs[:5])
