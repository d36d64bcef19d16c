"""Code-generation and language-model evaluation: HumanEval, MBPP+, perplexity.

`humaneval` / `mbpp` build the prompts of a protocol (`protocols`), generate every sample in
one engine batch (`generation`), sanitize the completions (`sanitize`), execute them against the
tests in a sandbox (`sandbox`), and score pass@k (`passk`); `report` prints and writes results.
"""
