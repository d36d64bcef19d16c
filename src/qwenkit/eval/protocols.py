"""Prompting protocols: how a problem becomes a prompt, how generation stops, and how the raw
completion becomes a program.

`qwen` is the maker's protocol, QwenLM/Qwen2.5-Coder `qwencoder-eval/instruct/eval_plus`
(`model.py` ChatML decoder + `generate.py` + evalplus sanitize):

* the raw ChatML prompt below, with `{prompt}` = the task prompt `.strip()`ped;
* greedy, one sample, `max_tokens=2048` inside vLLM's `max_model_len=1536` (so in practice a
  completion ends at 1536 tokens of prompt + completion);
* stop strings: the script's global EOS list *plus* "\\n```" (the list is shared and the chat
  decoder only appends to it): "<|endoftext|>", "<|endofmask|>", "</s>", "\\nif __name__",
  "\\ndef main(", "\\nprint(", "\\n#", "\\n```"; the EOS tokens <|im_end|>/<|endoftext|> stop too;
* the text has tabs replaced by 4 spaces and is cut at the first "```"; then `sanitize`.

`chat-template` (our variant, reported separately): the model's own chat template (default
system prompt), the same user request, no assistant prefill; the answer's fenced Python blocks
are extracted, then sanitized the same way.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from qwenkit.eval.sanitize import extract_fenced_code, sanitize

QWEN_SYSTEM = "You are an intelligent programming assistant to produce Python algorithmic solutions"
QWEN_USER = "Can you complete the following Python function?\n```python\n{prompt}\n```\n"
QWEN_CHATML = (
    "<|im_start|>system\n" + QWEN_SYSTEM + "<|im_end|>\n"
    "<|im_start|>user\n" + QWEN_USER + "<|im_end|>\n"
    "<|im_start|>assistant\n```python\n"
)
QWEN_STOP = ["<|endoftext|>", "<|endofmask|>", "</s>", "\nif __name__", "\ndef main(", "\nprint(", "\n#", "\n```"]
MAX_NEW_TOKENS = 2048
MAX_MODEL_LEN = 1536  # the maker's vLLM `max_model_len`


@dataclass(frozen=True)
class Protocol:
    name: str
    stop: tuple[str, ...]
    max_tokens: int = MAX_NEW_TOKENS
    max_model_len: int | None = MAX_MODEL_LEN

    def prompt(self, problem_prompt: str, tokenizer: Any) -> str:
        if self.name == "qwen":
            return QWEN_CHATML.format(prompt=problem_prompt.strip())
        user = QWEN_USER.format(prompt=problem_prompt.strip()).rstrip("\n")
        return tokenizer.apply_chat_template([{"role": "user", "content": user}], add_generation_prompt=True)

    def max_new_tokens(self, prompt_len: int) -> int:
        """`max_tokens`, capped so prompt + completion fits `max_model_len` (vLLM semantics)."""
        if self.max_model_len is None:
            return self.max_tokens
        room = self.max_model_len - prompt_len
        if room < 1:
            raise ValueError(f"prompt of {prompt_len} tokens leaves no room in max_model_len {self.max_model_len}")
        return min(self.max_tokens, room)

    def postprocess(self, completion: str, entry_point: str) -> str:
        """Raw completion -> the program that is executed."""
        text = completion.replace("\t", "    ")
        if self.name == "qwen":
            text = text.split("```")[0]
        else:
            text = extract_fenced_code(text)
        return sanitize(text, entry_point)


PROTOCOLS = {
    "qwen": Protocol("qwen", tuple(QWEN_STOP)),
    "chat-template": Protocol("chat-template", (), max_model_len=None),
}


def get_protocol(name: str) -> Protocol:
    try:
        return PROTOCOLS[name]
    except KeyError:
        raise ValueError(f"unknown protocol {name!r}; choose from {sorted(PROTOCOLS)}") from None
