"""A generated tiny Qwen2.5-style tokenizer for fast tests (no model file, no network).

Byte-level BPE with Qwen2's normaliser / split regex / decoder, merges learnt from
``fixtures/tiny_bpe_corpus.txt`` by a small deterministic trainer below, then Qwen2.5's 22 control
tokens right after the regular tokens in Qwen's order (``<|endoftext|>`` = first control id, like
151643) and ``[PAD<id>]`` fillers up to a multiple of 64 (like the GGUF's 151,936). Ids 0-255 are
the single bytes in GPT-2 order, as in Qwen's vocabulary. The chat template is Qwen2.5's
(``fixtures/qwen2.5_chat_template.jinja``). Written as a Hugging Face folder (tokenizer.json +
tokenizer_config.json) that ``Tokenizer.from_hf_dir`` and transformers both load.
"""
from __future__ import annotations

import json
import unicodedata
from collections import Counter
from pathlib import Path

FIXTURES = Path(__file__).resolve().parent / "fixtures"
CHAT_TEMPLATE = (FIXTURES / "qwen2.5_chat_template.jinja").read_text(encoding="utf-8")

# Qwen2.5's control tokens in id order (151643 + offset in the real vocabulary).
CONTROL_TOKENS = (
    "<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|object_ref_start|>", "<|object_ref_end|>",
    "<|box_start|>", "<|box_end|>", "<|quad_start|>", "<|quad_end|>", "<|vision_start|>",
    "<|vision_end|>", "<|vision_pad|>", "<|image_pad|>", "<|video_pad|>", "<tool_call>",
    "</tool_call>", "<|fim_prefix|>", "<|fim_middle|>", "<|fim_suffix|>", "<|fim_pad|>",
    "<|repo_name|>", "<|file_sep|>",
)  # fmt: skip
# Not special in Qwen's tokenizer_config.json (they survive skip_special_tokens).
NON_SPECIAL = frozenset(CONTROL_TOKENS[14:])
# Qwen2's pre-tokenizer split pattern, as in its tokenizer.json.
SPLIT_REGEX = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
    r"|\s*[\r\n]+|\s+(?!\S)|\s+"
)
NUM_MERGES = 256
PAD_MULTIPLE = 64


def byte_alphabet() -> list[str]:
    """GPT-2's byte -> printable character map, in vocabulary order (ids 0-255)."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    chars = [chr(b) for b in bs]
    n = 0
    for b in range(256):
        if b not in bs:
            chars.append(chr(256 + n))
            n += 1
    return chars


def _pre_tokenizer():  # type: ignore[no-untyped-def]
    from tokenizers import Regex, pre_tokenizers

    return pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(SPLIT_REGEX), behavior="isolated", invert=False),
            pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=False, use_regex=False),
        ]
    )


def train_merges(text: str, num_merges: int = NUM_MERGES) -> list[tuple[str, str]]:
    """Greedy BPE: merge the most frequent adjacent pair (ties: the largest pair) until
    `num_merges` merges or no pair occurs twice. Deterministic, independent of library versions."""
    words = Counter(p for p, _ in _pre_tokenizer().pre_tokenize_str(unicodedata.normalize("NFC", text)))
    splits = {w: list(w) for w in words}
    known = set(byte_alphabet())
    merges: list[tuple[str, str]] = []
    while len(merges) < num_merges:
        pairs: Counter[tuple[str, str]] = Counter()
        for w, n in words.items():
            s = splits[w]
            for pair in zip(s, s[1:]):
                pairs[pair] += n
        best = max(((n, p) for p, n in pairs.items() if n >= 2 and p[0] + p[1] not in known), default=None)
        if best is None:
            break
        a, b = best[1]
        merges.append((a, b))
        known.add(a + b)
        for w, s in splits.items():
            i, out = 0, []
            while i < len(s):
                if i + 1 < len(s) and s[i] == a and s[i + 1] == b:
                    out.append(a + b)
                    i += 2
                else:
                    out.append(s[i])
                    i += 1
            splits[w] = out
    return merges


def build_backend():  # type: ignore[no-untyped-def]
    """The `tokenizers.Tokenizer`: byte tokens, merges, control tokens, [PAD] fillers."""
    from tokenizers import AddedToken, Tokenizer, decoders, normalizers, processors
    from tokenizers.models import BPE

    merges = train_merges((FIXTURES / "tiny_bpe_corpus.txt").read_text(encoding="utf-8"))
    regular = byte_alphabet() + [a + b for a, b in merges]
    base = len(regular)
    total = -(-(base + len(CONTROL_TOKENS)) // PAD_MULTIPLE) * PAD_MULTIPLE
    tokens = regular + list(CONTROL_TOKENS) + [f"[PAD{i}]" for i in range(base + len(CONTROL_TOKENS), total)]
    vocab = {t: i for i, t in enumerate(tokens)}
    assert len(vocab) == total, "duplicate tokens"
    tok = Tokenizer(
        BPE(vocab=vocab, merges=merges, dropout=None, unk_token=None, continuing_subword_prefix="",
            end_of_word_suffix="", fuse_unk=False, byte_fallback=False)
    )  # fmt: skip
    tok.normalizer = normalizers.NFC()
    tok.pre_tokenizer = _pre_tokenizer()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    tok.decoder = decoders.ByteLevel()
    tok.add_tokens(
        [AddedToken(t, single_word=False, lstrip=False, rstrip=False, normalized=False, special=t not in NON_SPECIAL)
         for t in CONTROL_TOKENS]
    )  # fmt: skip
    return tok


def write_tiny_tokenizer(out: Path) -> Path:
    """tokenizer.json + tokenizer_config.json (Qwen2.5-Instruct's settings) into `out`."""
    out.mkdir(parents=True, exist_ok=True)
    tok = build_backend()
    tok.save(str(out / "tokenizer.json"))
    base = tok.token_to_id(CONTROL_TOKENS[0])
    decoder = {
        str(base + k): {"content": t, "lstrip": False, "normalized": False, "rstrip": False, "single_word": False,
                        "special": t not in NON_SPECIAL}
        for k, t in enumerate(CONTROL_TOKENS)
    }  # fmt: skip
    cfg = {
        "add_bos_token": False,
        "add_prefix_space": False,
        "added_tokens_decoder": decoder,
        "additional_special_tokens": [t for t in CONTROL_TOKENS[1:14] if t != "<|im_end|>"],
        "bos_token": None,
        "chat_template": CHAT_TEMPLATE,
        "clean_up_tokenization_spaces": False,
        "eos_token": "<|im_end|>",
        "errors": "replace",
        "model_max_length": 32768,
        "pad_token": "<|endoftext|>",
        "split_special_tokens": False,
        "tokenizer_class": "Qwen2Tokenizer",
        "unk_token": None,
    }
    (out / "tokenizer_config.json").write_text(json.dumps(cfg, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    return out
